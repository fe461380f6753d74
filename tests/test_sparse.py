"""attn_course.sparse: every pattern equals an independently written dense masked attention."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attn_course import sparse as S


def reference(q, k, v, mask=None):
    """Dense masked softmax attention written here, in float64, without attn_course."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    w = torch.softmax(scores, -1).nan_to_num(0.0)
    return w @ v


def qkv(seed, B, H, L, d, dtype=torch.float64, d_v=None):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, d, generator=g, dtype=dtype), torch.randn(B, H, L, d, generator=g, dtype=dtype),
            torch.randn(B, H, L, d_v or d, generator=g, dtype=dtype))


def close(a, b, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


dtypes = st.sampled_from([torch.float32, torch.float64])
seeds = st.integers(0, 2**31 - 1)


@given(seeds, st.integers(1, 200), st.integers(0, 70), st.booleans(), dtypes)
def test_sliding_window_equals_dense_under_its_mask(seed, L, window, causal, dtype):
    q, k, v = qkv(seed, 1, 2, L, 8, dtype, d_v=5)
    out = S.sliding_window_attention(q, k, v, window, is_causal=causal)
    assert out.shape == (1, 2, L, 5) and out.dtype == dtype
    mask = S.sliding_window_mask(L, window, is_causal=causal)
    close(out, reference(q, k, v, mask), dtype)


def test_sliding_window_mask_closed_form():
    m = S.sliding_window_mask(5, 1)
    assert m.tolist()[2] == [False, True, True, True, False]
    c = S.sliding_window_mask(5, 2, is_causal=True)
    assert c.tolist()[4] == [False, False, True, True, True] and not c[0, 1]


@given(seeds, st.integers(1, 120), st.integers(0, 6), st.integers(1, 5), st.booleans())
def test_dilated_window_equals_dense(seed, L, window, dilation, causal):
    q, k, v = qkv(seed, 1, 1, L, 4)
    mask = S.dilated_window_mask(L, window, dilation, is_causal=causal)
    close(S.dilated_window_attention(q, k, v, window, dilation, is_causal=causal), reference(q, k, v, mask),
          torch.float64)


@given(seeds, st.integers(2, 150), st.integers(0, 20), st.lists(st.integers(0, 10**6), max_size=5), dtypes)
def test_longformer_equals_dense(seed, L, window, raw_tokens, dtype):
    tokens = [t % L for t in raw_tokens]
    q, k, v = qkv(seed, 2, 1, L, 8, dtype)
    mask = S.longformer_mask(L, window, tokens)
    close(S.longformer_attention(q, k, v, window, tokens), reference(q, k, v, mask), dtype)


def test_longformer_mask_rows_and_columns():
    m = S.longformer_mask(6, 0, torch.tensor([2]))
    assert m[2].all() and m[:, 2].all() and m[0, 0] and not m[0, 4]


@given(seeds, st.integers(1, 8), st.integers(1, 12), st.floats(0, 1), dtypes)
def test_block_sparse_equals_dense(seed, nb, b, density, dtype):
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(nb, nb, generator=g) < density
    q, k, v = qkv(seed, 1, 2, nb * b, 6, dtype)
    out = S.block_sparse_attention(q, k, v, layout, b)
    close(out, reference(q, k, v, S.block_sparse_mask(layout, b)), dtype)
    empty = ~layout.any(1)
    assert torch.all(out.view(1, 2, nb, b, 6)[:, :, empty] == 0)


@given(seeds, st.integers(1, 12), st.integers(0, 4), st.integers(0, 3))
def test_bigbird_is_block_sparse_with_its_layout(seed, nb, n_random, n_global):
    layout = S.bigbird_layout(nb, num_random_blocks=n_random, num_global_blocks=n_global, seed=seed)
    r = torch.arange(nb)
    assert layout[(r[:, None] - r[None, :]).abs() <= 1].all()                   # the band
    assert layout[:n_global].all() and layout[:, :n_global].all()               # global rows/columns
    band_and_global = ((r[:, None] - r[None, :]).abs() <= 1) | (r[:, None] < n_global) | (r[None, :] < n_global)
    extra = (layout & ~band_and_global).sum(1)
    assert torch.all(extra <= n_random)
    assert torch.all((extra == n_random) | (layout.sum(1) == nb))             # n_random unless the row is full
    assert torch.equal(layout, S.bigbird_layout(nb, num_random_blocks=n_random, num_global_blocks=n_global, seed=seed))
    q, k, v = qkv(seed, 1, 1, nb * 4, 4)
    out = S.bigbird_attention(q, k, v, 4, num_random_blocks=n_random, num_global_blocks=n_global, seed=seed)
    close(out, reference(q, k, v, S.block_sparse_mask(layout, 4)), torch.float64)


@given(seeds, st.integers(1, 60), st.integers(1, 80))
def test_topk_equals_dense_on_its_top_keys(seed, L, k_top):
    q, k, v = qkv(seed, 1, 2, L, 8)
    scores = q @ k.transpose(-2, -1)
    if k_top >= L:
        mask = None
    else:
        kth = scores.topk(k_top, dim=-1).values[..., -1:]
        mask = scores >= kth
    close(S.topk_attention(q, k, v, k_top), reference(q, k, v, mask), torch.float64)


@given(seeds, st.integers(2, 90), st.integers(1, 40), st.integers(1, 4))
def test_lsh_equals_dense_under_its_mask(seed, L, bucket, rounds):
    q, k, v = qkv(seed, 1, 2, L, 8)
    mask = S.lsh_mask(q, k, bucket, rounds, seed=seed)
    assert mask.shape == (1, 2, L, L) and mask.any(-1).all()      # every query sees some key
    close(S.lsh_attention(q, k, v, bucket, rounds, seed=seed), reference(q, k, v, mask), torch.float64)


def test_lsh_with_one_bucket_is_dense_and_sparse_with_small_ones():
    q, k, v = qkv(0, 1, 1, 100, 8)
    close(S.lsh_attention(q, k, v, bucket_size=100), reference(q, k, v), torch.float64)
    assert S.lsh_mask(q, k, 10, 1).float().mean() < 0.3


def test_lsh_puts_similar_vectors_together():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 256, 16, generator=g, dtype=torch.float64)
    q = k + 0.05 * torch.randn(1, 1, 256, 16, generator=g, dtype=torch.float64)  # each query near its key
    mask = S.lsh_mask(q, k, 16, 4)
    assert mask[0, 0].diagonal().float().mean() > 0.95  # near pairs: almost always together
    assert mask.float().mean() < 0.5                     # while most pairs are not


def test_performer_converges_to_softmax_attention():
    q, k, v = qkv(1, 1, 2, 64, 16)
    q, k = 0.5 * q, 0.5 * k
    exact = reference(q, k, v)

    def mean_error(m):
        return sum((S.performer_attention(q, k, v, m, seed=s) - exact).abs().mean() for s in range(5)) / 5

    errors = [mean_error(m) for m in (8, 64, 512, 4096)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 0.02


def test_performer_beats_the_mean_of_values_only_for_small_norms():
    # Choromanski et al.'s Lemma 2: the variance of FAVOR+ grows as exp(|x + y|^2) / F, so it
    # beats uniform attention (the mean of V) when |q|, |k| are small and loses when they are large
    q, k, v = qkv(4, 1, 2, 256, 32)

    def errors(s, features=1024):
        exact = reference(s * q, s * k, v)
        mean_of_v = (v.mean(-2, keepdim=True) - exact).abs().mean()
        favor = [(S.performer_attention(s * q, s * k, v, features, seed=i) - exact).abs().mean() for i in range(3)]
        return max(favor), min(favor), mean_of_v

    worst, _, baseline = errors(0.25)
    assert worst < 0.8 * baseline
    _, best, baseline = errors(1.0)
    assert best > 1.2 * baseline


def test_lsh_hashes_queries_and_keys_separately():
    # no shared-QK (unlike Reformer): the chunks a query reaches depend on the keys' own hashes
    q, k, v = qkv(5, 1, 1, 128, 8)
    mask = S.lsh_mask(q, k, 16, 1)
    assert not torch.equal(mask, S.lsh_mask(q, q, 16, 1))
    close(S.lsh_attention(q, k, v, 16, 1), reference(q, k, v, mask), torch.float64)


def test_performer_is_finite_for_large_inputs_and_keeps_dtype():
    q, k, v = qkv(2, 1, 1, 32, 8, torch.float32)
    out = S.performer_attention(10 * q, 10 * k, v, 64)
    assert torch.isfinite(out).all() and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_close_to_float32(dtype):
    q, k, v = qkv(3, 1, 2, 96, 16, torch.float32)
    cases = [(lambda *a: S.sliding_window_attention(*a, 5), True),
             (lambda *a: S.longformer_attention(*a, 3, [0]), True),
             (lambda *a: S.bigbird_attention(*a, 16), True),
             (lambda *a: S.topk_attention(*a, 10), False)]  # top-k is discontinuous: rounding can change the picks
    for fn, continuous in cases:
        ref = fn(q, k, v)
        out = fn(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        if continuous:
            torch.testing.assert_close(out.float(), ref, atol=5e-2, rtol=5e-2)


def test_flex_backend_equals_the_blocked_one():
    if not S.flex_available():
        pytest.skip("this torch has no FlexAttention")
    pytest.importorskip("torch._inductor")
    q, k, v = qkv(4, 1, 2, 256, 16, torch.float32)
    try:
        out = S.sliding_window_attention(q, k, v, 17, backend="flex")
    except Exception as exc:  # pragma: no cover - depends on a working compiler toolchain
        pytest.skip(f"FlexAttention could not compile here: {type(exc).__name__}")
    torch.testing.assert_close(out, S.sliding_window_attention(q, k, v, 17), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("call, exc, word", [
    (lambda q: S.sliding_window_attention(q, q, q, -1), ValueError, "window"),
    (lambda q: S.sliding_window_attention(q, q, q, 2.5), TypeError, "window"),
    (lambda q: S.sliding_window_attention(q, q, q, 2, backend="cuda"), ValueError, "backend"),
    (lambda q: S.sliding_window_attention(q[0], q[0], q[0], 2), ValueError, "query must have 4"),
    (lambda q: S.sliding_window_attention(q, q[:, :, :5], q, 2), ValueError, "same shape"),
    (lambda q: S.sliding_window_attention(q, q, q.double(), 2), TypeError, "value has dtype"),
    (lambda q: S.longformer_attention(q, q, q, 2, [0, 99]), ValueError, "global_tokens"),
    (lambda q: S.longformer_attention(q, q, q, 2, "0"), TypeError, "global_tokens"),
    (lambda q: S.block_sparse_attention(q, q, q, torch.ones(3, 3, dtype=torch.bool), 4), ValueError, "L=16"),
    (lambda q: S.block_sparse_attention(q, q, q, torch.ones(4, 4), 4), TypeError, "layout"),
    (lambda q: S.block_sparse_attention(q, q, q, torch.ones(4, 2, dtype=torch.bool), 4), ValueError, "square"),
    (lambda q: S.bigbird_attention(q, q, q, 5), ValueError, "multiple of block_size"),
    (lambda q: S.bigbird_layout(4, num_random_blocks=-1), ValueError, "num_random_blocks"),
    (lambda q: S.topk_attention(q, q, q, 0), ValueError, "k must be"),
    (lambda q: S.performer_attention(q, q, q, 0), ValueError, "num_features"),
    (lambda q: S.lsh_attention(q, q, q, bucket_size=0), ValueError, "bucket_size"),
    (lambda q: S.lsh_attention(q, q, q, n_hashes=0), ValueError, "n_hashes"),
    (lambda q: S.dilated_window_attention(q, q, q, 2, 0), ValueError, "dilation"),
    (lambda q: S.block_sparse_attention(q, q, q, torch.ones(4, 4, dtype=torch.bool), 0), ValueError, "block_size"),
    (lambda q: S.sliding_window_attention(q.numpy(), q, q, 2), TypeError, "query must be a torch.Tensor"),
    (lambda q: S.bigbird_attention(q, q.long(), q, 4), TypeError, "key must be a floating-point"),
    (lambda q: S.performer_attention(q, q, q[:, :, :5]), ValueError, "value must be"),
    (lambda q: S.topk_attention(q, q, q, 2.5), TypeError, "k must be an int"),
])
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call(torch.zeros(1, 2, 16, 4))


def test_strided_layout_closed_form():
    lay = S.strided_layout(8, band=1, stride=4)
    assert lay[5].tolist() == [False, False, False, True, True, True, True, True]
    assert lay[0].tolist() == [True, True, False, True, False, False, False, True]
    assert torch.equal(S.strided_layout(4, band=0, stride=1), torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="band"):
        S.strided_layout(4, band=-1)


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 1000))
def test_lsh_buckets_depend_on_the_direction_only(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x, R = torch.randn(3, 9, d, generator=g, dtype=torch.float64), torch.randn(d, n, generator=g, dtype=torch.float64)
    buckets = S.lsh_buckets(x, R)
    assert buckets.dtype == torch.int64 and buckets.shape == (3, 9)
    assert int(buckets.min()) >= 0 and int(buckets.max()) < 2 * n
    scale = torch.rand(3, 9, 1, generator=g, dtype=torch.float64) * 100 + 1e-3
    assert torch.equal(S.lsh_buckets(x * scale, R), buckets)                 # length does not matter
    assert torch.equal(S.lsh_buckets(-x, R), (buckets + n) % (2 * n))         # the opposite direction


def test_lsh_buckets_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="rotations"):
        S.lsh_buckets(torch.randn(4, 3), torch.randn(2, 2))
    with pytest.raises(TypeError, match="x"):
        S.lsh_buckets(torch.arange(6).view(2, 3), torch.randn(3, 2))
