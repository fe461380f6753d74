"""Serving: the KV caches (contiguous, paged, sink).

References are independent of the code under test: a plain contiguous cache, torch's own ops.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_course.multihead import KVCache, PagedKVCache, SinkKVCache


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- paged and sink caches -----------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(block=st.integers(1, 6), chunks=st.lists(st.tuples(st.integers(0, 2), st.integers(1, 7)), min_size=1,
                                                   max_size=8))
def test_paged_cache_equals_a_contiguous_cache(block, chunks):
    paged = PagedKVCache(64, block, 2, 3, dtype=torch.float64)
    contiguous = {s: KVCache() for s in range(3)}
    for i, (seq, n) in enumerate(chunks):
        k, v = rand(1, 2, n, 3, seed=i), rand(1, 2, n, 3, seed=100 + i)
        paged.append(seq, k[0], v[0])
        contiguous[seq].append(k, v)
    for seq, c in contiguous.items():
        if c.length:
            pk, pv = paged.gather(seq)
            assert torch.equal(pk, c.key[0]) and torch.equal(pv, c.value[0])
    u = paged.usage()
    assert u["used_slots"] == sum(n for _, n in chunks)
    assert 0 <= u["allocated_slots"] - u["used_slots"] < block * 3


def test_paged_cache_frees_blocks_and_reports_a_full_pool():
    c = PagedKVCache(3, 4, 1, 2)
    c.append("a", torch.zeros(1, 9, 2), torch.zeros(1, 9, 2))
    with pytest.raises(ValueError, match="free blocks"):
        c.append("b", torch.zeros(1, 5, 2), torch.zeros(1, 5, 2))
    c.free("a")
    c.append("b", torch.ones(1, 12, 2), torch.ones(1, 12, 2))
    assert c.usage()["fragmentation"] == 0.0 and torch.equal(c.gather("b")[0], torch.ones(1, 12, 2))
    with pytest.raises(KeyError, match="unknown seq_id"):
        c.gather("a")
    with pytest.raises(ValueError, match="key must be"):
        c.append("b", torch.zeros(2, 1, 2), torch.zeros(2, 1, 2))


def test_sink_cache_keeps_sinks_and_the_window():
    c = SinkKVCache(num_sinks=2, window=3)
    for t in range(10):
        c.append(torch.full((1, 1, 1, 1), float(t)), torch.full((1, 1, 1, 1), float(t)))
    assert c.key.flatten().tolist() == [0, 1, 7, 8, 9] and c.seen == 10 and c.length == 5
    with pytest.raises(ValueError, match="num_sinks"):
        SinkKVCache(num_sinks=-1)
