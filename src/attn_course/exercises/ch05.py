"""Chapter 5 exercises: the sinusoidal table, RoPE, ALiBi slopes, relative distance indices."""

from __future__ import annotations

import math

import torch

from .. import positional
from ._core import Case, Exercise


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- ch05.sinusoidal_encoding ---------------------------------------------------------------------

def _sin_solution(length, dim):
    pos = torch.arange(length, dtype=torch.float64)[:, None]                # (L, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe.float()


def _sin_cases():
    return [Case(f"length {L}, dim {d}", (L, d)) for L, d in ((4, 2), (10, 8), (50, 16), (7, 64))]


def _sin_hint(case, got, expected):
    L, d = case.args
    if got.shape != expected.shape:
        return None
    swapped = expected.clone()
    swapped[:, 0::2], swapped[:, 1::2] = expected[:, 1::2], expected[:, 0::2]
    if torch.allclose(got.double(), swapped.double(), atol=1e-4):
        return "sine goes in the even columns (2i), cosine in the odd ones (2i+1)."
    pos = torch.arange(L, dtype=torch.float64)[:, None]
    wrong = torch.zeros(L, d, dtype=torch.float64)
    inv = 10000.0 ** (-torch.arange(d // 2, dtype=torch.float64) / d)  # i/d instead of 2i/d
    wrong[:, 0::2], wrong[:, 1::2] = torch.sin(pos * inv), torch.cos(pos * inv)
    if torch.allclose(got.double(), wrong, atol=1e-4):
        return "the exponent is 2i/dim, where i counts pairs: use torch.arange(0, dim, 2) / dim."
    return "PE[p, 2i] = sin(p / 10000**(2i/dim)) and PE[p, 2i+1] = cos(p / 10000**(2i/dim))."


# --- ch05.apply_rope --------------------------------------------------------------------------

def _rope_solution(x, positions):
    d = x.shape[-1]
    theta = positions[:, None].double() * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = torch.cos(theta).to(x.dtype), torch.sin(theta).to(x.dtype)   # (L, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _rope_expected(x, positions):
    return positional.apply_rope(x, positions)


def _rope_cases():
    g = _gen(50)
    return [
        Case("one pair at position 1", (torch.tensor([[1.0, 0.0]]), torch.tensor([1]))),
        Case("x (4, 8), positions 0..3", (torch.randn(4, 8, generator=g), torch.arange(4))),
        Case("x (2, 5, 6), positions 3, 5, 7, 9, 11", (torch.randn(2, 5, 6, generator=g), torch.arange(3, 12, 2))),
        Case("x (3, 16), positions 100, 0, 37", (torch.randn(3, 16, generator=g), torch.tensor([100, 0, 37]))),
    ]


def _rope_hint(case, got, expected):
    x, pos = case.args
    if got.shape != expected.shape:
        return None
    if torch.allclose(got.double(), positional.apply_rope(x, -pos).double(), atol=1e-4):
        return "you rotate the wrong way: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)."
    d = x.shape[-1]
    theta = pos[:, None].double() * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    a, b = x[..., : d // 2].double(), x[..., d // 2:].double()
    halves = torch.cat([a * torch.cos(theta) - b * torch.sin(theta), a * torch.sin(theta) + b * torch.cos(theta)], -1)
    if torch.allclose(got.double(), halves, atol=1e-4):
        return "the pairs are interleaved, (x[..., 0], x[..., 1]), (x[..., 2], x[..., 3]), ..., not the two halves."
    return "pair i = (x[..., 2i], x[..., 2i+1]) turns by the angle position * 10000**(-2i/d)."


# --- ch05.alibi_slopes ------------------------------------------------------------------------

def _alibi_solution(num_heads):
    def geometric(n):
        return [2 ** (-8 * (k + 1) / n) for k in range(n)]

    if num_heads & (num_heads - 1) == 0:
        return torch.tensor(geometric(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = geometric(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(geometric(closest) + extra)


def _alibi_cases():
    return [Case(f"{n} heads", (n,)) for n in (1, 2, 4, 8, 16, 6, 12, 3)]


def _alibi_hint(case, got, expected):
    n = case.args[0]
    if n & (n - 1):
        return ("for a head count that is not a power of two, take the slopes of the largest power "
                "of two below it, then every other slope of twice that many heads.")
    return "for n a power of two the slopes are 2**(-8k/n) for k = 1 .. n."


# --- ch05.relative_position_index ---------------------------------------------------------------

def _rel_solution(length_q, length_k, max_distance):
    distance = torch.arange(length_k)[None, :] - torch.arange(length_q)[:, None]  # j - i
    return distance.clamp(-max_distance, max_distance) + max_distance


def _rel_cases():
    return [Case(f"L_q={a}, L_k={b}, max_distance={k}", (a, b, k))
            for a, b, k in ((3, 3, 1), (5, 5, 2), (4, 7, 3), (6, 2, 1), (8, 8, 10))]


def _rel_hint(case, got, expected):
    if got.shape == expected.shape and torch.equal(got, 2 * case.args[2] - expected):
        return "the distance is j - i (key minus query), not i - j."
    return "index = clip(j - i, -max_distance, max_distance) + max_distance, as int64."


EXERCISES = [
    Exercise("ch05.sinusoidal_encoding", "sinusoidal_encoding(length, dim) -> (length, dim), base 10000",
             _sin_cases, positional.sinusoidal_encoding, _sin_solution, _sin_hint, atol=1e-5),
    Exercise("ch05.apply_rope", "apply_rope(x (..., L, d), positions (L,)) -> rotated x, base 10000",
             _rope_cases, _rope_expected, _rope_solution, _rope_hint, atol=1e-5),
    Exercise("ch05.alibi_slopes", "alibi_slopes(num_heads) -> (num_heads,) float tensor",
             _alibi_cases, positional.alibi_slopes, _alibi_solution, _alibi_hint),
    Exercise("ch05.relative_position_index",
             "relative_position_index(length_q, length_k, max_distance) -> (L_q, L_k) int64",
             _rel_cases, positional.relative_position_index, _rel_solution, _rel_hint),
]
