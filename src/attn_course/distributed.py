r"""Chapter 7: ring attention over ``torch.distributed`` (Liu et al., 2023).

The sequence is cut into ``W`` contiguous shards, one per process (rank). Rank
``r`` keeps its queries and, at step ``s = 0, ..., W - 1``, holds the key/value
shard of rank ``(r - s) mod W``: it computes attention of its queries over that
shard (in tiles, with the log-sum-exp, as :func:`attn_course.flash.flash_attention`),
merges it into its running result (:func:`attn_course.flash.merge_attention`, in
float32 for half-precision inputs), and passes
the shard on to rank ``r + 1`` while receiving the next one from rank ``r - 1``.
The send of step ``s + 1``'s shard is posted *before* step ``s``'s compute, so
communication overlaps computation. After ``W`` steps every rank has seen every
key exactly once, and its output equals its rows of dense attention.

The same code runs on CPUs with the gloo backend (local processes started by
:func:`run_ring_attention`) and on GPUs with NCCL: only ``backend`` changes.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist

from . import _checks
from .basics import _check_qkv
from .flash import _flash, merge_attention

__all__ = ["ring_attention", "run_ring_attention", "ring_attention_profile", "ring_schedule"]


def ring_schedule(world_size: int) -> list[list[int]]:
    """``schedule[s][r]``: the rank whose key/value shard rank ``r`` holds at step ``s`` (``(r - s) mod W``)."""
    w = _checks.positive_number("world_size", world_size, integer=True)
    return [[(r - s) % w for r in range(w)] for s in range(w)]


def _check_shards(query, key, value) -> None:
    _check_qkv(query, key, value)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be a (B, H, L/W, d) shard, got shape {tuple(x.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same feature size d_k; got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    if query.shape[:2] != key.shape[:2] or key.shape[:2] != value.shape[:2]:
        raise ValueError(f"query, key and value shards must share (B, H); got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}, value {tuple(value.shape)}")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"each rank must hold equal query and key shards (contiguous pieces of one "
                         f"sequence); got query {tuple(query.shape)}, key {tuple(key.shape)}")


def _ring(query, key, value, is_causal, group, stats, block=256, compute=True):
    _check_shards(query, key, value)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ring_attention must be called on every rank of an initialised "
                           "torch.distributed process group (see run_ring_attention)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    send_to = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    recv_from = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    # Every rank must hold a shard of the same shape, or the ring's buffers do not match.
    shape = torch.tensor([*key.shape, value.shape[-1]], device=key.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise ValueError(f"every rank must hold shards of the same shape; got (B, H, L/W, d_k, d_v) = "
                         f"{[tuple(s.tolist()) for s in shapes]}")
    k_cur, v_cur = key.contiguous(), value.contiguous()
    out = lse = None                                     # the running result, merged step by step
    for step in range(world):
        source = (rank - step) % world                   # whose keys we hold now
        pending = []
        if step < world - 1:                             # post the transfer first: it overlaps the compute
            k_next, v_next = torch.empty_like(k_cur), torch.empty_like(v_cur)
            ops = [dist.P2POp(dist.isend, k_cur, send_to, group), dist.P2POp(dist.isend, v_cur, send_to, group),
                   dist.P2POp(dist.irecv, k_next, recv_from, group),
                   dist.P2POp(dist.irecv, v_next, recv_from, group)]
            pending = dist.batch_isend_irecv(ops)
            if stats is not None:
                stats["bytes_sent"] += k_cur.nbytes + v_cur.nbytes
        start = time.perf_counter()
        # causal: keys entirely before our queries need no mask, our own shard is causal within
        # itself, and shards after ours hold only future keys: nothing to compute
        needed = compute and (not is_causal or source <= rank)
        if needed:
            o, s = _flash(query, k_cur, v_cur, is_causal and source == rank, block, block, None)
            if out is None:
                out, lse = o.to(s.dtype), s
            else:
                out, lse = merge_attention([out, o.to(s.dtype)], [lse, s])
        if stats is not None:
            stats["compute_s"] += time.perf_counter() - start
            stats["blocks_computed"] += int(needed)
        start = time.perf_counter()
        for req in pending:
            req.wait()
        if stats is not None:
            stats["wait_s"] += time.perf_counter() - start
        if pending:
            k_cur, v_cur = k_next, v_next
    if out is None:   # compute=False: the communication alone
        return torch.zeros(*query.shape[:-1], value.shape[-1], dtype=value.dtype, device=value.device)
    return out.to(value.dtype)


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   is_causal: bool = False, group=None) -> torch.Tensor:
    r"""Rank ``r``'s shard of exact attention over the whole sequence, by passing key/value shards in a ring.

    Call on every rank of an initialised process group (gloo on CPUs, NCCL on GPUs).
    Rank ``r`` holds the ``r``-th contiguous shard of the sequence:

    Args:
        query: ``(B, H, L/W, d_k)``; key: ``(B, H, L/W, d_k)``; value: ``(B, H, L/W, d_v)``.
        is_causal: causal in *global* positions: query ``i`` sees keys ``j <= i`` of the whole
            sequence. Shards after rank ``r`` are then skipped (they still pass through).
        group: the process group (the default group when None).

    At step ``s`` rank ``r`` attends over the shard of rank ``(r - s) mod W`` (in tiles of
    256, as :func:`attn_course.flash.flash_attention`) and merges the partial result into
    its running one with the log-sum-exp rule of :func:`attn_course.flash.merge_attention`.
    Each rank sends ``W - 1`` key/value shards in all: ``(W - 1)/W`` of the bytes of the
    sequence's ``K`` and ``V``.

    Returns:
        ``(B, H, L/W, d_v)``: rank ``r``'s rows of ``softmax(Q K^T / sqrt(d_k)) V``.
    """
    return _ring(query, key, value, bool(is_causal), group, None)


def _loopback_interface() -> str | None:
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None  # pragma: no cover - every system the course runs on has one


def _worker(rank, world_size, init_file, backend, query, key, value, is_causal, out, stats_out, warmup,
            threads):
    # Share the machine's cores between the local processes instead of oversubscribing them.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        shard = query.shape[2] // world_size
        sl = slice(rank * shard, (rank + 1) * shard)
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        q, k, v = (x[:, :, sl].to(device) for x in (query, key, value))
        stats = {"bytes_sent": 0, "compute_s": 0.0, "wait_s": 0.0, "blocks_computed": 0}
        if warmup:  # connect the ring's peers once, so that the timed run measures the ring itself
            _ring(q, k, v, is_causal, None, None)
        dist.barrier()
        start = time.perf_counter()
        result = _ring(q, k, v, is_causal, None, stats)
        stats["total_s"] = time.perf_counter() - start
        out[:, :, sl] = result.to(out.device)
        comm_s = 0.0
        if warmup:  # the same transfers without any compute: what communication alone costs
            dist.barrier()
            start = time.perf_counter()
            _ring(q, k, v, is_causal, None, None, compute=False)
            comm_s = time.perf_counter() - start
        stats_out[rank] = torch.tensor([stats["bytes_sent"], stats["compute_s"], stats["wait_s"],
                                        stats["blocks_computed"], stats["total_s"], comm_s], dtype=torch.float64)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _launch(query, key, value, world_size, is_causal, backend, warmup=False, threads=None):
    _check_qkv(query, key, value)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be (B, H, L, d), got shape {tuple(x.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same feature size d_k; got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    if not (query.shape[:3] == key.shape[:3] and key.shape[:3] == value.shape[:3]):
        raise ValueError(f"ring attention needs query, key and value of one sequence: equal (B, H, L); "
                         f"got query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
    world_size = _checks.positive_number("world_size", world_size, integer=True)
    L = query.shape[2]
    if L % world_size:
        raise ValueError(f"world_size={world_size} must divide the sequence length L={L} "
                         f"(each rank holds L / world_size positions)")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU processes) or 'nccl' (one GPU per process), got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend='nccl' needs world_size={world_size} GPUs, found {torch.cuda.device_count()}")
    if not dist.is_available():  # pragma: no cover
        raise RuntimeError("this PyTorch build has no torch.distributed")
    import torch.multiprocessing as mp

    out = torch.zeros(*query.shape[:3], value.shape[-1], dtype=value.dtype).share_memory_()
    stats = torch.zeros(world_size, 6, dtype=torch.float64).share_memory_()
    inputs = [x.detach().cpu().contiguous().share_memory_() for x in (query, key, value)]
    env_set = "GLOO_SOCKET_IFNAME" not in os.environ and _loopback_interface() is not None
    if env_set:   # keep gloo's connections on this machine (spawned workers inherit the variable)
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    with tempfile.TemporaryDirectory(prefix="attn-course-ring-") as tmp:
        try:
            mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "rendezvous"), backend, *inputs,
                                              bool(is_causal), out, stats, warmup, threads),
                               nprocs=world_size, join=True, start_method="spawn")
        finally:
            if env_set:
                del os.environ["GLOO_SOCKET_IFNAME"]
    return out.to(query.device), stats


def run_ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, world_size: int, *,
                       is_causal: bool = False, backend: str = "gloo") -> torch.Tensor:
    """Start ``world_size`` local processes, run :func:`ring_attention`, and gather the result.

    Args:
        query, key: ``(B, H, L, d_k)``; value: ``(B, H, L, d_v)``: the whole sequence.
            Rank ``r`` gets positions ``[r L/W, (r + 1) L/W)``.
        world_size: the number of processes ``W``; it must divide ``L``.
        is_causal: causal attention in global positions.
        backend: ``"gloo"`` (CPU processes) or ``"nccl"`` (one GPU per process).

    Returns:
        ``(B, H, L, d_v)``, equal to dense attention over the whole sequence.
    """
    out, _ = _launch(query, key, value, world_size, is_causal, backend)
    return out


def ring_attention_profile(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, world_size: int, *,
                           is_causal: bool = False, backend: str = "gloo",
                           threads: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """:func:`run_ring_attention` that also reports, per rank, what the ring cost.

    Returns ``(output, stats)`` with one dict per rank: ``bytes_sent`` (key/value bytes it sent),
    ``compute_s`` (seconds in attention), ``wait_s`` (seconds waiting for the next shard after
    computing: communication that did not overlap), ``blocks_computed`` (key shards it attended
    over), ``total_s`` (its wall-clock time in the ring) and ``comm_only_s`` (the same
    transfers run again without any compute: if ``total_s`` is close to ``compute_s`` while
    ``comm_only_s`` is not small, the transfers were hidden behind the compute). ``wait_s``
    also holds waiting for a slower neighbour (the causal imbalance) and, on a busy machine,
    for the scheduler. The timed pass follows an untimed one, so that connecting the
    processes is not counted. ``threads``: CPU threads per process (default: the machine's
    cores shared out between the processes).
    """
    if threads is not None:
        threads = _checks.positive_number("threads", threads, integer=True)
    out, stats = _launch(query, key, value, world_size, is_causal, backend, warmup=True, threads=threads)
    keys = ("bytes_sent", "compute_s", "wait_s", "blocks_computed", "total_s", "comm_only_s")
    rows = [dict(zip(keys, row.tolist())) for row in stats]
    for row in rows:
        row["bytes_sent"], row["blocks_computed"] = int(row["bytes_sent"]), int(row["blocks_computed"])
    return out, rows
