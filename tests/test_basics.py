"""attn_course.basics against independent references: torch's own ops, closed forms, loops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from attn_course import basics

finite = st.floats(-50, 50, allow_nan=False, width=32)


# --- softmax (NumPy) ----------------------------------------------------------------------------

@given(arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=finite),
       st.floats(0.05, 20))
def test_softmax_equals_torch_with_temperature(x, T):
    ref = torch.softmax(torch.from_numpy(x) / T, dim=-1).numpy()
    np.testing.assert_allclose(basics.softmax(x, temperature=T), ref, rtol=1e-10, atol=1e-12)


@given(arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)), elements=finite),
       st.floats(-1e3, 1e3))
def test_softmax_rows_sum_to_one_and_ignore_a_constant_shift(x, c):
    w = basics.softmax(x, axis=1)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(basics.softmax(x + c, axis=1), w, atol=1e-9)


def test_softmax_stays_finite_for_huge_logits_and_handles_minus_inf():
    w = basics.softmax(np.array([1e4, 0.0, -1e4]))
    np.testing.assert_allclose(w, [1.0, 0.0, 0.0])
    w = basics.softmax(np.array([[0.0, -np.inf], [-np.inf, -np.inf]]))
    np.testing.assert_array_equal(w, [[1.0, 0.0], [0.0, 0.0]])
    w0 = basics.softmax(np.array([[1.0, 2.0], [3.0, 5.0]]), axis=0)
    np.testing.assert_allclose(w0.sum(axis=0), 1.0)


@pytest.mark.parametrize("kwargs, exc, word", [
    ({"temperature": 0}, ValueError, "temperature"),
    ({"temperature": -1}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"axis": 3}, ValueError, "axis"),
])
def test_softmax_bad_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        basics.softmax(np.zeros((2, 3)), **kwargs)


def test_softmax_rejects_tensors_and_strings():
    with pytest.raises(TypeError, match="x must be a NumPy array"):
        basics.softmax(torch.zeros(3))
    with pytest.raises(TypeError, match="x must hold real numbers"):
        basics.softmax(np.array(["a", "b"]))


# --- masked_softmax --------------------------------------------------------------------------------

def _loop_masked_softmax(scores, mask):
    """Row-by-row reference over the kept entries only."""
    s, m = scores.double().numpy(), np.broadcast_to(mask.numpy(), scores.shape)
    out = np.zeros_like(s)
    for idx in np.ndindex(s.shape[:-1]):
        keep = m[idx]
        if keep.any():
            e = np.exp(s[idx][keep] - s[idx][keep].max())
            out[idx][keep] = e / e.sum()
    return torch.from_numpy(out)


@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_masked_softmax_equals_a_loop_over_kept_entries(B, L_q, L_k, seed):
    g = torch.Generator().manual_seed(seed)
    scores = 4 * torch.randn(B, L_q, L_k, generator=g, dtype=torch.float64)
    mask = torch.rand(B, L_q, L_k, generator=g) > 0.4
    w = basics.masked_softmax(scores, mask)
    torch.testing.assert_close(w, _loop_masked_softmax(scores, mask))
    assert not torch.isnan(w).any()
    # rows with at least one key sum to 1, fully masked rows are zero
    sums = w.sum(-1)
    torch.testing.assert_close(sums, mask.any(-1).double())


@given(st.integers(0, 2**31 - 1))
def test_masked_keys_never_change_the_weights(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 4, 6, generator=g)
    mask = torch.rand(3, 1, 6, generator=g) > 0.5  # broadcasts over queries
    changed = scores + torch.where(mask, 0.0, 100 * torch.randn(3, 4, 6, generator=g))
    torch.testing.assert_close(basics.masked_softmax(scores, mask), basics.masked_softmax(changed, mask))


def test_masked_softmax_without_mask_is_torch_softmax_on_any_dim():
    s = torch.randn(2, 3, 4)
    torch.testing.assert_close(basics.masked_softmax(s, dim=1), torch.softmax(s, dim=1))


@pytest.mark.parametrize("mask, exc, word", [
    (torch.ones(3, 5, dtype=torch.bool), ValueError, "mask of shape \\(3, 5\\)"),
    (torch.ones(2, 4), TypeError, "torch.bool"),
    ([[True]], TypeError, "mask must be a bool torch.Tensor"),
    (torch.ones(1, 2, 3, 4, dtype=torch.bool), ValueError, "does not broadcast"),
])
def test_masked_softmax_bad_masks(mask, exc, word):
    with pytest.raises(exc, match=word):
        basics.masked_softmax(torch.zeros(2, 3, 4), mask)


def test_masked_softmax_bad_scores():
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        basics.masked_softmax(np.zeros((2, 2)))
    with pytest.raises(TypeError, match="scores must be a floating-point tensor"):
        basics.masked_softmax(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="dim 5"):
        basics.masked_softmax(torch.zeros(2, 2), dim=5)


# --- Nadaraya-Watson -------------------------------------------------------------------------------

def test_nadaraya_watson_closed_form():
    x = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    y = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    q = torch.tensor([0.5, 2.0], dtype=torch.float64)
    h = 0.7
    y_hat, w = basics.nadaraya_watson(x, y, q, bandwidth=h)
    for i, qi in enumerate(q.tolist()):
        k = [math.exp(-0.5 * ((qi - xi) / h) ** 2) for xi in x.tolist()]
        ref = [kj / sum(k) for kj in k]
        assert w[i].tolist() == pytest.approx(ref, rel=1e-12)
        assert y_hat[i].item() == pytest.approx(sum(r * yj for r, yj in zip(ref, y.tolist())), rel=1e-12)


@given(st.integers(1, 30), st.integers(1, 10), st.floats(0.01, 10), st.integers(0, 2**31 - 1))
def test_nadaraya_watson_rows_sum_to_one_and_predictions_stay_in_range(n, m, h, seed):
    g = torch.Generator().manual_seed(seed)
    x, y, q = torch.rand(n, generator=g), torch.randn(n, generator=g), 100 * torch.randn(m, generator=g)
    y_hat, w = basics.nadaraya_watson(x, y, q, bandwidth=h)
    assert w.shape == (m, n)
    torch.testing.assert_close(w.sum(-1), torch.ones(m))
    assert torch.all(y_hat >= y.min() - 1e-5) and torch.all(y_hat <= y.max() + 1e-5)


def test_nadaraya_watson_learns_a_tensor_bandwidth_by_gradient_descent():
    """A 0-d tensor sigma is accepted and gradients reach it, equal to the closed-form derivative."""
    x = torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)
    y = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    q = torch.tensor([0.5, 2.0], dtype=torch.float64)
    sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    y_hat, w = basics.nadaraya_watson(x, y, q, bandwidth=sigma)
    same, _ = basics.nadaraya_watson(x, y, q, bandwidth=0.7)
    torch.testing.assert_close(y_hat, same)
    y_hat.sum().backward()
    # d/dsigma of sum_i w_i y_i with w = softmax(-(q - x)^2 / (2 sigma^2)): finite difference reference
    eps = 1e-6
    up = basics.nadaraya_watson(x, y, q, bandwidth=0.7 + eps)[0].sum()
    down = basics.nadaraya_watson(x, y, q, bandwidth=0.7 - eps)[0].sum()
    assert sigma.grad.item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-6)
    with pytest.raises(ValueError, match="bandwidth"):
        basics.nadaraya_watson(x, y, q, bandwidth=torch.tensor(-1.0, dtype=torch.float64))
    with pytest.raises(TypeError, match="bandwidth"):
        basics.nadaraya_watson(x, y, q, bandwidth=torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("args, kwargs, exc, word", [
    ((torch.zeros(3), torch.zeros(4), torch.zeros(2)), {}, ValueError, "y_train"),
    ((torch.zeros(3, 1), torch.zeros(3), torch.zeros(2)), {}, ValueError, "x_train"),
    ((torch.zeros(3), torch.zeros(3), torch.zeros(2)), {"bandwidth": 0.0}, ValueError, "bandwidth"),
    ((torch.zeros(3), torch.zeros(3), np.zeros(2)), {}, TypeError, "x_query"),
    ((torch.zeros(3), torch.zeros(3, dtype=torch.float64), torch.zeros(2)), {}, TypeError, "y_train"),
    ((torch.zeros(0), torch.zeros(0), torch.zeros(2)), {}, ValueError, "x_train"),
])
def test_nadaraya_watson_bad_input(args, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        basics.nadaraya_watson(*args, **kwargs)


# --- scaled dot-product attention -------------------------------------------------------------------

shapes = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 8), st.integers(1, 5))


@given(shapes, st.booleans(), st.integers(0, 2**31 - 1))
def test_sdpa_equals_torch(shape, causal, seed):
    B, L_q, L_k, d_k, d_v = shape
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, L_q, d_k, generator=g), torch.randn(B, L_k, d_k, generator=g)
    v = torch.randn(B, L_k, d_v, generator=g)
    out, w = basics.scaled_dot_product_attention(q, k, v, is_causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    scores = torch.einsum("bqd,bkd->bqk", q, k) / math.sqrt(d_k)
    if causal:
        scores = scores.masked_fill(~torch.ones(L_q, L_k, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(w, torch.softmax(scores, -1))


@given(st.integers(0, 2**31 - 1), st.sampled_from([None, 0.1, 2.0]))
def test_sdpa_with_mask_and_scale_equals_torch_on_rows_with_keys(seed, scale):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 5, 5, generator=g) > 0.3
    out, w = basics.scaled_dot_product_attention(q, k, v, mask, scale=scale)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    live = mask.expand(2, 3, 5, 5).any(-1)
    torch.testing.assert_close(out[live], ref[live])
    assert torch.all(out[~live] == 0) and torch.all(w[~live] == 0)
    assert torch.all(w.masked_select(~mask.expand_as(w)) == 0)


@given(st.integers(0, 2**31 - 1))
def test_masked_keys_never_change_the_output(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)
    keep = torch.rand(6, generator=g) > 0.5
    k2 = torch.where(keep[:, None], k, 50 * torch.randn(6, 3, generator=g))
    v2 = torch.where(keep[:, None], v, 50 * torch.randn(6, 2, generator=g))
    a, _ = basics.scaled_dot_product_attention(q, k, v, keep)
    b, _ = basics.scaled_dot_product_attention(q, k2, v2, keep)
    torch.testing.assert_close(a, b)


@given(st.integers(2, 7), st.integers(0, 2**31 - 1))
def test_self_attention_without_positions_is_permutation_equivariant(L, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, 4, generator=g, dtype=torch.float64)
    perm = torch.randperm(L, generator=g)
    out, w = basics.scaled_dot_product_attention(x, x, x)
    out_p, w_p = basics.scaled_dot_product_attention(x[perm], x[perm], x[perm])
    torch.testing.assert_close(out_p, out[perm])
    torch.testing.assert_close(w_p, w[perm][:, perm])


def test_sdpa_causal_with_more_keys_than_queries_matches_torch_alignment():
    q, k, v = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2)
    out, w = basics.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    assert torch.all(w.triu(1) == 0)


def test_sdpa_mask_and_causal_combine():
    q = k = v = torch.randn(1, 4, 3)
    mask = torch.tensor([True, False, True, True])
    _, w = basics.scaled_dot_product_attention(q, k, v, mask, is_causal=True)
    allowed = torch.ones(4, 4, dtype=torch.bool).tril() & mask
    assert torch.all(w[0][~allowed] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 4))


def test_sdpa_broadcasts_batch_dimensions_like_torch():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(1, 3, 6, 4), torch.randn(1, 3, 6, 2)
    out, w = basics.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    assert w.shape == (2, 3, 5, 6)


def test_sdpa_dropout_uses_the_dropped_weights():
    q, k, v = torch.randn(2, 5, 4), torch.randn(2, 7, 4), torch.randn(2, 7, 3)
    torch.manual_seed(0)
    out, w = basics.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(out, w @ v)
    kept = w[w > 0]
    assert (w == 0).any() and kept.numel() > 0
    _, w_full = basics.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(w[w > 0], 2 * w_full[w > 0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sdpa_keeps_dtype_and_is_close_to_float32(dtype):
    q, k, v = torch.randn(2, 8, 16), torch.randn(2, 9, 16), torch.randn(2, 9, 4)
    ref, _ = basics.scaled_dot_product_attention(q, k, v)
    out, w = basics.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    assert out.dtype == dtype and w.dtype == dtype
    assert torch.isfinite(out).all()
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


def test_sdpa_large_logits_stay_finite():
    q = torch.full((1, 3, 4), 100.0)
    k = torch.randn(1, 5, 4) * 100
    out, w = basics.scaled_dot_product_attention(q, k, torch.randn(1, 5, 2))
    assert torch.isfinite(out).all() and torch.isfinite(w).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sdpa_on_cuda_equals_cpu():  # pragma: no cover - runs on the GPU machine
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 3)
    out, _ = basics.scaled_dot_product_attention(q.cuda(), k.cuda(), v.cuda(), is_causal=True)
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), basics.scaled_dot_product_attention(q, k, v, is_causal=True)[0],
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("q, k, v, kwargs, exc, word", [
    (torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(5, 2), {}, ValueError, "d_k"),
    (torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(6, 2), {}, ValueError, "L_k"),
    (torch.zeros(4), torch.zeros(5, 4), torch.zeros(5, 2), {}, ValueError, "query must have at least 2"),
    (torch.zeros(2, 3, 4), torch.zeros(3, 5, 4), torch.zeros(3, 5, 2), {}, ValueError, "batch dimensions"),
    (torch.zeros(3, 4), torch.zeros(5, 4, dtype=torch.float64), torch.zeros(5, 2), {}, TypeError, "key has dtype"),
    (torch.zeros(3, 4, dtype=torch.int64), torch.zeros(5, 4), torch.zeros(5, 2), {}, TypeError, "query must be a floating"),
    (np.zeros((3, 4)), torch.zeros(5, 4), torch.zeros(5, 2), {}, TypeError, "query must be a torch.Tensor"),
    (torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(5, 2), {"mask": torch.ones(3, 4, dtype=torch.bool)}, ValueError, "mask of shape"),
    (torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(5, 2), {"mask": torch.ones(3, 5)}, TypeError, "torch.bool"),
    (torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(5, 2), {"dropout_p": 1.0}, ValueError, "dropout_p"),
    (torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(5, 2), {"scale": "x"}, TypeError, "scale"),
])
def test_sdpa_bad_input_names_the_argument(q, k, v, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        basics.scaled_dot_product_attention(q, k, v, **kwargs)


# --- additive and multiplicative attention ----------------------------------------------------------

def test_additive_attention_equals_the_formula_pair_by_pair():
    m = basics.AdditiveAttention(3, 5, 7).double()
    q, k, v = torch.randn(2, 4, 3).double(), torch.randn(2, 6, 5).double(), torch.randn(2, 6, 2).double()
    mask = torch.rand(2, 4, 6) > 0.3
    mask[..., 0] = True
    out, w = m(q, k, v, mask)
    Wq, Wk, wv = m.W_q.weight, m.W_k.weight, m.w_v.weight[0]
    for b in range(2):
        for i in range(4):
            s = torch.stack([wv @ torch.tanh(Wq @ q[b, i] + Wk @ k[b, j]) for j in range(6)])
            s = s.masked_fill(~mask[b, i], float("-inf"))
            ref = torch.softmax(s, 0)
            torch.testing.assert_close(w[b, i], ref)
            torch.testing.assert_close(out[b, i], ref @ v[b])


def test_multiplicative_attention_equals_the_formula():
    m = basics.MultiplicativeAttention(3, 5).double()
    q, k, v = torch.randn(4, 3).double(), torch.randn(6, 5).double(), torch.randn(6, 2).double()
    out, w = m(q, k, v)
    W = m.W.weight  # (query_dim, key_dim)
    s = torch.stack([torch.stack([q[i] @ W @ k[j] for j in range(6)]) for i in range(4)]).detach()
    torch.testing.assert_close(w, torch.softmax(s, -1))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v)


@pytest.mark.parametrize("module", [basics.AdditiveAttention(3, 5, 7), basics.MultiplicativeAttention(3, 5)])
def test_learned_scores_reject_wrong_feature_sizes(module):
    with pytest.raises(ValueError, match="query has 4 features"):
        module(torch.zeros(2, 4), torch.zeros(6, 5), torch.zeros(6, 2))
    with pytest.raises(ValueError, match="key has 3 features"):
        module(torch.zeros(2, 3), torch.zeros(6, 3), torch.zeros(6, 2))
    with pytest.raises(ValueError, match="mask"):
        module(torch.zeros(2, 3), torch.zeros(6, 5), torch.zeros(6, 2), torch.ones(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("ctor, args, word", [
    (basics.AdditiveAttention, (0, 3, 4), "query_dim"),
    (basics.AdditiveAttention, (3, 3, -1), "hidden_dim"),
    (basics.MultiplicativeAttention, (3, 2.5), "key_dim"),
])
def test_modules_reject_bad_sizes(ctor, args, word):
    with pytest.raises((ValueError, TypeError), match=word):
        ctor(*args)


def test_selection_weights_are_input_independent_and_attention_weights_are_not():
    x = torch.randn(5, 8, 2)
    _, w_sel = basics.FixedSelectionPool(8)(x)
    _, w_att = basics.ContentAttentionPool(2)(x)
    assert torch.allclose(w_sel, w_sel[:1].expand_as(w_sel))
    assert not torch.allclose(w_att, w_att[:1].expand_as(w_att))
    torch.testing.assert_close(w_att.sum(-1), torch.ones(5))
