"""Exercises: the MLA cache, the absorbed query, one delta-rule step, one chunk of the delta rule
in its parallel (WY/UT) form, causal linear attention, a causal top-k selection mask, and the
global layers of a local/global stack.

The expected answers come from :mod:`attn_course.modern`, bound here when the module is imported
(a learner who rebinds ``modern.linear_attention`` in a notebook cannot change what is
expected). Each exercise lists the mistakes learners make and which case catches each; a hint
is given only when the wrong answer equals one of those mistakes on the failing case and the
mistake there differs from the answer (``_core.Hint``). Values are compared with the
course's tolerances (atol 1e-5, rtol 1e-4), so an answer computed in float32 passes; every
case runs in float64 and in float32. ``delta_rule_step`` may update its state in place (and
return it), as recurrent code does; every other input must come back unchanged.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from .. import modern
from ._core import (
    Case,
    Exercise,
    any_precision,
    clone_tree,
    fact,
    first_match,
    in_both_precisions,
    square_free,
)

# the package's answers, bound at import time
_kv_cache_bytes_at = modern.kv_cache_bytes_at
_AttentionConfig = modern.AttentionConfig
_absorbed_weights = modern.MultiHeadLatentAttention.absorbed_weights
_delta_rule_step = modern.delta_rule_step
_gated_delta_rule = modern.gated_delta_rule
_linear_attention = modern.linear_attention
_indexer_topk_mask = modern.indexer_topk_mask
_global_layers = modern.global_layers


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- modern.mla_cache_bytes ---------------------------------------------------------------------
# Mistakes, and the cases that catch them:
#   - caching keys AND values (x 2, the MHA habit): every case;
#   - one latent per head (x num_heads): the cases with several heads;
#   - a rope key per head (d_c + H d_R): cases 1, 2 and 4 (heads > 1 and rope_dim > 0);
#   - forgetting the rope key: cases 1, 2 and 4 (rope_dim > 0);
#   - forgetting the layers: every case but 3.

def _mla_bytes_solution(num_layers, num_heads, kv_latent_dim, rope_dim, bytes_per_value):
    # per layer and token: the latent and the decoupled rope key, both shared by all heads
    return num_layers * (kv_latent_dim + rope_dim) * bytes_per_value


def _mla_bytes_expected(num_layers, num_heads, kv_latent_dim, rope_dim, bytes_per_value):
    config = _AttentionConfig("exercise", "MLA", num_layers, kv_latent_dim=kv_latent_dim, rope_dim=rope_dim)
    return _kv_cache_bytes_at(config, 1, bytes_per_value=bytes_per_value)


def _mla_bytes_cases():
    return [Case(f"{n} layers, {h} heads, d_c = {c}, d_R = {r}, {b} bytes per value", (n, h, c, r, b))
            for n, h, c, r, b in ((60, 128, 512, 64, 2),    # DeepSeek-V2 in bfloat16
                                  (61, 128, 512, 64, 1),    # DeepSeek-V3 in FP8
                                  (1, 1, 16, 0, 4),
                                  (4, 8, 32, 8, 2),
                                  (3, 2, 64, 0, 4),
                                  (1, 4, 8, 16, 1),
                                  (5, 1, 32, 16, 1),
                                  (2, 4, 16, 0, 1))]


_MLA_BYTES_CONDITIONS = {
    "one layer": lambda n, h, c, r, b: n == 1,
    "several layers": lambda n, h, c, r, b: n > 1,
    "one head": lambda n, h, c, r, b: h == 1,
    "several heads": lambda n, h, c, r, b: h > 1,
    "no rope key (d_R = 0)": lambda n, h, c, r, b: r == 0,
    "a rope key (d_R > 0)": lambda n, h, c, r, b: r > 0,
    "one byte per value (FP8)": lambda n, h, c, r, b: b == 1,
}
_MLA_BYTES_EXCLUSIVE = (("one layer", "several layers"), ("one head", "several heads"),
                        ("no rope key (d_R = 0)", "a rope key (d_R > 0)"))


def _mla_bytes_hint(case, got, expected):
    n, h, c, r, b = case.args
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if type(got) not in (int, float):
        return None
    return first_match(got, expected, [
        (2 * expected, "the latent is cached once: keys AND values are both rebuilt from it (no factor 2)."),
        (h * expected, "the latent (and the rope key) is shared by all heads: do not multiply by num_heads."),
        (n * (c + h * r) * b, "the decoupled rope key is shared by all heads; only the rope *queries* are "
                              "per head."),
        (n * c * b, "each token also caches its decoupled rope key (rope_dim numbers)."),
        ((c + r) * b, "every layer has its own cache: multiply by num_layers."),
        (8 * expected, "that counts bits: the answer is in bytes (8 bits each).")], atol=0, rtol=0)


# --- modern.absorbed_query_weight ---------------------------------------------------------------
# Mistakes: the transpose W_q[h]^T W_uk[h] (E x d_c; cases 1, 2, 4 have a different shape,
# case 3 has E = d_c and a transposed value); no split into heads (W_uk^T W_q: a wrong
# shape in every case); splitting the rows into heads the interleaved way (row r to head
# r % H) instead of in contiguous blocks: cases 1, 2 and 3 (one head, case 4, cannot tell).

def _absorbed_solution(W_q, W_uk, num_heads):
    H = num_heads
    w_q = W_q.reshape(H, -1, W_q.shape[-1])          # (H, d_h, E): head h owns rows h*d_h .. (h+1)*d_h
    w_uk = W_uk.reshape(H, -1, W_uk.shape[-1])       # (H, d_h, d_c)
    return w_uk.transpose(1, 2) @ w_q                # (H, d_c, E): x -> head h's query in latent space


def _absorbed_expected(W_q, W_uk, num_heads):
    HD, E = W_q.shape
    d_c = W_uk.shape[1]
    zeros = torch.zeros(HD, d_c, dtype=W_q.dtype)
    module = SimpleNamespace(num_heads=num_heads, head_dim=HD // num_heads, rope_dim=0, embed_dim=E,
                             kv_latent_dim=d_c, q_proj=SimpleNamespace(weight=W_q),
                             k_up=SimpleNamespace(weight=W_uk), v_up=SimpleNamespace(weight=zeros),
                             out_proj=SimpleNamespace(weight=zeros.new_zeros(E, HD)))
    return _absorbed_weights(module)[0]


def _absorbed_cases():
    g = _gen(80)
    cases = []
    for H, d_h, E, d_c in ((2, 3, 5, 4), (4, 2, 6, 3), (3, 4, 8, 8), (1, 4, 3, 5), (1, 2, 6, 6)):
        W_q = torch.randn(H * d_h, E, generator=g, dtype=torch.float64)
        W_uk = torch.randn(H * d_h, d_c, generator=g, dtype=torch.float64)
        cases.append(Case(f"{H} heads of {d_h}, E = {E}, d_c = {d_c}", (W_q, W_uk, H)))
    return in_both_precisions(cases)


_ABSORBED_CONDITIONS = {
    "one head": lambda W_q, W_uk, H: H == 1,
    "several heads": lambda W_q, W_uk, H: H > 1,
    "E = d_c (a transposed answer has the right shape)": lambda W_q, W_uk, H: W_q.shape[1] == W_uk.shape[1],
    "E != d_c": lambda W_q, W_uk, H: W_q.shape[1] != W_uk.shape[1],
}
_ABSORBED_EXCLUSIVE = (("one head", "several heads"), ("E = d_c (a transposed answer has the right shape)", "E != d_c"))


def _absorbed_hint(case, got, expected):
    W_q, W_uk, H = case.args
    d_h = W_q.shape[0] // H
    interleaved = (W_uk.reshape(d_h, H, -1).transpose(0, 1).transpose(1, 2)
                   @ W_q.reshape(d_h, H, -1).transpose(0, 1))
    return first_match(got, expected, [
        (expected.transpose(1, 2), "transposed: A[h] = W_uk[h]^T W_q[h] maps x (E numbers) to a query in "
                                   "latent space (d_c numbers), so it is (d_c, E)."),
        (interleaved, "head h owns the contiguous rows h*d_h .. (h+1)*d_h: reshape to (H, d_h, ...), not "
                      "(d_h, H, ...).")])


# --- modern.delta_rule_step ---------------------------------------------------------------------
# Mistakes: the additive (linear attention) update g S + b v k^T, no erasing (every case);
# the gate left out of the erase term, g S + b (v - S k) k^T (cases 2, 4, 5, 6: gate < 1);
# the gate applied to the new write too, g (S + b (v - S k) k^T) (cases 2, 4, 5, 6); beta left
# out of the write, g S (I - b k k^T) + v k^T (every case with beta < 1); the outer product
# transposed, k v^T (cases 1-3 have d_k != d_v, a wrong shape; cases 4-6 a wrong value);
# beta or gate broadcast along the wrong axes (cases 4-6 vary them per batch and head);
# normalising the key inside, or dividing the write by |k|^2 (case 6: the only keys that are
# not unit vectors; the formula takes k as it is given).
# A hint is given only when the mistaken formula differs from the answer on the case at hand
# (with gate = 1, say, "the gate left out of the erase term" is right) and equals the value.

def _delta_solution(state, key, value, beta, gate):
    g, b = gate[..., None, None], beta[..., None, None]               # (..., 1, 1)
    read = state @ key[..., :, None]                                   # (..., d_v, 1): what S returns for k
    return g * state + b * (value[..., :, None] - g * read) * key[..., None, :]


def _delta_cases():
    g = _gen(81)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    one = torch.ones((), dtype=torch.float64)
    return in_both_precisions([
        Case("one head, beta = 1, gate = 1, d_v = 3, d_k = 4", (randn(3, 4), unit(4), randn(3), one, one)),
        Case("(B, H) = (2, 3), beta = 0.7, gate = 0.5",
             (randn(2, 3, 3, 4), unit(2, 3, 4), randn(2, 3, 3), torch.full((2, 3), 0.7, dtype=torch.float64),
              torch.full((2, 3), 0.5, dtype=torch.float64))),
        Case("beta = 0: nothing is written, the state only decays",
             (randn(1, 2, 3, 5), unit(1, 2, 5), randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.float64),
              torch.full((1, 2), 0.9, dtype=torch.float64))),
        Case("d_v = d_k = 4, beta and gate differ per batch and head",
             (randn(2, 2, 4, 4), unit(2, 2, 4), randn(2, 2, 4), rand(2, 2), rand(2, 2))),
        Case("(B, H) = (3, 1), d_v = d_k = 6, random beta and gate",
             (randn(3, 1, 6, 6), unit(3, 1, 6), randn(3, 1, 6), rand(3, 1), rand(3, 1))),
        Case("(B, H) = (2, 2), keys that are NOT unit vectors (norms 0.5 to 2), random beta and gate",
             (randn(2, 2, 3, 4), unit(2, 2, 4) * (0.5 + 1.5 * rand(2, 2, 1)), randn(2, 2, 3), rand(2, 2),
              rand(2, 2))),
        Case("one state, d_v = d_k = 4, a key of norm 2, beta = 0, gate = 0.8",
             (randn(4, 4), unit(4) * 2, randn(4), torch.zeros((), dtype=torch.float64),
              torch.full((), 0.8, dtype=torch.float64))),
        Case("(B, H) = (1, 2), d_v = d_k = 3, beta 1 and 0.3, gate 1 and 0.6",
             (randn(1, 2, 3, 3), unit(1, 2, 3), randn(1, 2, 3), torch.tensor([[1.0, 0.3]], dtype=torch.float64),
              torch.tensor([[1.0, 0.6]], dtype=torch.float64))),
        Case("(B, H) = (1, 3): beta 0, 1 and 0.5 and gate 1, 0.5 and 0 in the three heads, keys of norm 3",
             (randn(1, 3, 2, 5) * 10, unit(1, 3, 5) * 3, randn(1, 3, 2),
              torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64),
              torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64))),
    ])


def _unit_keys(S, k, v, b, g) -> bool:
    return bool(((k.double().norm(dim=-1) - 1).abs() < 1e-6).all())


_DELTA_CONDITIONS = {
    "one state, no batch or head axes": lambda S, k, v, b, g: S.ndim == 2,
    "batch and head axes": lambda S, k, v, b, g: S.ndim == 4,
    "d_v != d_k": lambda S, k, v, b, g: S.shape[-1] != S.shape[-2],
    "d_v = d_k (a transposed outer product has the right shape)": lambda S, k, v, b, g: S.shape[-1] == S.shape[-2],
    "beta = 0 somewhere (nothing written)": lambda S, k, v, b, g: bool((b == 0).any()),
    "beta = 1 somewhere": lambda S, k, v, b, g: bool((b == 1).any()),
    "gate = 1 somewhere (no decay)": lambda S, k, v, b, g: bool((g == 1).any()),
    "gate below 1": lambda S, k, v, b, g: bool((g < 1).any()),
    "beta and gate that differ across batch and heads": lambda S, k, v, b, g: b.numel() > 1 and bool(
        (b != b.reshape(-1)[0]).any() and (g != g.reshape(-1)[0]).any()),
    "unit keys": _unit_keys,
    "keys that are not unit vectors": lambda *a: not _unit_keys(*a),
}
_DELTA_EXCLUSIVE = (("one state, no batch or head axes", "batch and head axes"),
                    ("d_v != d_k", "d_v = d_k (a transposed outer product has the right shape)"),
                    ("unit keys", "keys that are not unit vectors"),
                    ("one state, no batch or head axes", "beta and gate that differ across batch and heads"))


def _delta_variants(S, k, v, beta, gate):
    """The known mistakes, each as (value on this case, the hint that names it)."""
    g, b = gate[..., None, None], beta[..., None, None]
    col, row = v[..., :, None], k[..., None, :]
    Sk, outer = S @ k[..., :, None], col * row
    k2 = (k * k).sum(-1)[..., None, None]                              # |k|^2, (..., 1, 1)
    kn = F.normalize(k, dim=-1)
    return [
        (g * S + b * outer,
         "that is the additive (linear attention) update: first erase what S holds for k, b (g S k) k^T."),
        (g * S + b * (col - Sk) * row, "decay the state before reading it: the correction is v - g S k, not v - S k."),
        (g * (S + b * (col - Sk) * row), "the gate decays the old state only; the new write b v k^T is not decayed."),
        (g * S - g * b * Sk * row + outer, "beta scales the write too: + b v k^T."),
        (g * S - g * b * Sk * row + b * outer.transpose(-2, -1) if S.shape[-1] == S.shape[-2] else None,
         "the write is the outer product v k^T (d_v x d_k), not k v^T."),
        (g * S + b * (col - g * S @ kn[..., :, None]) * kn[..., None, :],
         "use the key as it is given: the formula does not normalise k (a model normalises its keys "
         "before the layer, if it wants unit keys)."),
        (g * S + b * (col - g * Sk) * row / k2,
         "do not divide by |k|^2: the formula is g S + b (v - g S k) k^T for the k given, unit or not."),
    ]


def _delta_hint(case, got, expected):
    return first_match(got, expected, _delta_variants(*case.args))


# --- modern.delta_chunk ---------------------------------------------------------------------------
# One chunk of the delta rule (DeltaNet, gate = 1) in the parallel form of Yang et al. (2024):
# with S_0 the state before the chunk, the written vectors u_t = beta_t (v_t - S_{t-1} k_t) solve
# (I + A) U = diag(beta) (V - K S_0^T), A_ts = beta_t k_t . k_s for s < t; then
# O = Q S_0^T + (Q K^T, lower triangle with the diagonal) U and S_C = S_0 + U^T K.
# Mistakes, and the cases that catch them:
#   - the additive update, U = diag(beta) V (no triangular solve): every case with C > 1 or S_0 != 0;
#   - starting from a zero state (the chunk forgets `state`): the cases with S_0 != 0;
#   - (I - A) instead of (I + A): the cases with C > 1;
#   - the output mask without its diagonal (o_t read before token t's write): every case;
#   - the correction without S_0 (v - S_0 k dropped from the right-hand side): the cases with S_0 != 0;
#   - a loop over the tokens (right values): caught by `verify` on the C = 64 case, which counts
#     the torch operations called.

def _chunk_solution(state, query, key, value, beta):
    C = key.shape[-2]
    b = beta[..., :, None]                                                 # (..., C, 1)
    A = (b * (key @ key.transpose(-2, -1))).tril(-1)                       # beta_t k_t . k_s, s < t
    eye = torch.eye(C, dtype=key.dtype, device=key.device)
    rhs = b * (value - key @ state.transpose(-2, -1))                      # beta_t (v_t - S_0 k_t)
    U = torch.linalg.solve_triangular(eye + A, rhs, upper=False)           # (..., C, d_v)
    out = query @ state.transpose(-2, -1) + (query @ key.transpose(-2, -1)).tril() @ U
    return out, state + U.transpose(-2, -1) @ key


def _chunk_expected(state, query, key, value, beta):
    return _gated_delta_rule(query, key, value, beta, torch.ones_like(beta), initial_state=state)


_CHUNK_LONG = 64


def _chunk_cases():
    g = _gen(84)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    def zeros(*shape):
        return torch.zeros(*shape, dtype=torch.float64)

    def with_zero(beta):
        beta = beta.clone()
        beta.view(-1)[:: 3] = 0.0
        return beta

    def case(text, lead, C, d_k, d_v, *, state=True, beta=None):
        S = randn(*lead, d_v, d_k) if state else zeros(*lead, d_v, d_k)
        b = rand(*lead, C) if beta is None else beta
        return Case(text, (S, unit(*lead, C, d_k), unit(*lead, C, d_k), randn(*lead, C, d_v), b))

    cases = [
        case("(B, H) = (1, 2), one token, a zero state, beta 0 and 0.5, d_v = 3, d_k = 4", (1, 2), 1, 4, 3,
             state=False, beta=torch.tensor([[[0.0], [0.5]]], dtype=torch.float64)),
        case("no batch or head axes, 7 tokens, a random state, beta 0 and 1 among others, d_v = 2, d_k = 3",
             (), 7, 3, 2, beta=torch.tensor([0.0, 1.0, 0.3, 1.0, 0.0, 0.7, 0.5], dtype=torch.float64)),
        case("no batch or head axes, one token, a random state, d_v = 2, d_k = 3", (), 1, 3, 2),
        case("(B, H) = (2, 2), 5 tokens, a zero state, d_v = d_k = 4", (2, 2), 5, 4, 4, state=False),
        case("(B, H) = (1, 3), 16 tokens, a random state, d_v = d_k = 8", (1, 3), 16, 8, 8),
        case("(B, H) = (2, 1), 9 tokens, beta = 1 everywhere, a random state, d_v = 5, d_k = 6", (2, 1), 9, 6, 5,
             beta=torch.ones(2, 1, 9, dtype=torch.float64)),
    ]
    cases.append(case(f"(B, H) = (1, 2), C = {_CHUNK_LONG} tokens, a random state, beta 0 every third "
                      f"token, d_v = 4, d_k = 8: no loop over the tokens", (1, 2), _CHUNK_LONG, 8, 4,
                      beta=with_zero(rand(1, 2, _CHUNK_LONG))))
    return in_both_precisions(cases)


_CHUNK_CONDITIONS = {
    "one token (C = 1)": lambda S, q, k, v, b: k.shape[-2] == 1,
    "several tokens": lambda S, q, k, v, b: k.shape[-2] > 1,
    "a zero state": lambda S, q, k, v, b: not bool(S.any()),
    "a state that is not zero": lambda S, q, k, v, b: bool(S.any()),
    "beta = 0 somewhere (a token that writes nothing)": lambda S, q, k, v, b: bool((b == 0).any()),
    "batch and head axes": lambda S, q, k, v, b: S.ndim == 4,
    "d_v != d_k": lambda S, q, k, v, b: S.shape[-1] != S.shape[-2],
    f"C = {_CHUNK_LONG}: no loop over the tokens": lambda S, q, k, v, b: k.shape[-2] >= _CHUNK_LONG,
}
_CHUNK_EXCLUSIVE = (("one token (C = 1)", "several tokens"),
                    ("a zero state", "a state that is not zero"),
                    ("one token (C = 1)", f"C = {_CHUNK_LONG}: no loop over the tokens"),
                    ("a zero state", f"C = {_CHUNK_LONG}: no loop over the tokens"))


def _chunk_variants(S, q, k, v, beta):
    S, q, k, v, beta = (t.double() for t in (S, q, k, v, beta))
    C = k.shape[-2]
    b = beta[..., :, None]
    kk, qk = k @ k.transpose(-2, -1), q @ k.transpose(-2, -1)
    eye = torch.eye(C, dtype=torch.float64)
    A = (b * kk).tril(-1)
    rhs = b * (v - k @ S.transpose(-2, -1))
    zero = torch.zeros_like(S)

    def finish(U, start=S, diagonal=0):                                    # (outputs, new state)
        return q @ start.transpose(-2, -1) + qk.tril(diagonal) @ U, start + U.transpose(-2, -1) @ k

    U = torch.linalg.solve_triangular(eye + A, rhs, upper=False)
    return [
        (finish(b * v), "that is the additive update (linear attention): the delta rule writes "
                        "u_t = beta_t (v_t - S_{t-1} k_t), which is what the triangular system (I + A) U = ... solves."),
        (finish(torch.linalg.solve_triangular(eye + A, b * v, upper=False), start=zero),
         "start from the given state S_0: it enters the outputs (Q S_0^T), the correction (v_t - S_0 k_t) "
         "and the new state (S_0 + U^T K)."),
        (finish(torch.linalg.solve_triangular(eye - A, rhs, upper=False)),
         "check the sign: u_t + sum_{s<t} beta_t (k_t . k_s) u_s = beta_t (v_t - S_0 k_t), so the system is "
         "(I + A) U, not (I - A) U."),
        (finish(U, diagonal=-1), "o_t = S_t q_t reads the state after token t's own write: the mask of "
                                      "Q K^T keeps the diagonal (s <= t)."),
        (finish(torch.linalg.solve_triangular(eye + A, b * v, upper=False)),
         "the first write also corrects what S_0 holds: the right-hand side is beta_t (v_t - S_0 k_t)."),
    ]


def _chunk_hint(case, got, expected):
    return first_match(got, expected, _chunk_variants(*case.args))


class _OpCount:
    """Counts the torch operations called while active (a loop over C tokens calls O(C) of them)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not getattr(func, "is_view", False):
                    counter.calls += 1
                return func(*args, **(kwargs or {}))

        self.calls = 0
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _chunk_verify(case, fn, got):
    C = case.args[2].shape[-2]
    if C < _CHUNK_LONG:
        return None
    with _OpCount() as spy:
        fn(*clone_tree(case.args))
    if spy.calls > C:
        return (f"the values are right, but your function called {spy.calls} torch operations for a chunk of "
                f"C = {C} tokens: a loop over the tokens (or a forward substitution written in Python) calls "
                f"a few per token. The chunked form does the whole chunk in a fixed number of operations: "
                f"the matrix A, one torch.linalg.solve_triangular for U, and a few matrix products.")
    return None


# --- modern.causal_linear_attention -------------------------------------------------------------
# Mistakes: summing over all keys, not a prefix (cases with L > 1); an exclusive prefix that
# leaves out the current token (cases with L > 1; the first query then divides 0 by 0); no
# normaliser (every case); another feature map than elu + 1, e.g. relu or exp (every case);
# softmax attention itself (every case with L > 1); the quadratic form, an L x L matrix of
# phi(q_i) . phi(k_j) masked to j <= i: right values, caught by `verify` on the long case
# (L = 256, d = d_v = 2), where it creates a tensor of at least L x L elements and the prefix
# sums (L x d x d_v per head) or chunks (L x C) stay far below. A small eps added to the
# denominator, as in Katharopoulos et al.'s code (1e-6), is accepted.

_LONG_L = 256


def _linear_solution(query, key, value):
    phi_q, phi_k = F.elu(query) + 1, F.elu(key) + 1                        # (..., L, d), positive
    state = torch.cumsum(phi_k[..., :, :, None] * value[..., :, None, :], dim=-3)  # (..., L, d, d_v)
    z = torch.cumsum(phi_k, dim=-2)                                        # (..., L, d)
    num = (phi_q[..., :, :, None] * state).sum(-2)                         # phi(q_i)^T S_i
    den = (phi_q * z).sum(-1, keepdim=True)                                # phi(q_i)^T z_i
    return num / den


_WORK_L = 1024


def _linear_cases():
    g = _gen(82)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    cases = [Case(f"(B, H, L, d) = {s}, d_v = {dv}", (r(*s), r(*s), r(*s[:-1], dv)))
             for s, dv in (((1, 1, 5, 3), 2), ((2, 2, 8, 4), 3), ((1, 1, 1, 4), 4), ((1, 3, 17, 8), 5),
                           ((2, 6, 3), 2), ((2, 1, 3), 2))]
    s = (1, 2, _LONG_L, 2)
    cases.append(Case(f"(B, H, L, d) = {s}, d_v = 2: no tensor of L x L elements allowed",
                      (r(*s), r(*s), r(*s))))
    s = (1, 1, _WORK_L, 2)
    cases.append(Case(f"(B, H, L, d) = {s}, d_v = 2: work linear in L", (r(*s), r(*s), r(*s))))
    return in_both_precisions(cases, skip=lambda case: case.args[0].shape[-2] >= _LONG_L)


_LINEAR_CONDITIONS = {
    "a single position": lambda q, k, v: q.shape[-2] == 1,
    "d_v differs from d": lambda q, k, v: v.shape[-1] != q.shape[-1],
    "(B, H) axes": lambda q, k, v: q.ndim == 4,
    "no head axis (B, L, d)": lambda q, k, v: q.ndim == 3,
    f"L = {_LONG_L}: no L x L tensor": any_precision(lambda q, k, v: q.shape[-2] >= _LONG_L),
    f"L = {_WORK_L}: work linear in L": any_precision(lambda q, k, v: q.shape[-2] >= _WORK_L),
}
_LINEAR_EXCLUSIVE = (("(B, H) axes", "no head axis (B, L, d)"),
                     *((c, f"L = {_LONG_L}: no L x L tensor") for c in ("a single position", "d_v differs from d",
                                                                         "no head axis (B, L, d)")),
                     *((c, f"L = {_WORK_L}: work linear in L") for c in ("a single position", "d_v differs from d",
                                                                          "no head axis (B, L, d)")))


def _after_first(x):
    return x[..., 1:, :]


def _linear_hint(case, got, expected):
    q, k, v = case.args
    fq, fk = F.elu(q.double()) + 1, F.elu(k.double()) + 1
    v = v.double()
    scores = fq @ fk.transpose(-2, -1)                                     # (..., L, L)
    causal = scores.tril()
    L = q.shape[-2]
    pairs = [((scores @ v) / scores.sum(-1, keepdim=True),
              "each query may use only the keys up to its own position: prefix sums (cumsum), not one sum."),
             (causal @ v, "divide by the normaliser phi(q_i) . z_i with z_i = sum_{j<=i} phi(k_j).")]
    for name, phi in (("relu", F.relu), ("exp", torch.exp), ("the identity", lambda x: x)):
        s = (phi(q.double()) @ phi(k.double()).transpose(-2, -1)).tril()
        pairs.append(((s @ v) / s.sum(-1, keepdim=True), f"the feature map is phi(x) = elu(x) + 1, not {name}."))
    soft = torch.softmax((q.double() @ k.double().transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(
        ~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf")), -1) @ v
    pairs.append((soft, "that is softmax attention: replace exp(q . k / sqrt(d)) by phi(q) . phi(k)."))
    hint = first_match(got, expected, pairs)
    if hint or L < 2:
        return hint
    before = scores.tril(-1)
    exclusive = (before @ v) / before.sum(-1, keepdim=True)
    return first_match(got, expected, [(exclusive[..., 1:, :], "include the current token: the prefix runs "
                                                                "over j <= i (an inclusive cumsum).")],
                       where=_after_first)


def _linear_work(case):
    """Work allowed at L = 1024: 256 (d + d_v) per query and head, which prefix sums (about 16 d d_v)
    and chunks of up to about 100 tokens stay under and a loop over each query's whole prefix
    (L / 2 (d + d_v) on average) does not."""
    q, k, v = case.args
    if q.shape[-2] < _WORK_L:
        return None
    return 256 * (q.shape[-1] + v.shape[-1]) * q.numel() // q.shape[-1]


_LINEAR_VERIFY = square_free(lambda case: case.args[0].shape[-2], min_length=_LONG_L, work=_linear_work,
                             floor=lambda case: case.args[0].numel() + case.args[2].numel(),
                             what="Causal linear attention",
                             advice="Keep running sums of phi(k_j) v_j^T and phi(k_j) with torch.cumsum.")


# --- modern.indexer_topk_mask -------------------------------------------------------------------
# Mistakes: topk before the causal mask, so queries pick future keys (every case with k < L);
# topk before the causal mask, then `& causal`, so the future keys picked are dropped and those
# queries keep fewer than k keys (every case with k < L); masking with -inf and keeping every
# top-k slot, so early queries with fewer than k allowed keys mark future keys (every case with
# k > 1); the k lowest scores (every case); forgetting that k may exceed L (case 5); the
# convention inverted, True for the keys left out (every case).

def _topk_mask_solution(scores, k):
    L_q, L_k = scores.shape[-2:]
    causal = torch.ones(L_q, L_k, dtype=torch.bool).tril()
    masked = scores.masked_fill(~causal, float("-inf"))                    # the future is never a candidate
    top = masked.topk(min(k, L_k), dim=-1).indices
    mask = torch.zeros(scores.shape, dtype=torch.bool).scatter(-1, top, True)
    return mask & causal                                                   # early rows have < k allowed keys


def _topk_mask_expected(scores, k):
    return _indexer_topk_mask(scores, k, is_causal=True)


def _topk_mask_cases():
    g = _gen(83)
    return in_both_precisions(
        [Case(f"scores {s}, k = {k}", (torch.randn(*s, generator=g, dtype=torch.float64), k))
         for s, k in (((1, 6, 6), 2), ((2, 8, 8), 3), ((2, 5, 5), 1), ((2, 10, 10), 4), ((2, 4, 4), 9),
                      ((2, 3, 3), 3), ((1, 1, 1), 2))])


_TOPK_MASK_CONDITIONS = {
    "k = 1": lambda s, k: k == 1,
    "1 < k < L": lambda s, k: 1 < k < s.shape[-1],
    "k = L": lambda s, k: k == s.shape[-1],
    "k > L": lambda s, k: k > s.shape[-1],
    "a batch of several": lambda s, k: s.shape[0] > 1,
}
_TOPK_MASK_EXCLUSIVE = (("k = 1", "1 < k < L"), ("k = 1", "k = L"), ("k = 1", "k > L"), ("1 < k < L", "k = L"),
                        ("1 < k < L", "k > L"), ("k = L", "k > L"))


def _topk_mask_hint(case, got, expected):
    scores, k = case.args
    L = scores.shape[-1]
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bool or got.shape != expected.shape:
        return None
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    kk = min(k, L)
    plain = torch.zeros_like(got).scatter(-1, scores.topk(kk, -1).indices, True)
    all_slots = torch.zeros_like(got).scatter(-1, scores.masked_fill(~causal, float("-inf")).topk(kk, -1).indices, True)
    low = torch.zeros_like(got).scatter(-1, scores.masked_fill(~causal, float("inf")).topk(
        kk, -1, largest=False).indices, True) & causal
    hint = first_match(got, expected, [
        (~expected, "True marks the keys a query selects (and may attend to); your mask is inverted."),
        (plain, "mask the future (set its scores to -inf) before taking the top k."),
        (all_slots, "a query with fewer than k allowed keys picked masked (future) keys: keep only "
                    "selections that the causal mask allows (mask & causal)."),
        (plain & causal, "mask the future (scores -inf) *before* the top k: a top k over all keys picks "
                         "future keys, and `& causal` afterwards drops them, leaving those queries fewer "
                         "than k keys."),
        (low, "keep the k *highest* scores (topk's default, largest=True).")])
    if hint:
        return hint
    if bool((got & ~causal).any()):
        return fact("your mask selects future keys (j > i): a query may select only keys it may see.")
    return None


# --- modern.global_layers -----------------------------------------------------------------------
# Mistakes: a period of local_per_global instead of local_per_global + 1 (cases 1 to 4);
# starting with a global layer, i % (r + 1) == 0 (every case but 5); returning the indices of
# the global layers (a wrong shape or dtype: every case); True for the local layers (every case).

def _global_solution(num_layers, local_per_global):
    period = local_per_global + 1                  # r local layers, then one global layer
    return (torch.arange(num_layers) + 1) % period == 0


def _global_cases():
    return [Case(f"{n} layers, {r}:1 local:global", (n, r))
            for n, r in ((6, 5), (62, 5), (12, 1), (7, 2), (4, 0), (3, 5), (1, 0), (1, 3))]


_GLOBAL_CONDITIONS = {
    "no local layers (local_per_global = 0)": lambda n, r: r == 0,
    "whole periods": lambda n, r: n % (r + 1) == 0,
    "a partial last period": lambda n, r: n % (r + 1) != 0,
    "fewer layers than one period (no global layer)": lambda n, r: n < r + 1,
    "a single layer": lambda n, r: n == 1,
}
_GLOBAL_EXCLUSIVE = (("whole periods", "a partial last period"),
                     ("no local layers (local_per_global = 0)", "a partial last period"),
                     ("no local layers (local_per_global = 0)", "fewer layers than one period (no global layer)"),
                     ("whole periods", "fewer layers than one period (no global layer)"))


def _global_hint(case, got, expected):
    n, r = case.args
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bool or got.shape != expected.shape:
        return None
    i = torch.arange(n)
    return first_match(got, expected, [
        (~expected, "True marks the global layers (those that see the whole sequence); yours marks the local ones."),
        ((i + 1) % r == 0 if r > 0 else None, f"a {r}:1 ratio repeats {r} local layers and 1 global one: the "
                                              f"period is {r + 1}."),
        (i % (r + 1) == 0, "the stack starts with local layers: layer i is global when (i + 1) % (r + 1) == 0.")])


EXERCISES = [
    Exercise("modern.mla_cache_bytes",
             "mla_cache_bytes(num_layers, num_heads, kv_latent_dim, rope_dim, bytes_per_value) -> int per token",
             _mla_bytes_cases, _mla_bytes_expected, _mla_bytes_solution, _mla_bytes_hint, atol=0, rtol=0,
             conditions=_MLA_BYTES_CONDITIONS, exclusive=_MLA_BYTES_EXCLUSIVE),
    Exercise("modern.absorbed_query_weight",
             "absorbed_query_weight(W_q (H*d_h, E), W_uk (H*d_h, d_c), num_heads) -> (H, d_c, E)",
             _absorbed_cases, _absorbed_expected, _absorbed_solution, _absorbed_hint,
             conditions=_ABSORBED_CONDITIONS, exclusive=_ABSORBED_EXCLUSIVE),
    Exercise("modern.delta_rule_step",
             "delta_rule_step(state (..., d_v, d_k), key (..., d_k), value (..., d_v), beta (...), gate (...)) "
             "-> new state (..., d_v, d_k); state may be updated in place (then return it)",
             _delta_cases, _delta_rule_step, _delta_solution, _delta_hint, may_modify=(0, "state"),
             conditions=_DELTA_CONDITIONS, exclusive=_DELTA_EXCLUSIVE),
    Exercise("modern.delta_chunk",
             "delta_chunk(state (..., d_v, d_k), query (..., C, d_k), key (..., C, d_k), value (..., C, d_v), "
             "beta (..., C)) -> (outputs (..., C, d_v), new state (..., d_v, d_k)), gate = 1, no loop over tokens",
             _chunk_cases, _chunk_expected, _chunk_solution, _chunk_hint, verify=_chunk_verify,
             conditions=_CHUNK_CONDITIONS, exclusive=_CHUNK_EXCLUSIVE),
    Exercise("modern.causal_linear_attention",
             "causal_linear_attention(query, key, value) -> (..., L, d_v), with phi(x) = elu(x) + 1, "
             "with torch operations, without an L x L matrix, work linear in L",
             _linear_cases, _linear_attention, _linear_solution, _linear_hint, verify=_LINEAR_VERIFY,
             conditions=_LINEAR_CONDITIONS, exclusive=_LINEAR_EXCLUSIVE),
    Exercise("modern.indexer_topk_mask",
             "indexer_topk_mask(scores (B, L, L), k) -> (B, L, L) bool: each query's k best keys, causally",
             _topk_mask_cases, _topk_mask_expected, _topk_mask_solution, _topk_mask_hint,
             conditions=_TOPK_MASK_CONDITIONS, exclusive=_TOPK_MASK_EXCLUSIVE),
    Exercise("modern.global_layers",
             "global_layers(num_layers, local_per_global) -> (num_layers,) bool, True = global",
             _global_cases, _global_layers, _global_solution, _global_hint,
             conditions=_GLOBAL_CONDITIONS, exclusive=_GLOBAL_EXCLUSIVE),
]
