r"""Chapter 10: one sequence on many devices, over ``torch.distributed``.

Two families of *context parallelism* split one sequence of length ``L`` over ``W``
processes (ranks), each holding ``L / W`` positions:

**Ring attention** (Liu et al., 2023). Rank ``r`` keeps its queries and, at step
``s = 0, ..., W - 1`` (steps count from 0), holds the key/value shard of rank
``(r - s) mod W``: it computes attention of its queries over that shard (in tiles, with
the log-sum-exp, as :func:`attn_course.flash.flash_attention`), merges it into its running
result (:func:`attn_course.flash.merge_attention`, in float32 for half-precision inputs),
and passes the shard on to rank ``r + 1`` while receiving the next one from rank ``r - 1``.
The transfer of step ``s + 1``'s shard is posted *before* step ``s``'s compute, so
communication overlaps computation. After ``W`` steps every rank has seen every key once.

With causal attention and *contiguous* shards (rank ``r`` holds positions
``[r L/W, (r + 1) L/W)``), rank ``r`` needs only the shards of ranks ``<= r``: rank 0 works
one step, rank ``W - 1`` all ``W``. The **zigzag** layout cuts the sequence into ``2W``
chunks and gives rank ``r`` chunks ``r`` and ``2W - 1 - r`` (an early and a late one), so
that every rank computes the same number of scores (as in Llama 3's context parallelism,
Dubey et al., 2024; striped attention, Brandon et al., 2023, is the round-robin variant).

**Ulysses** (DeepSpeed-Ulysses, Jacobs et al., 2023). An all-to-all turns sequence shards
into head shards: afterwards rank ``j`` holds all ``L`` positions of heads
``[j H/W, (j + 1) H/W)``, computes ordinary attention for them, and a second all-to-all
returns the output to sequence shards. It needs ``W`` to divide the number of heads.

Both run on CPUs with the gloo backend (local processes started by
:func:`run_ring_attention`, :func:`run_ulysses_attention` or :func:`profile_attention`) and
on GPUs with NCCL: only ``backend`` changes. The ring uses point-to-point
``batch_isend_irecv``; Ulysses uses ``all_to_all_single``, which gloo implements for CPU
tensors (and NCCL for GPU tensors).

Keys and values may have fewer heads than queries (grouped-query attention, GQA): their number
``G`` must divide ``H``, and query head ``h`` reads key/value head ``h // (H / G)``, as in
``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)``.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from . import _checks
from .flash import _flash, merge_attention

__all__ = ["ring_attention", "run_ring_attention", "ulysses_attention", "run_ulysses_attention",
           "ring_attention_profile", "profile_attention", "ring_schedule", "shard_positions",
           "sequence_to_head_shards", "bytes_sent_per_rank", "overlap_threshold", "LAYOUTS"]

LAYOUTS = ("contiguous", "zigzag")
SCHEMES = ("ring", "ulysses")
_BLOCK = 256                      # the tile size of the attention each rank computes
_STAT_KEYS = ("bytes_sent", "scores_computed", "blocks_computed", "compute_s", "compute_cpu_s",
              "wait_s", "total_s", "comm_only_s")
_COUNT_KEYS = ("bytes_sent", "scores_computed", "blocks_computed")


# --- layouts and counts ------------------------------------------------------------------------------

def ring_schedule(world_size: int) -> list[list[int]]:
    """``schedule[s][r]``: the rank whose key/value shard rank ``r`` holds at step ``s`` (``(r - s) mod W``).

    Steps count from 0: at step 0 every rank holds its own shard.

    Example:
        >>> from attn_course.distributed import ring_schedule
        >>> ring_schedule(3)
        [[0, 1, 2], [2, 0, 1], [1, 2, 0]]
    """
    w = _checks.positive_number("world_size", world_size, integer=True)
    return [[(r - s) % w for r in range(w)] for s in range(w)]


def _check_layout(layout) -> str:
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return layout


def _check_split(length: int, world_size: int, layout: str) -> None:
    if layout == "zigzag" and length % (2 * world_size):
        raise ValueError(f"world_size={world_size}: the zigzag layout cuts the sequence into 2 * world_size = "
                         f"{2 * world_size} chunks of equal length, which L={length} does not allow")
    if length % world_size:
        raise ValueError(f"world_size={world_size} must divide the sequence length L={length} "
                         f"(each rank holds L / world_size positions)")


def shard_positions(length: int, world_size: int, rank: int, layout: str = "contiguous") -> torch.Tensor:
    """The global positions rank ``rank`` holds, in the order it stores them: ``(L / W,)`` int64.

    ``"contiguous"``: ``[r L/W, (r + 1) L/W)``. ``"zigzag"``: the sequence is cut into ``2W``
    chunks of ``L / (2W)``; rank ``r`` holds chunk ``r`` followed by chunk ``2W - 1 - r``
    (increasing positions, so a causal mask within the shard is the causal mask of the
    sequence). ``L`` must split into ``W`` (contiguous) or ``2W`` (zigzag) equal pieces,
    else a ``ValueError`` names ``world_size``.

    Example:
        >>> from attn_course.distributed import shard_positions
        >>> shard_positions(16, 4, 0, "zigzag").tolist(), shard_positions(16, 4, 3, "zigzag").tolist()
        ([0, 1, 14, 15], [6, 7, 8, 9])
    """
    length = _checks.positive_number("length", length, integer=True)
    world_size = _checks.positive_number("world_size", world_size, integer=True)
    layout = _check_layout(layout)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
    _check_split(length, world_size, layout)
    if layout == "contiguous":
        n = length // world_size
        return torch.arange(rank * n, (rank + 1) * n)
    c = length // (2 * world_size)
    late = 2 * world_size - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange(late * c, (late + 1) * c)])


def _ring_pieces(layout: str, rank: int, source: int, is_causal: bool, n: int) -> list[tuple]:
    """What ``rank`` computes with the key/value shard of ``source``: ``(query rows, key rows, causal)``.

    Contiguous: a shard before ours is attended in full, ours with the causal mask, one after
    ours not at all. Zigzag (we hold chunks ``r < 2W-1-r``, the source ``s`` and ``2W-1-s``):
    if ``s < r``, chunk ``s`` precedes both of ours and chunk ``2W-1-s`` follows both, so all
    our queries see the first half of its keys; if ``s > r``, both of its chunks lie between
    ours, so our late chunk sees all of its keys and our early chunk none. Either way half a
    shard-by-shard product: the same work on every rank at every step after the first.
    """
    rows = slice(0, n)
    if not is_causal:
        return [(rows, rows, False)]
    if source == rank:
        return [(rows, rows, True)]
    if layout == "contiguous":
        return [(rows, rows, False)] if source < rank else []
    h = n // 2
    if source < rank:
        return [(rows, slice(0, h), False)]
    return [(slice(h, n), rows, False)]


def _pairs(n_q: int, n_k: int, causal: bool) -> int:
    """Query-key scores a piece needs (the causal pieces are square: the diagonal block)."""
    return n_q * (n_q + 1) // 2 if causal else n_q * n_k


def _replication(world_size: int, num_kv_heads: int) -> int:
    """How many copies of each key/value head Ulysses sends, so that ``W`` divides the KV heads."""
    return world_size // math.gcd(world_size, num_kv_heads)


def bytes_sent_per_rank(scheme: str, *, batch: int, num_heads: int, num_kv_heads: int | None = None,
                        length: int, head_dim: int, world_size: int, bytes_per_value: int = 2,
                        value_dim: int | None = None) -> int:
    r"""Bytes one rank sends to the others in one attention forward pass.

    With ``L/W`` positions per rank, ``G = num_kv_heads`` (default ``H``), ``d_k = head_dim``,
    ``d_v = value_dim`` (default ``d_k``) and ``n_bytes = bytes_per_value``:

    * ``"ring"``: ``W - 1`` key/value shards, ``(W - 1) B G (L/W) (d_k + d_v) n_bytes``: about
      the sequence's whole ``K`` and ``V``, whatever ``W``.
    * ``"ulysses"``: of each all-to-all a rank keeps ``1/W`` and sends the rest. In: queries
      ``B H (L/W) d_k`` and keys/values ``B G f (L/W) (d_k + d_v)``, where each key/value head is
      sent ``f = W / gcd(W, G)`` times so that every rank gets the key/value heads of its query
      heads (``f = 1`` when ``W`` divides ``G``); out: the output ``B H (L/W) d_v``. In all,
      ``(W - 1)/W [B H (L/W) (d_k + d_v) + B G f (L/W) (d_k + d_v)] n_bytes``, which falls as ``1/W``.

    For multi-head attention this is ``4 (W - 1)/W^2 L H d`` values, which approaches the
    ``4 L h / W`` (``h = H d``) that Jacobs et al. (2023) count. Both schemes need ``W`` to
    divide ``L``, Ulysses also ``W`` to divide ``H`` (else a ``ValueError`` names ``world_size``).

    Example:
        One layer of 32 query and 8 key/value heads of 128, 128k tokens in bf16, over 8 devices (MiB):

        >>> from attn_course.distributed import bytes_sent_per_rank
        >>> sizes = dict(batch=1, num_heads=32, num_kv_heads=8, length=131072, head_dim=128, world_size=8)
        >>> bytes_sent_per_rank("ring", **sizes) / 2**20, bytes_sent_per_rank("ulysses", **sizes) / 2**20
        (448.0, 280.0)
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    B = _checks.positive_number("batch", batch, integer=True)
    H = _checks.positive_number("num_heads", num_heads, integer=True)
    H_kv = H if num_kv_heads is None else _checks.positive_number("num_kv_heads", num_kv_heads, integer=True)
    L = _checks.positive_number("length", length, integer=True)
    d_k = _checks.positive_number("head_dim", head_dim, integer=True)
    d_v = d_k if value_dim is None else _checks.positive_number("value_dim", value_dim, integer=True)
    W = _checks.positive_number("world_size", world_size, integer=True)
    b = _checks.positive_number("bytes_per_value", bytes_per_value, integer=True)
    if H % H_kv:
        raise ValueError(f"num_kv_heads={H_kv} must divide num_heads={H}")
    _check_split(L, W, "contiguous")
    n = L // W
    if scheme == "ring":
        return (W - 1) * B * H_kv * n * (d_k + d_v) * b
    if H % W:
        raise ValueError(f"world_size={W} must divide the number of heads num_heads={H} "
                         f"(Ulysses gives each rank num_heads / world_size heads)")
    kv_heads_sent = H_kv * _replication(W, H_kv)
    per_rank = B * H * n * (d_k + d_v) + B * kv_heads_sent * n * (d_k + d_v)
    return (W - 1) * per_rank // W * b


def overlap_threshold(flops_per_s: float, bytes_per_s: float, *, bytes_per_value: int = 2,
                      num_heads: int = 1, num_kv_heads: int | None = None, is_causal: bool = False) -> float:
    r"""The fewest positions per rank, ``L / W``, for which the ring hides its transfers.

    At each step a rank computes ``Q K^T`` and ``P V`` for its ``L/W`` queries against ``L/W``
    keys, ``4 (L/W)^2 d H`` FLOPs (half of it with causal attention and a balanced layout), while
    it sends one key/value shard, ``2 (L/W) d G n_bytes`` bytes. With ``R_comp`` FLOP/s and a link
    of ``R_link`` bytes/s, the transfer hides behind the compute when
    ``4 (L/W)^2 d H / R_comp >= 2 (L/W) d G n_bytes / R_link``:

    .. math:: \frac{L}{W} \ge \frac{R_\text{comp}}{R_\text{link}} \cdot \frac{n_\text{bytes}}{2}
              \cdot \frac{G}{H} \quad(\times 2 \text{ if causal})

    ``d`` cancels. With bf16 (``n_bytes = 2``) and multi-head attention this is Liu et al.'s
    (2023) condition, block size >= FLOPS / bandwidth.

    Args:
        flops_per_s: ``R_comp``, the attention FLOP rate one device reaches.
        bytes_per_s: ``R_link``, the link's bandwidth in one direction.
        bytes_per_value: ``n_bytes``; num_heads, num_kv_heads: ``H`` and ``G`` (default ``H``).
        is_causal: causal attention with zigzag shards: half the scores per step.

    Example:
        An H100 (989 TFLOP/s in bf16) on NVLink (450 GB/s each way); then causal, with GQA 32/8:

        >>> from attn_course.distributed import overlap_threshold
        >>> round(overlap_threshold(989e12, 450e9))
        2198
        >>> round(overlap_threshold(989e12, 450e9, num_heads=32, num_kv_heads=8, is_causal=True))
        1099
    """
    F = _checks.positive_number("flops_per_s", flops_per_s)
    Bw = _checks.positive_number("bytes_per_s", bytes_per_s)
    b = _checks.positive_number("bytes_per_value", bytes_per_value, integer=True)
    H = _checks.positive_number("num_heads", num_heads, integer=True)
    H_kv = H if num_kv_heads is None else _checks.positive_number("num_kv_heads", num_kv_heads, integer=True)
    return F / Bw * b / 2 * H_kv / H * (2 if is_causal else 1)


def sequence_to_head_shards(shards) -> list[torch.Tensor]:
    """Ulysses' first all-to-all, in one process: what every rank holds afterwards.

    Args:
        shards: ``W`` tensors ``(B, H, L/W, d)``, rank ``r``'s contiguous sequence shard.

    Returns:
        ``W`` tensors ``(B, H/W, L, d)``: rank ``j`` holds heads ``[j H/W, (j + 1) H/W)`` at
        every position. (:func:`ulysses_attention` does this with ``all_to_all_single``.)

    Example:
        >>> import torch
        >>> from attn_course.distributed import sequence_to_head_shards
        >>> x = torch.randn(1, 4, 8, 2)                        # (B, H, L, d)
        >>> after = sequence_to_head_shards(list(x.chunk(2, dim=2)))
        >>> [tuple(a.shape) for a in after], torch.equal(after[1], x[:, 2:])
        ([(1, 2, 8, 2), (1, 2, 8, 2)], True)
    """
    if isinstance(shards, torch.Tensor) or not isinstance(shards, (list, tuple)) or not shards:
        raise TypeError("shards must be a non-empty list of (B, H, L/W, d) tensors, one per rank")
    for i, s in enumerate(shards):
        _checks.float_tensor(f"shards[{i}]", s, ndim=4)
        if s.shape != shards[0].shape:
            raise ValueError(f"shards[{i}] has shape {tuple(s.shape)} but shards[0] has {tuple(shards[0].shape)}")
    W, H = len(shards), shards[0].shape[1]
    if H % W:
        raise ValueError(f"world_size={W} (the number of shards) must divide the number of heads H={H}")
    whole = torch.cat(list(shards), dim=2)                        # (B, H, L, d), positions in rank order
    return list(whole.split(H // W, dim=1))                       # rank j: heads j H/W .. (j+1) H/W - 1


# --- checks ---------------------------------------------------------------------------------------------

def _check_heads(query, key, value, what: str) -> None:
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.float_tensor(name, x)
    _checks.same_dtype_device(query=query, key=key, value=value)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name} must be a (B, H, {what}, d) tensor, got shape {tuple(x.shape)}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same feature size d_k; got query "
                         f"{tuple(query.shape)}, key {tuple(key.shape)}")
    if key.shape[:2] != value.shape[:2] or query.shape[0] != key.shape[0] or query.shape[1] % key.shape[1]:
        raise ValueError(f"query (B, H, ...), key and value (B, G, ...) must share B, and key and value "
                         f"one number of heads G that divides H; got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                         f"value {tuple(value.shape)}")


def _check_shards(query, key, value) -> None:
    _check_heads(query, key, value, "L/W")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"each rank must hold equal query and key shards (pieces of one "
                         f"sequence); got query {tuple(query.shape)}, key {tuple(key.shape)}")


def _require_group(name: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} must be called on every rank of an initialised "
                           f"torch.distributed process group (see run_{name})")


def _same_shapes_everywhere(group, *tensors) -> None:
    """Every rank must hold shards of one shape, or the transfers' buffers do not match."""
    shape = torch.tensor([d for t in tensors for d in t.shape], device=tensors[0].device)
    shapes = [torch.empty_like(shape) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise ValueError(f"every rank must hold shards of the same shape; got "
                         f"{[tuple(s.tolist()) for s in shapes]}")


def _attend(query, key, value, is_causal):
    """Attention in tiles with its log-sum-exp; key/value may have fewer heads (GQA), read as views."""
    B, H, n, d = query.shape
    H_kv = key.shape[1]
    if H_kv == H:
        return _flash(query, key, value, is_causal, _BLOCK, _BLOCK, None)
    g = H // H_kv                                       # query heads per key/value head
    o, lse = _flash(query.reshape(B, H_kv, g, n, d), key[:, :, None], value[:, :, None],
                    is_causal, _BLOCK, _BLOCK, None)
    return o.reshape(B, H, n, -1), lse.reshape(B, H, n)


class _Clock:
    """Adds wall and CPU seconds of a block to ``stats`` (a no-op without stats)."""

    def __init__(self, stats, wall: str, cpu: str | None = None):
        self.stats, self.wall, self.cpu = stats, wall, cpu

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc):
        if self.stats is not None:
            self.stats[self.wall] += time.perf_counter() - self.t
            if self.cpu:
                self.stats[self.cpu] += time.thread_time() - self.c


# --- ring attention -------------------------------------------------------------------------------------

def _ring(query, key, value, is_causal, group, stats, layout="contiguous", compute=True, check=True):
    _check_shards(query, key, value)
    layout = _check_layout(layout)
    _require_group("ring_attention")
    n = query.shape[2]
    if layout == "zigzag" and n % 2:
        raise ValueError(f"layout='zigzag': each rank holds two chunks of equal length, so its shard "
                         f"length must be even; got {n}")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    send_to = dist.get_global_rank(group, (rank + 1) % world) if group is not None else (rank + 1) % world
    recv_from = dist.get_global_rank(group, (rank - 1) % world) if group is not None else (rank - 1) % world
    if check:   # (off only where the pass that times the transfers alone follows a checked one)
        _same_shapes_everywhere(group, key, value)
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
        pieces = _ring_pieces(layout, rank, source, is_causal, n) if compute else []
        with _Clock(stats, "compute_s", "compute_cpu_s"):
            for rows, cols, causal in pieces:
                o, s = _attend(query[:, :, rows], k_cur[:, :, cols], v_cur[:, :, cols], causal)
                o = o.to(s.dtype)
                if out is None:                          # step 0: our own shard, every row
                    out, lse = o, s
                else:
                    out[:, :, rows], lse[:, :, rows] = merge_attention([out[:, :, rows], o], [lse[:, :, rows], s])
        if stats is not None and pieces:
            stats["blocks_computed"] += 1
            stats["scores_computed"] += sum(query.shape[0] * query.shape[1] * _pairs(
                rows.stop - rows.start, cols.stop - cols.start, causal) for rows, cols, causal in pieces)
        with _Clock(stats, "wait_s"):
            for req in pending:
                req.wait()
        if pending:
            k_cur, v_cur = k_next, v_next
    if out is None:   # compute=False: the communication alone
        return torch.zeros(*query.shape[:-1], value.shape[-1], dtype=value.dtype, device=value.device)
    return out.to(value.dtype)


def ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                   is_causal: bool = False, group=None, layout: str = "contiguous") -> torch.Tensor:
    r"""Rank ``r``'s shard of exact attention over the whole sequence, by passing key/value shards in a ring.

    Call on every rank of an initialised process group (gloo on CPUs, NCCL on GPUs).

    Args:
        query: ``(B, H, L/W, d_k)``; key: ``(B, G, L/W, d_k)``; value: ``(B, G, L/W, d_v)``
            (``G`` divides ``H``): the positions :func:`shard_positions` gives rank ``r``.
        is_causal: causal in *global* positions: query ``i`` sees keys ``j <= i`` of the whole
            sequence. Work no query needs is skipped (the shards still pass through).
        group: the process group (the default group when None).
        layout: ``"contiguous"`` (rank ``r`` holds the ``r``-th ``L/W`` positions) or
            ``"zigzag"`` (chunks ``r`` and ``2W - 1 - r`` of ``2W``, in that order: with
            causal attention every rank computes the same number of scores).

    At step ``s`` (from 0) rank ``r`` attends over the shard of rank ``(r - s) mod W`` in tiles
    of 256 and merges the partial result into its running one with the log-sum-exp rule of
    :func:`attn_course.flash.merge_attention`,

    .. math:: \ell = \log(e^{\ell_1} + e^{\ell_2}), \qquad o = e^{\ell_1 - \ell} o_1 + e^{\ell_2 - \ell} o_2 .

    Each rank sends ``W - 1`` key/value shards, ``(W - 1)/W`` of the sequence's ``K`` and ``V``
    (:func:`bytes_sent_per_rank`), and holds two shards of them at a time (``2/W``).

    Returns:
        ``(B, H, L/W, d_v)``: rank ``r``'s rows of ``softmax(Q K^T / sqrt(d_k)) V``.

    Example:
        It runs inside a process group (:func:`run_ring_attention` starts one); outside, it says so:

        >>> import torch
        >>> from attn_course.distributed import ring_attention
        >>> ring_attention(*(torch.randn(1, 2, 8, 4) for _ in range(3)), is_causal=True)
        Traceback (most recent call last):
        RuntimeError: ring_attention must be called on every rank of an initialised torch.distributed ...
    """
    return _ring(query, key, value, bool(is_causal), group, None, layout)


# --- Ulysses ----------------------------------------------------------------------------------------------

def _all_to_all(send: torch.Tensor, group, stats) -> torch.Tensor:
    """``send[j]`` goes to rank ``j``; returns ``recv`` with ``recv[j]`` from rank ``j``."""
    recv = torch.empty_like(send)
    with _Clock(stats, "wait_s"):
        dist.all_to_all_single(recv, send, group=group)
    if stats is not None:
        world = send.shape[0]
        stats["bytes_sent"] += send.nbytes * (world - 1) // world     # our own piece stays here
    return recv


def _seq_to_heads(x, world, group, stats):
    """``(B, h W, n, d)`` sequence shard -> ``(B, h, W n, d)``: our ``h`` heads, every position."""
    B, heads, n, d = x.shape
    send = x.reshape(B, world, heads // world, n, d).transpose(0, 1).contiguous()   # (W, B, h, n, d)
    recv = _all_to_all(send, group, stats)                                          # recv[j]: rank j's positions
    return recv.permute(1, 2, 0, 3, 4).reshape(B, heads // world, world * n, d)


def _heads_to_seq(x, world, group, stats):
    """``(B, h, W n, d)`` -> ``(B, h W, n, d)``: every head at our positions (the inverse)."""
    B, h, L, d = x.shape
    send = x.reshape(B, h, world, L // world, d).permute(2, 0, 1, 3, 4).contiguous()  # (W, B, h, n, d)
    recv = _all_to_all(send, group, stats)                                          # recv[j]: rank j's heads
    return recv.transpose(0, 1).reshape(B, world * h, L // world, d)


def _ulysses(query, key, value, is_causal, group, stats, compute=True, check=True):
    _check_shards(query, key, value)
    _require_group("ulysses_attention")
    world = dist.get_world_size(group)
    B, H, n, d_k = query.shape
    H_kv, d_v = key.shape[1], value.shape[-1]
    if H % world:
        raise ValueError(f"world_size={world} must divide the number of query heads H={H} "
                         f"(Ulysses gives each rank H / world_size heads)")
    if check:
        _same_shapes_everywhere(group, query, key, value)
    f = _replication(world, H_kv)       # each KV head sent f times: every rank gets its query heads' KV heads
    kv = torch.cat([key, value], dim=-1)                                  # one all-to-all for K and V
    if f > 1:
        kv = kv.repeat_interleave(f, dim=1)
    q_heads = _seq_to_heads(query, world, group, stats)                   # (B, H/W, L, d_k)
    kv_heads = _seq_to_heads(kv, world, group, stats)                     # (B, H_kv f/W, L, d_k + d_v)
    k_heads, v_heads = kv_heads.split([d_k, d_v], dim=-1)
    if compute:
        with _Clock(stats, "compute_s", "compute_cpu_s"):
            o, _ = _attend(q_heads, k_heads, v_heads, is_causal)          # ordinary attention, H/W heads
        if stats is not None:
            stats["blocks_computed"] += 1
            stats["scores_computed"] += B * q_heads.shape[1] * _pairs(world * n, world * n, is_causal)
    else:
        o = torch.zeros(*q_heads.shape[:-1], d_v, dtype=value.dtype, device=value.device)
    return _heads_to_seq(o.to(value.dtype), world, group, stats)


def ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                      is_causal: bool = False, group=None) -> torch.Tensor:
    r"""Rank ``r``'s shard of exact attention, by trading sequence shards for head shards (DeepSpeed-Ulysses).

    Jacobs et al. (2023). Call on every rank of an initialised process group.

    1. All-to-all (``torch.distributed.all_to_all_single``, which gloo and NCCL implement):
       rank ``r`` sends heads ``[j H/W, (j + 1) H/W)`` of its positions to rank ``j``, and
       receives from every rank its positions of heads ``[r H/W, (r + 1) H/W)``:
       ``(B, H, L/W, d) -> (B, H/W, L, d)``; keys and values the same way (under GQA each
       KV head is sent ``W / gcd(W, G)`` times, so that every rank has the KV heads of its
       query heads).
    2. Ordinary attention over the whole sequence for those ``H/W`` heads (in tiles of 256),
       causal or not; nothing to balance.
    3. The inverse all-to-all: ``(B, H/W, L, d_v) -> (B, H, L/W, d_v)``.

    Args:
        query: ``(B, H, L/W, d_k)``; key: ``(B, G, L/W, d_k)``; value: ``(B, G, L/W, d_v)``:
            rank ``r``'s contiguous shard, positions ``[r L/W, (r + 1) L/W)``.
        is_causal: causal attention over the whole sequence.
        group: the process group (the default group when None).

    A world size that does not divide ``H`` raises a ``ValueError`` naming ``world_size``: Ulysses
    cannot use more ranks than heads. Each rank sends ``(W - 1)/W`` of its ``Q, K, V`` and output
    shards (:func:`bytes_sent_per_rank`); the transfers do not overlap the compute.

    Returns:
        ``(B, H, L/W, d_v)``: rank ``r``'s rows of ``softmax(Q K^T / sqrt(d_k)) V``.

    Example:
        It runs inside a process group (:func:`run_ulysses_attention` starts one); outside, it says so:

        >>> import torch
        >>> from attn_course.distributed import ulysses_attention
        >>> ulysses_attention(*(torch.randn(1, 2, 8, 4) for _ in range(3)))
        Traceback (most recent call last):
        RuntimeError: ulysses_attention must be called on every rank of an initialised torch.distributed ...
    """
    return _ulysses(query, key, value, bool(is_causal), group, None)


# --- local processes ------------------------------------------------------------------------------------

def _loopback_interface() -> str | None:
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None  # pragma: no cover - every system the course runs on has one


def _start_method(backend: str) -> str:
    """``fork`` where it is safe and cheap (Linux, gloo, CUDA untouched): the workers inherit the
    imported torch instead of importing it again, which on a small machine takes seconds per
    process. Elsewhere (macOS, NCCL, a process that has used CUDA) ``spawn``."""
    if backend == "gloo" and sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        return "fork"
    return "spawn"


def _run_once(run, q, k, v, stats, compute=True, check=True):
    if run["scheme"] == "ring":
        return _ring(q, k, v, run["is_causal"], None, stats, run["layout"], compute=compute, check=check)
    return _ulysses(q, k, v, run["is_causal"], None, stats, compute=compute, check=check)


def _worker(rank, world_size, init_file, backend, runs, outs, stats_out, repeats, threads):
    # Share the machine's cores between the local processes instead of oversubscribing them.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        shards = []
        for run in runs:
            pos = shard_positions(run["query"].shape[2], world_size, rank, run["layout"])
            shards.append((pos, *(run[x][:, :, pos].to(device) for x in ("query", "key", "value"))))
        # An untimed pass of every run first: it connects the peers (and checks the shapes). Without
        # timed passes it computes the output; with them, only the transfers, and the first timed
        # pass gives the output (the compute then runs as often as the timings need, no more).
        for run, out, (pos, q, k, v) in zip(runs, outs, shards):
            result = _run_once(run, q, k, v, None, compute=not repeats)
            if not repeats:
                out[:, :, pos] = result.to(out.device)
        # Timed passes, interleaved between the runs: the run, then its transfers alone.
        for rep in range(repeats):
            for i, (run, out, (pos, q, k, v)) in enumerate(zip(runs, outs, shards)):
                stats = dict.fromkeys(_STAT_KEYS, 0.0)
                dist.barrier()
                with _Clock(stats, "total_s"):
                    result = _run_once(run, q, k, v, stats)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                if rep == 0:
                    out[:, :, pos] = result.to(out.device)
                dist.barrier()
                with _Clock(stats, "comm_only_s"):
                    _run_once(run, q, k, v, None, compute=False, check=False)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                stats_out[i, rank, rep] = torch.tensor([stats[key] for key in _STAT_KEYS], dtype=torch.float64)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_run(run, world_size: int) -> dict:
    if not isinstance(run, dict):
        raise TypeError(f"each run must be a dict with 'scheme', 'query', 'key', 'value'; got {type(run).__name__}")
    unknown = set(run) - {"scheme", "query", "key", "value", "is_causal", "layout"}
    if unknown:
        raise ValueError(f"unknown keys in a run: {sorted(unknown)}")
    scheme = run.get("scheme")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    layout = _check_layout(run.get("layout", "contiguous"))
    if scheme == "ulysses" and layout != "contiguous":
        raise ValueError(f"layout={layout!r}: Ulysses uses contiguous shards (each rank computes whole heads, "
                         f"so there is no causal imbalance to fix)")
    query, key, value = run.get("query"), run.get("key"), run.get("value")
    _check_heads(query, key, value, "L")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"query, key and value must be one sequence: equal L; got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}, value {tuple(value.shape)}")
    _check_split(query.shape[2], world_size, layout)
    if scheme == "ulysses" and query.shape[1] % world_size:
        raise ValueError(f"world_size={world_size} must divide the number of query heads H={query.shape[1]} "
                         f"(Ulysses gives each rank H / world_size heads)")
    return {"scheme": scheme, "layout": layout, "is_causal": bool(run.get("is_causal", False)),
            **{name: x.detach().cpu().contiguous().share_memory_()
               for name, x in (("query", query), ("key", key), ("value", value))}}


def _launch(runs, world_size, backend, repeats, threads):
    world_size = _checks.positive_number("world_size", world_size, integer=True)
    if isinstance(runs, dict) or not isinstance(runs, (list, tuple)) or not runs:
        raise TypeError("runs must be a non-empty list of dicts")
    runs = [_check_run(run, world_size) for run in runs]
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 0:
        raise ValueError(f"repeats must be an int >= 0, got {repeats!r}")
    if threads is not None:
        threads = _checks.positive_number("threads", threads, integer=True)
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU processes) or 'nccl' (one GPU per process), got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"backend='nccl' needs world_size={world_size} GPUs, found {torch.cuda.device_count()}")
    if not dist.is_available():  # pragma: no cover
        raise RuntimeError("this PyTorch build has no torch.distributed")
    import torch.multiprocessing as mp

    outs = [torch.zeros(*r["query"].shape[:3], r["value"].shape[-1], dtype=r["value"].dtype).share_memory_()
            for r in runs]
    stats = torch.zeros(len(runs), world_size, repeats, len(_STAT_KEYS), dtype=torch.float64).share_memory_()
    method = _start_method(backend)
    if method == "fork":
        # The first attention in a process loads torch's lazily imported modules (about a second);
        # loaded here once, the forked workers inherit them.
        for dtype in {r["query"].dtype for r in runs}:
            x = torch.zeros(1, 2, 2, 2, dtype=dtype)
            o, lse = _attend(x, x[:, :1], x[:, :1], True)
            merge_attention([o.to(lse.dtype)] * 2, [lse] * 2)
    env_set = "GLOO_SOCKET_IFNAME" not in os.environ and _loopback_interface() is not None
    if env_set:   # keep gloo's connections on this machine (the workers inherit the variable)
        os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    with tempfile.TemporaryDirectory(prefix="attn-course-dist-") as tmp:
        try:
            mp.start_processes(_worker, args=(world_size, os.path.join(tmp, "rendezvous"), backend, runs, outs,
                                              stats, repeats, threads),
                               nprocs=world_size, join=True, start_method=method)
        finally:
            if env_set:
                del os.environ["GLOO_SOCKET_IFNAME"]
    return runs, outs, stats


def profile_attention(runs, world_size: int, *, repeats: int = 1, backend: str = "gloo",
                      threads: int | None = None) -> list[dict]:
    """Run several distributed attentions in one launch of ``world_size`` local processes, and profile them.

    Starting processes costs seconds; this starts them once for all the runs.

    Args:
        runs: a list of dicts, each ``{"scheme": "ring" | "ulysses", "query", "key", "value"}``
            (whole sequences: ``(B, H, L, d_k)``, ``(B, G, L, d_k)``, ``(B, G, L, d_v)``) and
            optionally ``"is_causal"`` (default False) and ``"layout"`` (ring only; default
            ``"contiguous"``). Each run may have its own shapes and dtype.
        world_size: the number of processes ``W``.
        repeats: timed passes of every run, interleaved (run 1, run 2, ..., run 1, run 2, ...),
            after one untimed pass that connects the processes; the output comes from the first
            timed pass (with ``repeats=0``, from the untimed pass, which then computes).
        backend: ``"gloo"`` (CPU processes) or ``"nccl"`` (one GPU per process).
        threads: CPU threads per process (default: the machine's cores shared out).

    Returns:
        A list with one dict per run, holding ``"output"`` (``(B, H, L, d_v)`` in the natural order) and ``"ranks"``,
        one dict per rank with the counts ``bytes_sent`` (bytes it sent to other ranks),
        ``scores_computed`` (query-key scores its attention needed, over all batch entries and
        heads), ``blocks_computed`` (ring: key shards it attended over; Ulysses: 1) and, as lists
        of one value per repeat, ``compute_s`` (wall seconds in attention), ``compute_cpu_s``
        (CPU seconds of the computing thread: with one thread per process, the work done,
        whatever else the machine runs), ``wait_s`` (seconds blocked on transfers: for the ring,
        waiting after each step's compute, i.e. communication that did not overlap, plus waiting
        for a slower neighbour; for Ulysses, the all-to-alls), ``total_s`` and ``comm_only_s``
        (the same transfers again with no compute).

    Example:
        Both layouts of the causal ring in one launch of 2 processes:

        >>> import torch
        >>> from attn_course.distributed import profile_attention
        >>> x = torch.randn(1, 1, 16, 4)
        >>> runs = [{"scheme": "ring", "layout": layout, "is_causal": True, "query": x, "key": x, "value": x}
        ...         for layout in ("contiguous", "zigzag")]
        >>> [[r["scores_computed"] for r in res["ranks"]] for res in profile_attention(runs, 2)]
        [[36, 100], [68, 68]]
    """
    runs, outs, stats = _launch(runs, world_size, backend, repeats, threads)
    results = []
    for run, out, st in zip(runs, outs, stats):
        ranks = []
        for per_rank in st:                               # (repeats, keys)
            row = {}
            for j, key in enumerate(_STAT_KEYS):
                values = per_rank[:, j].tolist()
                row[key] = int(values[0]) if key in _COUNT_KEYS and values else values
            if not repeats:
                row.update(dict.fromkeys(_COUNT_KEYS))
            ranks.append(row)
        results.append({"scheme": run["scheme"], "layout": run["layout"], "is_causal": run["is_causal"],
                        "output": out, "ranks": ranks})
    return results


def run_ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, world_size: int, *,
                       is_causal: bool = False, backend: str = "gloo", layout: str = "contiguous") -> torch.Tensor:
    """Start ``world_size`` local processes, run :func:`ring_attention`, and gather the result.

    Args:
        query: ``(B, H, L, d_k)``; key: ``(B, G, L, d_k)``; value: ``(B, G, L, d_v)``: the
            whole sequence; rank ``r`` gets the positions :func:`shard_positions` gives it.
        world_size: the number of processes ``W``; it must divide ``L`` (zigzag: ``2W`` must),
            else a ``ValueError`` names ``world_size``.
        is_causal: causal attention in global positions.
        backend: ``"gloo"`` (CPU processes) or ``"nccl"`` (one GPU per process).
        layout: ``"contiguous"`` or ``"zigzag"``; anything else raises a ``ValueError`` naming ``layout``.

    Returns:
        ``(B, H, L, d_v)`` in the natural order, equal to dense attention over the whole sequence.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.distributed import run_ring_attention
        >>> q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
        >>> out = run_ring_attention(q, k, v, 2, is_causal=True, layout="zigzag")
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        True
    """
    run = {"scheme": "ring", "query": query, "key": key, "value": value, "is_causal": is_causal, "layout": layout}
    (result,) = profile_attention([run], world_size, repeats=0, backend=backend)
    return result["output"].to(query.device)


def run_ulysses_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, world_size: int, *,
                          is_causal: bool = False, backend: str = "gloo") -> torch.Tensor:
    """Start ``world_size`` local processes, run :func:`ulysses_attention`, and gather the result.

    Args:
        query: ``(B, H, L, d_k)``; key: ``(B, G, L, d_k)``; value: ``(B, G, L, d_v)``; rank
            ``r`` gets positions ``[r L/W, (r + 1) L/W)``.
        world_size: ``W``; it must divide ``L`` and the number of heads ``H``, else a ``ValueError``
            names ``world_size``.

    Returns:
        ``(B, H, L, d_v)``, equal to dense attention over the whole sequence.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.distributed import run_ulysses_attention
        >>> q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
        >>> out = run_ulysses_attention(q, k, v, 2, is_causal=True)
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        True
    """
    run = {"scheme": "ulysses", "query": query, "key": key, "value": value, "is_causal": is_causal}
    (result,) = profile_attention([run], world_size, repeats=0, backend=backend)
    return result["output"].to(query.device)


def ring_attention_profile(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, world_size: int, *,
                           is_causal: bool = False, backend: str = "gloo", threads: int | None = None,
                           layout: str = "contiguous") -> tuple[torch.Tensor, list[dict]]:
    """:func:`run_ring_attention` that also reports, per rank, what the ring cost (one timed pass).

    Returns ``(output, stats)`` with one dict per rank, as in :func:`profile_attention` but with
    one number per timing: ``bytes_sent``, ``scores_computed``, ``blocks_computed``,
    ``compute_s``, ``compute_cpu_s``, ``wait_s``, ``total_s`` and ``comm_only_s`` (if
    ``total_s`` is close to ``compute_s`` while ``comm_only_s`` is not small, the transfers
    were hidden behind the compute). ``wait_s`` also holds waiting for a slower neighbour (the
    causal imbalance) and, on a busy machine, for the scheduler.

    Example:
        >>> import torch
        >>> from attn_course.distributed import ring_attention_profile
        >>> x = torch.randn(1, 1, 16, 4)
        >>> _, stats = ring_attention_profile(x, x, x, 2, is_causal=True)
        >>> [s["blocks_computed"] for s in stats], [s["bytes_sent"] for s in stats]
        ([1, 2], [256, 256])
    """
    run = {"scheme": "ring", "query": query, "key": key, "value": value, "is_causal": is_causal, "layout": layout}
    (result,) = profile_attention([run], world_size, repeats=1, backend=backend, threads=threads)
    rows = [{k: (v[0] if isinstance(v, list) else v) for k, v in rank.items()} for rank in result["ranks"]]
    return result["output"].to(query.device), rows
