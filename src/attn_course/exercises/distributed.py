"""Exercises of attention on many devices: who holds what, who sends how much, and when it hides.

Expected answers come from the package functions bound here at import time
(:mod:`attn_course.distributed`), so a learner who reassigns them cannot move the target.
Above each exercise, a comment lists the mistakes learners make; a case catches each one.
"""

from __future__ import annotations

import math

import torch

from ..distributed import bytes_sent_per_rank as _bytes_sent_per_rank
from ..distributed import overlap_threshold as _overlap_threshold
from ..distributed import ring_schedule as _ring_schedule
from ..distributed import sequence_to_head_shards as _sequence_to_head_shards
from ..distributed import shard_positions as _shard_positions
from ._core import Case, Exercise, as_number

_number = as_number  # one definition, in _core


def _same(got, value) -> bool:
    return got is not None and math.isclose(got, value, rel_tol=1e-9, abs_tol=0)


# --- distributed.zigzag_positions --------------------------------------------------------------------
# Rank r holds chunks r and 2W - 1 - r of 2W chunks, early chunk first. Mistakes: the contiguous
# shard; chunks of L / W (W chunks, not 2W); the late chunk 2W - r (off by one); the late chunk
# first (positions must increase for the causal mask within a shard); striped (r, r + W, ...).

def _zigzag_solution(rank, world_size, length):
    c = length // (2 * world_size)                                 # 2W chunks of c positions
    late = 2 * world_size - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c), torch.arange(late * c, (late + 1) * c)])


def _zigzag_expected(rank, world_size, length):
    return _shard_positions(length, world_size, rank, "zigzag")


def _zigzag_cases():
    return [Case(f"rank {r} of W = {w}, L = {L}", (r, w, L))
            for r, w, L in ((1, 4, 32), (0, 4, 32), (3, 4, 32), (0, 1, 8), (2, 3, 6), (1, 3, 24), (5, 8, 64))]


def _zigzag_hint(case, got, expected):
    r, w, L = case.args
    if not isinstance(got, torch.Tensor) or got.ndim != 1 or got.is_floating_point():
        return None
    got = got.cpu().long()
    c, n = L // (2 * w), L // w
    if got.numel() == 2 * n:
        return "each of the 2W chunks holds L / (2W) positions: a rank holds two of them, L / W in all."
    if got.numel() != n:
        return None
    late = 2 * w - 1 - r
    variants = (
        (torch.arange(r * n, (r + 1) * n), "that is the contiguous shard. Cut the sequence into 2W chunks and "
                                           "take chunk r and chunk 2W - 1 - r."),
        (torch.cat([torch.arange(late * c, (late + 1) * c), torch.arange(r * c, (r + 1) * c)]),
         "store the early chunk first: positions must increase within a shard, so that the causal mask "
         "within the shard is the causal mask of the sequence."),
        (torch.arange(r, L, w), "that is striped attention's round-robin layout (r, r + W, ...); the zigzag "
                                "layout keeps two contiguous chunks, r and 2W - 1 - r."),
        (torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * w - r) * c, (2 * w - r + 1) * c)]),
         "chunks are numbered 0 .. 2W - 1: the late chunk of rank r is 2W - 1 - r (rank 0 holds the first "
         "and the last chunk)."),
    )
    for variant, text in variants:
        if torch.equal(got, variant) and not torch.equal(variant, expected):
            return text
    return None


# --- distributed.ring_source ----------------------------------------------------------------------------
# Steps count from 0 (at step 0 a rank holds its own shard). Mistakes: the wrong direction
# ((r + s) mod W); no modulo (negative ranks); steps counted from 1 ((r - s + 1) mod W).

def _ring_solution(rank, step, world_size):
    return (rank - step) % world_size


def _ring_expected(rank, step, world_size):
    return _ring_schedule(world_size)[step][rank]


def _ring_cases():
    return [Case(f"rank {r}, step {s}, W = {w}", (r, s, w))
            for r, s, w in ((2, 1, 4), (0, 1, 4), (1, 3, 4), (3, 0, 4), (0, 2, 3), (4, 4, 5), (0, 0, 1))]


def _ring_hint(case, got, expected):
    r, s, w = case.args
    if got == (r + s) % w:
        return "shards travel from rank r - 1 to rank r, so at step s you hold the shard of rank r - s."
    if got == r - s:
        return "rank numbers wrap around the ring: take the result modulo world_size."
    if got == (r - s + 1) % w:
        return "steps count from 0: at step 0 every rank holds its own shard."
    return None


# --- distributed.ring_bytes ------------------------------------------------------------------------------
# (W - 1) shards of K and V, of B G (L / W) d values each (G = num_kv_heads). Mistakes: W transfers instead of W - 1;
# keys only; num_heads instead of num_kv_heads; the whole sequence per step; no batch; no bytes.

_SIZES = "batch, num_heads, num_kv_heads, length, head_dim, world_size, bytes_per_value"


def _ring_bytes_solution(batch, num_heads, num_kv_heads, length, head_dim, world_size, bytes_per_value):
    shard = batch * num_kv_heads * (length // world_size) * head_dim * bytes_per_value   # one K shard
    return (world_size - 1) * 2 * shard                                                  # K and V, W - 1 times


def _bytes_expected(scheme):
    def expected(batch, num_heads, num_kv_heads, length, head_dim, world_size, bytes_per_value):
        return _bytes_sent_per_rank(scheme, batch=batch, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                    length=length, head_dim=head_dim, world_size=world_size,
                                    bytes_per_value=bytes_per_value)
    return expected


def _ring_bytes_cases():
    return [Case(f"(B, H, G, L, d, W, bytes) = {a}", a) for a in (
        (3, 16, 4, 1200, 64, 3, 4), (2, 8, 8, 4096, 64, 4, 2), (1, 32, 8, 8192, 128, 8, 2),
        (1, 16, 1, 2048, 128, 16, 2), (1, 8, 8, 1024, 64, 1, 2))]


def _ring_bytes_hint(case, got, expected):
    B, H, Hkv, L, d, W, b = case.args
    got = _number(got)
    if got is None or got == expected:
        return None
    shard = B * Hkv * (L // W) * d * b
    for value, text in (
            (W * 2 * shard, "a rank passes a shard on at W - 1 steps: after the last step nothing moves on."),
            ((W - 1) * shard, "the shard that travels holds the keys AND the values."),
            ((W - 1) * 2 * B * H * (L // W) * d * b, "only the key/value heads travel: num_kv_heads, not "
                                                     "num_heads (under GQA the ring sends less)."),
            ((W - 1) * 2 * B * Hkv * L * d * b, "each step moves one shard of L / world_size positions, not the "
                                                "whole sequence."),
            ((W - 1) * 2 * Hkv * (L // W) * d * b, "every sequence of the batch has its shard: multiply by batch."),
            ((W - 1) * 2 * B * Hkv * (L // W) * d, "count bytes: multiply by bytes_per_value.")):
        if _same(got, value) and value != expected:
            return text
    return None


# --- distributed.ulysses_bytes ---------------------------------------------------------------------------
# Of each all-to-all a rank keeps 1/W: it sends (W - 1)/W of its Q, K, V shards and of its output
# shard. Under GQA with W > G each KV head goes to W / G ranks. Mistakes: no output
# all-to-all; the piece a rank keeps counted as sent; KV not copied when W > G; KV expanded
# to all H heads before sending; keys only.

def _ulysses_bytes_solution(batch, num_heads, num_kv_heads, length, head_dim, world_size, bytes_per_value):
    n = length // world_size                                   # positions per rank
    kv_heads_sent = max(num_kv_heads, world_size)              # W > G: each KV head to W / G ranks
    values = batch * n * head_dim * (num_heads               # Q in
                                     + 2 * kv_heads_sent     # K and V in
                                     + num_heads)            # the output back
    return values * (world_size - 1) // world_size * bytes_per_value


def _ulysses_bytes_cases():
    return [Case(f"(B, H, G, L, d, W, bytes) = {a}", a) for a in (
        (1, 32, 4, 8192, 128, 16, 2), (2, 8, 8, 4096, 64, 4, 2), (1, 32, 8, 8192, 128, 8, 2),
        (1, 32, 8, 8192, 128, 16, 2), (1, 8, 2, 1024, 64, 4, 4), (3, 12, 12, 600, 64, 3, 2), (1, 8, 8, 1024, 64, 1, 2))]


def _ulysses_bytes_hint(case, got, expected):
    B, H, Hkv, L, d, W, b = case.args
    got = _number(got)
    if got is None or got == expected:
        return None
    n, kv = L // W, max(Hkv, W)

    def sent(q, k, v, out, keep=False):
        values = B * n * d * (q + k + v + out)
        return values * b if keep else values * (W - 1) // W * b

    for value, text in (
            (sent(H, kv, kv, 0), "the output goes back to sequence shards with a second all-to-all: count it."),
            (sent(H, kv, kv, H, keep=True), "of each all-to-all a rank keeps its own 1/W: it sends (W - 1)/W."),
            (sent(H, Hkv, Hkv, H), "with more ranks than KV heads each KV head goes to W / num_kv_heads "
                                   "ranks: send max(num_kv_heads, W) KV heads."),
            (sent(H, H, H, H), "send each KV head to the ranks whose query heads read it (W / num_kv_heads "
                               "copies when W > num_kv_heads), not a copy for every query head."),
            (sent(H, kv, 0, H), "the keys AND the values are sent.")):
        if _same(got, value) and value != expected:
            return text
    return None


# --- distributed.overlap_threshold ---------------------------------------------------------------------
# L/W >= (F / B) (b / 2) (G / H), twice that for causal zigzag. Mistakes: B / F; one matmul per step
# (2 (L/W)^2 d); keys only; the heads' ratio ignored or inverted; causal halved instead of doubled.

def _overlap_solution(flops_per_s, bytes_per_s, bytes_per_value, num_heads, num_kv_heads, is_causal):
    # compute 4 c^2 d H (half if causal) / F  >=  transfer 2 c d G b / B with c = L/W; solve for c
    per_step = 2 if is_causal else 4
    return 2 * num_kv_heads * bytes_per_value * flops_per_s / (per_step * num_heads * bytes_per_s)


def _overlap_expected(flops_per_s, bytes_per_s, bytes_per_value, num_heads, num_kv_heads, is_causal):
    return _overlap_threshold(flops_per_s, bytes_per_s, bytes_per_value=bytes_per_value, num_heads=num_heads,
                              num_kv_heads=num_kv_heads, is_causal=is_causal)


def _overlap_cases():
    return [Case(f"{F:.3g} FLOP/s, {Bw:.3g} bytes/s, {b} bytes per value, H = {H}, G = {Hkv}, causal={c}",
                 (F, Bw, b, H, Hkv, c))
            for F, Bw, b, H, Hkv, c in ((312e12, 300e9, 2, 8, 8, False), (989e12, 450e9, 2, 32, 8, False),
                                        (989e12, 50e9, 2, 32, 8, True), (1e11, 1e9, 4, 4, 4, False),
                                        (2e13, 2.5e10, 1, 16, 1, True))]


def _overlap_hint(case, got, expected):
    F, Bw, b, H, Hkv, c = case.args
    got = _number(got)
    if got is None or not math.isfinite(got):
        return None
    causal = 2 if c else 1
    for value, text in (
            (Bw / F * b / 2 * Hkv / H * causal, "a faster device needs longer shards to stay busy: the threshold "
                                                 "grows as flops_per_s / bytes_per_s, not the inverse."),
            (F / Bw * b * Hkv / H * causal, "a step computes two products, Q K^T and P V, 2 (L/W)^2 d FLOPs each "
                                            "per head: 4 (L/W)^2 d H in all (half when causal)."),
            (F / Bw * b / 4 * Hkv / H * causal, "the shard that travels holds the keys AND the values: "
                                                "2 (L/W) d G bytes_per_value bytes."),
            (F / Bw * b / 2 * causal, "the compute grows with the query heads H, the transfer with the KV heads "
                                      "G: multiply by G / H (num_kv_heads / num_heads)."),
            (F / Bw * b / 2 * H / Hkv * causal, "G / H, not H / G: fewer KV heads means less to send."),
            (F / Bw * b / 2 * Hkv / H / 2, "causal attention halves the compute per step (balanced), so the "
                                           "shard must be twice as long: multiply by 2.")):
        if _same(got, value) and not _same(expected, value):
            return text
    return None


# --- distributed.ulysses_all_to_all ----------------------------------------------------------------------
# W sequence shards (B, H, L/W, d) -> W head shards (B, H/W, L, d): rank j gets heads
# [j H/W, (j + 1) H/W) at every position, positions in rank order. Mistakes: strided heads
# (j, j + W, ...); the sequence in the wrong order; heads concatenated instead of positions.

def _a2a_solution(shards):
    W = len(shards)
    H = shards[0].shape[1]
    h = H // W                                                  # heads per rank
    return [torch.cat([s[:, j * h:(j + 1) * h] for s in shards], dim=2) for j in range(W)]


def _a2a_expected(shards):
    return tuple(_sequence_to_head_shards(shards))


def _a2a_cases():
    g = torch.Generator().manual_seed(70)
    cases = []
    for B, H, L, d, W in ((1, 4, 8, 3, 2), (2, 6, 12, 4, 3), (1, 4, 8, 2, 4), (1, 2, 6, 2, 1), (2, 8, 16, 5, 4)):
        whole = torch.randn(B, H, L, d, generator=g, dtype=torch.float64)
        cases.append(Case(f"(B, H, L, d) = {(B, H, L, d)}, W = {W}", (list(whole.chunk(W, dim=2)),)))
    return cases


def _a2a_hint(case, got, expected):
    (shards,) = case.args
    W = len(shards)
    if not isinstance(got, (list, tuple)) or len(got) != W or not all(isinstance(x, torch.Tensor) for x in got):
        return None
    whole = torch.cat(shards, dim=2)
    if all(x.shape == s.shape for x, s in zip(got, shards)):
        return ("every rank still holds a sequence shard (B, H, L/W, d): rank j should hold all L positions of "
                "heads j H/W .. (j + 1) H/W - 1, (B, H/W, L, d).")
    if got[0].shape != expected[0].shape:
        return None
    variants = (
        ([whole[:, j::W] for j in range(W)], "rank j gets consecutive heads j H/W .. (j + 1) H/W - 1 (reshape "
                                             "as (B, W, H/W, ...), not (B, H/W, W, ...)): heads j, j + W, ... "
                                             "is another split."),
        ([torch.cat([s[:, j * (whole.shape[1] // W):(j + 1) * (whole.shape[1] // W)] for s in reversed(shards)], 2)
          for j in range(W)], "put the positions in rank order: shard 0 holds the first L/W positions."))
    for variant, text in variants:
        if all(x.shape == v.shape and torch.allclose(x.double(), v.double()) for x, v in zip(got, variant)) \
                and not all(torch.equal(v, e) for v, e in zip(variant, expected)):
            return text
    return None


EXERCISES = [
    Exercise("distributed.zigzag_positions",
             "zigzag_positions(rank, world_size, length) -> (L / W,) int64 tensor of positions, early chunk first",
             _zigzag_cases, _zigzag_expected, _zigzag_solution, _zigzag_hint, atol=0, rtol=0),
    Exercise("distributed.ring_source", "ring_source(rank, step, world_size) -> int: whose key/value shard rank "
             "holds at step (steps count from 0)",
             _ring_cases, _ring_expected, _ring_solution, _ring_hint, atol=0, rtol=0),
    Exercise("distributed.ring_bytes", f"ring_bytes({_SIZES}) -> int: bytes one rank sends",
             _ring_bytes_cases, _bytes_expected("ring"), _ring_bytes_solution, _ring_bytes_hint, atol=0, rtol=0),
    Exercise("distributed.ulysses_bytes", f"ulysses_bytes({_SIZES}) -> int: bytes one rank sends",
             _ulysses_bytes_cases, _bytes_expected("ulysses"), _ulysses_bytes_solution, _ulysses_bytes_hint,
             atol=0, rtol=0),
    Exercise("distributed.overlap_threshold",
             "overlap_threshold(flops_per_s, bytes_per_s, bytes_per_value, num_heads, num_kv_heads, is_causal) "
             "-> float: the fewest positions per rank that hide the ring's transfers",
             _overlap_cases, _overlap_expected, _overlap_solution, _overlap_hint, atol=0, rtol=1e-6),
    Exercise("distributed.ulysses_all_to_all",
             "ulysses_all_to_all(shards: W tensors (B, H, L/W, d)) -> W tensors (B, H/W, L, d)",
             _a2a_cases, _a2a_expected, _a2a_solution, _a2a_hint, atol=0, rtol=0),
]
