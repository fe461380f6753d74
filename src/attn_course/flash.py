r"""Chapter 7: exact attention at scale, computed in tiles with the online softmax.

Softmax attention over a set of keys can be split into parts. For each query,
attention over the keys of part :math:`i` gives an output :math:`o_i` and the
log-sum-exp of the scores, :math:`\ell_i = \log \sum_{j \in i} e^{s_j}`. The
attention over the union of disjoint parts is then

.. math:: \ell = \log \sum_i e^{\ell_i}, \qquad o = \sum_i e^{\ell_i - \ell}\, o_i ,

which is all that FlashAttention (Dao et al., 2022), the KV cache's chunked
prefill and ring attention (Liu et al., 2023) need: the :math:`L_q \times L_k`
matrix of scores is never stored, only one tile of it at a time.

Public functions (see the course's API page): :func:`attention_with_lse`,
:func:`merge_attention`, :func:`flash_attention`; plus :func:`tile_plan`, which
counts the tiles a causal pass computes and skips, and :func:`online_softmax`,
the streaming softmax of one vector of scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _checks
from .basics import _scores_setup

__all__ = ["attention_with_lse", "merge_attention", "flash_attention", "tile_plan", "online_softmax",
           "flash_hbm_bytes", "standard_hbm_bytes"]


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
        query: ``(..., L_q, d_k)``; key: ``(..., L_k, d_k)``; value: ``(..., L_k, d_v)``.
        mask: bool, broadcasts to ``(..., L_q, L_k)``; ``True`` = may attend.
        is_causal: hide keys ``j > i`` (top-left aligned, as torch's SDPA).
        scale: multiplies the scores; defaults to ``1 / sqrt(d_k)``.

    Returns:
        ``output (..., L_q, d_v)`` in the inputs' dtype and ``lse (..., L_q)``, kept in float32
        for float16/bfloat16 inputs (as FlashAttention keeps it: merging many parts with a
        half-precision lse loses accuracy). A query with no allowed key gets a zero output
        and ``lse = -inf``: merged with other parts it changes nothing.
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

    For each block: :math:`m' = \max(m, \max_j s_j)`, :math:`z' = z\,e^{m - m'} + \sum_j e^{s_j - m'}`.
    Returns ``(softmax (..., n), running max (..., n_blocks), running sum (..., n_blocks))``:
    the softmax is computed at the end as :math:`e^{s - m}/z`, and the per-block
    history shows how the two numbers evolve.
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


def tile_plan(length_q: int, length_k: int, block_q: int = 128, block_k: int = 128, *,
              is_causal: bool = False) -> dict[str, int]:
    """How many ``block_q x block_k`` tiles a pass computes in full, computes with a mask, or skips.

    Causal (top-left aligned, key ``j`` allowed for query ``i`` when ``j <= i``): a tile whose first
    key comes after its last query is skipped; a tile whose last key is at or before its first
    query needs no mask; the tiles on the diagonal are computed with a mask.
    """
    for name, v in (("length_q", length_q), ("length_k", length_k), ("block_q", block_q),
                    ("block_k", block_k)):
        _checks.positive_number(name, v, integer=True)
    plan = {"full": 0, "masked": 0, "skipped": 0}
    for q0 in range(0, length_q, block_q):
        q1 = min(q0 + block_q, length_q)
        for k0 in range(0, length_k, block_k):
            k1 = min(k0 + block_k, length_k)
            plan[_tile_kind(q0, q1, k0, k1, is_causal)] += 1
    plan["total"] = plan["full"] + plan["masked"] + plan["skipped"]
    return plan


def _tile_kind(q0: int, q1: int, k0: int, k1: int, is_causal: bool) -> str:
    if not is_causal or k1 - 1 <= q0:
        return "full"
    if k0 > q1 - 1:
        return "skipped"
    return "masked"


def flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                    is_causal: bool = False, block_q: int = 128, block_k: int = 128,
                    scale: float | None = None) -> torch.Tensor:
    r"""Exact attention in tiles with the online softmax: FlashAttention's forward pass (Dao et al., 2022).

    For each tile of ``block_q`` queries, the tiles of ``block_k`` keys are visited in
    order, keeping per query a running maximum :math:`m`, a running sum :math:`z` and
    an unnormalised output :math:`\tilde o`:

    .. math:: S = \text{scale}\, Q_t K_u^\top,\quad m' = \max(m, \mathrm{rowmax}\,S),\quad
              P = e^{S - m'},\quad z' = e^{m - m'} z + \mathrm{rowsum}\,P,\quad
              \tilde o' = e^{m - m'}\, \tilde o + P V_u

    and the output is :math:`\tilde o / z`. Only one ``block_q x block_k`` tile of scores
    exists at a time, never the ``L_q x L_k`` matrix. With ``is_causal`` (top-left
    aligned, as ``torch.nn.functional.scaled_dot_product_attention``), tiles above the
    diagonal are skipped and only the diagonal tiles are masked. Half-precision inputs
    are accumulated in float32, as the paper's kernel does.

    Args:
        query: ``(..., L_q, d_k)``; key: ``(..., L_k, d_k)``; value: ``(..., L_k, d_v)``.
        block_q, block_k: tile sizes (any positive ints; lengths need not be multiples).

    Returns:
        ``(..., L_q, d_v)``, equal to dense softmax attention.
    """
    out, _ = _flash(query, key, value, is_causal, block_q, block_k, scale)
    return out


def _flash(query, key, value, is_causal, block_q, block_k, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flash_attention`, also returning the log-sum-exp ``m + log z`` (float32 for half inputs)."""
    scale, _ = _scores_setup(query, key, value, None, False, scale)
    batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    block_q = _checks.positive_number("block_q", block_q, integer=True)
    block_k = _checks.positive_number("block_k", block_k, integer=True)
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
            kind = _tile_kind(q0, q1, k0, k1, is_causal)
            if kind == "skipped":
                break                                    # every later key tile is skipped too
            s = q @ k_all[..., k0:k1, :].to(acc).transpose(-2, -1)          # (..., bq, bk): one tile
            if kind == "masked":
                rows = torch.arange(q0, q1, device=query.device)[:, None]
                cols = torch.arange(k0, k1, device=query.device)[None, :]
                s = s.masked_fill(cols > rows, float("-inf"))
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


def standard_hbm_bytes(length: int, head_dim: int, *, bytes_per_value: int = 2) -> int:
    r"""Bytes moved to and from GPU memory (HBM) by standard attention for one head (Dao et al. 2022, Thm. 2).

    Read :math:`Q, K, V` (``3 N d``), write and read back :math:`S` and :math:`P`
    (``4 N^2``: S written, read by softmax, P written, read by the product), write :math:`O`
    (``N d``): :math:`\Theta(N d + N^2)` elements.
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
    """
    n, d = length, head_dim
    m_elems = sram_bytes // bytes_per_value
    block_c = max(1, m_elems // (4 * d))
    t_c = math.ceil(n / block_c)
    return (2 * n * d + t_c * (3 * n * d + 4 * n)) * bytes_per_value
