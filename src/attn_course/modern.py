"""Chapter 11, attention in today's LLMs: what "MLA", "5:1 local/global", "sparse attention" and
"linear attention / DeltaNet" on a model card mean, and what each one buys.

- :class:`MultiHeadLatentAttention` (DeepSeek-V2): keys and values rebuilt from a small
  per-token latent, which is all the decoding cache holds.
- :func:`kv_bytes_per_token` and :data:`MODEL_CONFIGS`: the key/value cache of published
  models (MHA, GQA, MQA, MLA, sliding-window and local/global mixes).
- :func:`global_layers`: which layers of a local/global stack see the whole sequence.
- :func:`indexer_scores`, :func:`indexer_topk`, :func:`indexer_topk_mask`,
  :func:`sparse_selected_attention`: learned sparse selection (DeepSeek-V3.2's indexer).
- :func:`linear_attention` (Katharopoulos et al., 2020) and :func:`gated_delta_rule`
  (Yang et al., 2024): attention with a fixed-size state instead of a growing cache.

Every function keeps the dtype and the device of its inputs; float16 and bfloat16 inputs are
computed in float32 inside and cast back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .multihead import merge_heads
from .positional import apply_rope

__all__ = [
    "linear_attention",
    "delta_rule_step",
    "gated_delta_rule",
    "MLACache",
    "MultiHeadLatentAttention",
    "AttentionConfig",
    "MODEL_CONFIGS",
    "kv_bytes_per_token",
    "kv_cache_bytes_at",
    "global_layers",
    "indexer_scores",
    "indexer_topk",
    "indexer_topk_mask",
    "sparse_selected_attention",
]


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _int_arg(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _bool_arg(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__}")
    return value


# --- linear attention ---------------------------------------------------------------------------

def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0


def _features(feature_map, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(feature_map, str):
        if feature_map != "elu1":
            raise ValueError(f"feature_map must be 'elu1' or a function, got {feature_map!r}")
        return _elu1(q), _elu1(k)
    if not callable(feature_map):
        raise TypeError(f"feature_map must be 'elu1' or a function, got {type(feature_map).__name__}")
    fq, fk = feature_map(q), feature_map(k)
    for name, f, x in (("query", fq, q), ("key", fk, k)):
        if not isinstance(f, torch.Tensor) or f.shape[:-1] != x.shape[:-1]:
            raise ValueError(f"feature_map must map {name} {tuple(x.shape)} to a tensor (..., L, m); got "
                             f"{tuple(getattr(f, 'shape', ()))}")
    if fq.shape[-1] != fk.shape[-1]:
        raise ValueError(f"feature_map gave {fq.shape[-1]} features for query but {fk.shape[-1]} for key")
    return fq.to(q.dtype), fk.to(q.dtype)


def linear_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                     is_causal: bool = True, feature_map: str | Callable = "elu1",
                     chunk_size: int = 64) -> torch.Tensor:
    r"""Linear attention (Katharopoulos et al., 2020, "Transformers are RNNs").

    The softmax's :math:`\exp(q \cdot k)` is replaced by a product of features,
    :math:`\phi(q) \cdot \phi(k)` with :math:`\phi(x) = \mathrm{elu}(x) + 1 > 0`:

    .. math:: o_i = \frac{\sum_{j \in M_i} (\phi(q_i) \cdot \phi(k_j))\, v_j}
                         {\sum_{j \in M_i} \phi(q_i) \cdot \phi(k_j)}
                  = \frac{\phi(q_i)^\top S_i}{\phi(q_i)^\top z_i},\quad
              S_i = \sum_{j \in M_i} \phi(k_j) v_j^\top,\; z_i = \sum_{j \in M_i} \phi(k_j)

    with :math:`M_i = \{j \le i\}` when causal, all keys otherwise. The ``L x L`` matrix is
    never built: without causality ``S`` and ``z`` are one sum; with it they are prefix sums,
    computed chunk by chunk (within a chunk of ``chunk_size`` queries the masked products are
    formed, ``chunk_size x chunk_size``; across chunks the running sums carry the past).

    Args:
        query: ``(..., L_q, d)``; key ``(..., L_k, d)``; value ``(..., L_k, d_v)``, the same
            leading dimensions. Causal attention needs ``L_q == L_k``.
        feature_map: ``"elu1"`` or a function ``phi(x (..., L, d)) -> (..., L, m)`` with
            non-negative values (a query whose denominator is 0 gets a zero output).
        chunk_size: queries per chunk of the causal computation (the result does not depend on it).

    Returns:
        ``(..., L_q, d_v)`` in the dtype and on the device of ``query``.

    Example:
        It equals the quadratic form it replaces, and the chunk size changes nothing:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.modern import linear_attention
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 2, 10, 4).unbind(0)              # (B, L, d) each
        >>> out = linear_attention(q, k, v)                             # causal
        >>> A = ((F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)).tril()   # phi(q_i) . phi(k_j), j <= i
        >>> torch.allclose(out, (A @ v) / A.sum(-1, keepdim=True), atol=1e-5)
        True
        >>> torch.allclose(linear_attention(q, k, v, chunk_size=3), out, atol=1e-5)
        True
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.float_tensor(name, x, min_ndim=2)
    _checks.same_dtype_device(query=query, key=key, value=value)
    is_causal = _bool_arg("is_causal", is_causal)
    chunk_size = _int_arg("chunk_size", chunk_size, minimum=1)
    shapes = f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
    if not query.shape[:-2] == key.shape[:-2] == value.shape[:-2]:
        raise ValueError(f"query, key and value must have the same leading dimensions; got {shapes}")
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(f"need query (..., L_q, d), key (..., L_k, d), value (..., L_k, d_v); got {shapes}")
    if key.shape[-2] == 0 or query.shape[-2] == 0:
        raise ValueError(f"the sequences are empty; got {shapes}")
    if is_causal and query.shape[-2] != key.shape[-2]:
        raise ValueError(f"causal linear attention needs as many queries as keys; got {shapes}")
    work = _work_dtype(query.dtype)
    fq, fk = _features(feature_map, query.to(work), key.to(work))
    v = value.to(work)
    if not is_causal:
        state = fk.transpose(-2, -1) @ v                             # (..., m, d_v)
        num = fq @ state                                             # (..., L_q, d_v)
        den = fq @ fk.sum(-2)[..., None]                             # (..., L_q, 1)
    else:
        L, C = key.shape[-2], min(chunk_size, key.shape[-2])
        n = -(-L // C)
        pad = n * C - L                                              # zero features change nothing
        fq, fk, v = (F.pad(t, (0, 0, 0, pad)).unflatten(-2, (n, C)) for t in (fq, fk, v))  # (..., n, C, .)
        chunk_state = fk.transpose(-2, -1) @ v                       # (..., n, m, d_v)
        past_state = chunk_state.cumsum(-3) - chunk_state            # sums over earlier chunks only
        chunk_z = fk.sum(-2)                                         # (..., n, m)
        past_z = chunk_z.cumsum(-2) - chunk_z
        within = (fq @ fk.transpose(-2, -1)).tril()                  # (..., n, C, C), j <= i
        num = within @ v + fq @ past_state
        den = within.sum(-1, keepdim=True) + fq @ past_z[..., None]
        num, den = num.flatten(-3, -2)[..., :L, :], den.flatten(-3, -2)[..., :L, :]
    out = torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)
    return out.to(query.dtype)


# --- the (gated) delta rule ---------------------------------------------------------------------

def _unit_interval(name: str, x: torch.Tensor) -> None:
    if x.device.type == "meta":  # no values to check (shape-only runs)
        return
    if not bool(((x >= 0) & (x <= 1)).all()):
        bad = x[~((x >= 0) & (x <= 1))]
        raise ValueError(f"{name} must lie in [0, 1] (it scales the state); got values such as "
                         f"{bad.flatten()[0].item():.4g} (min {x.min().item():.4g}, max {x.max().item():.4g})")


def delta_rule_step(state: torch.Tensor, key: torch.Tensor, value: torch.Tensor, beta: torch.Tensor,
                    gate: torch.Tensor) -> torch.Tensor:
    r"""One step of the gated delta rule: write ``value`` under ``key`` into the ``state``.

    .. math:: S' = g\, S\, (I - \beta\, k k^\top) + \beta\, v k^\top
              = g\, S + \beta\, (v - g\, S k)\, k^\top

    The state first decays by the gate :math:`g`, then the value it currently returns for
    :math:`k` is replaced, by a share :math:`\beta`, with the new :math:`v` (the delta rule of
    Widrow and Hoff, as a fast-weight update: Schlag et al., 2021; gated: Yang et al., 2024).

    Shapes: ``state (..., d_v, d_k)``, ``key (..., d_k)``, ``value (..., d_v)``, ``beta`` and
    ``gate`` ``(...)`` in ``[0, 1]``. Returns the new state ``(..., d_v, d_k)``.

    Example:
        With ``beta = gate = 1`` and a unit key, the state then returns exactly the new value:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.modern import delta_rule_step
        >>> _ = torch.manual_seed(0)
        >>> state, value = torch.randn(3, 4), torch.randn(3)          # (d_v, d_k), (d_v,)
        >>> key = F.normalize(torch.randn(4), dim=0)
        >>> new = delta_rule_step(state, key, value, beta=torch.tensor(1.0), gate=torch.tensor(1.0))
        >>> torch.allclose(new @ key, value, atol=1e-6)
        True
        >>> half = delta_rule_step(state, key, value, beta=torch.tensor(0.5), gate=torch.tensor(1.0))
        >>> torch.allclose(half @ key, (state @ key + value) / 2, atol=1e-6)   # halfway there
        True
    """
    _checks.float_tensor("state", state, min_ndim=2)
    _checks.float_tensor("key", key)
    _checks.float_tensor("value", value)
    _checks.float_tensor("beta", beta, min_ndim=0)
    _checks.float_tensor("gate", gate, min_ndim=0)
    _checks.same_dtype_device(state=state, key=key, value=value, beta=beta, gate=gate)
    lead = state.shape[:-2]
    if (key.shape != lead + state.shape[-1:] or value.shape != lead + state.shape[-2:-1]
            or beta.shape != lead or gate.shape != lead):
        raise ValueError(f"need state (..., d_v, d_k), key (..., d_k), value (..., d_v), beta and gate (...); "
                         f"got state {tuple(state.shape)}, key {tuple(key.shape)}, value "
                         f"{tuple(value.shape)}, beta {tuple(beta.shape)}, gate {tuple(gate.shape)}")
    _unit_interval("beta", beta)
    _unit_interval("gate", gate)
    return _delta_step(state, key, value, beta, gate)


def _delta_step(S, k, v, beta, gate):
    g, b = gate[..., None, None], beta[..., None, None]
    Sk = (S @ k[..., :, None])                                # (..., d_v, 1): what the state returns for k
    return g * S + b * (v[..., :, None] - g * Sk) * k[..., None, :]


def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, beta: torch.Tensor,
                     gate: torch.Tensor, *, chunk_size: int | None = None,
                     initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The gated delta rule (Gated DeltaNet, Yang et al., 2024), a linear-attention layer whose
    state is edited rather than only added to.

    .. math:: S_t = g_t\, S_{t-1} (I - \beta_t k_t k_t^\top) + \beta_t v_t k_t^\top,\qquad o_t = S_t q_t

    With ``gate = 1`` it is DeltaNet (Schlag et al., 2021); with ``beta = 1`` and unit keys each
    write replaces what the state held for that key. The papers normalise ``q`` and ``k`` to
    unit length (then every factor ``I - beta k k^T`` is a contraction); this function applies
    the recurrence to the tensors it is given.

    ``chunk_size=None`` runs the recurrence step by step. An int runs the chunked parallel form
    (Yang et al., 2024, "Parallelizing Linear Transformers with the Delta Rule"): within a chunk
    of ``C`` steps, with :math:`\gamma_t = \prod_{s \le t} g_s` (a cumulative log-decay), the
    written vectors :math:`u_t = \beta_t (v_t - g_t S_{t-1} k_t)` solve the unit lower-triangular
    system :math:`(I + A) U = \mathrm{diag}(\beta) V - \mathrm{diag}(\beta\gamma) K S_0^\top` with
    :math:`A_{ts} = \beta_t (\gamma_t / \gamma_s) k_t \cdot k_s` for :math:`s < t` (the WY / UT
    transform, one triangular solve per chunk, for all chunks at once); then

    .. math:: o_t = \gamma_t S_0 q_t + \sum_{s \le t} (\gamma_t/\gamma_s)(q_t \cdot k_s)\, u_s,\qquad
              S_C = \gamma_C S_0 + \sum_s (\gamma_C/\gamma_s)\, u_s k_s^\top

    and only the ``L / C`` chunk-to-chunk steps are sequential. Both forms give the same result.

    Args:
        query, key: ``(B, H, L, d_k)`` (any leading dimensions); value ``(B, H, L, d_v)``.
        beta, gate: ``(B, H, L)`` in ``[0, 1]``: the write strength and the decay of each step.
        chunk_size: ``None`` (recurrent) or the chunk length (``L`` need not be a multiple).
        initial_state: ``(B, H, d_v, d_k)``, zeros by default.

    Returns:
        ``output (B, H, L, d_v)`` and the final ``state (B, H, d_v, d_k)``, in the input dtype.

    Example:
        The chunked parallel form gives the step-by-step recurrence's result:

        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.modern import gated_delta_rule
        >>> _ = torch.manual_seed(0)
        >>> q, k = torch.randn(2, 1, 2, 12, 4).unbind(0)              # (B, H, L, d_k)
        >>> k = F.normalize(k, dim=-1)
        >>> v, beta, gate = torch.randn(1, 2, 12, 3), torch.rand(1, 2, 12), 0.5 + 0.5 * torch.rand(1, 2, 12)
        >>> out, state = gated_delta_rule(q, k, v, beta, gate)
        >>> tuple(out.shape), tuple(state.shape)
        ((1, 2, 12, 3), (1, 2, 3, 4))
        >>> out_c, state_c = gated_delta_rule(q, k, v, beta, gate, chunk_size=5)
        >>> torch.allclose(out_c, out, atol=1e-5), torch.allclose(state_c, state, atol=1e-5)
        (True, True)
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.float_tensor(name, x, min_ndim=2)
    _checks.float_tensor("beta", beta)
    _checks.float_tensor("gate", gate)
    _checks.same_dtype_device(query=query, key=key, value=value, beta=beta, gate=gate)
    shapes = (f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}, "
              f"beta {tuple(beta.shape)}, gate {tuple(gate.shape)}")
    if query.shape != key.shape or value.shape[:-1] != key.shape[:-1]:
        raise ValueError(f"need query and key (B, H, L, d_k), value (B, H, L, d_v); got {shapes}")
    if beta.shape != key.shape[:-1]:
        raise ValueError(f"beta must have shape (B, H, L) = {tuple(key.shape[:-1])}; got {shapes}")
    if gate.shape != key.shape[:-1]:
        raise ValueError(f"gate must have shape (B, H, L) = {tuple(key.shape[:-1])}; got {shapes}")
    if key.shape[-2] == 0:
        raise ValueError(f"the sequences are empty; got {shapes}")
    _unit_interval("beta", beta)
    _unit_interval("gate", gate)
    if chunk_size is not None:
        chunk_size = _int_arg("chunk_size", chunk_size, minimum=1)
    lead, d_k, d_v = key.shape[:-2], key.shape[-1], value.shape[-1]
    work = _work_dtype(query.dtype)
    if initial_state is None:
        S = torch.zeros(*lead, d_v, d_k, device=query.device, dtype=work)
    else:
        _checks.float_tensor("initial_state", initial_state, min_ndim=2)
        _checks.same_dtype_device(query=query, initial_state=initial_state)
        if initial_state.shape != lead + (d_v, d_k):
            raise ValueError(f"initial_state must have shape (B, H, d_v, d_k) = {tuple(lead + (d_v, d_k))}, "
                             f"got {tuple(initial_state.shape)}")
        S = initial_state.to(work)
    q, k, v, b, g = (t.to(work) for t in (query, key, value, beta, gate))
    if chunk_size is None:
        out = []
        for t in range(k.shape[-2]):
            S = _delta_step(S, k[..., t, :], v[..., t, :], b[..., t], g[..., t])
            out.append((S @ q[..., t, :, None])[..., 0])
        return torch.stack(out, dim=-2).to(query.dtype), S.to(query.dtype)
    out, S = _chunked_delta(q, k, v, b, g, S, chunk_size)
    return out.to(query.dtype), S.to(query.dtype)


def _chunked_delta(q, k, v, beta, gate, S, C):
    L = k.shape[-2]
    C = min(C, L)
    n = -(-L // C)
    pad = n * C - L
    # padded steps write nothing (beta = 0) and do not decay (gate = 1)
    q, k, v = (F.pad(t, (0, 0, 0, pad)).unflatten(-2, (n, C)) for t in (q, k, v))     # (..., n, C, d)
    beta = F.pad(beta, (0, pad)).unflatten(-1, (n, C))                                 # (..., n, C)
    gate = F.pad(gate, (0, pad), value=1.0).unflatten(-1, (n, C))
    tiny = torch.finfo(q.dtype).tiny                    # a gate of exactly 0 becomes exp(log(tiny)) ~ 0
    log_gamma = gate.clamp_min(tiny).log().cumsum(-1)                                  # log gamma_t
    diff = log_gamma[..., :, None] - log_gamma[..., None, :]                           # log(gamma_t / gamma_s)
    ones = torch.ones(C, C, dtype=torch.bool, device=q.device)
    before, upto = ones.tril(-1), ones.tril()
    decay_before = diff.masked_fill(~before, float("-inf")).exp()                    # s < t
    decay_upto = diff.masked_fill(~upto, float("-inf")).exp()                        # s <= t
    gamma = log_gamma.exp()
    A = beta[..., None] * (k @ k.transpose(-2, -1)) * decay_before                    # (..., n, C, C)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * gamma)[..., None] * k], dim=-1)
    solved = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
    U0, W = solved[..., : v.shape[-1]], solved[..., v.shape[-1]:]                     # u = U0 - W S^T
    attn = (q @ k.transpose(-2, -1)) * decay_upto                                      # (..., n, C, C)
    to_end = (log_gamma[..., -1:] - log_gamma).exp()                                   # gamma_C / gamma_s
    outs = []
    for c in range(n):
        u = U0[..., c, :, :] - W[..., c, :, :] @ S.transpose(-2, -1)                   # (..., C, d_v)
        outs.append((q[..., c, :, :] * gamma[..., c, :, None]) @ S.transpose(-2, -1)
                    + attn[..., c, :, :] @ u)
        S = (gamma[..., c, -1, None, None] * S
             + (u * to_end[..., c, :, None]).transpose(-2, -1) @ k[..., c, :, :])
    out = torch.stack(outs, dim=-3).flatten(-3, -2)[..., :L, :]
    return out, S


# --- multi-head latent attention ------------------------------------------------------------------

@dataclass
class MLACache:
    r"""The decoding cache of :class:`MultiHeadLatentAttention`: per token, only the latent
    ``(B, T, kv_latent_dim)`` and the rotated rope key ``(B, T, rope_dim)`` shared by all heads.

    .. math:: \text{bytes} = B \cdot T \cdot (d_c + d_R) \cdot \text{bytes per value}

    whatever the number of heads, against :math:`B \cdot T \cdot 2 H d_h` values for
    multi-head attention (DeepSeek-AI, 2024, DeepSeek-V2, Sec. 2.1).

    Example:
        >>> import torch
        >>> from attn_course.modern import MLACache
        >>> cache = MLACache()
        >>> latents, rope_keys = cache.append(torch.zeros(2, 3, 16), torch.zeros(2, 3, 4))
        >>> cache.length, cache.nbytes                       # 2 * 3 * (16 + 4) float32 numbers
        (3, 480)
        >>> _ = cache.append(torch.zeros(2, 1, 16), torch.zeros(2, 1, 4))   # one decoded token
        >>> cache.length, tuple(cache.latent.shape)
        (4, (2, 4, 16))
    """

    latent: torch.Tensor | None = None
    rope_key: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """The number of tokens cached."""
        return 0 if self.latent is None else self.latent.shape[1]

    @property
    def nbytes(self) -> int:
        """The bytes held, ``B * T * (kv_latent_dim + rope_dim) * element_size``."""
        return 0 if self.latent is None else self.latent.nbytes + self.rope_key.nbytes

    def append(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' latents and rope keys; return all of them."""
        if self.latent is None:
            self.latent, self.rope_key = latent, rope_key
        else:
            self.latent = torch.cat([self.latent, latent], dim=1)
            self.rope_key = torch.cat([self.rope_key, rope_key], dim=1)
        return self.latent, self.rope_key


class MultiHeadLatentAttention(nn.Module):
    r"""Multi-head latent attention (MLA, DeepSeek-V2, 2024), causal self-attention with a small cache.

    Each token ``x_t`` is compressed to a latent :math:`c_t = W_{DKV} x_t` of
    ``kv_latent_dim`` numbers, from which every head rebuilds its key and value:
    :math:`k^h_t = W^h_{UK} c_t`, :math:`v^h_t = W^h_{UV} c_t`. Rotary positions cannot pass
    through that shared compression, so a *decoupled* rope key :math:`k^R_t =
    \mathrm{RoPE}(W_{KR} x_t)` of ``rope_dim`` numbers, shared by all heads, is appended:

    .. math:: \mathrm{score}^h_{ts} = \frac{q^h_t \cdot W^h_{UK} c_s + q^{R,h}_t \cdot k^R_s}
                                           {\sqrt{d_h + d_R}},\qquad
              o_t = \sum_h W^h_O \sum_s a^h_{ts}\, W^h_{UV} c_s

    The cache holds only :math:`c` and :math:`k^R`: ``kv_latent_dim + rope_dim`` numbers per
    token and layer, whatever the number of heads. ``absorb=True`` computes the same output
    without rebuilding keys and values: :math:`W^{h\top}_{UK}` is folded into the query
    projection (scores are taken against the latents directly) and :math:`W^h_{UV}` into the
    output projection; attention then runs in the latent space, like multi-query attention
    with one shared key/value head of width ``kv_latent_dim (+ rope_dim)``.

    Differences from DeepSeek-V2: queries are projected from ``x`` directly (DeepSeek also
    compresses them, to save activation memory in training), there is no normalisation of the
    latent, and no biases.

    ``forward(x (B, L, E), *, is_causal=True, cache=None, absorb=False) -> (output (B, L, E), cache)``.
    Without a cache a new :class:`MLACache` is returned; a cache passed in is extended in place
    and returned, and ``x`` then holds only the new tokens, at positions that continue the
    cached sequence (rope included).

    Example:
        >>> import torch
        >>> from attn_course.modern import MultiHeadLatentAttention
        >>> _ = torch.manual_seed(0)
        >>> mla = MultiHeadLatentAttention(embed_dim=32, num_heads=4, kv_latent_dim=8, rope_dim=4)
        >>> x = torch.randn(2, 6, 32)
        >>> out, cache = mla(x)
        >>> tuple(out.shape), tuple(cache.latent.shape), tuple(cache.rope_key.shape)   # 8 + 4 per token
        ((2, 6, 32), (2, 6, 8), (2, 6, 4))
        >>> torch.allclose(mla(x, absorb=True)[0], out, atol=1e-5)     # the absorbed form agrees
        True
        >>> _, cache = mla(x[:, :5])
        >>> last, cache = mla(x[:, 5:], cache=cache)                    # decode one more token
        >>> torch.allclose(last, out[:, 5:], atol=1e-5), cache.length
        (True, 6)
    """

    def __init__(self, embed_dim: int, num_heads: int, kv_latent_dim: int, *, head_dim: int | None = None,
                 rope_dim: int = 0, rope_base: float = 10000.0):
        super().__init__()
        embed_dim = _checks.positive_number("embed_dim", embed_dim, integer=True)
        num_heads = _checks.positive_number("num_heads", num_heads, integer=True)
        kv_latent_dim = _checks.positive_number("kv_latent_dim", kv_latent_dim, integer=True)
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} "
                                 f"(or give head_dim)")
            head_dim = embed_dim // num_heads
        head_dim = _checks.positive_number("head_dim", head_dim, integer=True)
        rope_dim = _int_arg("rope_dim", rope_dim, minimum=0)
        if rope_dim % 2:
            raise ValueError(f"rope_dim must be even (rotary pairs), got {rope_dim}")
        self.rope_base = _checks.positive_number("rope_base", rope_base)
        self.embed_dim, self.num_heads, self.kv_latent_dim = embed_dim, num_heads, kv_latent_dim
        self.head_dim, self.rope_dim = head_dim, rope_dim
        H = num_heads
        self.q_proj = nn.Linear(embed_dim, H * (head_dim + rope_dim), bias=False)   # [q^h ; q^{R,h}]
        self.kv_down = nn.Linear(embed_dim, kv_latent_dim, bias=False)              # W_DKV
        self.k_rope = nn.Linear(embed_dim, rope_dim, bias=False) if rope_dim else None  # W_KR
        self.k_up = nn.Linear(kv_latent_dim, H * head_dim, bias=False)              # W_UK
        self.v_up = nn.Linear(kv_latent_dim, H * head_dim, bias=False)              # W_UV
        self.out_proj = nn.Linear(H * head_dim, embed_dim, bias=False)              # W_O

    @property
    def scale(self) -> float:
        """The score scale ``1 / sqrt(head_dim + rope_dim)`` (both forms use it)."""
        return 1.0 / math.sqrt(self.head_dim + self.rope_dim)

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The folded matrices of the absorbed form.

        Returns ``W_q_latent (H, kv_latent_dim, E)`` with ``W_q_latent[h] = W_UK^{h T} W_Q^h``
        (maps ``x`` straight to head ``h``'s query in latent space) and ``W_out_latent
        (H, E, kv_latent_dim)`` with ``W_out_latent[h] = W_O^h W_UV^h``.
        """
        H, dh, dr, E = self.num_heads, self.head_dim, self.rope_dim, self.embed_dim
        w_q = self.q_proj.weight.view(H, dh + dr, E)[:, :dh]                 # (H, d_h, E)
        w_uk = self.k_up.weight.view(H, dh, self.kv_latent_dim)              # (H, d_h, d_c)
        w_uv = self.v_up.weight.view(H, dh, self.kv_latent_dim)
        w_o = self.out_proj.weight.view(E, H, dh).transpose(0, 1)            # (H, E, d_h)
        return w_uk.transpose(1, 2) @ w_q, w_o @ w_uv

    def forward(self, x: torch.Tensor, *, is_causal: bool = True, cache: MLACache | None = None,
                absorb: bool = False) -> tuple[torch.Tensor, MLACache]:
        """Attend from the tokens ``x (B, L, E)``; return ``output (B, L, E)`` and the cache.

        With a ``cache``, ``x`` holds the new tokens only: their latents and rope keys are
        appended (in place) and they attend to every cached token, causally when
        ``is_causal``. ``absorb=True`` computes the same output in the latent space.
        """
        _checks.float_tensor("x", x, ndim=3)
        weight = self.q_proj.weight
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but embed_dim="
                             f"{self.embed_dim}")
        if x.dtype != weight.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the module's weights are {weight.dtype}; "
                            f"convert one of them (module.to({x.dtype}))")
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the module's weights are on {weight.device}")
        is_causal, absorb = _bool_arg("is_causal", is_causal), _bool_arg("absorb", absorb)
        B, L, _ = x.shape
        if L == 0:
            raise ValueError(f"x holds no tokens, shape {tuple(x.shape)}")
        if cache is None:
            cache = MLACache()
        elif not isinstance(cache, MLACache):
            raise TypeError(f"cache must be an MLACache or None, got {type(cache).__name__}")
        elif cache.latent is not None and (cache.latent.shape[0] != B or cache.latent.shape[2] != self.kv_latent_dim
                                           or cache.latent.dtype != x.dtype or cache.latent.device != x.device):
            raise ValueError(f"cache holds latents {tuple(cache.latent.shape)} ({cache.latent.dtype}, "
                             f"{cache.latent.device}) that do not continue x {tuple(x.shape)} ({x.dtype}, "
                             f"{x.device}) with kv_latent_dim={self.kv_latent_dim}")
        H, dh, dr = self.num_heads, self.head_dim, self.rope_dim
        past = cache.length
        positions = torch.arange(past, past + L, device=x.device)
        q = self.q_proj(x).view(B, L, H, dh + dr).transpose(1, 2)                  # (B, H, L, d_h + d_R)
        q_c, q_r = q[..., :dh], q[..., dh:]
        latent = self.kv_down(x)                                                    # (B, L, d_c)
        rope_key = self.k_rope(x) if dr else x.new_zeros(B, L, 0)                   # (B, L, d_R)
        if dr:
            q_r = apply_rope(q_r, positions, self.rope_base)
            rope_key = apply_rope(rope_key, positions, self.rope_base)
        c, k_r = cache.append(latent, rope_key)                                     # (B, T, .)
        T = c.shape[1]
        mask = None
        if is_causal:  # new token i sits at position past + i
            mask = torch.ones(L, T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        if absorb:
            w_q_latent, w_out_latent = self.absorbed_weights()
            q_lat = torch.einsum("ble,hce->bhlc", x, w_q_latent)                   # (B, H, L, d_c)
            keys = torch.cat([c, k_r], dim=-1)[:, None]                             # (B, 1, T, d_c + d_R)
            ctx = F.scaled_dot_product_attention(
                torch.cat([q_lat, q_r], dim=-1), keys.expand(B, H, T, -1), c[:, None].expand(B, H, T, -1),
                attn_mask=mask, scale=self.scale)                                   # (B, H, L, d_c)
            out = torch.einsum("bhlc,hec->ble", ctx, w_out_latent)
        else:
            k_c = self.k_up(c).view(B, T, H, dh).transpose(1, 2)                    # (B, H, T, d_h)
            v = self.v_up(c).view(B, T, H, dh).transpose(1, 2)
            k = torch.cat([k_c, k_r[:, None].expand(B, H, T, dr)], dim=-1)
            heads = F.scaled_dot_product_attention(torch.cat([q_c, q_r], dim=-1), k, v, attn_mask=mask,
                                                   scale=self.scale)                # (B, H, L, d_h)
            out = self.out_proj(merge_heads(heads))
        return out, cache


# --- the key/value cache of published models ------------------------------------------------------

ATTENTION_TYPES = ("MHA", "GQA", "MQA", "MLA")


@dataclass(frozen=True)
class AttentionConfig:
    r"""What sets the decoding cache of a model's attention layers.

    .. math:: \text{values per token and layer} = 2 G d_h\ \ (\text{MHA}: G = H;\ \text{GQA};\
              \text{MQA}: G = 1),\qquad d_c + d_R\ \ (\text{MLA})

    for multi-head (Vaswani et al., 2017), grouped-query (Ainslie et al., 2023), multi-query
    (Shazeer, 2019) and multi-head latent attention (DeepSeek-AI, 2024); a local layer
    (Beltagy et al., 2020; Jiang et al., 2023) caches at most ``window`` tokens.

    ``kind`` is ``"MHA"``, ``"GQA"``, ``"MQA"`` (each caching ``num_kv_heads`` keys and values
    of ``head_dim``) or ``"MLA"`` (caching ``kv_latent_dim + rope_dim`` numbers). ``window``:
    the span of the local (sliding-window) layers, which cache at most ``window`` tokens (the
    rolling buffer of the published implementations, the current token included);
    ``local_per_global``: local layers per global one (``None`` with a window: all layers
    local; ``None`` without: all global). ``source``: where the numbers come from.
    ``max_context``: the context length the model was released for (``None`` if not given);
    a cache computed beyond it describes a model that does not exist.

    Example:
        >>> from attn_course.modern import AttentionConfig
        >>> gqa = AttentionConfig("toy-GQA", "GQA", num_layers=6, num_kv_heads=2, head_dim=64,
        ...                       window=512, local_per_global=2)
        >>> gqa.values_per_token_per_layer, gqa.global_layer_flags      # 2 G d_h; local, local, global
        (256, [False, False, True, False, False, True])
        >>> AttentionConfig("toy-MLA", "MLA", num_layers=6, kv_latent_dim=512, rope_dim=64).values_per_token_per_layer
        576
    """

    name: str
    kind: str
    num_layers: int
    num_kv_heads: int = 0
    head_dim: int = 0
    kv_latent_dim: int = 0
    rope_dim: int = 0
    window: int | None = None
    local_per_global: int | None = None
    source: str = ""
    max_context: int | None = None

    def __post_init__(self):
        if self.kind not in ATTENTION_TYPES:
            raise ValueError(f"kind must be one of {ATTENTION_TYPES}, got {self.kind!r}")
        _checks.positive_number("num_layers", self.num_layers, integer=True)
        if self.kind == "MLA":
            _checks.positive_number("kv_latent_dim", self.kv_latent_dim, integer=True)
            _int_arg("rope_dim", self.rope_dim, minimum=0)
        else:
            _checks.positive_number("num_kv_heads", self.num_kv_heads, integer=True)
            _checks.positive_number("head_dim", self.head_dim, integer=True)
        if self.window is not None:
            _checks.positive_number("window", self.window, integer=True)
        if self.local_per_global is not None:
            _int_arg("local_per_global", self.local_per_global, minimum=0)
        if self.max_context is not None:
            _checks.positive_number("max_context", self.max_context, integer=True)

    @property
    def values_per_token_per_layer(self) -> int:
        """How many numbers one layer caches per token, ``2 G d_h`` (K and V) or ``d_c + d_R`` (MLA)."""
        if self.kind == "MLA":
            return self.kv_latent_dim + self.rope_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def global_layer_flags(self) -> list[bool]:
        """Which layers attend to the whole sequence (and cache every token)."""
        if self.window is None:
            return [True] * self.num_layers
        if self.local_per_global is None:
            return [False] * self.num_layers
        return global_layers(self.num_layers, self.local_per_global).tolist()


def _context(context_len) -> int:
    return _checks.positive_number("context_len", context_len, integer=True)


def kv_cache_bytes_at(config: AttentionConfig, context_len: int, *, batch_size: int = 1,
                      bytes_per_value: int = 2) -> int:
    """Bytes of the key/value cache of all layers after ``context_len`` tokens.

    Global layers cache every token; local layers at most ``window`` tokens (a rolling
    buffer). ``bytes_per_value=2`` is bfloat16/float16.

    Example:
        At 8k tokens, Mistral's sliding window halves the cache of an otherwise equal model:

        >>> from attn_course.modern import MODEL_CONFIGS, kv_cache_bytes_at
        >>> [kv_cache_bytes_at(MODEL_CONFIGS[name], 8192) / 2**20 for name in ("Llama-3-8B", "Mistral-7B-v0.1")]
        [1024.0, 512.0]
    """
    if not isinstance(config, AttentionConfig):
        raise TypeError(f"config must be an AttentionConfig, got {type(config).__name__}")
    context_len = _context(context_len)
    batch_size = _checks.positive_number("batch_size", batch_size, integer=True)
    bytes_per_value = _checks.positive_number("bytes_per_value", bytes_per_value, integer=True)
    tokens = sum(context_len if is_global else min(context_len, config.window)
                 for is_global in config.global_layer_flags)
    return tokens * config.values_per_token_per_layer * batch_size * bytes_per_value


def kv_bytes_per_token(config: AttentionConfig, context_len: int = 1, *, bytes_per_value: int = 2) -> float:
    """Cache bytes per token of context: :func:`kv_cache_bytes_at` divided by ``context_len``.

    Below the window every token costs the same; beyond it the local layers stop growing,
    so the average falls towards the cost of the global layers alone.

    Example:
        >>> from attn_course.modern import MODEL_CONFIGS, kv_bytes_per_token
        >>> kv_bytes_per_token(MODEL_CONFIGS["Llama-3-8B"]) / 2**10       # 32 layers x 2 x 8 x 128 x 2 bytes
        128.0
        >>> kv_bytes_per_token(MODEL_CONFIGS["DeepSeek-V3"]) / 2**10      # 61 layers x (512 + 64) x 2 bytes
        68.625
        >>> gemma = MODEL_CONFIGS["Gemma-3-27B"]
        >>> kv_bytes_per_token(gemma, 1024) > kv_bytes_per_token(gemma, 131072)   # local layers stop growing
        True
    """
    return kv_cache_bytes_at(config, context_len, bytes_per_value=bytes_per_value) / _context(context_len)


#: The attention configurations of published models, by name, each with its ``source``
#: (paper or released ``config.json``) and its released context length ``max_context``:
#: MHA, GQA, MQA, sliding-window, local/global and MLA.
MODEL_CONFIGS: dict[str, AttentionConfig] = {c.name: c for c in (
    AttentionConfig("Llama-2-7B", "MHA", 32, num_kv_heads=32, head_dim=128, max_context=4096,
                    source="Touvron et al. 2023 (arXiv:2307.09288): context length 4k; config.json of "
                           "meta-llama/Llama-2-7b-hf"),
    AttentionConfig("Llama-3-8B", "GQA", 32, num_kv_heads=8, head_dim=128, max_context=8192,
                    source="Llama 3 Herd of Models, Table 3 (arXiv:2407.21783); config.json of "
                           "meta-llama/Meta-Llama-3-8B (max_position_embeddings 8192)"),
    AttentionConfig("Falcon-7B", "MQA", 32, num_kv_heads=1, head_dim=64, max_context=2048,
                    source="Almazrouei et al. 2023 (arXiv:2311.16867): sequence length 2048; config.json of "
                           "tiiuae/falcon-7b (71 query heads of 64, one key/value head)"),
    AttentionConfig("Mistral-7B-v0.1", "GQA", 32, num_kv_heads=8, head_dim=128, window=4096, max_context=8192,
                    source="Jiang et al. 2023, Table 1 (arXiv:2310.06825): sliding window 4096 in every layer, "
                           "context length 8192"),
    AttentionConfig("Gemma-2-9B", "GQA", 42, num_kv_heads=8, head_dim=256, window=4096, local_per_global=1,
                    max_context=8192,
                    source="Gemma Team 2024 (arXiv:2408.00118): context length 8192; config.json of "
                           "google/gemma-2-9b: local and global layers alternate, window 4096"),
    AttentionConfig("Gemma-3-27B", "GQA", 62, num_kv_heads=16, head_dim=128, window=1024, local_per_global=5,
                    max_context=131072,
                    source="Gemma Team 2025 (arXiv:2503.19786): 128K context; config.json of "
                           "google/gemma-3-27b-pt: 5 local layers per global one, window 1024"),
    AttentionConfig("DeepSeek-V2", "MLA", 60, kv_latent_dim=512, rope_dim=64, max_context=131072,
                    source="DeepSeek-AI 2024, Sec. 3.1 (arXiv:2405.04434): d_c = 512, d_h^R = 64, 60 layers; "
                           "128K context"),
    AttentionConfig("DeepSeek-V3", "MLA", 61, kv_latent_dim=512, rope_dim=64, max_context=131072,
                    source="DeepSeek-AI 2024, Sec. 4.2 (arXiv:2412.19437): d_c = 512, d_h^R = 64, 61 layers; "
                           "128K context"),
)}


def global_layers(num_layers: int, local_per_global: int) -> torch.Tensor:
    """Which layers of a local/global stack are global: a bool tensor ``(num_layers,)``.

    A ratio of ``local_per_global`` : 1 repeats ``local_per_global`` local layers followed
    by one global layer, starting with a local layer: layer ``i`` (from 0) is global when
    ``(i + 1) % (local_per_global + 1) == 0``. Gemma 2 alternates (1:1); Gemma 3 uses 5:1,
    so with 62 layers its global layers are 5, 11, ..., 59. ``local_per_global = 0`` makes
    every layer global.

    Example:
        >>> from attn_course.modern import global_layers
        >>> global_layers(6, 1).int().tolist()                          # Gemma 2: alternating
        [0, 1, 0, 1, 0, 1]
        >>> global_layers(62, 5).nonzero().flatten().tolist()[:3], int(global_layers(62, 5).sum())
        ([5, 11, 17], 10)
    """
    num_layers = _checks.positive_number("num_layers", num_layers, integer=True)
    local_per_global = _int_arg("local_per_global", local_per_global, minimum=0)
    return (torch.arange(num_layers) + 1) % (local_per_global + 1) == 0


# --- learned sparse selection ---------------------------------------------------------------------

def indexer_scores(index_query: torch.Tensor, index_key: torch.Tensor, head_weights: torch.Tensor) -> torch.Tensor:
    r"""The index scores of DeepSeek-V3.2's lightning indexer (DeepSeek-AI, 2025).

    .. math:: I_{ts} = \sum_{j=1}^{H_I} w_{t,j}\; \mathrm{ReLU}(q^I_{t,j} \cdot k^I_s)

    The indexer heads score every (query, key) pair: still ``L_q x L_k`` scores, with
    ``H_I d_I`` multiply-adds each instead of the main attention's, used only to choose which
    keys the main attention reads (:func:`indexer_topk`). DeepSeek-V3.2-Exp has ``H_I = 64``
    heads of ``d_I = 128`` in FP8 (8192 multiply-adds per pair, against 128 heads x (576 + 512)
    for its MLA in the absorbed form: about 17 times fewer, before the cheaper FP8 arithmetic)
    and keeps 2048 keys per query.

    Shapes: ``index_query (B, L_q, H_I, d_I)``, ``index_key (B, L_k, d_I)``,
    ``head_weights (B, L_q, H_I)``; returns ``(B, L_q, L_k)``.

    Example:
        >>> import torch
        >>> from attn_course.modern import indexer_scores
        >>> _ = torch.manual_seed(0)
        >>> index_query, index_key = torch.randn(1, 3, 2, 4), torch.randn(1, 5, 4)   # H_I = 2, d_I = 4
        >>> head_weights = torch.rand(1, 3, 2)
        >>> scores = indexer_scores(index_query, index_key, head_weights)
        >>> t, s = 1, 4
        >>> manual = sum(head_weights[0, t, j] * torch.relu(index_query[0, t, j] @ index_key[0, s])
        ...              for j in range(2))
        >>> tuple(scores.shape), torch.allclose(scores[0, t, s], manual)
        ((1, 3, 5), True)
    """
    _checks.float_tensor("index_query", index_query, ndim=4)
    _checks.float_tensor("index_key", index_key, ndim=3)
    _checks.float_tensor("head_weights", head_weights, ndim=3)
    _checks.same_dtype_device(index_query=index_query, index_key=index_key, head_weights=head_weights)
    B, L_q, H_I, d_I = index_query.shape
    if index_key.shape[0] != B or index_key.shape[2] != d_I or head_weights.shape != (B, L_q, H_I):
        raise ValueError(f"need index_query (B, L_q, H_I, d_I), index_key (B, L_k, d_I), head_weights "
                         f"(B, L_q, H_I); got {tuple(index_query.shape)}, {tuple(index_key.shape)}, "
                         f"{tuple(head_weights.shape)}")
    per_head = torch.einsum("bthd,bsd->bths", index_query, index_key).relu()          # (B, L_q, H_I, L_k)
    return torch.einsum("bths,bth->bts", per_head, head_weights)


def _allowed(L_q: int, L_k: int, is_causal: bool, device) -> torch.Tensor | None:
    """Causal mask with the queries aligned to the end of the keys (query i at L_k - L_q + i)."""
    if not is_causal:
        return None
    return torch.ones(L_q, L_k, dtype=torch.bool, device=device).tril(diagonal=L_k - L_q)


def indexer_topk(scores: torch.Tensor, k: int, *, is_causal: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` highest-scoring keys of each query: ``indices`` and ``valid``, each ``(..., L_q, min(k, L_k))``.

    ``scores (..., L_q, L_k)``. When causal, query ``i`` sits at position ``L_k - L_q + i``
    (the last queries of the sequence, as when decoding) and may pick only keys up to there;
    a query with fewer than ``k`` allowed keys picks them all, and the remaining slots have
    ``valid = False``. Ties are broken by ``torch.topk``.

    Example:
        Two queries at the end of four keys: query 0 sits at position 2, query 1 at 3.

        >>> import torch
        >>> from attn_course.modern import indexer_topk
        >>> scores = torch.tensor([[4.0, 1.0, 3.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
        >>> indices, valid = indexer_topk(scores, k=2)
        >>> indices.tolist()                      # query 0 may not pick key 3, its future
        [[0, 2], [3, 2]]
        >>> indexer_topk(scores, k=4)[1].tolist()  # query 0 has only 3 keys to give
        [[True, True, True, False], [True, True, True, True]]
    """
    _checks.float_tensor("scores", scores, min_ndim=2)
    k = _checks.positive_number("k", k, integer=True)
    is_causal = _bool_arg("is_causal", is_causal)
    L_q, L_k = scores.shape[-2:]
    if L_k == 0 or L_q == 0:
        raise ValueError(f"scores must have at least one query and one key, got shape {tuple(scores.shape)}")
    if is_causal and L_q > L_k:
        raise ValueError(f"causal selection needs L_q <= L_k (queries are the last tokens), got scores "
                         f"{tuple(scores.shape)}")
    allowed = _allowed(L_q, L_k, is_causal, scores.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    indices = scores.topk(min(k, L_k), dim=-1).indices
    if allowed is None:
        valid = torch.ones_like(indices, dtype=torch.bool)
    else:
        valid = torch.gather(allowed.expand(scores.shape), -1, indices)
    return indices, valid


def indexer_topk_mask(scores: torch.Tensor, k: int, *, is_causal: bool = True) -> torch.Tensor:
    """The dense ``(..., L_q, L_k)`` bool mask of :func:`indexer_topk`'s selection (``True`` = selected).

    Example:
        >>> import torch
        >>> from attn_course.modern import indexer_topk_mask
        >>> scores = torch.tensor([[4.0, 1.0, 3.0, 9.0], [1.0, 2.0, 3.0, 4.0]])
        >>> indexer_topk_mask(scores, k=2).int()
        tensor([[1, 0, 1, 0],
                [0, 0, 1, 1]], dtype=torch.int32)
    """
    indices, valid = indexer_topk(scores, k, is_causal=is_causal)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter(-1, indices, valid)


def sparse_selected_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              indices: torch.Tensor, valid: torch.Tensor | None = None, *,
                              scale: float | None = None) -> torch.Tensor:
    r"""Softmax attention over selected keys only (DeepSeek Sparse Attention's main attention).

    .. math:: o_t = \sum_{s \in \mathcal S_t} \mathrm{softmax}_{s \in \mathcal S_t}
              \Big(\frac{q_t \cdot k_s}{\sqrt d}\Big)\, v_s

    Each query gathers its ``k`` selected keys and values (``O(L_q k d)`` work and memory, no
    ``L_q x L_k`` tensor) and equals dense attention under :func:`indexer_topk_mask`.

    Shapes: ``query (B, H, L_q, d)``, ``key (B, H, L_k, d)``, ``value (B, H, L_k, d_v)``;
    ``indices`` int64 ``(B, L_q, k)`` (one selection shared by all heads, as in DSA) or
    ``(B, H, L_q, k)``; ``valid`` bool of the same shape (``False`` slots are ignored; a query
    with none gets a zero output). Returns ``(B, H, L_q, d_v)``.

    Example:
        >>> import torch
        >>> from attn_course.modern import indexer_topk, indexer_topk_mask, sparse_selected_attention
        >>> from attn_course.sparse import dense_attention
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 6, 4).unbind(0)            # (B, H, L, d)
        >>> index_scores = torch.randn(1, 6, 6)                        # (B, L_q, L_k)
        >>> indices, valid = indexer_topk(index_scores, k=3)           # shared by both heads
        >>> out = sparse_selected_attention(q, k, v, indices, valid)
        >>> mask = indexer_topk_mask(index_scores, 3)[:, None]         # (B, 1, L_q, L_k)
        >>> tuple(out.shape), torch.allclose(out, dense_attention(q, k, v, mask), atol=1e-5)
        ((1, 2, 6, 4), True)
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        _checks.float_tensor(name, x, ndim=4)
    _checks.same_dtype_device(query=query, key=key, value=value)
    B, H, L_q, d = query.shape
    L_k = key.shape[2]
    if key.shape[:2] != (B, H) or key.shape[3] != d or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"need query (B, H, L_q, d), key (B, H, L_k, d), value (B, H, L_k, d_v); got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long:
        raise TypeError(f"indices must be an int64 tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.ndim == 3:
        indices = indices[:, None]
        valid = None if valid is None else (valid[:, None] if isinstance(valid, torch.Tensor) else valid)
    if indices.ndim != 4 or indices.shape[0] != B or indices.shape[1] not in (1, H) or indices.shape[2] != L_q:
        raise ValueError(f"indices must be (B, L_q, k) or (B, H, L_q, k) with B={B}, H={H}, L_q={L_q}; got "
                         f"{tuple(indices.shape)}")
    if indices.device != query.device:
        raise ValueError(f"indices is on {indices.device} but query is on {query.device}")
    if indices.device.type != "meta" and indices.numel() and (indices.min() < 0 or indices.max() >= L_k):
        raise ValueError(f"indices must lie in [0, L_k={L_k}), got min {int(indices.min())}, max {int(indices.max())}")
    if valid is not None:
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
            raise TypeError(f"valid must be a bool tensor, got {getattr(valid, 'dtype', type(valid).__name__)}")
        if valid.shape != indices.shape:
            raise ValueError(f"valid must have the shape of indices {tuple(indices.shape)}, got {tuple(valid.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else _checks.positive_number("scale", scale)
    kk = indices.shape[-1]
    idx = indices.expand(B, H, L_q, kk).reshape(B, H, L_q * kk, 1)
    k_sel = torch.gather(key, 2, idx.expand(-1, -1, -1, d)).view(B, H, L_q, kk, d)
    v_sel = torch.gather(value, 2, idx.expand(-1, -1, -1, value.shape[-1])).view(B, H, L_q, kk, -1)
    scores = torch.einsum("bhqd,bhqkd->bhqk", query, k_sel) * scale                  # (B, H, L_q, k)
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    weights = torch.softmax(scores.to(_work_dtype(scores.dtype)), dim=-1).nan_to_num(0.0).to(query.dtype)
    return torch.einsum("bhqk,bhqkd->bhqd", weights, v_sel)


# --- many small transformers at once --------------------------------------------------------------
