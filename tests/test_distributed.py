"""Many devices: ring attention over torch.distributed (local gloo processes).

References are independent of the code under test: torch's own SDPA.
"""

import pytest
import torch
import torch.nn.functional as F

from attn_course.distributed import (
    ring_attention,
    ring_attention_profile,
    ring_schedule,
    run_ring_attention,
)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- ring attention over torch.distributed -------------------------------------------------------

def test_ring_schedule_passes_each_shard_to_every_rank_once():
    for w in (1, 2, 3, 5):
        sched = ring_schedule(w)
        for r in range(w):
            assert sorted(step[r] for step in sched) == list(range(w))
        for s in range(1, w):  # what rank r holds at step s came from rank r - 1 at step s - 1
            assert all(sched[s][r] == sched[s - 1][(r - 1) % w] for r in range(w))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ring_attention_over_local_processes_equals_dense(world_size):
    L = 12 * world_size
    q, k, v = rand(2, 2, L, 8), rand(2, 2, L, 8, seed=1), rand(2, 2, L, 5, seed=2)
    for causal in (False, True):
        out = run_ring_attention(q, k, v, world_size, is_causal=causal)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                                   atol=1e-10, rtol=1e-10)


def test_ring_profile_counts_bytes_and_causal_work():
    W, L = 4, 32
    q, k, v = rand(1, 2, L, 8), rand(1, 2, L, 8, seed=1), rand(1, 2, L, 8, seed=2)
    out, stats = ring_attention_profile(q, k, v, W, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    shard_bytes = 2 * (1 * 2 * (L // W) * 8 * 8)   # K and V shards, float64
    assert [s["bytes_sent"] for s in stats] == [(W - 1) * shard_bytes] * W
    assert [s["blocks_computed"] for s in stats] == [1, 2, 3, 4]   # the causal imbalance
    assert all(s["comm_only_s"] > 0 and s["total_s"] > 0 for s in stats)


def test_ring_attention_bad_input():
    q = torch.randn(1, 1, 10, 4)
    with pytest.raises(ValueError, match="world_size=3"):
        run_ring_attention(q, q, q, 3)
    with pytest.raises(ValueError, match="backend"):
        run_ring_attention(q, q, q, 2, backend="mpi")
    with pytest.raises(ValueError, match=r"\(B, H, L\)"):
        run_ring_attention(q, torch.randn(1, 1, 8, 4), torch.randn(1, 1, 8, 4), 2)
    with pytest.raises(ValueError, match="query must be"):
        run_ring_attention(torch.randn(10, 4), torch.randn(10, 4), torch.randn(10, 4), 2)
    with pytest.raises(RuntimeError, match="process group"):
        ring_attention(q, q, q)
    with pytest.raises(ValueError, match="equal query and key shards"):
        ring_attention(q, torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4))


def test_ring_attention_in_bfloat16_is_as_accurate_as_one_process():
    q, k, v = (x.to(torch.bfloat16) for x in (rand(1, 2, 64, 8), rand(1, 2, 64, 8, seed=1), rand(1, 2, 64, 8, seed=2)))
    ref = F.scaled_dot_product_attention(*(x.double() for x in (q, k, v)), is_causal=True)
    ring = run_ring_attention(q, k, v, 4, is_causal=True)
    one = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert ring.dtype == torch.bfloat16
    assert (ring.double() - ref).abs().max() <= 2 * (one.double() - ref).abs().max() + 1e-3
