"""Exact attention in tiles: online softmax, FlashAttention's tiles, the log-sum-exp merge.

References are independent of the code under test: torch's own SDPA, a float64
dense softmax written here, and torch.logsumexp.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_course import flash


def dense64(q, k, v, mask=None):
    """Softmax attention in float64, written out."""
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return w @ v.double(), torch.logsumexp(s, -1)


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- attention_with_lse and merge_attention ---------------------------------------------------

def test_attention_with_lse_equals_sdpa_and_logsumexp():
    q, k, v = rand(2, 3, 9, 8), rand(2, 3, 11, 8, seed=1), rand(2, 3, 11, 5, seed=2)
    for causal in (False, True):
        out, lse = flash.attention_with_lse(q, k, v, is_causal=causal)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        mask = torch.ones(9, 11, dtype=torch.bool).tril() if causal else None
        torch.testing.assert_close(lse, dense64(q, k, v, mask)[1])


def test_fully_masked_query_gets_zero_output_and_minus_inf_lse():
    q, k, v = rand(1, 4, 8), rand(1, 6, 8, seed=1), rand(1, 6, 3, seed=2)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[2] = False
    out, lse = flash.attention_with_lse(q, k, v, mask)
    assert torch.equal(out[0, 2], torch.zeros(3, dtype=out.dtype)) and lse[0, 2] == float("-inf")
    assert not out.isnan().any()


@settings(max_examples=40, deadline=None)
@given(L_k=st.integers(1, 40), cuts=st.lists(st.integers(0, 40), max_size=5), causal=st.booleans())
def test_any_split_of_the_keys_merges_to_the_whole(L_k, cuts, causal):
    q, k, v = rand(2, 7, 4, seed=L_k), rand(2, L_k, 4, seed=1), rand(2, L_k, 3, seed=2)
    mask = torch.ones(7, L_k, dtype=torch.bool).tril() if causal else torch.ones(7, L_k, dtype=torch.bool)
    edges = sorted({0, L_k, *[c for c in cuts if c <= L_k]})
    parts = [flash.attention_with_lse(q, k[:, a:b], v[:, a:b], mask[:, a:b]) for a, b in zip(edges, edges[1:])]
    out, lse = flash.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    ref_out, ref_lse = dense64(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


def test_merge_with_an_empty_part_changes_nothing_and_all_empty_gives_zero():
    q, k, v = rand(5, 4), rand(6, 4, seed=1), rand(6, 2, seed=2)
    out, lse = flash.attention_with_lse(q, k, v)
    empty = (torch.zeros(5, 2, dtype=out.dtype), torch.full((5,), float("-inf"), dtype=out.dtype))
    merged, merged_lse = flash.merge_attention([out, empty[0]], [lse, empty[1]])
    torch.testing.assert_close(merged, out)
    torch.testing.assert_close(merged_lse, lse)
    none, none_lse = flash.merge_attention([empty[0], empty[0]], [empty[1], empty[1]])
    assert torch.equal(none, empty[0]) and torch.isneginf(none_lse).all()


def test_merge_rejects_bad_input_with_named_arguments():
    o, s = torch.zeros(3, 2), torch.zeros(3)
    with pytest.raises(TypeError, match="sequences"):
        flash.merge_attention(o, s)
    with pytest.raises(ValueError, match="at least one"):
        flash.merge_attention([], [])
    with pytest.raises(ValueError, match="one entry per part"):
        flash.merge_attention([o, o], [s])
    with pytest.raises(ValueError, match=r"lses\[1\]"):
        flash.merge_attention([o, o], [s, torch.zeros(4)])
    with pytest.raises(ValueError, match=r"outputs\[1\]"):
        flash.merge_attention([o, torch.zeros(4, 2)], [s, torch.zeros(4)])
    with pytest.raises(TypeError, match=r"lses\[0\]"):
        flash.merge_attention([o], [torch.zeros(3, dtype=torch.long)])


def test_online_softmax_equals_softmax_and_tracks_the_max():
    s = rand(3, 50) * 10
    probs, ms, zs = flash.online_softmax(s, 7)
    torch.testing.assert_close(probs, torch.softmax(s, -1))
    assert ms.shape == (3, 8) and torch.equal(ms[:, -1], s.amax(-1))
    torch.testing.assert_close(zs[:, -1], torch.exp(s - s.amax(-1, keepdim=True)).sum(-1))
    with pytest.raises(ValueError, match="block"):
        flash.online_softmax(s, 0)


# --- flash_attention -----------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(L_q=st.integers(1, 45), L_k=st.integers(1, 45), bq=st.integers(1, 20), bk=st.integers(1, 20),
       causal=st.booleans())
def test_flash_equals_dense_for_any_lengths_and_tiles(L_q, L_k, bq, bk, causal):
    q, k, v = rand(2, 2, L_q, 8, seed=L_q), rand(2, 2, L_k, 8, seed=L_k + 100), rand(2, 2, L_k, 3, seed=7)
    out = flash.flash_attention(q, k, v, is_causal=causal, block_q=bq, block_k=bk)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=causal),
                               atol=1e-10, rtol=1e-10)


def test_flash_scale_broadcast_and_half_precision():
    q, k, v = rand(2, 1, 33, 16), rand(1, 3, 40, 16, seed=1), rand(1, 3, 40, 16, seed=2)
    out = flash.flash_attention(q, k, v, block_q=8, block_k=16, scale=0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        qh, kh, vh = (x.to(dtype) for x in (q, k, v))
        got = flash.flash_attention(qh, kh, vh, is_causal=True, block_q=8, block_k=8)
        assert got.dtype == dtype and got.device == q.device
        torch.testing.assert_close(got.double(), F.scaled_dot_product_attention(q, k, v, is_causal=True),
                                   atol=2e-2, rtol=2e-2)


def test_flash_never_builds_the_full_score_matrix(monkeypatch):
    """Every matmul inside flash_attention is at most block_q x block_k."""
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        seen.append(tuple(out.shape[-2:]))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    q, k, v = rand(1, 2, 300, 8), rand(1, 2, 300, 8, seed=1), rand(1, 2, 300, 8, seed=2)
    flash.flash_attention(q, k, v, block_q=32, block_k=64, is_causal=True)
    assert seen and max(a * b for a, b in seen) <= 32 * 64


def test_tile_plan_counts_causal_tiles():
    plan = flash.tile_plan(1024, 1024, 128, 128, is_causal=True)
    assert plan == {"full": 28, "masked": 8, "skipped": 28, "total": 64}
    assert flash.tile_plan(100, 50, 30, 20) == {"full": 12, "masked": 0, "skipped": 0, "total": 12}
    # brute force: a tile is skipped iff no (i, j) in it has j <= i
    for bq, bk in ((7, 5), (16, 16), (3, 11)):
        plan = flash.tile_plan(40, 37, bq, bk, is_causal=True)
        m = torch.ones(40, 37, dtype=torch.bool).tril()
        tiles = [m[a:a + bq, b:b + bk] for a in range(0, 40, bq) for b in range(0, 37, bk)]
        assert plan["skipped"] == sum(not t.any() for t in tiles)
        assert plan["full"] == sum(bool(t.all()) for t in tiles)


def test_flash_bad_input_names_the_argument():
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="block_q"):
        flash.flash_attention(q, q, q, block_q=0)
    with pytest.raises(TypeError, match="block_k"):
        flash.flash_attention(q, q, q, block_k=2.5)
    with pytest.raises(ValueError, match="d_k"):
        flash.flash_attention(q, torch.randn(1, 4, 6), q)
    with pytest.raises(TypeError, match="key"):
        flash.flash_attention(q, q.long(), q)
    with pytest.raises(TypeError, match="scale"):
        flash.attention_with_lse(q, q, q, scale="big")


def test_io_counts_follow_the_paper():
    # standard attention moves Theta(N^2) elements, FlashAttention Theta(N^2 d^2 / M)
    std = [flash.standard_hbm_bytes(n, 64) for n in (1024, 2048)]
    fa = [flash.flash_hbm_bytes(n, 64, 192 * 1024) for n in (1024, 2048)]
    assert 3.5 < std[1] / std[0] < 4.1 and 3.5 < fa[1] / fa[0] < 4.1
    assert fa[0] < std[0] / 4
    # a larger SRAM means fewer passes over Q and O
    assert flash.flash_hbm_bytes(4096, 64, 4 * 192 * 1024) < flash.flash_hbm_bytes(4096, 64, 192 * 1024)


def test_half_precision_keeps_the_lse_in_float32_and_merges_accurately():
    q, k, v = rand(1, 2, 16, 8), rand(1, 2, 64, 8, seed=1), rand(1, 2, 64, 8, seed=2)
    ref = F.scaled_dot_product_attention(q, k, v)
    for dtype in (torch.float16, torch.bfloat16):
        qh, kh, vh = (x.to(dtype) for x in (q, k, v))
        parts = [flash.attention_with_lse(qh, kh[..., a:a + 8, :], vh[..., a:a + 8, :]) for a in range(0, 64, 8)]
        assert all(lse.dtype == torch.float32 for _, lse in parts)
        out, lse = flash.merge_attention([o for o, _ in parts], [s for _, s in parts])
        assert out.dtype == dtype and lse.dtype == torch.float32
        one_shot = F.scaled_dot_product_attention(qh, kh, vh).double()
        # merging eight parts is about as accurate as one fused call in the same precision
        assert (out.double() - ref).abs().max() <= 3 * (one_shot - ref).abs().max() + 1e-3


def test_peak_tensor_bytes_counts_new_tensors_only():
    from attn_course.bench import peak_tensor_bytes

    x = torch.randn(1000, 100)                                   # 400 kB, made before
    assert peak_tensor_bytes(lambda: x[:10])[1] == 0             # a view of an input is not new
    assert peak_tensor_bytes(lambda: x.clone())[1] == x.nbytes
    _, peak = peak_tensor_bytes(lambda: (x @ x.T).sum())         # 4 MB held, then freed
    assert peak >= 1000 * 1000 * 4
