"""Chapter 4 exercises: splitting and merging heads, torch's masks, parameter and cache counts."""

from __future__ import annotations

import torch

from .. import multihead
from ._core import Case, Exercise


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- ch04.split_heads / ch04.merge_heads ----------------------------------------------------------

def _split_solution(x, num_heads):
    B, L, E = x.shape
    return x.reshape(B, L, num_heads, E // num_heads).transpose(1, 2)  # (B, H, L, d)


def _merge_solution(x):
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


def _split_cases():
    g = _gen(40)
    return [Case(f"x of shape {s}, {h} heads", (torch.randn(*s, generator=g), h))
            for s, h in (((2, 5, 12), 3), ((1, 4, 8), 1), ((3, 2, 16), 8), ((2, 6, 6), 2))]


def _merge_cases():
    g = _gen(41)
    return [Case(f"x of shape {s}", (torch.randn(*s, generator=g),))
            for s in ((2, 3, 5, 4), (1, 1, 4, 8), (3, 8, 2, 2))]


def _split_hint(case, got, expected):
    x, h = case.args
    B, L, E = x.shape
    if tuple(got.shape) == (B, L, h, E // h):
        return "that is (B, L, H, d): move the head axis in front of the positions with .transpose(1, 2)."
    if got.shape == expected.shape:
        return ("reshape to (B, L, H, d) first, then transpose: reshaping straight to (B, H, L, d) "
                "mixes positions and heads.")
    return None


def _merge_hint(case, got, expected):
    if got.shape == expected.shape:
        return "transpose back to (B, L, H, d) before reshaping to (B, L, H * d)."
    return None


# --- ch04.masks_from_torch ------------------------------------------------------------------------

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
    return cases


def _masks_hint(case, got, expected):
    if got.dtype != torch.bool:
        return "return a bool tensor."
    if got.shape == expected.shape and torch.equal(got, ~expected):
        return "torch's True means 'masked out'; ours means 'may attend': invert both masks."
    if got.shape == expected.shape:
        attn, pad = case.args
        if torch.equal(got, (~attn)[None, None] | (~pad)[:, None, None]):
            return "a key is allowed only if BOTH masks allow it: combine with &, not |."
    return "shape (B, 1, L_q, L_k): attn_mask goes to [None, None, :, :], key_padding_mask to [:, None, None, :]."


# --- ch04.mha_parameter_count -------------------------------------------------------------------

def _params_solution(embed_dim, num_heads, kdim, vdim, bias):
    E = embed_dim
    weights = E * E + E * kdim + E * vdim + E * E  # W_Q, W_K, W_V, W_O: heads only split them
    biases = 4 * E if bias else 0
    return weights + biases


def _params_expected(embed_dim, num_heads, kdim, vdim, bias):
    return multihead.count_parameters(
        multihead.MultiHeadAttention(embed_dim, num_heads, kdim=kdim, vdim=vdim, bias=bias))


def _params_cases():
    return [Case(f"embed_dim={E}, num_heads={H}, kdim={k}, vdim={v}, bias={b}", (E, H, k, v, b))
            for E, H, k, v, b in ((64, 8, 64, 64, True), (64, 1, 64, 64, True), (48, 4, 16, 32, True),
                                  (32, 2, 32, 32, False), (12, 3, 5, 7, False))]


def _params_hint(case, got, expected):
    E, H, k, v, bias = case.args
    if not isinstance(got, int):
        return None
    if got == expected - E * E - (E if bias else 0):
        return "you left out the output projection W_O (E x E, plus its bias)."
    if bias and got == expected - 4 * E:
        return "each of the four projections has a bias of size E."
    if got == 4 * E * E + (4 * E if bias else 0) and (k, v) != (E, E):
        return "W_K maps kdim features to E, and W_V maps vdim features to E."
    if got != expected and H > 1:
        return "the number of heads does not change the count: heads split E, they do not add weights."
    return None


# --- ch04.kv_cache_bytes ------------------------------------------------------------------------

def _cache_solution(num_layers, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value):
    per_token = 2 * num_kv_heads * head_dim  # a key and a value vector per KV head
    return num_layers * per_token * seq_len * batch_size * bytes_per_value


def _cache_cases():
    return [Case(f"layers={a}, kv heads={b}, head_dim={c}, seq_len={d}, batch={e}, bytes={f}",
                 (a, b, c, d, e, f))
            for a, b, c, d, e, f in ((32, 32, 128, 4096, 1, 2), (32, 8, 128, 4096, 1, 2),
                                     (24, 1, 64, 2048, 4, 2), (2, 4, 16, 10, 3, 4))]


def _cache_hint(case, got, expected):
    if isinstance(got, (int, float)) and got * 2 == expected:
        return "the cache holds keys AND values: count both."
    return "bytes = 2 (K and V) x layers x KV heads x head_dim x tokens x batch x bytes per value."


EXERCISES = [
    Exercise("ch04.split_heads", "split_heads(x (B, L, E), num_heads) -> (B, H, L, E / H)",
             _split_cases, multihead.split_heads, _split_solution, _split_hint),
    Exercise("ch04.merge_heads", "merge_heads(x (B, H, L, d)) -> (B, L, H * d)",
             _merge_cases, multihead.merge_heads, _merge_solution, _merge_hint),
    Exercise("ch04.masks_from_torch",
             "masks_from_torch(attn_mask (L_q, L_k), key_padding_mask (B, L_k)) -> "
             "bool mask (B, 1, L_q, L_k), True = may attend",
             _masks_cases, multihead.masks_from_torch, _masks_solution, _masks_hint),
    Exercise("ch04.mha_parameter_count",
             "mha_parameter_count(embed_dim, num_heads, kdim, vdim, bias) -> int",
             _params_cases, _params_expected, _params_solution, _params_hint, atol=0, rtol=0),
    Exercise("ch04.kv_cache_bytes",
             "kv_cache_bytes(num_layers, num_kv_heads, head_dim, seq_len, batch_size, "
             "bytes_per_value) -> int",
             _cache_cases, multihead.kv_cache_bytes, _cache_solution, _cache_hint, atol=0, rtol=0),
]
