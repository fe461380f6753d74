"""Exercises of attention on many devices: the ring schedule.

Expected answers come from the package functions bound here at import time, so a
learner who reassigns ``attn_course.flash.merge_attention`` cannot move the target.
"""

from __future__ import annotations

import torch

from ..distributed import ring_schedule as _ring_schedule
from ._core import Case, Exercise


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731


# --- distributed.ring_source ----------------------------------------------------------------------------
# Mistakes: the wrong direction ((r + s) mod W); no modulo (negative ranks).

def _ring_solution(rank, step, world_size):
    return (rank - step) % world_size


def _ring_expected(rank, step, world_size):
    return _ring_schedule(world_size)[step][rank]


def _ring_cases():
    return [Case(f"rank {r}, step {s}, W = {w}", (r, s, w))
            for r, s, w in ((2, 1, 4), (0, 1, 4), (1, 3, 4), (3, 0, 4), (0, 2, 3), (4, 4, 5))]


def _ring_hint(case, got, expected):
    r, s, w = case.args
    if got == (r + s) % w:
        return "shards travel from rank r - 1 to rank r, so at step s you hold the shard of rank r - s."
    if got == r - s:
        return "rank numbers wrap around the ring: take the result modulo world_size."
    return None


EXERCISES = [
    Exercise("distributed.ring_source", "ring_source(rank, step, world_size) -> int: whose key/value shard rank holds",
             _ring_cases, _ring_expected, _ring_solution, _ring_hint, atol=0, rtol=0),
]
