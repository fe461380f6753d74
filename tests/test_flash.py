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


# --- end-aligned (bottom-right) causal masks ------------------------------------------------------

def lower_right(L_q, L_k):
    """Key j allowed for query i when j <= i + L_k - L_q, written out."""
    return torch.arange(L_k)[None, :] <= torch.arange(L_q)[:, None] + (L_k - L_q)


@settings(max_examples=30, deadline=None)
@given(L_q=st.integers(1, 30), extra=st.integers(0, 30), bq=st.integers(1, 12), bk=st.integers(1, 12))
def test_bottom_right_equals_sdpa_with_causal_lower_right(L_q, extra, bq, bk):
    from torch.nn.attention.bias import causal_lower_right

    L_k = L_q + extra                                   # new queries after cached keys (chunked prefill)
    q, k, v = rand(2, 2, L_q, 8, seed=L_q), rand(2, 2, L_k, 8, seed=L_k + 50), rand(2, 2, L_k, 4, seed=3)
    out = flash.flash_attention(q, k, v, is_causal=True, align="bottom_right", block_q=bq, block_k=bk)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L_q, L_k))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


def test_bottom_right_with_more_queries_than_keys_gives_zero_rows():
    q, k, v = rand(1, 9, 4), rand(1, 5, 4, seed=1), rand(1, 5, 3, seed=2)
    out = flash.flash_attention(q, k, v, is_causal=True, align="bottom_right", block_q=2, block_k=3)
    ref, _ = dense64(q, k, v, lower_right(9, 5))
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[0, :4], torch.zeros(4, 3, dtype=out.dtype))     # queries 0..3 see no key
    # equal lengths: both alignments are the same mask; top-left is torch's is_causal
    q, k, v = rand(1, 7, 4), rand(1, 7, 4, seed=1), rand(1, 7, 3, seed=2)
    torch.testing.assert_close(flash.flash_attention(q, k, v, is_causal=True, align="bottom_right"),
                               flash.flash_attention(q, k, v, is_causal=True, align="top_left"))


def test_align_is_checked_and_named():
    q = rand(1, 4, 8)
    for bad in ("bottom-right", "lower_right", None, 1):
        with pytest.raises(ValueError, match="align"):
            flash.flash_attention(q, q, q, is_causal=True, align=bad)
    with pytest.raises(ValueError, match="align"):
        flash.tile_plan(8, 8, align="top")


def test_tile_plan_bottom_right_counts_by_brute_force():
    for L_q, L_k, bq, bk in ((5, 40, 4, 8), (40, 37, 7, 5), (16, 64, 16, 16), (1, 100, 1, 16), (30, 10, 4, 3)):
        plan = flash.tile_plan(L_q, L_k, bq, bk, is_causal=True, align="bottom_right")
        m = lower_right(L_q, L_k)
        tiles = [m[a:a + bq, b:b + bk] for a in range(0, L_q, bq) for b in range(0, L_k, bk)]
        assert plan["skipped"] == sum(not t.any() for t in tiles), (L_q, L_k)
        assert plan["full"] == sum(bool(t.all()) for t in tiles), (L_q, L_k)
    # one decoding query sees every key: nothing to skip or mask
    assert flash.tile_plan(1, 100, 1, 16, is_causal=True, align="bottom_right")["full"] == 7


# --- the backward pass in tiles -----------------------------------------------------------------

def dense_masked(q, k, v, mask=None, scale=None):
    """Attention written out with torch ops, differentiable by autograd (the reference)."""
    s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def leaves(*shapes, seed=0, dtype=torch.float64):
    return [rand(*s, seed=seed + i, dtype=dtype).requires_grad_() for i, s in enumerate(shapes)]


@pytest.mark.parametrize("causal, align, L_q, L_k", [
    (False, "top_left", 7, 11), (True, "top_left", 9, 9), (True, "top_left", 11, 6),
    (True, "bottom_right", 5, 12), (True, "bottom_right", 10, 4)])
def test_gradcheck_in_float64(causal, align, L_q, L_k):
    q, k, v = leaves((2, L_q, 4), (2, L_k, 4), (2, L_k, 3))
    fn = lambda q, k, v: flash.flash_attention(q, k, v, is_causal=causal, align=align,  # noqa: E731
                                               block_q=3, block_k=4, scale=0.7)
    assert torch.autograd.gradcheck(fn, (q, k, v))


@settings(max_examples=40, deadline=None)
@given(L_q=st.integers(1, 33), L_k=st.integers(1, 33), bq=st.integers(1, 16), bk=st.integers(1, 16),
       causal=st.booleans(), bottom_right=st.booleans())
def test_gradients_equal_autograd_through_dense_attention(L_q, L_k, bq, bk, causal, bottom_right):
    q, k, v = leaves((2, 2, L_q, 8), (2, 2, L_k, 8), (2, 2, L_k, 5), seed=L_q * 40 + L_k)
    align = "bottom_right" if bottom_right else "top_left"
    out = flash.flash_attention(q, k, v, is_causal=causal, align=align, block_q=bq, block_k=bk)
    mask = None
    if causal:
        mask = lower_right(L_q, L_k) if bottom_right else torch.ones(L_q, L_k, dtype=torch.bool).tril()
    ref = dense_masked(q, k, v, mask)
    grad = rand(*out.shape, seed=9)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


@settings(max_examples=25, deadline=None)
@given(L_q=st.integers(1, 40), L_k=st.integers(1, 40), bq=st.integers(1, 16), bk=st.integers(1, 16),
       causal=st.booleans())
def test_gradients_equal_sdpa_backward(L_q, L_k, bq, bk, causal):
    q, k, v = leaves((1, 3, L_q, 16), (1, 3, L_k, 16), (1, 3, L_k, 16), seed=L_q + 7 * L_k)
    out = flash.flash_attention(q, k, v, is_causal=causal, block_q=bq, block_k=bk)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    grad = rand(*out.shape, seed=4)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_bottom_right_gradients_equal_sdpa_with_causal_lower_right():
    from torch.nn.attention.bias import causal_lower_right

    q, k, v = leaves((2, 2, 6, 8), (2, 2, 21, 8), (2, 2, 21, 8))
    out = flash.flash_attention(q, k, v, is_causal=True, align="bottom_right", block_q=4, block_k=5)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(6, 21))
    for g, w in zip(torch.autograd.grad(out.square().sum(), (q, k, v)),
                    torch.autograd.grad(ref.square().sum(), (q, k, v))):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_gradients_of_broadcast_inputs_and_queries_without_keys():
    # batch dimensions broadcast: each gradient has its input's shape (summed over the broadcast)
    q, k, v = leaves((2, 1, 9, 4), (1, 3, 12, 4), (1, 1, 12, 2))
    out = flash.flash_attention(q, k, v, is_causal=True, block_q=4, block_k=5)
    ref = dense_masked(q, k, v, torch.ones(9, 12, dtype=torch.bool).tril())
    got, want = torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))
    for x, g, w in zip((q, k, v), got, want):
        assert g.shape == x.shape
        torch.testing.assert_close(g, w)
    # bottom-right with more queries than keys: the first queries see nothing and get zero gradient
    q, k, v = leaves((1, 8, 4), (1, 3, 4), (1, 3, 2))
    out = flash.flash_attention(q, k, v, is_causal=True, align="bottom_right", block_q=3, block_k=2)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(dq[0, :5], torch.zeros(5, 4, dtype=dq.dtype)) and not dq.isnan().any()
    assert dk.isfinite().all() and dv.isfinite().all()


def test_half_precision_gradients_keep_the_dtype_and_are_close():
    q, k, v = leaves((1, 2, 40, 16), (1, 2, 40, 16), (1, 2, 40, 16))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(), (q, k, v))
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        qh, kh, vh = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
        out = flash.flash_attention(qh, kh, vh, is_causal=True, block_q=16, block_k=8)
        grads = torch.autograd.grad(out.sum(), (qh, kh, vh))
        for g, w in zip(grads, ref):
            assert g.dtype == dtype
            torch.testing.assert_close(g.double(), w, atol=5e-2, rtol=5e-2)


def test_backward_never_builds_the_full_score_matrix(monkeypatch):
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        seen.append(tuple(out.shape[-2:]))
        return out

    q, k, v = (x.float().requires_grad_() for x in (rand(1, 2, 300, 8), rand(1, 2, 300, 8, seed=1),
                                                    rand(1, 2, 300, 8, seed=2)))
    out = flash.flash_attention(q, k, v, block_q=32, block_k=64, is_causal=True)
    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    torch.autograd.grad(out.sum(), (q, k, v))
    assert seen and max(a * b for a, b in seen) <= 32 * 64


def test_forward_and_backward_memory_is_linear_in_the_length():
    from attn_course.bench import peak_tensor_bytes

    def peak(L, fn):
        q, k, v = (torch.randn(1, 2, L, 16, generator=torch.Generator().manual_seed(i)).requires_grad_()
                   for i in range(3))
        return peak_tensor_bytes(lambda: torch.autograd.grad(fn(q, k, v).sum(), (q, k, v)))[1]

    def tiled(q, k, v):
        return flash.flash_attention(q, k, v, is_causal=True, block_q=64, block_k=64)

    def materialised(q, k, v):
        return dense_masked(q, k, v, torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).tril())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # a Python loop of small ops: one thread is many times faster on a busy machine
    try:
        flash_peaks = [peak(L, tiled) for L in (256, 512, 1024)]
        dense_peaks = [peak(L, materialised) for L in (256, 512, 1024)]
    finally:
        torch.set_num_threads(threads)
    assert dense_peaks[2] / dense_peaks[1] > 3.5                 # quadratic
    assert flash_peaks[2] / flash_peaks[1] < 2.2                 # linear (plus a few fixed tiles)
    assert flash_peaks[2] * 8 < dense_peaks[2]
    # what grows is the saved inputs, output, lse and gradients: a few L x d tensors
    assert flash_peaks[2] - flash_peaks[1] < 16 * 2 * 512 * 16 * 4


# --- the IO model (Dao et al. 2022, Theorem 2) -----------------------------------------------------

def test_flash2_io_count_equals_a_simulated_loop_and_tends_to_m_over_2d2():
    def simulate(n, d, sram_bytes, b=2):
        """Count the elements the FA2 loop order moves, tile by tile."""
        block = max(1, sram_bytes // b // (4 * d))
        moved = 0
        for q0 in range(0, n, block):
            rows = min(block, n - q0)
            moved += 2 * rows * d                         # read Q tile, write O tile
            for k0 in range(0, n, block):
                moved += 2 * min(block, n - k0) * d       # read K and V tiles
        return moved * b

    for n, d, m in ((1000, 64, 100 * 1024), (4096, 128, 100 * 1024), (777, 32, 48 * 1024)):
        assert flash.flash2_hbm_bytes(n, d, m) == simulate(n, d, m)
    # long sequences: standard / tiled -> M / (2 d^2), M in elements
    n = 1 << 18
    for d, m_bytes in ((64, 192 * 1024), (128, 100 * 1024), (256, 228 * 1024)):
        ratio = flash.standard_hbm_bytes(n, d) / flash.flash2_hbm_bytes(n, d, m_bytes)
        limit = (m_bytes / 2) / (2 * d * d)
        assert ratio == pytest.approx(limit, rel=0.05)
    with pytest.raises(ValueError, match="sram_bytes"):
        flash.flash2_hbm_bytes(1024, 64, 0)


# --- the chapter's benchmark: training step and GPU table ----------------------------------------

def test_training_benchmark_runs_each_method_in_a_fresh_process():
    from attn_course import bench

    rows = bench._run_flash_train(L=256, timeout=600)
    assert [r["method"] for r in rows] == list(bench._flash_train_methods())
    assert all(r["L"] == 256 and r["grad_error"] < 1e-4 and len(r["times"]) == 3 for r in rows)
    table = bench.flash_train_table(rows)
    assert table.count("\n") == 4 and "1.00x" in table


def test_gpu_table_reports_median_ratios_of_interleaved_rounds():
    from attn_course import bench

    rows = [{"method": "Triton kernel (attn_course.kernels)", "L": 64, "times": [2e-3, 3e-3, 2e-3], "seconds": 2e-3},
            {"method": "SDPA flash backend", "L": 64, "times": [1e-3, 1e-3, 2e-3], "seconds": 1e-3}]
    lines = bench._triton_gpu_table(rows).splitlines()
    assert lines[2] == "| 64 | Triton kernel (attn_course.kernels) | 2.000 (2.000 to 3.000) | 2.00 (1.00 to 3.00) |"
    assert lines[3].endswith("| 1.00 (1.00 to 1.00) |")
