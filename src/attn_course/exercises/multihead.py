"""Exercises: splitting and merging heads, torch's masks, a whole multi-head forward
pass from its weights, parameter and cache counts.

Expected answers come from package functions bound here at import time. Above each
exercise, a comment lists the mistakes learners make; a case catches each one, and a hint
names a mistake only when the answer is that mistake (``_core.Hint``). Each exercise's
``conditions`` list what its statement names; floating inputs run in float32 and float64.
"""

from __future__ import annotations

import math

import torch

from ..multihead import MultiHeadAttention as _MultiHeadAttention
from ..multihead import count_parameters as _count_parameters
from ..multihead import kv_cache_bytes as _kv_cache_bytes
from ..multihead import masks_from_torch as _masks_from_torch
from ..multihead import merge_heads as _merge_heads
from ..multihead import split_heads as _split_heads
from ._core import (
    Case,
    Exercise,
    agrees,
    as_number,
    builds_nothing,
    fact,
    factor_hint,
    finite,
    first_match,
    in_both_precisions,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


_number = as_number  # one definition, in _core


# --- multihead.split_heads / multihead.merge_heads ----------------------------------------------------------
# Mistakes (split): no transpose, (B, L, H, d); reshaping straight to (B, H, L, d), which mixes
# positions and heads; giving head h every H-th feature (reshape to (B, L, d, H)) instead of a
# contiguous slice. (merge): reshaping (B, H, L, d) straight to (B, L, H * d); the wrong
# transpose, which interleaves the heads' features.

def _split_solution(x, num_heads):
    B, L, E = x.shape
    return x.reshape(B, L, num_heads, E // num_heads).transpose(1, 2)  # (B, H, L, d)


def _merge_solution(x):
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


def _split_cases():
    g = _gen(40)
    return in_both_precisions([Case(f"x of shape {s}, {h} heads", (torch.randn(*s, generator=g), h))
                               for s, h in (((2, 5, 12), 3), ((1, 4, 8), 1), ((3, 2, 16), 8), ((2, 6, 6), 2),
                                            ((1, 3, 4), 4))])


def _merge_cases():
    g = _gen(41)
    return in_both_precisions([Case(f"x of shape {s}", (torch.randn(*s, generator=g),))
                               for s in ((2, 3, 5, 4), (1, 1, 4, 8), (3, 8, 2, 2), (2, 4, 3, 1))])


_SPLIT_CONDITIONS = {
    "one head": lambda x, h: h == 1,
    "several heads": lambda x, h: h > 1,
    "heads of width 2 or less": lambda x, h: x.shape[-1] // h <= 2,
}
_SPLIT_EXCLUSIVE = (("one head", "several heads"), ("one head", "heads of width 2 or less"))
_MERGE_CONDITIONS = {
    "one head": lambda x: x.shape[1] == 1,
    "several heads": lambda x: x.shape[1] > 1,
    "heads of width 2 or less": lambda x: x.shape[-1] <= 2,
}
_MERGE_EXCLUSIVE = (("one head", "several heads"), ("one head", "heads of width 2 or less"))


def _split_hint(case, got, expected):
    x, h = case.args
    B, L, E = x.shape
    if not isinstance(got, torch.Tensor):
        return None
    if tuple(got.shape) == (B, L, h, E // h) and (B, L, h, E // h) != tuple(expected.shape):
        return first_match(got, expected, [(x.reshape(B, L, h, E // h), "that is (B, L, H, d): move the "
                                             "head axis in front of the positions with .transpose(1, 2).")],
                           atol=0, rtol=0) or fact("your result is (B, L, H, d)-shaped: the head axis goes "
                                                   "in front of the positions, (B, H, L, d).")
    if got.shape != expected.shape:
        return None
    return first_match(got, expected, [
        (x.reshape(B, h, L, E // h), "reshape to (B, L, H, d) first, then transpose: reshaping straight "
                                     "to (B, H, L, d) mixes positions and heads."),
        (x.reshape(B, L, E // h, h).permute(0, 3, 1, 2), "head h gets the contiguous features "
                                                         "h*d .. (h+1)*d - 1, not every H-th feature.")],
        atol=0, rtol=0)


def _merge_hint(case, got, expected):
    (x,) = case.args
    B, H, L, d = x.shape
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape:
        return None
    return first_match(got, expected, [
        (x.reshape(B, L, H * d), "transpose back to (B, L, H, d) before reshaping to (B, L, H * d)."),
        (x.permute(0, 2, 3, 1).reshape(B, L, H * d), "keep each head's d features together: "
                                                     "x.transpose(1, 2), then reshape.")], atol=0, rtol=0)


# --- multihead.masks_from_torch ------------------------------------------------------------------------
# Mistakes: not inverting (torch's True = blocked); inverting only one of the two masks;
# combining with | instead of &; the shape (B, L_q, L_k) without the head axis.

def _masks_solution(attn_mask, key_padding_mask):
    allowed = ~attn_mask                      # (L_q, L_k): torch's True = blocked
    not_padding = ~key_padding_mask           # (B, L_k):   torch's True = padding
    return allowed[None, None, :, :] & not_padding[:, None, None, :]  # (B, 1, L_q, L_k)


def _masks_cases():
    g = _gen(42)
    cases = []
    for B, L_q, L_k in ((2, 3, 4), (1, 5, 5), (3, 2, 6)):
        attn = torch.rand(L_q, L_k, generator=g) > 0.6
        pad = torch.zeros(B, L_k, dtype=torch.bool)
        pad[-1, L_k // 2:] = True
        cases.append(Case(f"attn_mask ({L_q}, {L_k}), key_padding_mask ({B}, {L_k})", (attn, pad)))
    causal = torch.ones(4, 4, dtype=torch.bool).triu(1)
    cases.append(Case("a causal attn_mask, no padding", (causal, torch.zeros(2, 4, dtype=torch.bool))))
    cases.append(Case("attn_mask (2, 5), no padding", (torch.rand(2, 5, generator=g) > 0.5,
                                                        torch.zeros(3, 5, dtype=torch.bool))))
    pad = torch.tensor([[False, False, True, True, True], [False] * 5])
    cases.append(Case("a causal attn_mask (5, 5) and padding", (torch.ones(5, 5, dtype=torch.bool).triu(1), pad)))
    return cases


_MASKS_CONDITIONS = {
    "padding": lambda a, p: bool(p.any()),
    "no padding": lambda a, p: not bool(p.any()),
    "L_q != L_k": lambda a, p: a.shape[0] != a.shape[1],
    "a causal attn_mask": lambda a, p: a.shape[0] == a.shape[1] and torch.equal(a, torch.ones_like(a).triu(1)),
    "a batch of several": lambda a, p: p.shape[0] > 1,
}
_MASKS_EXCLUSIVE = (("padding", "no padding"), ("L_q != L_k", "a causal attn_mask"))


def _masks_hint(case, got, expected):
    attn, pad = case.args
    if not isinstance(got, torch.Tensor) or got.dtype != torch.bool:
        return None
    if got.ndim == 3 and got.shape == expected.shape[:1] + expected.shape[2:]:
        return first_match(got, expected, [(expected[:, 0], "add a head axis of size 1: (B, 1, L_q, L_k) "
                                                            "broadcasts over the heads.")]) \
            or fact("your mask has no head axis: return (B, 1, L_q, L_k), which broadcasts over the heads.")
    if got.shape != expected.shape:
        return fact("return the shape (B, 1, L_q, L_k): attn_mask goes to [None, None, :, :], "
                    "key_padding_mask to [:, None, None, :].")
    a, p = attn[None, None], pad[:, None, None]
    return first_match(got, expected, [
        (a | p, "torch's True means 'masked out'; ours means 'may attend': invert both masks."),
        ((~a) & p, "invert the key_padding_mask too: torch's True marks the padding."),
        (a & ~p, "invert the attn_mask too: torch's True marks what is blocked."),
        ((~a) | (~p), "a key is allowed only if BOTH masks allow it: combine with &, not |.")])


# --- multihead.multihead_forward -----------------------------------------------------------------------
# Mistakes: scaling by sqrt(E) instead of sqrt(d) = sqrt(E / H); splitting without the transpose
# (or reshaping straight to (B, H, L, d)); merging without the transpose; leaving out W_O; using
# the weights untransposed (x @ W: they are (out, in) as in nn.Linear); one big head (num_heads
# ignored); the softmax over the queries. L_q != L_k in one case.

def _mha_solution(query, key, value, W_q, W_k, W_v, W_o, num_heads):
    B, L_q, E = query.shape
    L_k, d = key.shape[1], E // num_heads

    def heads(x, W, L):
        return (x @ W.T).reshape(B, L, num_heads, d).transpose(1, 2)        # (B, H, L, d)

    q, k, v = heads(query, W_q, L_q), heads(key, W_k, L_k), heads(value, W_v, L_k)
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d), dim=-1)  # (B, H, L_q, L_k)
    out = (weights @ v).transpose(1, 2).reshape(B, L_q, E)                   # heads side by side
    return out @ W_o.T


def _mha_expected(query, key, value, W_q, W_k, W_v, W_o, num_heads):
    E = query.shape[-1]
    module = _MultiHeadAttention(E, num_heads, bias=False).to(query.dtype)
    with torch.no_grad():
        for proj, W in ((module.q_proj, W_q), (module.k_proj, W_k), (module.v_proj, W_v), (module.out_proj, W_o)):
            proj.weight.copy_(W)
        return module(query, key, value, need_weights=False)[0]


def _mha_cases():
    g = _gen(43)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cases = []
    for B, L_q, L_k, E, H in ((2, 5, 5, 12, 3), (1, 3, 6, 8, 2), (2, 4, 4, 8, 8), (2, 2, 1, 6, 1),
                              (2, 3, 1, 4, 4)):
        W = [r(E, E) / math.sqrt(E) for _ in range(4)]
        cases.append(Case(f"query ({B}, {L_q}, {E}), key/value ({B}, {L_k}, {E}), {H} heads",
                          (r(B, L_q, E), r(B, L_k, E), r(B, L_k, E), *W, H)))
    return in_both_precisions(cases)


_MHA_CONDITIONS = {
    "L_q != L_k": lambda q, k, v, *W: q.shape[1] != k.shape[1],
    "one head": lambda q, k, v, *W: W[-1] == 1,
    "several heads": lambda q, k, v, *W: W[-1] > 1,
    "heads of width 1 (num_heads = E)": lambda q, k, v, *W: W[-1] == q.shape[-1],
    "a batch of several": lambda q, k, v, *W: q.shape[0] > 1,
    "a single key": lambda q, k, v, *W: k.shape[1] == 1,
}
_MHA_EXCLUSIVE = (("one head", "several heads"), ("one head", "heads of width 1 (num_heads = E)"))


def _mha_variant(query, key, value, W_q, W_k, W_v, W_o, H, *, scale="d", transpose_w=True,
                 split="right", merge="right", out_proj=True, dim=-1):
    B, L_q, E = query.shape
    L_k, d = key.shape[1], E // H

    def proj(x, W):
        return x @ (W.T if transpose_w else W)

    def heads(x, L):
        if split == "no transpose":
            return x.reshape(B, H, L, d)
        return x.reshape(B, L, H, d).transpose(1, 2)

    q, k, v = heads(proj(query, W_q), L_q), heads(proj(key, W_k), L_k), heads(proj(value, W_v), L_k)
    s = q @ k.transpose(-2, -1) / math.sqrt(d if scale == "d" else E)
    o = torch.softmax(s, dim=dim) @ v
    o = o.reshape(B, L_q, E) if merge == "no transpose" else o.transpose(1, 2).reshape(B, L_q, E)
    return proj(o, W_o) if out_proj else o


def _mha_hint(case, got, expected):
    args = tuple(t.double() if isinstance(t, torch.Tensor) else t for t in case.args)
    if isinstance(got, (tuple, list)) and len(got) == 2 and agrees(got[0], expected):
        return fact("your first item is the output: return the output tensor alone, not (output, weights).")
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    pairs = []
    for kwargs, text in (
            ({"scale": "E"}, "each head's scores are divided by sqrt(d), d = E / num_heads, the head's "
                             "width, not sqrt(E)."),
            ({"split": "no transpose"}, "split with reshape(B, L, H, d).transpose(1, 2): reshaping "
                                        "straight to (B, H, L, d) mixes positions and heads."),
            ({"merge": "no transpose"}, "merge with transpose(1, 2) before reshape(B, L, E): the heads' "
                                        "outputs must be put side by side per position."),
            ({"out_proj": False}, "finish with the output projection W_o."),
            ({"transpose_w": False}, "the weights are (out, in) as in nn.Linear: project with x @ W.T."),
            ({"dim": -2}, "the softmax goes over the keys, the last axis.")):
        pairs.append((_mha_variant(*args, **kwargs), text))
    pairs.append((_mha_variant(*args[:-1], 1), "split into num_heads heads: one head of width E is a "
                                               "different function."))
    return first_match(got, expected, pairs)


# --- multihead.mha_parameter_count -------------------------------------------------------------------
# Mistakes: the output projection W_O left out; the biases left out (or counted when bias is
# False); W_K and W_V taken as E x E although kdim and vdim differ; multiplying by the number
# of heads.

def _params_solution(embed_dim, num_heads, kdim, vdim, bias):
    E = embed_dim
    weights = E * E + E * kdim + E * vdim + E * E  # W_Q, W_K, W_V, W_O: heads only split them
    biases = 4 * E if bias else 0
    return weights + biases


def _params_expected(embed_dim, num_heads, kdim, vdim, bias):
    return _count_parameters(_MultiHeadAttention(embed_dim, num_heads, kdim=kdim, vdim=vdim, bias=bias))


def _params_cases():
    return [Case(f"embed_dim={E}, num_heads={H}, kdim={k}, vdim={v}, bias={b}", (E, H, k, v, b))
            for E, H, k, v, b in ((64, 8, 64, 64, True), (64, 1, 64, 64, True), (48, 4, 16, 32, True),
                                  (32, 2, 32, 32, False), (12, 3, 5, 7, False), (16, 1, 40, 24, False))]


_PARAMS_CONDITIONS = {
    "biases": lambda E, H, k, v, b: b,
    "no biases": lambda E, H, k, v, b: not b,
    "kdim and vdim differ from embed_dim and from each other": lambda E, H, k, v, b: len({E, k, v}) == 3,
    "one head": lambda E, H, k, v, b: H == 1,
    "several heads": lambda E, H, k, v, b: H > 1,
}
_PARAMS_EXCLUSIVE = (("biases", "no biases"), ("one head", "several heads"))


def _params_hint(case, got, expected):
    E, H, k, v, bias = case.args
    got = _number(got)
    if got is None:
        return None
    b = 4 * E if bias else 0
    return first_match(got, expected, [
        (expected - E * E - (E if bias else 0), "you left out the output projection W_O (E x E, plus its bias)."),
        (expected - 4 * E if bias else None, "each of the four projections has a bias of size E."),
        (expected + 4 * E if not bias else None, "bias=False: no biases at all."),
        (4 * E * E + b, "W_K maps kdim features to E, and W_V maps vdim features to E."),
        (expected * H, "the number of heads does not change the count: heads split E, they do not add "
                       "weights.")], atol=0, rtol=0)


# --- multihead.kv_cache_bytes ------------------------------------------------------------------------
# Mistakes: forgetting the factor 2 (keys AND values); forgetting the layers, the batch or the
# bytes per value.

def _cache_solution(num_layers, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value):
    per_token = 2 * num_kv_heads * head_dim  # a key and a value vector per KV head
    return num_layers * per_token * seq_len * batch_size * bytes_per_value


def _cache_cases():
    return [Case(f"layers={a}, kv heads={b}, head_dim={c}, seq_len={d}, batch={e}, bytes={f}",
                 (a, b, c, d, e, f))
            for a, b, c, d, e, f in ((32, 32, 128, 4096, 1, 2), (32, 8, 128, 4096, 1, 2),
                                     (24, 1, 64, 2048, 4, 2), (2, 4, 16, 10, 3, 4), (3, 2, 8, 5, 2, 1),
                                     (4, 1, 32, 7, 1, 1))]


_CACHE_CONDITIONS = {
    "one KV head": lambda n, g, d, L, B, s: g == 1,
    "a batch of several": lambda n, g, d, L, B, s: B > 1,
    "a batch of one": lambda n, g, d, L, B, s: B == 1,
    "one byte per value (8-bit)": lambda n, g, d, L, B, s: s == 1,
    "several bytes per value": lambda n, g, d, L, B, s: s > 1,
}
_CACHE_EXCLUSIVE = (("a batch of several", "a batch of one"), ("one byte per value (8-bit)", "several bytes per value"))


def _cache_hint(case, got, expected):
    n, g, d, L, B, s = case.args
    got = _number(got)
    if got is None or got == expected:
        return None
    # every mistake whose number is the answer (two may coincide, e.g. 2 bytes per value)
    return factor_hint(got, expected, ((1 / 2, "the cache holds keys AND values: count both"),
                                       (1 / n, "every layer has its own cache: multiply by num_layers"),
                                       (1 / B, "every sequence in the batch has its own cache: multiply by "
                                               "batch_size"),
                                       (1 / s, "count bytes, not values: multiply by bytes_per_value"),
                                       (8, "that counts bits: the answer is in bytes (8 bits each)")))


EXERCISES = [
    Exercise("multihead.split_heads", "split_heads(x (B, L, E), num_heads) -> (B, H, L, E / H)",
             _split_cases, _split_heads, _split_solution, _split_hint,
             conditions=_SPLIT_CONDITIONS, exclusive=_SPLIT_EXCLUSIVE),
    Exercise("multihead.merge_heads", "merge_heads(x (B, H, L, d)) -> (B, L, H * d)",
             _merge_cases, _merge_heads, _merge_solution, _merge_hint,
             conditions=_MERGE_CONDITIONS, exclusive=_MERGE_EXCLUSIVE),
    Exercise("multihead.masks_from_torch",
             "masks_from_torch(attn_mask (L_q, L_k), key_padding_mask (B, L_k)) -> "
             "bool mask (B, 1, L_q, L_k), True = may attend",
             _masks_cases, _masks_from_torch, _masks_solution, _masks_hint,
             conditions=_MASKS_CONDITIONS, exclusive=_MASKS_EXCLUSIVE),
    Exercise("multihead.multihead_forward",
             "multihead_forward(query (B, L_q, E), key (B, L_k, E), value (B, L_k, E), W_q, W_k, W_v, "
             "W_o (E, E) each, num_heads) -> the output tensor (B, L_q, E) alone (not a tuple), no biases",
             _mha_cases, _mha_expected, _mha_solution, _mha_hint,
             conditions=_MHA_CONDITIONS, exclusive=_MHA_EXCLUSIVE),
    Exercise("multihead.mha_parameter_count",
             "mha_parameter_count(embed_dim, num_heads, kdim, vdim, bias) -> int, derived without "
             "building a module",
             _params_cases, _params_expected, _params_solution, _params_hint, atol=0, rtol=0,
             verify=builds_nothing(lambda case: case.args[0] ** 2, what="a module's parameters"),
             conditions=_PARAMS_CONDITIONS, exclusive=_PARAMS_EXCLUSIVE),
    Exercise("multihead.kv_cache_bytes",
             "kv_cache_bytes(num_layers, num_kv_heads, head_dim, seq_len, batch_size, "
             "bytes_per_value) -> int",
             _cache_cases, _kv_cache_bytes, _cache_solution, _cache_hint, atol=0, rtol=0,
             conditions=_CACHE_CONDITIONS, exclusive=_CACHE_EXCLUSIVE),
]
