"""Exercises: the sinusoidal table, RoPE, RoPE scores that depend on offsets only,
ALiBi slopes, relative distance indices.

Expected answers come from package functions bound here at import time. Above each
exercise, a comment lists the mistakes learners make; a case catches each one, and a hint
names a mistake only when the answer is that mistake (``_core.Hint``). Each exercise's
``conditions`` list what its statement names; floating inputs run in float32 and float64.
"""

from __future__ import annotations

import math

import torch

from ..positional import alibi_slopes as _alibi_slopes
from ..positional import apply_rope as _apply_rope
from ..positional import relative_position_index as _relative_position_index
from ..positional import sinusoidal_encoding as _sinusoidal_encoding
from ._core import Case, Exercise, finite, first_match, generic, in_both_precisions


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _freqs(d, exponent="2i/d"):
    i = torch.arange(0, d, 2, dtype=torch.float64) if exponent == "2i/d" else \
        torch.arange(d // 2, dtype=torch.float64)
    return 10000.0 ** (-i / d)


def _table(positions, d, *, layout="interleaved", exponent="2i/d", swap=False):
    angle = positions.double()[:, None] * _freqs(d, exponent)[None, :]
    first, second = (torch.cos(angle), torch.sin(angle)) if swap else (torch.sin(angle), torch.cos(angle))
    if layout == "halves":
        return torch.cat([first, second], -1)
    return torch.stack([first, second], -1).flatten(-2)


# --- positional.sinusoidal_encoding ---------------------------------------------------------------------
# Mistakes: sine and cosine swapped; the exponent i/d instead of 2i/d (i counting pairs); all
# sines then all cosines (two halves: a column permutation of the table, not the formula asked
# for); positions counted from 1.

def _sin_solution(length, dim):
    pos = torch.arange(length, dtype=torch.float64)[:, None]                # (L, 1)
    inv_freq = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    pe = torch.zeros(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe.float()


def _sin_cases():
    return [Case(f"length {L}, dim {d}", (L, d)) for L, d in ((4, 2), (10, 8), (50, 16), (7, 64), (60, 2),
                                                              (1, 2), (45, 64), (1, 64))]


_SIN_CONDITIONS = {
    "dim 2 (one frequency)": lambda L, d: d == 2,
    "dim 64 (wavelengths up to 2 pi 10000)": lambda L, d: d >= 64,
    "positions beyond 40": lambda L, d: L > 40,
    "a single position": lambda L, d: L == 1,
}
_SIN_EXCLUSIVE = (("dim 2 (one frequency)", "dim 64 (wavelengths up to 2 pi 10000)"),
                  ("positions beyond 40", "a single position"))


def _sin_hint(case, got, expected):
    L, d = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    p = torch.arange(L)
    return first_match(got, expected, [
            (_table(p, d, swap=True), "sine goes in the even columns (2i), cosine in the odd ones (2i+1)."),
            (_table(p, d, exponent="i/d"), "the exponent is 2i/dim, where i counts pairs: use "
                                           "torch.arange(0, dim, 2) / dim."),
            (_table(p, d, layout="halves"), "interleave: column 2i holds sin and column 2i+1 cos of the "
                                            "same frequency, as in the paper's formula. All sines, then "
                                            "all cosines is the same table with its columns permuted "
                                            "(as usable in a model), but not this formula."),
            (_table(p + 1, d), "positions start at 0.")], atol=1e-4)


# --- positional.apply_rope --------------------------------------------------------------------------
# Mistakes: rotating the wrong way; pairing x[i] with x[i + d/2] (the "rotate-half" layout of
# GPT-NeoX and Llama: not a mistake in a model, where it is RoFormer's RoPE with the features
# permuted, but not this exercise's interleaved pairs, so the hint says so without calling it wrong);
# ignoring the given positions (using 0 .. L-1; the cases use 3, 5, 7...); the exponent i/d;
# overwriting x_2i before computing x_2i+1 from it.

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
    return _apply_rope(x, positions)


def _rope_cases():
    g = _gen(50)
    return in_both_precisions([
        Case("one pair at position 1", (torch.tensor([[1.0, 0.0]]), torch.tensor([1]))),
        Case("x (4, 8), positions 0..3", (torch.randn(4, 8, generator=g), torch.arange(4))),
        Case("x (2, 5, 6), positions 3, 5, 7, 9, 11", (torch.randn(2, 5, 6, generator=g), torch.arange(3, 12, 2))),
        Case("x (3, 16), positions 100, 0, 37", (torch.randn(3, 16, generator=g), torch.tensor([100, 0, 37]))),
        Case("heads: x (2, 3, 4, 2), one pair, positions 250 .. 253",
             (torch.randn(2, 3, 4, 2, generator=g), torch.arange(250, 254))),
    ])


_ROPE_CONDITIONS = {
    "one pair (d = 2)": lambda x, p: x.shape[-1] == 2,
    "several pairs": lambda x, p: x.shape[-1] > 2,
    "positions other than 0 .. L-1": lambda x, p: not torch.equal(p, torch.arange(len(p))),
    "positions of 100 or more": lambda x, p: bool((p >= 100).any()),
    "leading (batch, head) axes": lambda x, p: x.ndim > 2,
}
_ROPE_EXCLUSIVE = (("one pair (d = 2)", "several pairs"),)


def _rope_variant(x, pos, *, sign=1.0, layout="interleaved", exponent="2i/d", sequential=False):
    x = x.double()
    d = x.shape[-1]
    theta = sign * pos.double()[:, None] * _freqs(d, exponent)
    c, s = torch.cos(theta), torch.sin(theta)
    if layout == "halves":
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * c - b * s, a * s + b * c], -1)
    a, b = x[..., 0::2], x[..., 1::2]
    new_a = a * c - b * s
    new_b = (new_a if sequential else a) * s + b * c
    return torch.stack([new_a, new_b], -1).flatten(-2)


def _rope_hint(case, got, expected):
    x, pos = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    pairs = []
    for kwargs, text in (
            ({"sign": -1.0}, "you rotate the wrong way: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos)."),
            ({"layout": "halves"}, "that is the rotate-half layout (GPT-NeoX, Hugging Face Llama), which "
                                   "pairs x[i] with x[i + d/2]. It is not wrong: it is RoFormer's RoPE with "
                                   "the features permuted, and works as well in a model. This exercise asks "
                                   "for RoFormer's interleaved pairs (x[..., 2i], x[..., 2i+1]), as "
                                   "attn_course.apply_rope does."),
            ({"exponent": "i/d"}, "pair i turns by position * 10000**(-2i/d): use torch.arange(0, d, 2) / d."),
            ({"sequential": True}, "compute both new coordinates from the OLD pair: you overwrote x_2i "
                                   "before using it for x_2i+1.")):
        pairs.append((_rope_variant(x, pos, **kwargs), text))
    pairs.append((_rope_variant(x, torch.arange(x.shape[-2])), "use the positions you are given, not 0 .. L-1."))
    return first_match(got, expected, pairs, atol=1e-4)


# --- positional.rope_scores -------------------------------------------------------------------------
# Rotate q and k, each by its own positions, then the scaled dot product: scores that depend
# only on the offset between query and key positions (two cases hold the same q and k at
# positions shifted by 100). Mistakes: rotating only q (or only k); rotating k with the
# query's positions; numbering the query from 0 in a decoding step (one query at position 7);
# the rotation the wrong way for one of them (scores then depend on m + n); no 1/sqrt(d).

def _rs_solution(q, k, q_positions, k_positions):
    def rotate(x, positions):
        d = x.shape[-1]
        angle = positions[:, None].double() * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        cos, sin = torch.cos(angle).to(x.dtype), torch.sin(angle).to(x.dtype)      # (L, d/2)
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    q, k = rotate(q, q_positions), rotate(k, k_positions)      # each by its own position
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])   # depends on the offsets only


def _rs_expected(q, k, q_positions, k_positions):
    qr, kr = _apply_rope(q, q_positions), _apply_rope(k, k_positions)
    return qr @ kr.transpose(-2, -1) / math.sqrt(q.shape[-1])


def _rs_cases():
    g = _gen(51)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k = r(3, 16), r(6, 16)
    return in_both_precisions([
        Case("q (4, 8) at positions 4..7, k (4, 8) at 0..3",
             (r(4, 8), r(4, 8), torch.arange(4, 8), torch.arange(4))),
        Case("a decoding step: one query at position 7, keys at 0..7",
             (r(1, 8), r(8, 8), torch.tensor([7]), torch.arange(8))),
        Case("q (3, 16) at 5..7, k (6, 16) at 2..7", (q, k, torch.arange(5, 8), torch.arange(2, 8))),
        Case("the same q and k, every position shifted by 100",
             (q.clone(), k.clone(), torch.arange(105, 108), torch.arange(102, 108))),
        Case("heads: q and k (2, 2, 5, 8) at positions 10..14",
             (r(2, 2, 5, 8), r(2, 2, 5, 8), torch.arange(10, 15), torch.arange(10, 15))),
        Case("heads, a decoding step: one query (2, 2, 1, 8) at position 105, keys at 100..105",
             (r(2, 2, 1, 8), r(2, 2, 6, 8), torch.tensor([105]), torch.arange(100, 106))),
    ])


_RS_CONDITIONS = {
    "a decoding step (one query, at the last key's position)": lambda q, k, pq, pk: len(pq) == 1 and int(pq[0]) == int(pk[-1]),
    "L_q != L_k": lambda q, k, pq, pk: q.shape[-2] != k.shape[-2],
    "positions of 100 or more": lambda q, k, pq, pk: bool((pq >= 100).all() and (pk >= 100).all()),
    "leading (batch, head) axes": lambda q, k, pq, pk: q.ndim > 2,
    "query positions other than 0 .. L_q-1": lambda q, k, pq, pk: not torch.equal(pq, torch.arange(len(pq))),
}


def _rs_hint(case, got, expected):
    q, k, pq, pk = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    d = q.shape[-1]

    def scores(a, b, scale=None):
        return a @ b.transpose(-2, -1) * (1 / math.sqrt(d) if scale is None else scale)

    rot, q64, k64 = _rope_variant, q.double(), k.double()
    variants = [
        (scores(rot(q, pq), k64), "rotate k too: with only q rotated the score depends on the query's "
                                  "absolute position, not on the offset."),
        (scores(q64, rot(k, pk)), "rotate q too: each of q and k turns by its own position."),
        (scores(rot(q, pq, sign=-1.0), rot(k, pk)), "rotate q and k the same way; a rotation by -m "
                                                    "and one by +n give a score that depends on m + n."),
        (scores(rot(q, pq), rot(k, pk), 1.0), "scale the scores by 1 / sqrt(d)."),
        (scores(rot(q, pq, layout="halves"), rot(k, pk, layout="halves")),
         "you used the rotate-half layout (x[i] with x[i + d/2], as in GPT-NeoX and Llama): a valid RoPE, "
         "RoFormer's with the features permuted, but for the same q and k it gives other scores. This "
         "exercise uses the interleaved pairs (x[..., 2i], x[..., 2i+1])."),
    ]
    if len(pq) == len(pk):
        variants.append((scores(rot(q, pk), rot(k, pq)), "rotate q by q_positions and k by k_positions."))
    if len(pq) != len(pk) or not torch.equal(pq, torch.arange(len(pq))):
        variants.append((scores(rot(q, torch.arange(len(pq))), rot(k, pk)),
                         "a query's position is its place in the sequence (here q_positions), not its "
                         "index among the queries: in a decoding step the one query sits at the end."))
    return first_match(got, expected, variants, atol=1e-4)


# --- positional.alibi_slopes ------------------------------------------------------------------------
# Mistakes: the plain geometric sequence 2**(-8k/n) for a head count that is not a power of two;
# k counted from 0 (a first slope of 1); an integer tensor.

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


_ALIBI_CONDITIONS = {
    "one head": lambda n: n == 1,
    "a power of two above 1": lambda n: n > 1 and n & (n - 1) == 0,
    "not a power of two": lambda n: n & (n - 1) != 0,
}
_ALIBI_EXCLUSIVE = (("one head", "a power of two above 1"), ("one head", "not a power of two"),
                    ("a power of two above 1", "not a power of two"))


def _alibi_hint(case, got, expected):
    n = case.args[0]
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    plain = torch.tensor([2 ** (-8 * (k + 1) / n) for k in range(n)], dtype=torch.float64)
    from_zero = torch.tensor([2 ** (-8 * k / n) for k in range(n)], dtype=torch.float64)
    return first_match(got, expected, [
        (plain, "for a head count that is not a power of two, the reference code's workaround (the paper "
                "trains only powers of two): the slopes of the largest power of two below it, then every "
                "other slope of twice that many heads."),
        (from_zero, "count k from 1: the slopes are 2**(-8k/n) for k = 1 .. n (the first is below 1).")])


# --- positional.relative_position_index ---------------------------------------------------------------
# Mistakes: i - j instead of j - i; no clipping; no offset (negative indices); a float tensor.

def _rel_solution(length_q, length_k, max_distance):
    distance = torch.arange(length_k)[None, :] - torch.arange(length_q)[:, None]  # j - i
    return distance.clamp(-max_distance, max_distance) + max_distance


def _rel_cases():
    return [Case(f"L_q={a}, L_k={b}, max_distance={k}", (a, b, k))
            for a, b, k in ((3, 3, 1), (5, 5, 2), (4, 7, 3), (6, 2, 1), (8, 8, 10), (3, 9, 12), (1, 4, 2), (5, 2, 6),
                              (1, 3, 5))]


_REL_CONDITIONS = {
    "L_q < L_k": lambda a, b, k: a < b,
    "L_q > L_k": lambda a, b, k: a > b,
    "distances clipped": lambda a, b, k: max(a, b) - 1 > k,
    "max_distance beyond every distance (no clipping)": lambda a, b, k: max(a, b) - 1 <= k,
    "a single query": lambda a, b, k: a == 1,
}
_REL_EXCLUSIVE = (("L_q < L_k", "L_q > L_k"), ("distances clipped", "max_distance beyond every distance (no clipping)"),
                  ("a single query", "L_q > L_k"))


def _rel_hint(case, got, expected):
    Lq, Lk, k = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.is_floating_point():
        return None
    dist = torch.arange(Lk)[None, :] - torch.arange(Lq)[:, None]
    return first_match(got, expected, [
        (2 * k - expected, "the distance is j - i (key minus query), not i - j."),
        (dist + k, "clip the distance to [-max_distance, max_distance] before adding max_distance."),
        (dist.clamp(-k, k), "add max_distance so that the indices start at 0.")]) \
        or generic("the rule: index = clip(j - i, -max_distance, max_distance) + max_distance, as int64.")


EXERCISES = [
    Exercise("positional.sinusoidal_encoding", "sinusoidal_encoding(length, dim) -> (length, dim), base 10000",
             _sin_cases, _sinusoidal_encoding, _sin_solution, _sin_hint, atol=1e-5,
             conditions=_SIN_CONDITIONS, exclusive=_SIN_EXCLUSIVE),
    Exercise("positional.apply_rope", "apply_rope(x (..., L, d), positions (L,)) -> rotated x, base 10000",
             _rope_cases, _rope_expected, _rope_solution, _rope_hint, atol=1e-5,
             conditions=_ROPE_CONDITIONS, exclusive=_ROPE_EXCLUSIVE),
    Exercise("positional.rope_scores",
             "rope_scores(q (..., L_q, d), k (..., L_k, d), q_positions (L_q,), k_positions (L_k,)) "
             "-> scores (..., L_q, L_k) = rope(q) rope(k)^T / sqrt(d)",
             _rs_cases, _rs_expected, _rs_solution, _rs_hint, atol=1e-4, rtol=1e-4,
             conditions=_RS_CONDITIONS),
    Exercise("positional.alibi_slopes", "alibi_slopes(num_heads) -> (num_heads,) float tensor",
             _alibi_cases, _alibi_slopes, _alibi_solution, _alibi_hint,
             conditions=_ALIBI_CONDITIONS, exclusive=_ALIBI_EXCLUSIVE),
    Exercise("positional.relative_position_index",
             "relative_position_index(length_q, length_k, max_distance) -> (L_q, L_k) int64",
             _rel_cases, _relative_position_index, _rel_solution, _rel_hint,
             conditions=_REL_CONDITIONS, exclusive=_REL_EXCLUSIVE),
]
