r"""Chapter 8: exact attention in tiles, forward and backward, with the online softmax.

Softmax attention over a set of keys can be split into parts. For each query,
attention over the keys of part :math:`i` gives an output :math:`o_i` and the
log-sum-exp of the scores, :math:`\ell_i = \log \sum_{j \in i} e^{s_j}`. The
attention over the union of disjoint parts is then

.. math:: \ell = \log \sum_i e^{\ell_i}, \qquad o = \sum_i e^{\ell_i - \ell}\, o_i ,

which is all that FlashAttention (Dao et al., 2022), the KV cache's chunked
prefill and ring attention (Liu et al., 2023) need: the :math:`L_q \times L_k`
matrix of scores is never stored, only one tile of it at a time. The saved
:math:`\ell` is also what lets the backward pass recompute the weights tile by tile
instead of storing them (FlashAttention-2, Dao 2023).

Public functions (see the course's API page): :func:`attention_with_lse`,
:func:`merge_attention`, :func:`flash_attention` (differentiable, top-left or
bottom-right causal masks); plus :func:`tile_plan`, which counts the tiles a causal
pass computes and skips, :func:`online_softmax`, the streaming softmax of one vector
of scores, and the IO counts of Dao et al.'s Theorem 2: :func:`standard_hbm_bytes`,
:func:`flash_hbm_bytes` (the paper's loop order) and :func:`flash2_hbm_bytes` (the loop
order :func:`flash_attention` uses).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _checks
from .basics import _scores_setup

__all__ = ["attention_with_lse", "merge_attention", "flash_attention", "tile_plan", "online_softmax",
           "flash_hbm_bytes", "flash2_hbm_bytes", "standard_hbm_bytes", "ALIGNS"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half precision inputs are accumulated in float32, as FlashAttention's kernels do."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       mask: torch.Tensor | None = None, *, is_causal: bool = False,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Dense attention and the log-sum-exp of each query's scores.

    .. math:: s_{ij} = \text{scale}\; q_i \cdot k_j, \quad
              \ell_i = \log \sum_{j\ \text{allowed}} e^{s_{ij}}, \quad
              o_i = \sum_{j\ \text{allowed}} e^{s_{ij} - \ell_i}\, v_j

    Args:
        query: ``(..., L_q, d_k)``.
        key: ``(..., L_k, d_k)``.
        value: ``(..., L_k, d_v)``.
        mask: bool, broadcasts to ``(..., L_q, L_k)``; ``True`` = may attend.
        is_causal: hide keys ``j > i`` (top-left aligned, as torch's SDPA).
        scale: multiplies the scores; defaults to ``1 / sqrt(d_k)``.

    Returns:
        ``output (..., L_q, d_v)`` in the inputs' dtype and ``lse (..., L_q)``, kept in float32
        for float16/bfloat16 inputs (as FlashAttention keeps it: merging many parts with a
        half-precision lse loses accuracy). A query with no allowed key gets a zero output
        and ``lse = -inf``: merged with other parts it changes nothing.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.flash import attention_with_lse
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 2, 6, 4).unbind(0)          # (B, L, d) each
        >>> out, lse = attention_with_lse(q, k, v, is_causal=True)
        >>> tuple(out.shape), tuple(lse.shape)
        ((2, 6, 4), (2, 6))
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
        True
        >>> first = (q[:, 0] * k[:, 0]).sum(-1) / 2                # query 0 sees key 0 only: lse = its score
        >>> torch.allclose(lse[:, 0], first)
        True
    """
    scale, mask = _scores_setup(query, key, value, mask, is_causal, scale)
    acc = _acc_dtype(query.dtype)
    scores = (query.to(acc) @ key.to(acc).transpose(-2, -1)) * scale       # (..., L_q, L_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                  # (..., L_q)
    finite = torch.isfinite(lse)
    weights = torch.exp(scores - torch.where(finite, lse, 0.0)[..., None])   # exp(-inf) = 0 when masked
    out = weights @ value.to(acc)
    return out.to(value.dtype), lse


def merge_attention(outputs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Combine attention computed over disjoint sets of keys into attention over their union.

    .. math:: \ell = \log \sum_i e^{\ell_i}, \qquad o = \sum_i e^{\ell_i - \ell}\, o_i

    Args:
        outputs: a sequence of ``(..., L_q, d_v)`` partial outputs, all of one dtype.
        lses: the matching sequence of ``(..., L_q)`` log-sum-exps (``-inf`` for a query
            that had no key in that part: the part then contributes nothing), all of one
            dtype, which may be wider than the outputs' (float32 for half outputs).

    Returns:
        ``(output (..., L_q, d_v), lse (..., L_q))``; a query with no key in any part gets a
        zero output and ``lse = -inf``.

    Example:
        Attention over keys 0-1 and over keys 2-4, merged, is attention over all five:

        >>> import torch
        >>> from attn_course.flash import attention_with_lse, merge_attention
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 5, 4).unbind(0)
        >>> o1, l1 = attention_with_lse(q, k[:, :2], v[:, :2])
        >>> o2, l2 = attention_with_lse(q, k[:, 2:], v[:, 2:])
        >>> out, lse = merge_attention([o1, o2], [l1, l2])
        >>> full, full_lse = attention_with_lse(q, k, v)
        >>> torch.allclose(out, full, atol=1e-6), torch.allclose(lse, full_lse, atol=1e-6)
        (True, True)
    """
    if isinstance(outputs, torch.Tensor) or isinstance(lses, torch.Tensor):
        raise TypeError("outputs and lses must be sequences (lists or tuples) of tensors, one per part")
    outputs, lses = list(outputs), list(lses)
    if not outputs:
        raise ValueError("outputs must hold at least one partial result")
    if len(outputs) != len(lses):
        raise ValueError(f"outputs and lses must have one entry per part; got {len(outputs)} outputs "
                         f"and {len(lses)} lses")
    for i, (o, s) in enumerate(zip(outputs, lses)):
        _checks.float_tensor(f"outputs[{i}]", o, min_ndim=2)
        _checks.float_tensor(f"lses[{i}]", s, min_ndim=1)
        _checks.same_dtype_device(**{"outputs[0]": outputs[0], f"outputs[{i}]": o})
        _checks.same_dtype_device(**{"lses[0]": lses[0], f"lses[{i}]": s})
        if s.device != o.device:
            raise ValueError(f"lses[{i}] is on {s.device} but outputs[{i}] is on {o.device}")
        if o.shape != outputs[0].shape:
            raise ValueError(f"outputs[{i}] has shape {tuple(o.shape)} but outputs[0] has "
                             f"{tuple(outputs[0].shape)}")
        if s.shape != o.shape[:-1]:
            raise ValueError(f"lses[{i}] must have the shape of outputs[{i}] without its last axis, "
                             f"{tuple(o.shape[:-1])}; got {tuple(s.shape)}")
    acc = torch.promote_types(_acc_dtype(outputs[0].dtype), _acc_dtype(lses[0].dtype))
    lse_all = torch.stack([s.to(acc) for s in lses])                       # (P, ..., L_q)
    lse = torch.logsumexp(lse_all, dim=0)                                   # (..., L_q)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)
    weights = torch.exp(lse_all - safe)                                     # 0 where a part is empty
    out = sum(w[..., None] * o.to(acc) for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), lse.to(_acc_dtype(lses[0].dtype))


def online_softmax(scores: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Softmax of ``scores (..., n)`` read in blocks of ``block``, keeping only a running max and sum.

    For each block: :math:`m' = \max(m, \max_j s_j)`, :math:`z' = z\,e^{m - m'} + \sum_j e^{s_j - m'}`
    (Milakov and Gimelshein, 2018; the inner loop of FlashAttention, Dao et al., 2022).

    Args:
        scores: ``(..., n)`` floats; the softmax is over the last axis.
        block: how many scores are read at a time (a positive int; ``n`` need not be a multiple).

    Returns:
        A tuple of the softmax ``(..., n)``, the running max ``(..., n_blocks)`` and the
        running sum ``(..., n_blocks)``. The softmax is computed at the end as
        :math:`e^{s - m}/z`; the per-block history shows how the two numbers evolve.

    Example:
        >>> import torch
        >>> from attn_course.flash import online_softmax
        >>> s = torch.tensor([1.0, 3.0, 0.0, 2.0, 5.0])
        >>> probs, m, z = online_softmax(s, block=2)      # blocks [1, 3], [0, 2], [5]
        >>> torch.allclose(probs, s.softmax(-1))
        True
        >>> m.tolist()                                     # the max so far, after each block
        [3.0, 3.0, 5.0]
        >>> [round(x, 4) for x in z.tolist()]              # e^-2 + 1, then + e^-3 + e^-1, then * e^-2 + 1
        [1.1353, 1.553, 1.2102]
    """
    _checks.float_tensor("scores", scores, min_ndim=1)
    block = _checks.positive_number("block", block, integer=True)
    m = torch.full(scores.shape[:-1], float("-inf"), dtype=scores.dtype, device=scores.device)
    z = torch.zeros(scores.shape[:-1], dtype=scores.dtype, device=scores.device)
    ms, zs = [], []
    for start in range(0, scores.shape[-1], block):
        s = scores[..., start:start + block]
        m_new = torch.maximum(m, s.amax(-1))
        m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
        z = z * torch.exp(m - m_safe) + torch.exp(s - m_safe[..., None]).sum(-1)
        m = m_new
        ms.append(m)
        zs.append(z)
    m_safe = torch.where(torch.isfinite(m), m, 0.0)
    z_safe = torch.where(z > 0, z, 1.0)
    probs = torch.exp(scores - m_safe[..., None]) / z_safe[..., None]
    return probs, torch.stack(ms, -1), torch.stack(zs, -1)


ALIGNS = ("top_left", "bottom_right")


def _causal_offset(align, length_q: int, length_k: int) -> int:
    """Key ``j`` is allowed for query ``i`` when ``j <= i + offset``: 0 top-left, ``L_k - L_q`` bottom-right."""
    if not isinstance(align, str) or align not in ALIGNS:
        raise ValueError(f"align must be 'top_left' (key j <= query i, as torch's SDPA) or 'bottom_right' "
                         f"(j <= i + L_k - L_q, as torch's causal_lower_right); got {align!r}")
    return 0 if align == "top_left" else length_k - length_q


def tile_plan(length_q: int, length_k: int, block_q: int = 128, block_k: int = 128, *,
              is_causal: bool = False, align: str = "top_left") -> dict[str, int]:
    """How many ``block_q x block_k`` tiles a pass computes in full, computes with a mask, or skips.

    Causal, key ``j`` allowed for query ``i`` when ``j <= i + offset`` (``offset = 0`` top-left
    aligned, ``L_k - L_q`` bottom-right aligned): a tile whose first key comes after its last
    query's last allowed key is skipped; a tile whose last key is allowed for its first query
    needs no mask; the tiles on the diagonal are computed with a mask.

    Args:
        length_q, length_k: the numbers of queries and keys.
        block_q, block_k: tile sizes (lengths need not be multiples of them).
        is_causal: apply the causal rule; without it every tile is ``"full"``.
        align: ``"top_left"`` or ``"bottom_right"``, where the causal diagonal sits.

    Returns:
        ``{"full": ..., "masked": ..., "skipped": ..., "total": ...}``, counts of tiles.

    Example:
        A causal 4 x 4 grid of tiles: 6 below the diagonal, 4 on it, 6 above it skipped.

        >>> from attn_course.flash import tile_plan
        >>> tile_plan(512, 512, 128, 128, is_causal=True)
        {'full': 6, 'masked': 4, 'skipped': 6, 'total': 16}
        >>> tile_plan(256, 512, 128, 128, is_causal=True, align="bottom_right")   # after 256 cached keys
        {'full': 5, 'masked': 2, 'skipped': 1, 'total': 8}
    """
    for name, v in (("length_q", length_q), ("length_k", length_k), ("block_q", block_q),
                    ("block_k", block_k)):
        _checks.positive_number(name, v, integer=True)
    offset = _causal_offset(align, length_q, length_k)
    plan = {"full": 0, "masked": 0, "skipped": 0}
    for q0 in range(0, length_q, block_q):
        q1 = min(q0 + block_q, length_q)
        for k0 in range(0, length_k, block_k):
            k1 = min(k0 + block_k, length_k)
            plan[_tile_kind(q0, q1, k0, k1, is_causal, offset)] += 1
    plan["total"] = plan["full"] + plan["masked"] + plan["skipped"]
    return plan


def _tile_kind(q0: int, q1: int, k0: int, k1: int, is_causal: bool, offset: int = 0) -> str:
    """``"full"``, ``"masked"`` or ``"skipped"`` for queries ``q0..q1-1`` and keys ``k0..k1-1``
    under the causal rule ``j <= i + offset``."""
    if not is_causal or k1 - 1 <= q0 + offset:
        return "full"
    if k0 > q1 - 1 + offset:
        return "skipped"
    return "masked"


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                    is_causal: bool = False, align: str = "top_left", block_q: int = 128,
                    block_k: int = 128, scale: float | None = None) -> torch.Tensor:
    r"""Exact attention in tiles with the online softmax, forward and backward (FlashAttention 1 and 2).

    **Forward** (Dao et al., 2022; loop order of Dao, 2023). For each tile of ``block_q``
    queries, the tiles of ``block_k`` keys are visited in order, keeping per query a running
    maximum :math:`m`, a running sum :math:`z` and an unnormalised output :math:`\tilde o`:

    .. math:: S = \text{scale}\, Q_t K_u^\top,\quad m' = \max(m, \mathrm{rowmax}\,S),\quad
              P = e^{S - m'},\quad z' = e^{m - m'} z + \mathrm{rowsum}\,P,\quad
              \tilde o' = e^{m - m'}\, \tilde o + P V_u

    and the output is :math:`O = \tilde o / z`; the log-sum-exp :math:`\ell = m + \log z` of
    each query is kept for the backward pass.

    **Backward** (FlashAttention-2, Algorithm 2). From the saved :math:`O` and :math:`\ell`
    only, with :math:`D = \mathrm{rowsum}(dO \circ O)` computed once, each tile recomputes its
    weights and adds its share of the gradients:

    .. math:: P = e^{S - \ell},\quad dV_u \mathrel{+}= P^\top dO_t,\quad dP = dO_t V_u^\top,\quad
              dS = P \circ (dP - D),\quad dQ_t \mathrel{+}= \text{scale}\; dS\, K_u,\quad
              dK_u \mathrel{+}= \text{scale}\; dS^\top Q_t .

    Only one ``block_q x block_k`` tile of scores exists at a time, forward or backward,
    never the ``L_q x L_k`` matrix: memory is linear in the lengths. With ``is_causal`` the
    tiles above the diagonal are skipped and only the diagonal tiles are masked.
    Half-precision inputs are accumulated in float32, as the papers' kernels do.

    Args:
        query: ``(..., L_q, d_k)`` (batch dimensions broadcast, here and in ``key``, ``value``).
        key: ``(..., L_k, d_k)``.
        value: ``(..., L_k, d_v)``.
        is_causal: hide the keys after each query.
        align: where the causal diagonal sits when ``L_q != L_k``. ``"top_left"``: query ``i``
            sees keys ``j <= i`` (torch's ``is_causal``); ``"bottom_right"``: the last query sees
            the last key, ``j <= i + L_k - L_q`` (torch's ``causal_lower_right``: new queries
            after cached keys, as in chunked prefill and speculative verification). A query
            that sees no key gets a zero output (and zero gradients).
        block_q, block_k: tile sizes (any positive ints; lengths need not be multiples).
        scale: multiplies the scores; defaults to ``1 / sqrt(d_k)``.

    Returns:
        ``(..., L_q, d_v)``, equal to dense softmax attention, differentiable in
        ``query``, ``key`` and ``value``.

    Example:
        Tiles of 16 over 50 queries and keys (not a multiple), against torch's dense attention,
        output and gradients:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.flash import flash_attention
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = (torch.randn(2, 3, 50, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
        >>> out = flash_attention(q, k, v, is_causal=True, block_q=16, block_k=16)
        >>> ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> tuple(out.shape), torch.allclose(out, ref)
        ((2, 3, 50, 8), True)
        >>> grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        >>> ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
        >>> all(torch.allclose(g, r) for g, r in zip(grads, ref_grads))
        True
    """
    scale, _ = _scores_setup(query, key, value, None, False, scale)
    offset = _causal_offset(align, query.shape[-2], key.shape[-2])
    block_q = _checks.positive_number("block_q", block_q, integer=True)
    block_k = _checks.positive_number("block_k", block_k, integer=True)
    return _FlashAttention.apply(query, key, value, bool(is_causal), offset, block_q, block_k, scale)


class _FlashAttention(torch.autograd.Function):
    """Tiled forward that saves ``(O, lse)``; tiled backward that recomputes the weights from them."""

    @staticmethod
    def forward(ctx, query, key, value, is_causal, offset, block_q, block_k, scale):
        out, lse = _flash(query, key, value, is_causal, block_q, block_k, scale, offset=offset)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.args = (is_causal, offset, block_q, block_k, scale)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, out, lse = ctx.saved_tensors
        dq, dk, dv = _flash_backward(query, key, value, out, lse, grad_out, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def _flash(query, key, value, is_causal, block_q, block_k, scale, *, offset: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The tiled forward pass: output and log-sum-exp ``m + log z`` (float32 for half inputs).

    Inputs are assumed validated (``scale`` may still be None); causal means ``j <= i + offset``.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    L_q, L_k, d_v = query.shape[-2], key.shape[-2], value.shape[-1]
    acc = _acc_dtype(query.dtype)
    q_all = query.expand(*batch, *query.shape[-2:])
    k_all = key.expand(*batch, *key.shape[-2:])
    v_all = value.expand(*batch, *value.shape[-2:])
    out = torch.empty(*batch, L_q, d_v, dtype=value.dtype, device=value.device)
    lse = torch.empty(*batch, L_q, dtype=acc, device=value.device)
    for q0 in range(0, L_q, block_q):
        q1 = min(q0 + block_q, L_q)
        q = q_all[..., q0:q1, :].to(acc) * scale                          # (..., bq, d)
        m = torch.full((*batch, q1 - q0), float("-inf"), dtype=acc, device=query.device)
        z = torch.zeros((*batch, q1 - q0), dtype=acc, device=query.device)
        o = torch.zeros((*batch, q1 - q0, d_v), dtype=acc, device=query.device)
        for k0 in range(0, L_k, block_k):
            k1 = min(k0 + block_k, L_k)
            kind = _tile_kind(q0, q1, k0, k1, is_causal, offset)
            if kind == "skipped":
                break                                    # every later key tile is skipped too
            s = q @ k_all[..., k0:k1, :].to(acc).transpose(-2, -1)          # (..., bq, bk): one tile
            if kind == "masked":
                s = s.masked_fill(_tile_mask(q0, q1, k0, k1, offset, query.device), float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isfinite(m_new), m_new, 0.0)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)                                   # rescales what came before
            z = alpha * z + p.sum(-1)
            o = alpha[..., None] * o + p @ v_all[..., k0:k1, :].to(acc)
            m = m_new
        out[..., q0:q1, :] = (o / torch.where(z > 0, z, 1.0)[..., None]).to(value.dtype)
        lse[..., q0:q1] = torch.where(z > 0, m + torch.log(torch.where(z > 0, z, 1.0)), float("-inf"))
    return out, lse


def _tile_mask(q0: int, q1: int, k0: int, k1: int, offset: int, device) -> torch.Tensor:
    """``(q1 - q0, k1 - k0)`` bool, True where a key is hidden (``j > i + offset``)."""
    rows = torch.arange(q0, q1, device=device)[:, None]
    cols = torch.arange(k0, k1, device=device)[None, :]
    return cols > rows + offset


def _backward_tile(q, k, v, dout, lse, delta, scale: float, hidden=None):
    r"""One tile of FlashAttention-2's backward pass: this tile's shares of ``dQ``, ``dK``, ``dV``.

    ``q (..., bq, d_k)``, ``k (..., bk, d_k)``, ``v (..., bk, d_v)``, ``dout (..., bq, d_v)``,
    ``lse`` and ``delta = rowsum(dO * O)`` ``(..., bq)`` of the whole rows; ``hidden`` a bool
    ``(bq, bk)`` mask, True where a key is hidden. A row with ``lse = -inf`` (no key at all)
    gets weights 0.
    """
    s = (q @ k.transpose(-2, -1)) * scale                                  # (..., bq, bk)
    if hidden is not None:
        s = s.masked_fill(hidden, float("-inf"))
    lse_safe = torch.where(torch.isfinite(lse), lse, float("inf"))          # exp(s - inf) = 0
    p = torch.exp(s - lse_safe[..., None])                                  # the weights, recomputed
    dv = p.transpose(-2, -1) @ dout                                         # (..., bk, d_v)
    dp = dout @ v.transpose(-2, -1)                                         # (..., bq, bk)
    ds = p * (dp - delta[..., None])                                        # softmax's backward
    dq = (ds @ k) * scale                                                   # (..., bq, d_k)
    dk = (ds.transpose(-2, -1) @ q) * scale                                 # (..., bk, d_k)
    return dq, dk, dv


def _flash_backward(query, key, value, out, lse, grad_out, is_causal, offset, block_q, block_k, scale):
    """Gradients of the tiled attention from the saved output and log-sum-exp (FA2, Algorithm 2):
    key tiles outside (their ``dK``, ``dV`` accumulate in one tile), query tiles inside (``dQ``
    accumulates in place); memory linear in the lengths."""
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    L_q, L_k = query.shape[-2], key.shape[-2]
    d_k, d_v = query.shape[-1], value.shape[-1]
    acc = _acc_dtype(query.dtype)
    q_all = query.expand(*batch, L_q, d_k)
    k_all = key.expand(*batch, L_k, d_k)
    v_all = value.expand(*batch, L_k, d_v)
    do_all = grad_out.to(acc).expand(*batch, L_q, d_v)
    delta = (do_all * out.to(acc)).sum(-1)                                  # D = rowsum(dO * O), (..., L_q)
    lse = lse.to(acc)
    dq = torch.zeros(*batch, L_q, d_k, dtype=acc, device=query.device)
    dk = torch.empty(*batch, L_k, d_k, dtype=acc, device=query.device)
    dv = torch.empty(*batch, L_k, d_v, dtype=acc, device=query.device)
    for k0 in range(0, L_k, block_k):
        k1 = min(k0 + block_k, L_k)
        k = k_all[..., k0:k1, :].to(acc)
        v = v_all[..., k0:k1, :].to(acc)
        dk_u = torch.zeros(*batch, k1 - k0, d_k, dtype=acc, device=query.device)
        dv_u = torch.zeros(*batch, k1 - k0, d_v, dtype=acc, device=query.device)
        first = max(0, k0 - offset) // block_q * block_q if is_causal else 0   # earlier query tiles see none
        for q0 in range(first, L_q, block_q):
            q1 = min(q0 + block_q, L_q)
            kind = _tile_kind(q0, q1, k0, k1, is_causal, offset)
            if kind == "skipped":
                continue
            hidden = _tile_mask(q0, q1, k0, k1, offset, query.device) if kind == "masked" else None
            dq_t, dk_t, dv_t = _backward_tile(q_all[..., q0:q1, :].to(acc), k, v, do_all[..., q0:q1, :],
                                              lse[..., q0:q1], delta[..., q0:q1], scale, hidden)
            dq[..., q0:q1, :] += dq_t
            dk_u += dk_t
            dv_u += dv_t
        dk[..., k0:k1, :] = dk_u
        dv[..., k0:k1, :] = dv_u
    return (dq.sum_to_size(query.shape).to(query.dtype), dk.sum_to_size(key.shape).to(key.dtype),
            dv.sum_to_size(value.shape).to(value.dtype))


def standard_hbm_bytes(length: int, head_dim: int, *, bytes_per_value: int = 2) -> int:
    r"""Bytes moved to and from GPU memory (HBM) by standard attention for one head (Dao et al. 2022, Thm. 2).

    Read :math:`Q, K, V` (``3 N d``), write and read back :math:`S` and :math:`P`
    (``4 N^2``: S written, read by softmax, P written, read by the product), write :math:`O`
    (``N d``): :math:`\Theta(N d + N^2)` elements.

    Args:
        length: :math:`N`, the sequence length.
        head_dim: :math:`d`.
        bytes_per_value: 2 for float16.

    Returns:
        The number of bytes, :math:`(4 N d + 4 N^2) \times` ``bytes_per_value``.

    Example:
        >>> from attn_course.flash import standard_hbm_bytes
        >>> standard_hbm_bytes(1024, 64) == (4 * 1024 * 64 + 4 * 1024**2) * 2
        True
        >>> round(standard_hbm_bytes(2048, 64) / standard_hbm_bytes(1024, 64), 2)   # the N^2 term dominates
        3.88
    """
    n, d = length, head_dim
    return (4 * n * d + 4 * n * n) * bytes_per_value


def flash_hbm_bytes(length: int, head_dim: int, sram_bytes: int, *, bytes_per_value: int = 2) -> int:
    r"""Bytes moved by FlashAttention's forward pass for one head (Dao et al. 2022, Thm. 2).

    This counts the loop order of the paper's Algorithm 1 (key/value tiles outside, queries
    inside); :func:`flash_attention` uses FlashAttention-2's order (queries outside), which
    reads each query tile once and the keys and values once per query tile instead.

    With SRAM of :math:`M` elements, key/value tiles of :math:`B_c = \lceil M / 4d \rceil`
    rows and query tiles of :math:`B_r = \min(B_c, d)` rows: :math:`K, V` are read once,
    and :math:`Q, O` and the running max and sum are read and written once per key/value
    tile, :math:`T_c = \lceil N / B_c \rceil` times: :math:`\Theta(N^2 d^2 / M)` elements.

    Args:
        length: :math:`N`, the sequence length.
        head_dim: :math:`d`.
        sram_bytes: :math:`M`, in bytes.
        bytes_per_value: 2 for float16.

    Returns:
        The number of bytes moved.

    Example:
        With 100 KiB of SRAM, :math:`B_c = 200` rows, so :math:`T_c = 6` passes over 1024 queries:

        >>> from attn_course.flash import flash_hbm_bytes, standard_hbm_bytes
        >>> flash_hbm_bytes(1024, 64, 100 * 1024) == (2 * 1024 * 64 + 6 * (3 * 1024 * 64 + 4 * 1024)) * 2
        True
        >>> round(standard_hbm_bytes(1024, 64) / flash_hbm_bytes(1024, 64, 100 * 1024), 2)
        3.34
    """
    n, d = length, head_dim
    m_elems = sram_bytes // bytes_per_value
    block_c = max(1, m_elems // (4 * d))
    t_c = math.ceil(n / block_c)
    return (2 * n * d + t_c * (3 * n * d + 4 * n)) * bytes_per_value


def flash2_hbm_bytes(length: int, head_dim: int, sram_bytes: int, *, bytes_per_value: int = 2) -> int:
    r"""Bytes moved by a tiled forward pass in FlashAttention-2's loop order, for one head.

    The order :func:`flash_attention` (and the course's Triton kernel) uses: query tiles
    outside, key/value tiles inside. SRAM of :math:`M_\text{sram}` elements holds one tile each
    of :math:`Q`, :math:`O`, :math:`K`, :math:`V`, so tiles have
    :math:`b = \lfloor M_\text{sram} / 4d \rfloor` rows (the budget of Dao et al. 2022, Thm. 2).
    :math:`Q` is read once and :math:`O` written once; :math:`K` and :math:`V` are read once per
    query tile, :math:`\lceil L / b \rceil` times:

    .. math:: 2 L d + 2 L d\, \lceil L / b \rceil \approx 2Ld + \frac{8 L^2 d^2}{M_\text{sram}}\ \text{elements},

    the same :math:`\Theta(L^2 d^2 / M_\text{sram})` as the paper's order. Against standard
    attention's :math:`4Ld + 4L^2`, the ratio tends to :math:`M_\text{sram} / 2d^2` for long
    sequences: the advantage shrinks with the square of the head dimension and vanishes near
    :math:`d = \sqrt{M_\text{sram}/2}`. (The log-sum-exp, one number per query, is left out.)

    Args:
        length: :math:`L`, the sequence length.
        head_dim: :math:`d`.
        sram_bytes: :math:`M_\text{sram}`, in bytes.
        bytes_per_value: 2 for float16.

    Returns:
        The number of bytes moved.

    Example:
        With 100 KiB of SRAM and :math:`d = 64`, tiles of 200 rows, so 1024 queries make 6 tiles:

        >>> from attn_course.flash import flash2_hbm_bytes, standard_hbm_bytes
        >>> flash2_hbm_bytes(1024, 64, 100 * 1024) == (2 * 1024 * 64 + 2 * 1024 * 64 * 6) * 2
        True
        >>> round(standard_hbm_bytes(1024, 64) / flash2_hbm_bytes(1024, 64, 100 * 1024), 2)
        4.86
    """
    for name, v in (("length", length), ("head_dim", head_dim), ("sram_bytes", sram_bytes),
                    ("bytes_per_value", bytes_per_value)):
        _checks.positive_number(name, v, integer=True)
    n, d = length, head_dim
    block = max(1, sram_bytes // bytes_per_value // (4 * d))
    t_r = math.ceil(n / block)
    return (2 * n * d + 2 * n * d * t_r) * bytes_per_value
