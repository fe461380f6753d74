"""The many-devices exercises: each checker rejects the plausible wrong answers with a hint that
names the mistake, and accepts right answers written in another style."""

import re

import numpy as np
import pytest
import torch

from attn_course.exercises import check, solution

# --- wrong answers ----------------------------------------------------------------------------------------


def _zigzag(kind):
    def fn(r, w, L):
        c, n = L // (2 * w), L // w
        late = 2 * w - 1 - r
        if kind == "contiguous":
            return torch.arange(r * n, (r + 1) * n)
        if kind == "late first":
            return torch.cat([torch.arange(late * c, (late + 1) * c), torch.arange(r * c, (r + 1) * c)])
        if kind == "striped":
            return torch.arange(r, L, w)
        if kind == "off by one":
            return torch.cat([torch.arange(r * c, (r + 1) * c), torch.arange((2 * w - r) * c, (2 * w - r + 1) * c)])
        if kind == "chunks of L/W":
            return torch.cat([torch.arange(r * n, (r + 1) * n), torch.arange((w - 1 - r) * n, (w - r) * n)])
        raise AssertionError(kind)
    return fn


def _ring_bytes(kind):
    def fn(B, H, Hkv, L, d, W, b):
        heads = H if kind == "num_heads" else Hkv
        steps = W if kind == "W steps" else W - 1
        tensors = 1 if kind == "keys only" else 2
        positions = L if kind == "whole sequence" else L // W
        batch = 1 if kind == "no batch" else B
        size = 1 if kind == "no bytes" else b
        return steps * tensors * batch * heads * positions * d * size
    return fn


def _ulysses_bytes(kind):
    def fn(B, H, Hkv, L, d, W, b):
        n = L // W
        kv = {"no copies": Hkv, "copy per query head": H}.get(kind, max(Hkv, W))
        out = 0 if kind == "no output" else H
        v = 0 if kind == "keys only" else kv
        values = B * n * d * (H + kv + v + out)
        return values * b if kind == "keeps counted" else values * (W - 1) // W * b
    return fn


def _overlap(kind):
    def fn(F, Bw, b, H, Hkv, causal):
        c = 2 if causal else 1
        return {"inverted": Bw / F * b / 2 * Hkv / H * c,
                "one matmul": F / Bw * b * Hkv / H * c,
                "keys only": F / Bw * b / 4 * Hkv / H * c,
                "no heads": F / Bw * b / 2 * c,
                "heads inverted": F / Bw * b / 2 * H / Hkv * c,
                "causal halves": F / Bw * b / 2 * Hkv / H / (2 if causal else 1)}[kind]
    return fn


def _a2a(kind):
    def fn(shards):
        W, H = len(shards), shards[0].shape[1]
        h = H // W
        whole = torch.cat(shards, dim=2)
        if kind == "strided":
            return [whole[:, j::W] for j in range(W)]
        if kind == "reversed":
            return [torch.cat([s[:, j * h:(j + 1) * h] for s in reversed(shards)], 2) for j in range(W)]
        if kind == "unchanged":
            return [s.clone() for s in shards]
        if kind == "in place":
            for s in shards:
                s.mul_(1.0)
                s[0, 0, 0, 0] += 1
            return [whole[:, j * h:(j + 1) * h] for j in range(W)]
        raise AssertionError(kind)
    return fn


WRONG = [
    ("distributed.zigzag_positions", _zigzag("contiguous"), "contiguous shard"),
    ("distributed.zigzag_positions", _zigzag("late first"), "early chunk first"),
    ("distributed.zigzag_positions", _zigzag("striped"), "striped"),
    ("distributed.zigzag_positions", _zigzag("off by one"), "2W - 1 - r"),
    ("distributed.zigzag_positions", _zigzag("chunks of L/W"), "L / \\(2W\\)"),
    ("distributed.ring_source", lambda r, s, w: (r + s) % w, "rank r - s"),
    ("distributed.ring_source", lambda r, s, w: r - s, "modulo"),
    ("distributed.ring_source", lambda r, s, w: (r - s + 1) % w, "count from 0"),
    ("distributed.ring_bytes", _ring_bytes("W steps"), "W - 1 steps"),
    ("distributed.ring_bytes", _ring_bytes("keys only"), "keys AND the values"),
    ("distributed.ring_bytes", _ring_bytes("num_heads"), "num_kv_heads"),
    ("distributed.ring_bytes", _ring_bytes("whole sequence"), "one shard"),
    ("distributed.ring_bytes", _ring_bytes("no batch"), "batch"),
    ("distributed.ring_bytes", _ring_bytes("no bytes"), "bytes_per_value"),
    ("distributed.ulysses_bytes", _ulysses_bytes("no output"), "second all-to-all"),
    ("distributed.ulysses_bytes", _ulysses_bytes("keeps counted"), "keeps its own 1/W"),
    ("distributed.ulysses_bytes", _ulysses_bytes("no copies"), "W / num_kv_heads"),
    ("distributed.ulysses_bytes", _ulysses_bytes("copy per query head"), "not a copy for every query head"),
    ("distributed.ulysses_bytes", _ulysses_bytes("keys only"), "keys AND the values"),
    ("distributed.ulysses_bytes", _ring_bytes("correct"), None),
    ("distributed.overlap_threshold", _overlap("inverted"), "not the inverse"),
    ("distributed.overlap_threshold", _overlap("one matmul"), "two products"),
    ("distributed.overlap_threshold", _overlap("keys only"), "keys AND the values"),
    ("distributed.overlap_threshold", _overlap("no heads"), "multiply by G / H"),
    ("distributed.overlap_threshold", _overlap("heads inverted"), "not H / G"),
    ("distributed.overlap_threshold", _overlap("causal halves"), "twice as long"),
    ("distributed.ulysses_all_to_all", _a2a("strided"), "consecutive heads"),
    ("distributed.ulysses_all_to_all", _a2a("reversed"), "rank order"),
    ("distributed.ulysses_all_to_all", _a2a("unchanged"), "still holds a sequence shard"),
    ("distributed.ulysses_all_to_all", _a2a("in place"), "changed its inputs in place"),
]


@pytest.mark.parametrize("name, wrong, words", WRONG, ids=[f"{row[0]}-{i}" for i, row in enumerate(WRONG)])
def test_each_listed_mistake_is_rejected_with_a_hint_that_names_it(name, wrong, words, capsys):
    assert check(name, wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ " + name), out
    if words:
        assert re.search(words, out), out


def test_every_exercise_has_at_least_two_listed_mistakes():
    from attn_course.exercises import list_exercises

    for name in (n for n in list_exercises() if n.startswith("distributed.")):
        assert sum(row[0] == name for row in WRONG) >= 2, name


def test_the_reference_solutions_pass(capsys):
    from attn_course.exercises import list_exercises

    for name in (n for n in list_exercises() if n.startswith("distributed.")):
        assert check(name, solution(name), strict=True) is True


# --- right answers in another style ------------------------------------------------------------------------

def _zigzag_numpy(rank, world_size, length):
    chunks = np.array_split(np.arange(length), 2 * world_size)
    return torch.from_numpy(np.concatenate([chunks[rank], chunks[2 * world_size - 1 - rank]]))


def _ring_source_by_walking(rank, step, world_size):
    holder = rank
    for _ in range(step):            # walk the ring backwards, one neighbour per step
        holder = holder - 1 if holder > 0 else world_size - 1
    return holder


def _ring_bytes_float(B, H, Hkv, L, d, W, b):
    return (W - 1) * 2.0 * B * Hkv * (L / W) * d * b        # as a float


def _ulysses_bytes_tensor(B, H, Hkv, L, d, W, b):
    copies = max(1, W // Hkv)
    per_rank = torch.tensor([H, Hkv * copies, Hkv * copies, H]) * (B * (L // W) * d)
    return (per_rank.sum() - per_rank.sum() // W) * b      # a 0-d tensor


def _overlap_by_search(F, Bw, b, H, Hkv, causal):
    lo, hi = 0.0, 1e9                  # bisect where compute time meets transfer time (d = 1)
    for _ in range(200):
        c = (lo + hi) / 2
        compute = (2 if causal else 4) * c * c * H / F
        transfer = 2 * c * Hkv * b / Bw
        lo, hi = (c, hi) if compute < transfer else (lo, c)
    return hi


def _a2a_by_view(shards):
    W = len(shards)
    B, H, n, d = shards[0].shape
    stacked = torch.stack(shards)                          # (W ranks, B, H, n, d)
    grouped = stacked.view(W, B, W, H // W, n, d)          # (source, B, dest, h, n, d)
    return tuple(grouped[:, :, j].permute(1, 2, 0, 3, 4).reshape(B, H // W, W * n, d) for j in range(W))


@pytest.mark.parametrize("name, fn", [
    ("distributed.zigzag_positions", _zigzag_numpy),
    ("distributed.ring_source", _ring_source_by_walking),
    ("distributed.ring_bytes", _ring_bytes_float),
    ("distributed.ulysses_bytes", _ulysses_bytes_tensor),
    ("distributed.overlap_threshold", _overlap_by_search),
    ("distributed.ulysses_all_to_all", _a2a_by_view),
])
def test_a_right_answer_in_another_style_passes(name, fn, capsys):
    assert check(name, fn) is True, capsys.readouterr().out
