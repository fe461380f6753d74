"""Many devices: ring attention (contiguous and zigzag) and Ulysses over torch.distributed.

References are independent of the code under test: torch's own SDPA (with ``enable_gqa``), a
dense causal mask, and closed-form counts. Starting processes costs time, so each world size
starts its processes once (``profile_attention`` runs every configuration in that launch).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from attn_course.distributed import (
    _ring_pieces,
    bytes_sent_per_rank,
    overlap_threshold,
    profile_attention,
    ring_attention,
    ring_attention_profile,
    ring_schedule,
    run_ring_attention,
    run_ulysses_attention,
    sequence_to_head_shards,
    shard_positions,
    ulysses_attention,
)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)


# --- layouts, schedules and counts, without processes ------------------------------------------------------

def test_ring_schedule_passes_each_shard_to_every_rank_once():
    for w in (1, 2, 3, 5):
        sched = ring_schedule(w)
        assert sched[0] == list(range(w))                     # steps count from 0: our own shard first
        for r in range(w):
            assert sorted(step[r] for step in sched) == list(range(w))
        for s in range(1, w):  # what rank r holds at step s came from rank r - 1 at step s - 1
            assert all(sched[s][r] == sched[s - 1][(r - 1) % w] for r in range(w))


@given(st.integers(1, 8), st.integers(1, 6), st.sampled_from(["contiguous", "zigzag"]))
def test_layouts_partition_the_sequence_in_increasing_order(world, chunk, layout):
    L = 2 * world * chunk
    held = [shard_positions(L, world, r, layout) for r in range(world)]
    assert sorted(torch.cat(held).tolist()) == list(range(L))
    assert all(torch.all(p[1:] > p[:-1]) for p in held)       # a causal mask within a shard is the global one
    if layout == "zigzag":
        c = L // (2 * world)
        for r, p in enumerate(held):
            assert p.tolist() == list(range(r * c, (r + 1) * c)) + list(range((2 * world - 1 - r) * c,
                                                                               (2 * world - r) * c))


@given(st.integers(1, 6), st.integers(1, 4), st.sampled_from(["contiguous", "zigzag"]), st.booleans())
def test_ring_pieces_cover_each_needed_score_exactly_once(world, chunk, layout, causal):
    """The plan of every step, mapped to global positions, against a dense causal mask."""
    L = 2 * world * chunk
    n = L // world
    held = [shard_positions(L, world, r, layout) for r in range(world)]
    for rank in range(world):
        covered = torch.zeros(n, L, dtype=torch.int64)            # rank's queries x all keys
        for step in range(world):
            source = ring_schedule(world)[step][rank]
            for rows, cols, tri in _ring_pieces(layout, rank, source, causal, n):
                block = torch.ones(rows.stop - rows.start, cols.stop - cols.start, dtype=torch.int64)
                if tri:
                    block = block.tril()
                covered[rows, held[source][cols]] += block
        q_pos = held[rank][:, None]
        needed = (torch.arange(L)[None, :] <= q_pos) if causal else torch.ones(n, L, dtype=torch.bool)
        assert torch.equal(covered, needed.long())


def test_zigzag_gives_every_rank_the_same_causal_work_and_contiguous_does_not():
    for world in (2, 4, 8):
        L = 2 * world * 16
        work = {lay: [int((shard_positions(L, world, r, lay) + 1).sum()) for r in range(world)]
                for lay in ("contiguous", "zigzag")}
        assert len(set(work["zigzag"])) == 1
        assert work["contiguous"] == sorted(work["contiguous"]) and work["contiguous"][0] < work["contiguous"][-1]
        assert sum(work["zigzag"]) == sum(work["contiguous"]) == L * (L + 1) // 2


def test_bytes_sent_closed_forms():
    kw = dict(batch=2, num_heads=8, length=4096, head_dim=64, bytes_per_value=2)
    for W in (1, 2, 4, 8):
        ring = bytes_sent_per_rank("ring", world_size=W, **kw)
        ulysses = bytes_sent_per_rank("ulysses", world_size=W, **kw)
        kv_bytes = 2 * 2 * 8 * 4096 * 64 * 2                   # the sequence's K and V
        assert ring == kv_bytes * (W - 1) // W
        assert ulysses == 2 * kv_bytes * (W - 1) // W ** 2     # Q, K, V in and the output back, 1/W each
        if W > 1:
            assert ring / ulysses == W / 2
    # GQA: the ring's K/V shrink with the KV heads; Ulysses must send each KV head to W // H_kv ranks
    gqa = dict(kw, num_kv_heads=2)
    assert bytes_sent_per_rank("ring", world_size=4, **gqa) == bytes_sent_per_rank("ring", world_size=4, **kw) // 4
    n, B = 4096 // 8, 2
    assert bytes_sent_per_rank("ulysses", world_size=8, **gqa) == 7 * (B * 8 * n * 128 + B * 8 * n * 128) // 8 * 2
    assert bytes_sent_per_rank("ulysses", world_size=2, **gqa) == (B * 8 * 2048 * 128 + B * 2 * 2048 * 128) // 2 * 2
    with pytest.raises(ValueError, match="world_size=3"):
        bytes_sent_per_rank("ulysses", world_size=3, batch=1, num_heads=8, length=48, head_dim=4)
    with pytest.raises(ValueError, match="world_size=5"):
        bytes_sent_per_rank("ring", world_size=5, batch=1, num_heads=8, length=48, head_dim=4)
    with pytest.raises(ValueError, match="scheme"):
        bytes_sent_per_rank("tree", world_size=2, batch=1, num_heads=8, length=48, head_dim=4)


def test_overlap_threshold_is_where_compute_catches_up_with_the_transfer():
    F_, B_ = 312e12, 300e9                                   # an A100 and NVLink, the paper's example
    assert overlap_threshold(F_, B_) == pytest.approx(F_ / B_)   # Liu et al.: c >= F / B in bf16
    d = 128

    def compute(c, H, causal):
        return (2 if causal else 4) * c * c * d * H / F_        # Q K^T and P V, per step

    def transfer(c, H_kv, b):
        return 2 * c * d * H_kv * b / B_                         # one K and one V shard

    for b, H, H_kv, causal in ((2, 8, 8, False), (4, 32, 8, False), (2, 16, 4, True), (1, 4, 1, True)):
        c_star = overlap_threshold(F_, B_, bytes_per_value=b, num_heads=H, num_kv_heads=H_kv, is_causal=causal)
        assert compute(c_star, H, causal) == pytest.approx(transfer(c_star, H_kv, b))
        for factor, faster in ((0.9, False), (1.1, True)):
            assert (compute(factor * c_star, H, causal) > transfer(factor * c_star, H_kv, b)) == faster


def test_sequence_to_head_shards_is_the_all_to_all():
    q = rand(2, 6, 12, 4)
    for W in (1, 2, 3, 6):
        shards = list(q.chunk(W, dim=2))
        after = sequence_to_head_shards(shards)
        assert len(after) == W
        for j, x in enumerate(after):
            torch.testing.assert_close(x, q[:, j * 6 // W:(j + 1) * 6 // W], rtol=0, atol=0)
    with pytest.raises(ValueError, match="world_size=4"):
        sequence_to_head_shards(list(q.chunk(4, dim=2)))        # 4 ranks cannot share 6 heads


# --- real processes: one launch per world size -------------------------------------------------------------

CONFIGS = [(scheme, layout, causal) for causal in (False, True)
           for scheme, layout in (("ring", "contiguous"), ("ring", "zigzag"), ("ulysses", "contiguous"))]
KV_HEADS = {2: 1, 3: 2, 4: 2}   # grouped-query attention: Ulysses must copy KV heads when W > G


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"W{w}")
def launched(request):
    W = request.param
    B, H, L, d, d_v = 2, 2 * W, 10 * W, 8, 5
    mha = (rand(B, H, L, d), rand(B, H, L, d, seed=1), rand(B, H, L, d_v, seed=2))
    gqa = (mha[0], rand(B, KV_HEADS[W], L, d, seed=3), rand(B, KV_HEADS[W], L, d_v, seed=4))
    runs = [{"scheme": s, "layout": lay, "is_causal": c, "query": q, "key": k, "value": v}
            for s, lay, c in CONFIGS for q, k, v in (mha, gqa)]
    if W == 4:  # half precision: as accurate as one process
        half = tuple(x.to(torch.bfloat16) for x in (rand(1, 4, 64, 8), rand(1, 4, 64, 8, seed=1),
                                                         rand(1, 4, 64, 8, seed=2)))
        runs += [{"scheme": s, "layout": lay, "is_causal": True, "query": half[0], "key": half[1], "value": half[2]}
                 for s, lay in (("ring", "contiguous"), ("ring", "zigzag"), ("ulysses", "contiguous"))]
    return W, runs, profile_attention(runs, W, repeats=1)


def test_both_schemes_equal_dense_attention_causal_and_not_with_and_without_gqa(launched):
    W, runs, results = launched
    for run, res in zip(runs, results):
        if run["query"].dtype != torch.float64:
            continue
        assert (res["scheme"], res["layout"], res["is_causal"]) == (run["scheme"], run["layout"], run["is_causal"])
        torch.testing.assert_close(res["output"], sdpa(run["query"], run["key"], run["value"], run["is_causal"]),
                                   atol=1e-10, rtol=1e-10)


def test_bytes_sent_match_the_count(launched):
    W, runs, results = launched
    for run, res in zip(runs, results):
        B, H, L, d = run["query"].shape
        expected = bytes_sent_per_rank(run["scheme"], batch=B, num_heads=H, num_kv_heads=run["key"].shape[1],
                                       length=L, head_dim=d, value_dim=run["value"].shape[-1], world_size=W,
                                       bytes_per_value=run["query"].element_size())
        assert [r["bytes_sent"] for r in res["ranks"]] == [expected] * W


def test_zigzag_balances_the_causal_work_and_nothing_is_computed_twice(launched):
    W, runs, results = launched
    for run, res in zip(runs, results):
        B, H, L, _ = run["query"].shape
        scores = [r["scores_computed"] for r in res["ranks"]]
        total = B * H * (L * (L + 1) // 2 if run["is_causal"] else L * L)
        assert sum(scores) == total                              # every needed score once, no more
        n = L // W
        if run["scheme"] == "ring" and run["layout"] == "contiguous" and run["is_causal"]:
            # the causal imbalance: rank r attends its own shard (a triangle) and r shards in full
            assert scores == [B * H * (n * (n + 1) // 2 + r * n * n) for r in range(W)]
            assert [r["blocks_computed"] for r in res["ranks"]] == list(range(1, W + 1))
        else:
            assert len(set(scores)) == 1, (run["scheme"], run["layout"], scores)


def test_profile_reports_timings(launched):
    _, _, results = launched
    for res in results:
        for r in res["ranks"]:
            assert all(len(r[k]) == 1 for k in ("compute_s", "compute_cpu_s", "wait_s", "total_s", "comm_only_s"))
            assert r["total_s"][0] > 0 and r["comm_only_s"][0] > 0 and r["compute_cpu_s"][0] > 0
            assert r["total_s"][0] >= r["compute_s"][0]


def test_bfloat16_is_as_accurate_as_one_process(launched):
    W, runs, results = launched
    half = [(run, res) for run, res in zip(runs, results) if run["query"].dtype == torch.bfloat16]
    assert len(half) == (3 if W == 4 else 0)
    for run, res in half:
        q, k, v = run["query"], run["key"], run["value"]
        ref = sdpa(q.double(), k.double(), v.double(), True)
        one = sdpa(q, k, v, True)
        assert res["output"].dtype == torch.bfloat16
        assert (res["output"].double() - ref).abs().max() <= 2 * (one.double() - ref).abs().max() + 1e-3


# --- bad input: raised before any process starts --------------------------------------------------------

def test_bad_input_names_the_argument():
    q = torch.randn(1, 4, 12, 4)
    with pytest.raises(ValueError, match="world_size=5"):
        run_ring_attention(q, q, q, 5)
    with pytest.raises(ValueError, match="world_size=4.*zigzag"):
        run_ring_attention(q, q, q, 4, layout="zigzag")       # 12 splits into 4, not into 8 chunks
    with pytest.raises(ValueError, match="layout"):
        run_ring_attention(q, q, q, 2, layout="striped")
    with pytest.raises(ValueError, match="world_size=3.*heads"):
        run_ulysses_attention(q, q, q, 3)                     # 3 divides L = 12 but not H = 4
    with pytest.raises(ValueError, match="world_size=8"):
        run_ulysses_attention(torch.randn(1, 4, 16, 4), torch.randn(1, 4, 16, 4), torch.randn(1, 4, 16, 4), 8)
    with pytest.raises(ValueError, match="backend"):
        run_ring_attention(q, q, q, 2, backend="mpi")
    with pytest.raises(ValueError, match="equal L"):
        run_ring_attention(q, torch.randn(1, 4, 8, 4), torch.randn(1, 4, 8, 4), 2)
    with pytest.raises(ValueError, match="G that divides H"):
        run_ulysses_attention(q, torch.randn(1, 3, 12, 4), torch.randn(1, 3, 12, 4), 2)
    with pytest.raises(ValueError, match="query must be"):
        run_ring_attention(torch.randn(12, 4), torch.randn(12, 4), torch.randn(12, 4), 2)
    with pytest.raises(TypeError, match="query"):
        run_ring_attention(q.long(), q, q, 2)
    with pytest.raises(ValueError, match="Ulysses uses contiguous"):
        profile_attention([{"scheme": "ulysses", "layout": "zigzag", "query": q, "key": q, "value": q}], 2)
    with pytest.raises(ValueError, match="scheme"):
        profile_attention([{"scheme": "tree", "query": q, "key": q, "value": q}], 2)
    with pytest.raises(ValueError, match="world_size=2.*zigzag"):
        ring_attention_profile(torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4), 2,
                               layout="zigzag")
    for fn in (ring_attention, ulysses_attention):
        with pytest.raises(RuntimeError, match="process group"):
            fn(q, q, q)
    with pytest.raises(ValueError, match="equal query and key shards"):
        ring_attention(q, torch.randn(1, 4, 5, 4), torch.randn(1, 4, 5, 4))
    with pytest.raises(ValueError, match="layout"):
        ring_attention(q, q, q, layout="zig")


def test_overlap_threshold_and_positions_reject_bad_input():
    with pytest.raises(ValueError, match="flops_per_s"):
        overlap_threshold(0, 1e9)
    with pytest.raises(ValueError, match="rank"):
        shard_positions(16, 4, 4)
    with pytest.raises(ValueError, match="layout"):
        shard_positions(16, 4, 0, "round-robin")
    assert math.isclose(overlap_threshold(1e12, 1e10, bytes_per_value=4, num_heads=8, num_kv_heads=2), 50.0)
