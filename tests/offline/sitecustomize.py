"""Imported at start-up by every Python process whose PYTHONPATH holds this folder
(`make nbval` puts it there, so the notebook kernels get it): refuse every network
connection that does not stay on this machine, before any packet is sent. Loopback
stays open, because Jupyter kernels talk to their client over 127.0.0.1."""

import ipaddress
import socket

_connect = socket.socket.connect
_connect_ex = socket.socket.connect_ex
_getaddrinfo = socket.getaddrinfo


class NetworkDisabled(OSError):
    """Raised for any connection off this machine while the course runs offline."""


def _local(address) -> bool:
    if isinstance(address, (str, bytes)):            # AF_UNIX sockets
        return True
    host = address[0]
    if host in ("localhost", "", None):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _guarded_connect(self, address):
    if not _local(address):
        raise NetworkDisabled(f"network access is disabled for the notebooks: refused {address!r}")
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    if not _local(address):
        raise NetworkDisabled(f"network access is disabled for the notebooks: refused {address!r}")
    return _connect_ex(self, address)


def _guarded_getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost", "") and not _local((host,)):
        raise NetworkDisabled(f"network access is disabled for the notebooks: no name lookup for {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo
socket.ATTN_COURSE_OFFLINE = True
