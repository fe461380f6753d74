"""The guard that keeps the notebooks offline (tests/offline/sitecustomize.py)."""

import os
import subprocess
import sys
from pathlib import Path

OFFLINE = Path(__file__).parent / "offline"

PROBE = r"""
import socket, sys
assert getattr(socket, "ATTN_COURSE_OFFLINE", False), "guard not installed"
for target in [("192.0.2.1", 80), ("2001:db8::1", 443)]:   # documentation addresses: never reached
    family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.connect(target)
    except OSError as exc:
        assert "network access is disabled" in str(exc), exc
    else:
        sys.exit("connected")
    finally:
        s.close()
try:
    socket.getaddrinfo("example.com", 80)
except OSError as exc:
    assert "no name lookup" in str(exc)
else:
    sys.exit("resolved")
server = socket.socket(); server.bind(("127.0.0.1", 0)); server.listen(1)
client = socket.socket(); client.connect(server.getsockname())   # loopback stays open
client.close(); server.close()
print("offline ok")
"""


def test_the_guard_refuses_the_network_and_keeps_loopback():
    env = {**os.environ, "PYTHONPATH": str(OFFLINE)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "offline ok" in out.stdout
