"""Chapter 7, efficient sparse attention: the same attention, most of the work removed.

Every function takes ``query``, ``key``, ``value`` of shape ``(B, H, L, d)`` (value may
have its own ``d_v``) and returns ``(B, H, L, d_v)``. Each fixed pattern has a
``*_mask`` (or ``*_layout``) giving its dense boolean equivalent (``True`` = may
attend), and the attention function equals dense attention under that mask while
never building an ``L x L`` tensor: queries are processed in blocks, each against only
the keys its pattern allows, with PyTorch's fused ``scaled_dot_product_attention``
doing the arithmetic. ``performer_attention`` and ``lsh_attention`` approximate dense
attention and converge to it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

from . import _checks

__all__ = [
    "sliding_window_mask",
    "sliding_window_attention",
    "dilated_window_mask",
    "dilated_window_attention",
    "longformer_mask",
    "longformer_attention",
    "block_sparse_mask",
    "block_sparse_attention",
    "bigbird_layout",
    "strided_layout",
    "bigbird_attention",
    "topk_attention",
    "performer_attention",
    "lsh_attention",
    "lsh_mask",
    "lsh_buckets",
    "dense_attention",
    "flex_available",
]

_BLOCK = 64            # queries per block
_QUERIES_PER_CALL = 1024  # blocks are batched into one fused call of about this many queries


# --- validation ---------------------------------------------------------------------------------

def _check_qkv(query, key, value) -> tuple[int, int, int, int]:
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.float_tensor(name, x, ndim=4)
    _checks.same_dtype_device(query=query, key=key, value=value)
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    if query.shape != key.shape:
        raise ValueError(f"query and key must have the same shape (B, H, L, d); got {shapes}")
    if value.shape[:3] != key.shape[:3]:
        raise ValueError(f"value must be (B, H, L, d_v) with the B, H, L of key; got {shapes}")
    B, H, L, d = query.shape
    if L == 0:
        raise ValueError(f"the sequences are empty; got {shapes}")
    return B, H, L, d


def _window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int, got {type(window).__name__}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    return window


def dense_attention(query, key, value, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference: plain softmax attention over ``(B, H, L, d)`` with an optional dense bool mask.

    Builds the full ``L x L`` scores: for checking the sparse functions on small inputs.
    Queries with no allowed key get zeros.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.sparse import dense_attention
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)
        >>> mask = torch.ones(5, 5, dtype=torch.bool).tril()
        >>> mask[2] = False                                  # query 2 may see nothing
        >>> out = dense_attention(q, k, v, mask)
        >>> torch.allclose(out[:, :, 3:], F.scaled_dot_product_attention(q, k, v, is_causal=True)[:, :, 3:],
        ...                atol=1e-6)
        True
        >>> out[:, :, 2].abs().max().item()                 # zeros, not NaN
        0.0
    """
    _check_qkv(query, key, value)
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if mask is not None:
        weights = weights.masked_fill(~mask, 0.0)
    return weights @ value


# --- sliding windows ------------------------------------------------------------------------------

def sliding_window_mask(length: int, window: int, *, is_causal: bool = False) -> torch.Tensor:
    """``(L, L)`` bool: ``|i - j| <= window`` (causal: ``0 <= i - j <= window``).

    Example:
        >>> from attn_course.sparse import sliding_window_mask
        >>> sliding_window_mask(5, 1).int()
        tensor([[1, 1, 0, 0, 0],
                [1, 1, 1, 0, 0],
                [0, 1, 1, 1, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 0, 1, 1]], dtype=torch.int32)
        >>> sliding_window_mask(5, 1, is_causal=True).sum(1).tolist()   # itself and one before
        [1, 2, 2, 2, 2]
    """
    length = _checks.positive_number("length", length, integer=True)
    window = _window(window)
    i = torch.arange(length)
    diff = i[:, None] - i[None, :]
    return (diff >= 0) & (diff <= window) if is_causal else diff.abs() <= window


def _banded(query, key, value, left: int, right: int, extra: tuple | None = None) -> torch.Tensor:
    """Each query ``i`` attends to keys ``i - left .. i + right`` (clipped to the sequence),
    plus optional extra keys ``extra = (k_extra (B, H, G, d), v_extra, allowed (L, G) bool)``.

    Blocks of ``_BLOCK`` queries each see a span of ``_BLOCK + left + right`` keys (a view
    into the zero-padded keys); a band mask shared by all blocks hides what the
    pattern does not allow. About ``_QUERIES_PER_CALL`` queries go into one fused call.
    """
    B, H, L, d = query.shape
    b = _BLOCK if L >= _BLOCK else L
    nb = -(-L // b)
    Lp, span = nb * b, b + left + right
    dev = query.device
    rel = torch.arange(span, device=dev)[None, :] - left - torch.arange(b, device=dev)[:, None]  # j - i
    band = (rel >= -left) & (rel <= right)                                         # (b, span)
    key_pos = torch.arange(nb, device=dev)[:, None] * b + torch.arange(span, device=dev)[None, :] - left
    mask = band[None] & ((key_pos >= 0) & (key_pos < L))[:, None, :]                  # (nb, b, span)
    if extra is not None:
        allowed = extra[2]
        allowed = F.pad(allowed, (0, 0, 0, Lp - L)).view(nb, b, allowed.shape[1])
        mask = torch.cat([mask, allowed], dim=-1)                                    # (nb, b, span + G)
    per_call = max(1, _QUERIES_PER_CALL // b)
    d_v = value.shape[-1]
    # (batch x head) rows are processed in groups of about _QUERIES_PER_CALL queries: one
    # row at a time for long sequences, many rows per call for short ones
    rows = max(1, _QUERIES_PER_CALL // Lp)
    q_all, k_all, v_all = (t.reshape(B * H, L, t.shape[-1]) for t in (query, key, value))
    out = query.new_empty(B * H, L, d_v)
    for r0 in range(0, B * H, rows):
        r1 = min(B * H, r0 + rows)
        kp = F.pad(k_all[r0:r1], (0, 0, left, right + Lp - L))
        vp = F.pad(v_all[r0:r1], (0, 0, left, right + Lp - L))
        qb = F.pad(q_all[r0:r1], (0, 0, 0, Lp - L)).view(r1 - r0, nb, b, d)
        kw = kp.unfold(1, span, b).transpose(-1, -2)                                  # (R, nb, span, d)
        vw = vp.unfold(1, span, b).transpose(-1, -2)
        for s in range(0, nb, per_call):
            e = min(nb, s + per_call)
            ks, vs = kw[:, s:e], vw[:, s:e]
            if extra is not None:
                k_extra, v_extra, _ = extra
                G = k_extra.shape[2]
                ke = k_extra.reshape(B * H, G, d)[r0:r1, None].expand(-1, e - s, -1, -1)
                ve = v_extra.reshape(B * H, G, d_v)[r0:r1, None].expand(-1, e - s, -1, -1)
                ks, vs = torch.cat([ks, ke], dim=2), torch.cat([vs, ve], dim=2)
            r = F.scaled_dot_product_attention(qb[:, s:e], ks, vs, attn_mask=mask[s:e])  # (R, e-s, b, d_v)
            stop = min(e * b, L)
            out[r0:r1, s * b:stop] = r.reshape(r1 - r0, -1, d_v)[:, : stop - s * b]
    return out.view(B, H, L, d_v)
    return out


def _flex_sliding_window(query, key, value, window, is_causal):
    compiled, block_mask = _flex_kernel(query.shape[2], window, is_causal, str(query.device))
    return compiled(query, key, value, block_mask=block_mask)


@lru_cache(maxsize=16)
def _flex_kernel(length, window, is_causal, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def band(b, h, q_idx, kv_idx):
        diff = q_idx - kv_idx
        return (diff >= 0) & (diff <= window) if is_causal else diff.abs() <= window

    block_mask = create_block_mask(band, None, None, length, length, device=device)
    return torch.compile(flex_attention, dynamic=False), block_mask


def flex_available() -> bool:
    """Whether this torch has FlexAttention (``torch.nn.attention.flex_attention``, torch >= 2.5).

    Example:
        >>> import torch
        >>> from attn_course.sparse import flex_available
        >>> flex_available() == (tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5))
        True
    """
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def sliding_window_attention(query, key, value, window: int, *, is_causal: bool = False,
                             backend: str = "blocked") -> torch.Tensor:
    """Local attention: query ``i`` attends to keys with ``|i - j| <= window`` (Longformer's window).

    Equals dense attention under :func:`sliding_window_mask` while doing
    ``O(L * window)`` work in ``O(L)`` memory. ``backend="flex"`` runs the same pattern
    through a compiled FlexAttention kernel (torch >= 2.5; the first call per shape
    compiles, which takes seconds).

    Example:
        >>> import torch
        >>> from attn_course import sparse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)     # (B, H, L, d) each
        >>> out = sparse.sliding_window_attention(q, k, v, window=2)
        >>> dense = sparse.dense_attention(q, k, v, sparse.sliding_window_mask(16, 2))
        >>> tuple(out.shape), torch.allclose(out, dense, atol=1e-5)
        ((1, 2, 16, 8), True)
    """
    _, _, L, _ = _check_qkv(query, key, value)
    window = _window(window)
    if backend == "flex":
        if not flex_available():
            raise RuntimeError("backend='flex' needs torch >= 2.5 (torch.nn.attention.flex_attention)")
        return _flex_sliding_window(query, key, value, window, is_causal)
    if backend != "blocked":
        raise ValueError(f"backend must be 'blocked' or 'flex', got {backend!r}")
    window = min(window, L - 1)
    return _banded(query, key, value, window, 0 if is_causal else window)


def dilated_window_mask(length: int, window: int, dilation: int, *, is_causal: bool = False) -> torch.Tensor:
    """``(L, L)`` bool: ``|i - j| <= window * dilation`` and ``(i - j) % dilation == 0``.

    Example:
        >>> from attn_course.sparse import dilated_window_mask
        >>> dilated_window_mask(6, window=1, dilation=2).int()     # every other key, one each side
        tensor([[1, 0, 1, 0, 0, 0],
                [0, 1, 0, 1, 0, 0],
                [1, 0, 1, 0, 1, 0],
                [0, 1, 0, 1, 0, 1],
                [0, 0, 1, 0, 1, 0],
                [0, 0, 0, 1, 0, 1]], dtype=torch.int32)
    """
    dilation = _checks.positive_number("dilation", dilation, integer=True)
    base = sliding_window_mask(length, _window(window) * dilation, is_causal=is_causal)
    i = torch.arange(length)
    return base & ((i[:, None] - i[None, :]) % dilation == 0)


def dilated_window_attention(query, key, value, window: int, dilation: int, *,
                             is_causal: bool = False) -> torch.Tensor:
    """Dilated sliding window: every ``dilation``-th key, ``window`` of them on each side.

    Positions with the same remainder mod ``dilation`` only ever see each other, so the
    pattern is a plain sliding window on each of the ``dilation`` interleaved subsequences.

    Example:
        >>> import torch
        >>> from attn_course import sparse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)     # (B, H, L, d) each
        >>> out = sparse.dilated_window_attention(q, k, v, window=2, dilation=3)
        >>> dense = sparse.dense_attention(q, k, v, sparse.dilated_window_mask(16, 2, 3))
        >>> torch.allclose(out, dense, atol=1e-5)
        True
    """
    _, _, L, _ = _check_qkv(query, key, value)
    window = _window(window)
    dilation = _checks.positive_number("dilation", dilation, integer=True)
    out = query.new_empty(*query.shape[:3], value.shape[-1])
    for r in range(min(dilation, L)):
        sub = slice(r, None, dilation)
        out[:, :, sub] = sliding_window_attention(query[:, :, sub], key[:, :, sub], value[:, :, sub],
                                                  window, is_causal=is_causal)
    return out


# --- Longformer: window + global tokens -------------------------------------------------------------

def _global_tokens(global_tokens, length: int) -> torch.Tensor:
    if isinstance(global_tokens, torch.Tensor):
        if global_tokens.dtype in (torch.bool,) or global_tokens.is_floating_point() or global_tokens.ndim != 1:
            raise TypeError(f"global_tokens must be a 1-D integer tensor or a sequence of ints, got "
                            f"{global_tokens.dtype} of shape {tuple(global_tokens.shape)}")
        idx = global_tokens.to("cpu", torch.long)
    else:
        if isinstance(global_tokens, (str, bytes)) or not isinstance(global_tokens, Sequence) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in global_tokens):
            raise TypeError(f"global_tokens must be a sequence of ints or a 1-D integer tensor, got "
                            f"{global_tokens!r}")
        idx = torch.tensor(list(global_tokens), dtype=torch.long)
    if idx.numel() and (idx.min() < 0 or idx.max() >= length):
        raise ValueError(f"global_tokens must be positions in [0, {length}), got {idx.tolist()}")
    return torch.unique(idx)


def longformer_mask(length: int, window: int, global_tokens) -> torch.Tensor:
    """``(L, L)`` bool: the sliding window, plus every row and column of the global tokens.

    Example:
        >>> from attn_course.sparse import longformer_mask
        >>> longformer_mask(6, window=1, global_tokens=[0]).int()
        tensor([[1, 1, 1, 1, 1, 1],
                [1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 0, 0],
                [1, 0, 1, 1, 1, 0],
                [1, 0, 0, 1, 1, 1],
                [1, 0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    mask = sliding_window_mask(length, window)
    g = _global_tokens(global_tokens, length)
    mask[g, :] = True
    mask[:, g] = True
    return mask


def longformer_attention(query, key, value, window: int, global_tokens) -> torch.Tensor:
    """Longformer attention (Beltagy et al., 2020): a sliding window plus global tokens.

    Every query sees its window and the global tokens; a global token's query sees every
    key. Equals dense attention under :func:`longformer_mask`.

    Example:
        >>> import torch
        >>> from attn_course import sparse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)     # (B, H, L, d) each
        >>> out = sparse.longformer_attention(q, k, v, window=2, global_tokens=[0, 9])
        >>> dense = sparse.dense_attention(q, k, v, sparse.longformer_mask(16, 2, [0, 9]))
        >>> torch.allclose(out, dense, atol=1e-5)
        True
    """
    _, _, L, _ = _check_qkv(query, key, value)
    window = min(_window(window), L - 1)
    g = _global_tokens(global_tokens, L).to(query.device)
    if g.numel() == 0:
        return sliding_window_attention(query, key, value, window)
    pos = torch.arange(L, device=query.device)
    outside = (pos[:, None] - g[None, :]).abs() > window    # (L, G): global keys not already in the window
    out = _banded(query, key, value, window, window, extra=(key[:, :, g], value[:, :, g], outside))
    out[:, :, g] = F.scaled_dot_product_attention(query[:, :, g], key, value)  # global rows: everything
    return out


# --- block-sparse and BigBird ---------------------------------------------------------------------

def _check_layout(layout) -> torch.Tensor:
    if not isinstance(layout, torch.Tensor) or layout.dtype != torch.bool:
        raise TypeError(f"layout must be a bool tensor (num_blocks, num_blocks), got "
                        f"{getattr(layout, 'dtype', type(layout).__name__)}")
    if layout.ndim != 2 or layout.shape[0] != layout.shape[1] or layout.shape[0] == 0:
        raise ValueError(f"layout must be square (num_blocks, num_blocks), got shape {tuple(layout.shape)}")
    return layout


def block_sparse_mask(layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blow a ``(L/b, L/b)`` block layout up to the ``(L, L)`` bool mask it stands for.

    Example:
        >>> import torch
        >>> from attn_course.sparse import block_sparse_mask
        >>> layout = torch.tensor([[True, False], [True, True]])
        >>> block_sparse_mask(layout, block_size=2).int()
        tensor([[1, 1, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 1],
                [1, 1, 1, 1]], dtype=torch.int32)
    """
    layout = _check_layout(layout)
    b = _checks.positive_number("block_size", block_size, integer=True)
    return layout.repeat_interleave(b, 0).repeat_interleave(b, 1)


def block_sparse_attention(query, key, value, layout: torch.Tensor, block_size: int) -> torch.Tensor:
    """Block-sparse attention (Child et al., 2019): query block ``r`` sees key block ``c`` iff
    ``layout[r, c]``. Equals dense attention under :func:`block_sparse_mask`.

    Query blocks are sorted by how many key blocks they see, and each group is padded
    only to its own largest count, so a few dense rows (global blocks) cost only their own work.

    Example:
        >>> import torch
        >>> from attn_course import sparse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)     # (B, H, L, d) each
        >>> layout = torch.ones(4, 4, dtype=torch.bool).tril()   # block-causal, blocks of 4
        >>> out = sparse.block_sparse_attention(q, k, v, layout, block_size=4)
        >>> dense = sparse.dense_attention(q, k, v, sparse.block_sparse_mask(layout, 4))
        >>> torch.allclose(out, dense, atol=1e-5)
        True
    """
    B, H, L, d = _check_qkv(query, key, value)
    # The layout is a plan, read on the CPU; only the index tensors go to the inputs' device.
    layout = _check_layout(layout).cpu()
    b = _checks.positive_number("block_size", block_size, integer=True)
    nb = layout.shape[0]
    if nb * b != L:
        raise ValueError(f"layout has {nb} blocks of block_size={b}, which is {nb * b} positions, "
                         f"but the sequences have L={L}")
    counts = layout.sum(1)
    order = torch.argsort(counts, stable=True).tolist()
    counts_list = counts.tolist()
    qb = query.view(B, H, nb, b, d)
    kb, vb = key.view(B, H, nb, b, d), value.view(B, H, nb, b, value.shape[-1])
    d_v = value.shape[-1]
    out = query.new_zeros(B, H, nb, b, d_v)
    rows_per_call = max(1, _QUERIES_PER_CALL // b)
    # groups of rows with similar block counts, so that padding stays small (equal counts: no mask)
    groups, current = [], []
    for row in order:
        if counts_list[row] == 0:
            continue                                   # rows that see nothing stay zero
        if current and (len(current) == rows_per_call or counts_list[row] > 1.25 * counts_list[current[0]]):
            groups.append(current)
            current = []
        current.append(row)
    if current:
        groups.append(current)
    for group in groups:
        rows_cpu = torch.tensor(group)
        R, C = len(group), int(counts[rows_cpu].max())
        rows = rows_cpu.to(query.device)
        cols = torch.argsort(~layout[rows_cpu], dim=1, stable=True)[:, :C].flatten().to(query.device)
        valid = torch.arange(C)[None, :] < counts[rows_cpu][:, None]              # allowed blocks first
        mask = None if bool(valid.all()) else valid.repeat_interleave(b, dim=1)[None, :, None, :].to(query.device)
        for bi in range(B):
            for h in range(H):  # one head at a time: the gathered blocks stay in cache
                ks = torch.index_select(kb[bi, h], 0, cols).view(1, R, C * b, d)
                vs = torch.index_select(vb[bi, h], 0, cols).view(1, R, C * b, d_v)
                qs = torch.index_select(qb[bi, h], 0, rows)[None]                   # (1, R, b, d)
                out[bi, h, rows] = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)[0]
    return out.view(B, H, L, value.shape[-1])


def bigbird_layout(num_blocks: int, *, num_random_blocks: int = 3, num_global_blocks: int = 1,
                   seed: int = 0) -> torch.Tensor:
    """BigBird's block layout (Zaheer et al., 2020): a 3-block band, the first
    ``num_global_blocks`` rows and columns, and ``num_random_blocks`` random blocks per
    other row (drawn among the blocks not already kept, with a seeded generator).

    Example:
        >>> from attn_course.sparse import bigbird_layout
        >>> layout = bigbird_layout(6, num_random_blocks=1)
        >>> bool(layout[0].all()), bool(layout[:, 0].all())   # block 0 is global
        (True, True)
        >>> layout.sum(1).tolist()        # band (3, 2 at the ends) + global column + 1 random
        [6, 4, 5, 5, 5, 4]
    """
    n = _checks.positive_number("num_blocks", num_blocks, integer=True)
    for name, v in (("num_random_blocks", num_random_blocks), ("num_global_blocks", num_global_blocks)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    r = torch.arange(n)
    layout = (r[:, None] - r[None, :]).abs() <= 1
    g = min(num_global_blocks, n)
    layout[:g, :] = True
    layout[:, :g] = True
    gen = torch.Generator().manual_seed(seed)
    for row in range(g, n):
        free = (~layout[row]).nonzero().flatten()
        pick = free[torch.randperm(free.numel(), generator=gen)[:num_random_blocks]]
        layout[row, pick] = True
    return layout


def strided_layout(num_blocks: int, *, band: int = 2, stride: int = 16) -> torch.Tensor:
    """A block layout after Child et al.'s (2019) "fixed" pattern: key blocks within ``band`` of
    the query block, plus every ``stride``-th block column (the "summary" columns).

    The summary columns are the paper's; the sliding band of ``±band`` blocks replaces its aligned
    blocks (``floor(i / l) == floor(j / l)``), and the layout is not causal. (The paper's "strided"
    pattern, the previous ``l`` positions plus every ``l``-th position, is a different one.)

    Example:
        >>> from attn_course.sparse import strided_layout
        >>> strided_layout(6, band=1, stride=3).int()        # the band and summary columns 2 and 5
        tensor([[1, 1, 1, 0, 0, 1],
                [1, 1, 1, 0, 0, 1],
                [0, 1, 1, 1, 0, 1],
                [0, 0, 1, 1, 1, 1],
                [0, 0, 1, 1, 1, 1],
                [0, 0, 1, 0, 1, 1]], dtype=torch.int32)
    """
    n = _checks.positive_number("num_blocks", num_blocks, integer=True)
    stride = _checks.positive_number("stride", stride, integer=True)
    if isinstance(band, bool) or not isinstance(band, int) or band < 0:
        raise ValueError(f"band must be an int >= 0, got {band!r}")
    r = torch.arange(n)
    return ((r[:, None] - r[None, :]).abs() <= band) | (r[None, :] % stride == stride - 1)


def bigbird_attention(query, key, value, block_size: int, *, num_random_blocks: int = 3,
                      num_global_blocks: int = 1, seed: int = 0) -> torch.Tensor:
    """BigBird attention: :func:`block_sparse_attention` with :func:`bigbird_layout`.

    Example:
        >>> import torch
        >>> from attn_course import sparse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)     # (B, H, L, d) each
        >>> out = sparse.bigbird_attention(q, k, v, block_size=2, num_random_blocks=1)
        >>> layout = sparse.bigbird_layout(8, num_random_blocks=1)
        >>> dense = sparse.dense_attention(q, k, v, sparse.block_sparse_mask(layout, 2))
        >>> torch.allclose(out, dense, atol=1e-5)
        True
    """
    _, _, L, _ = _check_qkv(query, key, value)
    b = _checks.positive_number("block_size", block_size, integer=True)
    if L % b:
        raise ValueError(f"the length L={L} must be a multiple of block_size={b}")
    layout = bigbird_layout(L // b, num_random_blocks=num_random_blocks,
                            num_global_blocks=num_global_blocks, seed=seed)
    return block_sparse_attention(query, key, value, layout, b)


# --- content-based and approximate -------------------------------------------------------------------

def topk_attention(query, key, value, k: int) -> torch.Tensor:
    """Each query attends only to its ``k`` highest-scoring keys (``k >= L``: dense attention).

    Scores are computed for one chunk of queries at a time, so memory stays
    ``O(chunk * L + L * k)``; ties at the k-th score are broken by ``torch.topk``.

    Example:
        >>> import torch
        >>> from attn_course import sparse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)     # (B, H, L, d) each
        >>> best = (q @ k.transpose(-2, -1)).argmax(-1)             # k=1: the best key's value
        >>> torch.allclose(sparse.topk_attention(q, k, v, 1), torch.gather(v, 2, best[..., None].expand(-1, -1, -1, 8)))
        True
        >>> torch.allclose(sparse.topk_attention(q, k, v, 16), sparse.dense_attention(q, k, v), atol=1e-5)
        True
    """
    B, H, L, d = _check_qkv(query, key, value)
    k = _checks.positive_number("k", k, integer=True)
    if k >= L:
        return F.scaled_dot_product_attention(query, key, value)
    out = query.new_empty(B, H, L, value.shape[-1])
    chunk = max(1, (1 << 22) // max(1, B * H * L))
    for s in range(0, L, chunk):
        scores = query[:, :, s:s + chunk] @ key.transpose(-2, -1) / math.sqrt(d)    # (B, H, c, L)
        top, idx = scores.topk(k, dim=-1)
        weights = torch.softmax(top, dim=-1)                                            # (B, H, c, k)
        picked = torch.gather(value[:, :, None].expand(-1, -1, idx.shape[2], -1, -1), 3,
                              idx[..., None].expand(-1, -1, -1, -1, value.shape[-1]))  # (B, H, c, k, d_v)
        out[:, :, s:s + chunk] = (weights[..., None] * picked).sum(-2)
    return out


def _orthogonal_features(num_features: int, dim: int, seed: int, device, dtype) -> torch.Tensor:
    """Random features with orthogonal directions and Gaussian norms (Choromanski et al., 2020)."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    for _ in range(-(-num_features // dim)):
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
        blocks.append(q.T)
    directions = torch.cat(blocks)[:num_features]
    norms = torch.randn(num_features, dim, generator=gen, dtype=torch.float64).norm(dim=1)
    return (directions * norms[:, None]).to(device, dtype)


def performer_attention(query, key, value, num_features: int = 256, *, seed: int = 0) -> torch.Tensor:
    r"""Performer's FAVOR+ (Choromanski et al., 2020): softmax attention through positive random features.

    .. math:: \exp(\mathbf q^\top \mathbf k / \sqrt d) = \mathbb E_\omega[\phi(\mathbf q)^\top \phi(\mathbf k)],\quad
              \phi(\mathbf x) = \tfrac{1}{\sqrt F} \exp(\omega^\top \mathbf x - \lVert \mathbf x\rVert^2 / 2)

    with ``F = num_features`` (``x`` scaled by ``d^{-1/4}``), so attention becomes
    :math:`\phi(Q)\,[\phi(K)^\top V] / \phi(Q)\,[\phi(K)^\top \mathbf 1]`: linear in ``L``.
    The estimate converges to softmax attention as ``num_features`` grows, but its variance
    grows as :math:`e^{\lVert \mathbf x + \mathbf y\rVert^2} / F` (the paper's Lemma 2): for
    queries and keys of large norm (peaked attention) it needs impractically many features.

    Example:
        >>> import torch
        >>> from attn_course import sparse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)     # (B, H, L, d) each
        >>> q, k = 0.5 * q, 0.5 * k                                     # moderate norms
        >>> exact = sparse.dense_attention(q, k, v)
        >>> errors = [(sparse.performer_attention(q, k, v, f) - exact).abs().max().item()
        ...           for f in (8, 4096)]
        >>> errors[1] < errors[0], errors[1] < 0.1                       # more features, closer
        (True, True)
    """
    B, H, L, d = _check_qkv(query, key, value)
    m = _checks.positive_number("num_features", num_features, integer=True)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    # scale by position in the argument list, never by identity: f(x, x, x) must scale q and k too
    q, k, v = query.to(work) * d ** -0.25, key.to(work) * d ** -0.25, value.to(work)
    omega = _orthogonal_features(m, d, seed, query.device, work)                     # (m, d)

    def features(x, per_row: bool):
        proj = x @ omega.T - (x * x).sum(-1, keepdim=True) / 2                      # (B, H, L, m)
        # subtracting a maximum keeps exp() finite; it cancels between numerator and denominator
        shift = proj.amax(-1, keepdim=True) if per_row else proj.amax(dim=(-2, -1), keepdim=True)
        return torch.exp(proj - shift) / math.sqrt(m)

    phi_q, phi_k = features(q, True), features(k, False)
    kv = phi_k.transpose(-2, -1) @ v                                                   # (B, H, m, d_v)
    normaliser = phi_q @ phi_k.sum(-2, keepdim=True).transpose(-2, -1)                # (B, H, L, 1)
    return ((phi_q @ kv) / normaliser.clamp_min(torch.finfo(work).tiny)).to(query.dtype)


def _lsh_chunks(query, key, bucket_size: int, n_hashes: int, seed: int):
    """Angular LSH (Kitaev et al., 2020): per round, a bucket per vector from a random rotation;
    queries and keys are each sorted by (bucket, position) and cut into chunks of
    ``bucket_size``. Returns sorted orders and chunk ids, ``(n_hashes, B, H, L)`` each."""
    B, H, L, d = query.shape
    n_buckets = max(2, 2 * math.ceil(L / (2 * bucket_size)))
    gen = torch.Generator().manual_seed(seed)
    rot = torch.randn(n_hashes, d, n_buckets // 2, generator=gen, dtype=torch.float64)
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    rot = rot.to(query.device, work)
    pos = torch.arange(L, device=query.device)
    orders, chunks = [], []
    for x in (query, key):
        proj = torch.einsum("bhld,rdn->rbhln", F.normalize(x.to(work), dim=-1), rot)
        # bucket = argmax over [proj, -proj], without building the concatenation
        best = proj.abs().argmax(-1, keepdim=True)
        buckets = (best + (n_buckets // 2) * (proj.gather(-1, best) < 0)).squeeze(-1)      # (r, B, H, L)
        order = torch.argsort(buckets * L + pos, dim=-1)                                 # by bucket, then position
        rank = torch.argsort(order, dim=-1)
        orders.append(order)
        chunks.append((rank // bucket_size).to(torch.int32))
    return orders, chunks


def lsh_buckets(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    r"""Angular LSH (Kitaev et al., 2020, after Andoni et al., 2015): the bucket of each vector.

    .. math:: h(\mathbf x) = \arg\max\,[\mathbf x R;\, -\mathbf x R]

    ``x (..., L, d)`` and ``rotations R (d, n_buckets / 2)`` give ``(..., L)`` bucket ids
    (int64) in ``[0, n_buckets)``: bucket ``j`` when column ``j`` of ``R`` is the direction
    most aligned with ``x``, ``j + n_buckets / 2`` when its opposite is. Vectors close in angle
    land in the same bucket with high probability; the length of ``x`` does not matter.
    :func:`lsh_attention` hashes queries and keys this way, one random ``R`` per round.

    Example:
        >>> import torch
        >>> from attn_course.sparse import lsh_buckets
        >>> R = torch.eye(2)                                       # 4 buckets: +e1, +e2, -e1, -e2
        >>> lsh_buckets(torch.tensor([[3.0, 1.0], [0.0, 2.0], [-5.0, 1.0], [1.0, -4.0]]), R).tolist()
        [0, 1, 2, 3]
    """
    _checks.float_tensor("x", x)
    _checks.float_tensor("rotations", rotations, ndim=2)
    if x.ndim < 1 or x.shape[-1] != rotations.shape[0]:
        raise ValueError(f"rotations must have shape (d, n) with d = x.shape[-1] = {x.shape[-1]}, "
                         f"got {tuple(rotations.shape)}")
    proj = x @ rotations.to(x.dtype)                                                     # (..., L, n / 2)
    return torch.cat([proj, -proj], dim=-1).argmax(-1)


def lsh_mask(query, key, bucket_size: int = 64, n_hashes: int = 4, *, seed: int = 0) -> torch.Tensor:
    """``(B, H, L, L)`` bool: the keys :func:`lsh_attention` lets each query see.

    In each hashing round, query ``i`` sees the keys in its own chunk and the chunk before
    (in sorted order); the mask is the union over rounds. For teaching and tests (it is dense).

    Example:
        >>> import torch
        >>> from attn_course import sparse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)     # (B, H, L, d) each
        >>> mask = sparse.lsh_mask(q, k, bucket_size=4, n_hashes=2)
        >>> tuple(mask.shape), 0.0 < mask.float().mean().item() < 1.0   # a dense mask, mostly False
        ((1, 2, 16, 16), True)
    """
    _check_qkv(query, key, key)
    bucket_size = _checks.positive_number("bucket_size", bucket_size, integer=True)
    n_hashes = _checks.positive_number("n_hashes", n_hashes, integer=True)
    _, (cq, ck) = _lsh_chunks(query, key, bucket_size, n_hashes, seed)
    diff = cq[..., :, None] - ck[..., None, :]                                          # (r, B, H, L, L)
    return ((diff & -2) == 0).any(0)                                                    # diff in {0, 1}


def lsh_attention(query, key, value, bucket_size: int = 64, n_hashes: int = 4, *, seed: int = 0) -> torch.Tensor:
    """Reformer-style LSH attention: each query sees only the keys hashed near it.

    Unlike Reformer, queries and keys are not shared (no shared-QK): both are hashed with the
    same rotations and sorted separately, and the ``c``-th chunk of sorted queries is paired
    with the ``c``-th (and ``c - 1``-th) chunk of sorted keys; a token may attend to itself.

    Per round, queries and keys sorted by bucket are cut into chunks of ``bucket_size``;
    each query chunk attends to the matching key chunk and the one before. The rounds are
    merged into one softmax over the union of the keys they reached, each key counted
    once, so the result equals dense attention under :func:`lsh_mask`;
    ``bucket_size >= L`` is dense attention. Memory is ``O(n_hashes * L * bucket_size)``.

    Example:
        >>> import torch
        >>> from attn_course import sparse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 16, 8).unbind(0)     # (B, H, L, d) each
        >>> out = sparse.lsh_attention(q, k, v, bucket_size=4, n_hashes=2)
        >>> dense = sparse.dense_attention(q, k, v, sparse.lsh_mask(q, k, bucket_size=4, n_hashes=2))
        >>> torch.allclose(out, dense, atol=1e-5)
        True
        >>> torch.allclose(sparse.lsh_attention(q, k, v, bucket_size=16), sparse.dense_attention(q, k, v), atol=1e-5)
        True
    """
    B, H, L, d = _check_qkv(query, key, value)
    c = _checks.positive_number("bucket_size", bucket_size, integer=True)
    r = _checks.positive_number("n_hashes", n_hashes, integer=True)
    (oq, ok), (cq, ck) = _lsh_chunks(query, key, c, r, seed)
    nc = -(-L // c)
    Lp = nc * c
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for rd in range(r):
        # key ranks of the previous chunk and this one, for every query chunk: (nc, 2c)
        ranks = torch.arange(-c, c, device=query.device)[None, :] + c * torch.arange(nc, device=query.device)[:, None]
        key_ok = (ranks >= 0) & (ranks < L)
        kidx = ok[rd].gather(-1, ranks.clamp(0, L - 1).flatten().expand(B, H, -1)).view(B, H, nc, 2 * c)
        qidx = F.pad(oq[rd], (0, Lp - L)).view(B, H, nc, c)                              # padded with query 0
        qs = query.to(work).gather(2, qidx.flatten(2)[..., None].expand(-1, -1, -1, d)).view(B, H, nc, c, d)
        ks = key.to(work).gather(2, kidx.flatten(2)[..., None].expand(-1, -1, -1, d)).view(B, H, nc, 2 * c, d)
        vs = value.to(work).gather(2, kidx.flatten(2)[..., None].expand(-1, -1, -1, value.shape[-1]))
        vs = vs.view(B, H, nc, 2 * c, value.shape[-1])
        scores = qs @ ks.transpose(-2, -1) / math.sqrt(d)                                # (B, H, nc, c, 2c)
        # how many rounds reach each (query, key) pair: count it once in the merged softmax
        times = torch.zeros(B, H, nc, c, 2 * c, dtype=torch.int8, device=query.device)
        for other in range(r):
            cq_pair = cq[other].gather(-1, qidx.flatten(2)).view(B, H, nc, c, 1)
            ck_pair = ck[other].gather(-1, kidx.flatten(2)).view(B, H, nc, 1, 2 * c)
            times += ((cq_pair - ck_pair) & -2) == 0      # the key's chunk is the query's or the one before
        times = times.clamp_min(1)
        scores = scores - times.to(work).log()
        scores = scores.masked_fill(~key_ok[None, None, :, None, :], float("-inf"))
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)                              # (B, H, nc, c, 1)
        o = torch.softmax(scores, dim=-1) @ vs
        # back to the original query order (padding rows are dropped)
        inv = torch.argsort(oq[rd], dim=-1)
        o = o.reshape(B, H, Lp, -1)[:, :, :L].gather(2, inv[..., None].expand(-1, -1, -1, o.shape[-1]))
        lse = lse.reshape(B, H, Lp, 1)[:, :, :L].gather(2, inv[..., None])
        outs.append(o)
        lses.append(lse)
    lses = torch.stack(lses)                                                              # (r, B, H, L, 1)
    share = torch.softmax(lses, dim=0)
    return (share * torch.stack(outs)).sum(0).to(query.dtype)
