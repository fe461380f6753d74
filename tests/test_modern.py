"""attn_course.modern against references written here: the quadratic masked form of linear
attention, a plain loop for the delta rule, a naive MLA that rebuilds every head's keys and
values and calls torch's SDPA, brute-force top-k, and the capstone's TinyTransformer."""

import itertools
import math
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_course import modern
from attn_course.exercises import check, solution

seeds = st.integers(0, 2**31 - 1)
F64 = torch.float64


def rand(g, *shape):
    return torch.randn(*shape, generator=g, dtype=F64)


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


# --- linear attention -----------------------------------------------------------------------------

def linear_reference(q, k, v, causal, phi=lambda x: F.elu(x) + 1):
    """The quadratic form: (phi(Q) phi(K)^T * M) V / ((phi(Q) phi(K)^T * M) 1)."""
    a = phi(q) @ phi(k).transpose(-2, -1)
    if causal:
        a = a * torch.ones(a.shape[-2:], dtype=F64).tril()
    return (a @ v) / a.sum(-1, keepdim=True)


@settings(max_examples=25)
@given(seeds, st.integers(1, 70), st.integers(1, 20), st.booleans(), st.integers(1, 5))
def test_linear_attention_equals_the_quadratic_masked_form(seed, L, chunk, causal, d_v):
    g = torch.Generator().manual_seed(seed)
    q, k, v = rand(g, 2, L, 4), rand(g, 2, L, 4), rand(g, 2, L, d_v)
    out = modern.linear_attention(q, k, v, is_causal=causal, chunk_size=chunk)
    assert out.shape == (2, L, d_v) and out.dtype == F64
    close(out, linear_reference(q, k, v, causal))


def test_linear_attention_non_causal_cross_attention_and_a_feature_map():
    g = torch.Generator().manual_seed(0)
    q, k, v = rand(g, 3, 5, 4), rand(g, 3, 9, 4), rand(g, 3, 9, 2)
    close(modern.linear_attention(q, k, v, is_causal=False), linear_reference(q, k, v, False))
    phi = lambda x: torch.cat([F.relu(x), F.relu(-x)], dim=-1) + 0.1  # noqa: E731 - 2d features
    close(modern.linear_attention(q, k, v, is_causal=False, feature_map=phi), linear_reference(q, k, v, False, phi))
    # a feature map that gives a zero denominator: a zero output, never NaN
    out = modern.linear_attention(q, k, v, is_causal=False, feature_map=lambda x: torch.zeros_like(x))
    assert torch.equal(out, torch.zeros_like(out))


def test_linear_attention_state_does_not_grow_with_length():
    """Causal linear attention over L = 1024 runs in chunks: its largest tensor is O(L d^2 / C), not L x L."""
    from torch.utils._python_dispatch import TorchDispatchMode

    sizes = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            sizes.extend(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                         if isinstance(t, torch.Tensor))
            return out

    q, k, v = (torch.randn(1, 1024, 4) for _ in range(3))
    with Spy():
        modern.linear_attention(q, k, v, chunk_size=32)
    assert max(sizes) < 1024 * 1024 // 8


def test_linear_attention_bad_input():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="query"):
        modern.linear_attention(x, torch.randn(2, 6, 4), torch.randn(2, 6, 4))   # causal needs L_q == L_k
    with pytest.raises(ValueError, match="leading"):
        modern.linear_attention(x, torch.randn(3, 5, 4), torch.randn(3, 5, 4))
    with pytest.raises(TypeError, match="value"):
        modern.linear_attention(x, x, x.long())
    with pytest.raises(ValueError, match="feature_map"):
        modern.linear_attention(x, x, x, feature_map="softmax")
    with pytest.raises(TypeError, match="feature_map"):
        modern.linear_attention(x, x, x, feature_map=3)
    with pytest.raises(ValueError, match="feature_map"):
        modern.linear_attention(x, x, x, feature_map=lambda t: t[..., :2, :])
    with pytest.raises(ValueError, match="chunk_size"):
        modern.linear_attention(x, x, x, chunk_size=0)
    with pytest.raises(TypeError, match="is_causal"):
        modern.linear_attention(x, x, x, is_causal=1)
    with pytest.raises(ValueError, match="empty"):
        e = torch.randn(2, 0, 4)
        modern.linear_attention(e, e, e)


# --- the delta rule -------------------------------------------------------------------------------

def delta_reference(q, k, v, beta, gate, S=None):
    """A plain loop over (batch, head, step) with explicit matrices."""
    B, H, L, d_k = k.shape
    d_v = v.shape[-1]
    out = torch.zeros(B, H, L, d_v, dtype=F64)
    states = torch.zeros(B, H, d_v, d_k, dtype=F64) if S is None else S.clone()
    eye = torch.eye(d_k, dtype=F64)
    for b in range(B):
        for h in range(H):
            state = states[b, h]
            for t in range(L):
                kt, vt = k[b, h, t], v[b, h, t]
                state = (gate[b, h, t] * state @ (eye - beta[b, h, t] * torch.outer(kt, kt))
                         + beta[b, h, t] * torch.outer(vt, kt))
                out[b, h, t] = state @ q[b, h, t]
            states[b, h] = state
    return out, states


def delta_inputs(g, B, H, L, d_k, d_v):
    q, k = F.normalize(rand(g, B, H, L, d_k), dim=-1), F.normalize(rand(g, B, H, L, d_k), dim=-1)
    v = rand(g, B, H, L, d_v)
    beta = torch.rand(B, H, L, generator=g, dtype=F64)
    gate = torch.rand(B, H, L, generator=g, dtype=F64) * 0.5 + 0.5
    return q, k, v, beta, gate


@given(seeds, st.integers(1, 30), st.booleans())
def test_gated_delta_rule_recurrence_equals_a_plain_loop(seed, L, with_state):
    g = torch.Generator().manual_seed(seed)
    q, k, v, beta, gate = delta_inputs(g, 2, 2, L, 4, 3)
    S0 = rand(g, 2, 2, 3, 4) if with_state else None
    out, S = modern.gated_delta_rule(q, k, v, beta, gate, initial_state=S0)
    ref_out, ref_S = delta_reference(q, k, v, beta, gate, S0)
    close(out, ref_out)
    close(S, ref_S)


@settings(max_examples=25)
@given(seeds, st.integers(1, 60), st.integers(1, 24), st.booleans())
def test_chunk_size_never_changes_the_result(seed, L, chunk, with_state):
    g = torch.Generator().manual_seed(seed)
    q, k, v, beta, gate = delta_inputs(g, 1, 2, L, 5, 3)
    gate[..., ::7] = 0.0                   # a gate of exactly 0 wipes the state
    beta[..., 1::5] = 1.0
    S0 = rand(g, 1, 2, 3, 5) if with_state else None
    out, S = modern.gated_delta_rule(q, k, v, beta, gate, initial_state=S0)
    out_c, S_c = modern.gated_delta_rule(q, k, v, beta, gate, chunk_size=chunk, initial_state=S0)
    close(out_c, out)
    close(S_c, S)


def test_the_state_carries_the_sequence_over():
    g = torch.Generator().manual_seed(1)
    q, k, v, beta, gate = delta_inputs(g, 1, 1, 20, 4, 4)
    full, S = modern.gated_delta_rule(q, k, v, beta, gate, chunk_size=8)
    first, S1 = modern.gated_delta_rule(q[..., :11, :], k[..., :11, :], v[..., :11, :], beta[..., :11],
                                        gate[..., :11])
    second, S2 = modern.gated_delta_rule(q[..., 11:, :], k[..., 11:, :], v[..., 11:, :], beta[..., 11:],
                                         gate[..., 11:], chunk_size=4, initial_state=S1)
    close(torch.cat([first, second], dim=-2), full)
    close(S2, S)


def test_delta_rule_with_unit_keys_and_beta_one_stores_orthogonal_pairs_exactly():
    d = 8
    keys = torch.eye(d, dtype=F64)[None, None]             # orthonormal keys
    values = torch.randn(1, 1, d, 3, dtype=F64)
    ones = torch.ones(1, 1, d, dtype=F64)
    _, S = modern.gated_delta_rule(keys, keys, values, ones, ones)
    close(S[0, 0] @ keys[0, 0].T, values[0, 0].T)          # read back: S k_i = v_i


def test_delta_rule_step_equals_the_matrix_form():
    g = torch.Generator().manual_seed(2)
    S, k, v = rand(g, 2, 3, 4), F.normalize(rand(g, 2, 4), dim=-1), rand(g, 2, 3)
    beta, gate = torch.tensor([0.3, 1.0], dtype=F64), torch.tensor([0.9, 0.5], dtype=F64)
    new = modern.delta_rule_step(S, k, v, beta, gate)
    for i in range(2):
        ref = gate[i] * S[i] @ (torch.eye(4, dtype=F64) - beta[i] * torch.outer(k[i], k[i])) \
            + beta[i] * torch.outer(v[i], k[i])
        close(new[i], ref)


def test_delta_rule_bad_input_names_the_argument():
    g = torch.Generator().manual_seed(3)
    q, k, v, beta, gate = delta_inputs(g, 1, 1, 4, 3, 3)
    with pytest.raises(ValueError, match="beta"):
        modern.gated_delta_rule(q, k, v, beta + 1, gate)
    with pytest.raises(ValueError, match="gate"):
        modern.gated_delta_rule(q, k, v, beta, -gate)
    with pytest.raises(ValueError, match="gate"):
        modern.gated_delta_rule(q, k, v, beta, gate.masked_fill(gate > 0.7, float("nan")).nan_to_num(2.0))
    with pytest.raises(ValueError, match="beta"):
        modern.gated_delta_rule(q, k, v, beta[..., :3], gate)
    with pytest.raises(ValueError, match="gate"):
        modern.gated_delta_rule(q, k, v, beta, gate[..., None])
    with pytest.raises(ValueError, match="value"):
        modern.gated_delta_rule(q, k, v[..., :3, :], beta, gate)
    with pytest.raises(TypeError, match="gate"):
        modern.gated_delta_rule(q, k, v, beta, gate.float())
    with pytest.raises(ValueError, match="initial_state"):
        modern.gated_delta_rule(q, k, v, beta, gate, initial_state=torch.zeros(1, 1, 3, 4, dtype=F64))
    with pytest.raises(ValueError, match="chunk_size"):
        modern.gated_delta_rule(q, k, v, beta, gate, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        modern.gated_delta_rule(q, k, v, beta, gate, chunk_size=2.0)
    with pytest.raises(ValueError, match="empty"):
        modern.gated_delta_rule(q[..., :0, :], k[..., :0, :], v[..., :0, :], beta[..., :0], gate[..., :0])
    S = torch.zeros(3, 3, dtype=F64)
    with pytest.raises(ValueError, match="beta"):
        modern.delta_rule_step(S, k[0, 0, 0], v[0, 0, 0], torch.tensor(1.5, dtype=F64), torch.tensor(1.0, dtype=F64))
    with pytest.raises(ValueError, match="key"):
        modern.delta_rule_step(S, k[0, 0], v[0, 0, 0], torch.tensor(1.0, dtype=F64), torch.tensor(1.0, dtype=F64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_half_precision_keeps_dtype_and_stays_close(dtype):
    g = torch.Generator().manual_seed(4)
    q, k, v, beta, gate = delta_inputs(g, 1, 2, 20, 8, 8)
    ref, ref_S = modern.gated_delta_rule(q, k, v, beta, gate)
    low = [t.to(dtype) for t in (q, k, v, beta, gate)]
    for chunk in (None, 8):
        out, S = modern.gated_delta_rule(*low, chunk_size=chunk)
        assert out.dtype == S.dtype == dtype
        assert (out.double() - ref).abs().max() < 0.1 and (S.double() - ref_S).abs().max() < 0.1
    lin = modern.linear_attention(low[0], low[1], low[2])
    assert lin.dtype == dtype and (lin.double() - modern.linear_attention(q, k, v)).abs().max() < 0.05


def test_aliasing_and_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    x = rand(g, 2, 3, 10, 4)
    beta, gate = torch.full((2, 3, 10), 0.5, dtype=F64), torch.full((2, 3, 10), 0.9, dtype=F64)
    xn = F.normalize(x, dim=-1)
    for chunk in (None, 4):
        a = modern.gated_delta_rule(xn, xn, xn, beta, gate, chunk_size=chunk)[0]
        b = modern.gated_delta_rule(xn.clone(), xn.clone(), xn.clone(), beta, gate, chunk_size=chunk)[0]
        close(a, b)
        t = xn.transpose(1, 2).contiguous().transpose(1, 2)
        assert not t.is_contiguous()
        close(modern.gated_delta_rule(t, t, t, beta, gate, chunk_size=chunk)[0], a)
    close(modern.linear_attention(x, x, x), modern.linear_attention(x.clone(), x.clone(), x.clone()))
    close(modern.linear_attention(x.transpose(-2, -1).contiguous().transpose(-2, -1), x, x),
          modern.linear_attention(x, x, x))


# --- multi-head latent attention --------------------------------------------------------------------

def naive_mla(m, x, positions):
    """Every head's full keys and values, rebuilt from the latent, and torch's SDPA."""
    from attn_course.positional import apply_rope

    B, L, _ = x.shape
    H, dh, dr = m.num_heads, m.head_dim, m.rope_dim
    W_q = m.q_proj.weight.view(H, dh + dr, -1)
    q = torch.einsum("hfe,ble->bhlf", W_q, x)
    c = x @ m.kv_down.weight.T
    k_r = x @ m.k_rope.weight.T if dr else x.new_zeros(B, L, 0)
    if dr:
        q = torch.cat([q[..., :dh], apply_rope(q[..., dh:], positions)], dim=-1)
        k_r = apply_rope(k_r, positions)
    keys = torch.einsum("hdc,blc->bhld", m.k_up.weight.view(H, dh, -1), c)
    values = torch.einsum("hdc,blc->bhld", m.v_up.weight.view(H, dh, -1), c)
    keys = torch.cat([keys, k_r[:, None].expand(B, H, L, dr)], dim=-1)
    heads = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=1 / math.sqrt(dh + dr))
    return heads.transpose(1, 2).reshape(B, L, H * dh) @ m.out_proj.weight.T


@lru_cache(maxsize=32)
def mla(seed, E=24, H=3, d_c=10, rope_dim=4, head_dim=None, dtype=F64):
    torch.manual_seed(seed)
    return modern.MultiHeadLatentAttention(E, H, d_c, rope_dim=rope_dim, head_dim=head_dim).to(dtype)


@settings(max_examples=12)
@given(seeds, st.integers(1, 12), st.sampled_from([0, 2, 6]), st.sampled_from([None, 5]))
def test_mla_equals_the_naive_per_head_computation(seed, L, rope_dim, head_dim):
    m = mla(seed % 4, rope_dim=rope_dim, head_dim=head_dim)
    x = rand(torch.Generator().manual_seed(seed), 2, L, 24)
    out, cache = m(x)
    close(out, naive_mla(m, x, torch.arange(L)))
    close(m(x, absorb=True)[0], out)
    assert cache.length == L and cache.latent.shape == (2, L, 10) and cache.rope_key.shape == (2, L, rope_dim)
    assert cache.nbytes == 2 * L * (10 + rope_dim) * 8


@settings(max_examples=12)
@given(seeds, st.integers(2, 10), st.booleans())
def test_decoding_with_the_cache_equals_the_full_causal_pass(seed, L, absorb):
    m = mla(seed % 4)
    x = rand(torch.Generator().manual_seed(seed), 1, L, 24)
    full, _ = m(x)
    split = 1 + seed % (L - 1)
    first, cache = m(x[:, :split], absorb=absorb)            # a prompt, then one token at a time
    outs = [first]
    for t in range(split, L):
        out, cache = m(x[:, t:t + 1], cache=cache, absorb=absorb)
        outs.append(out)
    close(torch.cat(outs, dim=1), full)
    assert cache.length == L and cache.nbytes == L * (10 + 4) * 8


def test_mla_without_causality_and_its_cache_is_small():
    m = mla(0)
    x = rand(torch.Generator().manual_seed(0), 2, 6, 24)
    out, _ = m(x, is_causal=False)
    out_abs, _ = m(x, is_causal=False, absorb=True)
    close(out, out_abs)
    assert not torch.allclose(out, m(x)[0])
    # the same module with H heads of full keys and values would cache 2 H d_h per token
    _, cache = m(x)
    assert cache.nbytes / (2 * 6 * 8) == 10 + 4 < 2 * 3 * 8
    w_q, w_o = m.absorbed_weights()
    assert w_q.shape == (3, 10, 24) and w_o.shape == (3, 24, 10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mla_keeps_the_dtype(dtype):
    m = mla(1, dtype=dtype)
    x = torch.randn(1, 5, 24).to(dtype)
    out, cache = m(x, absorb=True)
    assert out.dtype == cache.latent.dtype == dtype and torch.isfinite(out.float()).all()
    ref = mla(1)(x.double())[0]
    assert (out.double() - ref).abs().max() < 0.1


def test_mla_non_contiguous_input():
    m = mla(2)
    x = rand(torch.Generator().manual_seed(2), 5, 2, 24).transpose(0, 1)
    assert not x.is_contiguous()
    close(m(x)[0], m(x.contiguous())[0])


def test_mla_bad_input_names_the_argument():
    m = mla(3)
    x = torch.randn(1, 4, 24, dtype=F64)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(4, 24, dtype=F64))
    with pytest.raises(ValueError, match="embed_dim"):
        m(torch.randn(1, 4, 23, dtype=F64))
    with pytest.raises(TypeError, match="x"):
        m(x.float())
    with pytest.raises(ValueError, match="no tokens"):
        m(x[:, :0])
    with pytest.raises(TypeError, match="cache"):
        m(x, cache={})
    _, cache = m(x)
    with pytest.raises(ValueError, match="cache"):
        m(torch.randn(2, 1, 24, dtype=F64), cache=cache)
    with pytest.raises(TypeError, match="absorb"):
        m(x, absorb="yes")
    with pytest.raises(ValueError, match="rope_dim"):
        modern.MultiHeadLatentAttention(24, 3, 8, rope_dim=3)
    with pytest.raises(ValueError, match="divisible"):
        modern.MultiHeadLatentAttention(25, 3, 8)
    with pytest.raises(ValueError, match="kv_latent_dim"):
        modern.MultiHeadLatentAttention(24, 3, 0)


# --- the cache of published models -----------------------------------------------------------------

def test_bytes_per_token_of_the_cited_models():
    per_token = {name: modern.kv_bytes_per_token(c) for name, c in modern.MODEL_CONFIGS.items()}
    assert per_token["Llama-2-7B"] == 2 * 32 * 32 * 128 * 2 == 524288
    assert per_token["Llama-3-8B"] == 2 * 32 * 8 * 128 * 2 == 131072
    assert per_token["Falcon-7B"] == 2 * 32 * 1 * 64 * 2
    assert per_token["DeepSeek-V2"] == 60 * (512 + 64) * 2 == 69120
    assert per_token["DeepSeek-V3"] == 61 * (512 + 64) * 2
    assert all(c.source for c in modern.MODEL_CONFIGS.values())
    contexts = {name: c.max_context for name, c in modern.MODEL_CONFIGS.items()}
    assert contexts["Falcon-7B"] == 2048 and contexts["Llama-2-7B"] == 4096
    assert contexts["Llama-3-8B"] == contexts["Mistral-7B-v0.1"] == contexts["Gemma-2-9B"] == 8192
    assert contexts["Gemma-3-27B"] == contexts["DeepSeek-V3"] == 131072


def test_sliding_windows_cap_the_local_layers():
    gemma3, mistral = modern.MODEL_CONFIGS["Gemma-3-27B"], modern.MODEL_CONFIGS["Mistral-7B-v0.1"]
    per_token_layer = 2 * 16 * 128 * 2
    L = 32768
    # 62 layers, 5:1: 10 global layers (5, 11, ..., 59) cache L tokens, 52 local layers 1024
    assert modern.kv_cache_bytes_at(gemma3, L) == (10 * L + 52 * 1024) * per_token_layer
    assert modern.kv_cache_bytes_at(mistral, 8192, batch_size=3) == 3 * 32 * 4096 * 2 * 8 * 128 * 2
    assert modern.kv_bytes_per_token(mistral, 100) == modern.kv_bytes_per_token(mistral, 1)
    gemma2 = modern.MODEL_CONFIGS["Gemma-2-9B"]
    assert gemma2.global_layer_flags == [False, True] * 21


def test_global_layers():
    assert modern.global_layers(62, 5).nonzero().flatten().tolist() == list(range(5, 62, 6))
    assert modern.global_layers(4, 1).tolist() == [False, True, False, True]
    assert modern.global_layers(3, 0).all() and not modern.global_layers(3, 5).any()
    with pytest.raises(ValueError, match="local_per_global"):
        modern.global_layers(4, -1)
    with pytest.raises(TypeError, match="num_layers"):
        modern.global_layers(4.0, 1)


def test_config_and_calculator_bad_input():
    with pytest.raises(ValueError, match="kind"):
        modern.AttentionConfig("x", "SWA", 4, num_kv_heads=1, head_dim=8)
    with pytest.raises(ValueError, match="kv_latent_dim"):
        modern.AttentionConfig("x", "MLA", 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        modern.AttentionConfig("x", "GQA", 4, head_dim=8)
    with pytest.raises(ValueError, match="window"):
        modern.AttentionConfig("x", "GQA", 4, num_kv_heads=1, head_dim=8, window=0)
    with pytest.raises(ValueError, match="max_context"):
        modern.AttentionConfig("x", "GQA", 4, num_kv_heads=1, head_dim=8, max_context=0)
    with pytest.raises(TypeError, match="config"):
        modern.kv_cache_bytes_at("Llama-3-8B", 10)
    with pytest.raises(ValueError, match="context_len"):
        modern.kv_bytes_per_token(modern.MODEL_CONFIGS["Llama-3-8B"], 0)
    local = modern.AttentionConfig("x", "MQA", 4, num_kv_heads=1, head_dim=8, window=16)
    assert local.global_layer_flags == [False] * 4


# --- learned sparse selection ----------------------------------------------------------------------

def test_indexer_scores_equal_a_loop():
    g = torch.Generator().manual_seed(6)
    q, k, w = rand(g, 2, 5, 3, 4), rand(g, 2, 7, 4), rand(g, 2, 5, 3)
    ref = torch.zeros(2, 5, 7, dtype=F64)
    for b in range(2):
        for t in range(5):
            for s in range(7):
                ref[b, t, s] = sum(w[b, t, j] * torch.relu(q[b, t, j] @ k[b, s]) for j in range(3))
    close(modern.indexer_scores(q, k, w), ref)
    with pytest.raises(ValueError, match="head_weights"):
        modern.indexer_scores(q, k, w[..., :2])


def brute_force_topk_mask(scores, k, causal):
    Lq, Lk = scores.shape[-2:]
    mask = torch.zeros(scores.shape, dtype=torch.bool)
    for idx in itertools.product(*map(range, scores.shape[:-1])):
        i = idx[-1]
        allowed = list(range(Lk - Lq + i + 1)) if causal else list(range(Lk))
        best = sorted(allowed, key=lambda j: -scores[idx][j].item())[:k]
        mask[idx + (best,)] = True
    return mask


@given(seeds, st.integers(1, 12), st.integers(0, 6), st.integers(1, 15), st.booleans())
def test_topk_mask_picks_the_best_allowed_keys(seed, L_q, extra, k, causal):
    L_k = L_q + extra
    scores = rand(torch.Generator().manual_seed(seed), 2, L_q, L_k)
    mask = modern.indexer_topk_mask(scores, k, is_causal=causal)
    assert torch.equal(mask, brute_force_topk_mask(scores, k, causal))
    assert (mask.sum(-1) <= k).all()


@given(seeds, st.integers(1, 20), st.integers(1, 25), st.booleans())
def test_sparse_selected_attention_equals_dense_attention_under_the_mask(seed, L, k, per_head):
    g = torch.Generator().manual_seed(seed)
    q, key, v = rand(g, 2, 3, L, 4), rand(g, 2, 3, L, 4), rand(g, 2, 3, L, 5)
    scores = rand(g, 2, 3, L, L) if per_head else rand(g, 2, L, L)
    idx, valid = modern.indexer_topk(scores, k)
    out = modern.sparse_selected_attention(q, key, v, idx, valid)
    mask = modern.indexer_topk_mask(scores, k)
    mask = mask if per_head else mask[:, None]
    s = (q @ key.transpose(-2, -1) / 2.0).masked_fill(~mask, -math.inf)
    close(out, torch.softmax(s, -1) @ v)


def test_sparse_selected_attention_details():
    g = torch.Generator().manual_seed(7)
    q, k, v = rand(g, 1, 2, 6, 4), rand(g, 1, 2, 6, 4), rand(g, 1, 2, 6, 3)
    idx = torch.arange(6).expand(1, 6, 6).contiguous()          # every key, no `valid`: dense attention
    close(modern.sparse_selected_attention(q, k, v, idx), torch.softmax(q @ k.transpose(-2, -1) / 2, -1) @ v)
    none = torch.zeros(1, 6, 6, dtype=torch.bool)               # nothing valid: zeros, never NaN
    assert torch.equal(modern.sparse_selected_attention(q, k, v, idx, none), torch.zeros(1, 2, 6, 3, dtype=F64))
    close(modern.sparse_selected_attention(q, q, q, idx), modern.sparse_selected_attention(
        q.clone(), q.clone(), q.clone(), idx))                  # aliasing
    out = modern.sparse_selected_attention(q.half(), k.half(), v.half(), idx)
    assert out.dtype == torch.float16
    with pytest.raises(TypeError, match="indices"):
        modern.sparse_selected_attention(q, k, v, idx.int())
    with pytest.raises(ValueError, match="indices"):
        modern.sparse_selected_attention(q, k, v, idx + 1)
    with pytest.raises(ValueError, match="indices"):
        modern.sparse_selected_attention(q, k, v, idx[:, :3])
    with pytest.raises(ValueError, match="valid"):
        modern.sparse_selected_attention(q, k, v, idx, none[..., :2])
    with pytest.raises(TypeError, match="valid"):
        modern.sparse_selected_attention(q, k, v, idx, none.int())
    with pytest.raises(ValueError, match="value"):
        modern.sparse_selected_attention(q, k, v[:, :, :4], idx)
    with pytest.raises(ValueError, match="L_q <= L_k"):
        modern.indexer_topk(torch.randn(5, 3), 2)
    with pytest.raises(ValueError, match="k"):
        modern.indexer_topk(torch.randn(5, 5), 0)


# --- chapter 11's exercises: each mistake is rejected, with the hint that names it -------------------

@pytest.mark.parametrize("name", ["modern.mla_cache_bytes", "modern.absorbed_query_weight", "modern.delta_rule_step",
                                  "modern.delta_chunk", "modern.causal_linear_attention", "modern.indexer_topk_mask",
                                  "modern.global_layers"])
def test_solutions_pass_strictly(name, capsys):
    assert check(name, solution(name), strict=True)


def _wrong(name, fn, words, capsys):
    assert check(name, fn) is False
    out = capsys.readouterr().out
    assert words in out, out


def test_mla_cache_bytes_mistakes(capsys):
    name = "modern.mla_cache_bytes"
    _wrong(name, lambda n, h, c, r, b: 2 * n * (c + r) * b, "keys AND values", capsys)
    _wrong(name, lambda n, h, c, r, b: n * h * (c + r) * b, "shared by all heads", capsys)
    _wrong(name, lambda n, h, c, r, b: n * (c + h * r) * b, "rope *queries*", capsys)
    _wrong(name, lambda n, h, c, r, b: n * c * b, "rope key", capsys)
    _wrong(name, lambda n, h, c, r, b: (c + r) * b, "num_layers", capsys)


def test_absorbed_query_weight_mistakes(capsys):
    name = "modern.absorbed_query_weight"

    def transposed(W_q, W_uk, H):
        return W_q.reshape(H, -1, W_q.shape[1]).transpose(1, 2) @ W_uk.reshape(H, -1, W_uk.shape[1])

    def interleaved(W_q, W_uk, H):
        d_h = W_q.shape[0] // H
        return (W_uk.reshape(d_h, H, -1).permute(1, 2, 0) @ W_q.reshape(d_h, H, -1).transpose(0, 1))

    _wrong(name, transposed, "swapped", capsys)
    _wrong(name, lambda W_q, W_uk, H: W_uk.T @ W_q, "has shape", capsys)
    _wrong(name, interleaved, "contiguous rows", capsys)


def test_delta_rule_step_mistakes(capsys):
    name = "modern.delta_rule_step"

    def parts(S, k, v, b, g):
        return g[..., None, None], b[..., None, None], S @ k[..., :, None], v[..., :, None] * k[..., None, :]

    def additive(S, k, v, b, g):
        g, b, _, outer = parts(S, k, v, b, g)
        return g * S + b * outer

    def ungated_read(S, k, v, b, g):
        g, b, Sk, _ = parts(S, k, v, b, g)
        return g * S + b * (v[..., :, None] - Sk) * k[..., None, :]

    def gate_after(S, k, v, b, g):
        g, b, Sk, _ = parts(S, k, v, b, g)
        return g * (S + b * (v[..., :, None] - Sk) * k[..., None, :])

    def beta_missing(S, k, v, b, g):
        g, b, Sk, outer = parts(S, k, v, b, g)
        return g * S - g * b * Sk * k[..., None, :] + outer

    def normalised_key(S, k, v, b, g):
        return solution(name)(S, F.normalize(k, dim=-1), v, b, g)

    def over_key_norm(S, k, v, b, g):
        g, b, Sk, _ = parts(S, k, v, b, g)
        return g * S + b * (v[..., :, None] - g * Sk) * k[..., None, :] / (k * k).sum(-1)[..., None, None]

    _wrong(name, additive, "additive", capsys)
    _wrong(name, ungated_read, "decay the state before reading", capsys)
    _wrong(name, gate_after, "decays the old state only", capsys)
    _wrong(name, beta_missing, "beta scales the write", capsys)
    # keys of any length: only the case with non-unit keys tells these apart
    _wrong(name, normalised_key, "does not normalise k", capsys)
    _wrong(name, over_key_norm, "do not divide by |k|^2", capsys)


def _in_float32(fn):
    """``fn`` computed in float32 inside, its result cast back to the inputs' dtype."""
    def wrapped(*args):
        dtype = next(a.dtype for a in args if isinstance(a, torch.Tensor))
        args = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        return fn(*args).to(dtype)
    return wrapped


@pytest.mark.parametrize("name", ["modern.absorbed_query_weight", "modern.delta_rule_step",
                                  "modern.causal_linear_attention"])
def test_right_answers_computed_in_float32_pass(name, capsys):
    assert check(name, _in_float32(solution(name)), strict=True)
    assert check(name, lambda *a: _in_float32(solution(name))(*a).float()) is True   # float32 returned


def test_no_misleading_hint_where_the_mistake_is_right(capsys):
    # with gate = 1 (case 1) "v - S k" equals "v - g S k": a float32 answer that misses the
    # tolerance there must not be told to decay the state (the mistake is not one there)
    name = "modern.delta_rule_step"

    def slightly_off(S, k, v, b, g):
        return solution(name)(S, k, v, b, g) + 1e-3

    assert check(name, slightly_off) is False
    out = capsys.readouterr().out
    assert "test 1 of" in out and "Hint" not in out, out


def test_causal_linear_attention_mistakes(capsys):
    name = "modern.causal_linear_attention"

    def phi(x):
        return F.elu(x) + 1

    def everything(q, k, v):
        a = phi(q) @ phi(k).transpose(-2, -1)
        return (a @ v) / a.sum(-1, keepdim=True)

    def exclusive(q, k, v):
        a = (phi(q) @ phi(k).transpose(-2, -1)).tril(-1)
        return ((a @ v) / a.sum(-1, keepdim=True)).nan_to_num(0.0)

    def unnormalised(q, k, v):
        return (phi(q) @ phi(k).transpose(-2, -1)).tril() @ v

    def relu_features(q, k, v):
        a = (F.relu(q) @ F.relu(k).transpose(-2, -1)).tril()
        return (a @ v) / a.sum(-1, keepdim=True)

    def softmax(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def quadratic(q, k, v):                       # right values, but the L x L matrix it must avoid
        a = (phi(q) @ phi(k).transpose(-2, -1)).tril()
        return (a @ v) / a.sum(-1, keepdim=True)

    def with_eps(q, k, v, eps=1e-6):              # the denominator of Katharopoulos et al.'s code
        s = torch.cumsum(phi(k)[..., :, :, None] * v[..., :, None, :], dim=-3)
        z = torch.cumsum(phi(k), dim=-2)
        return (phi(q)[..., :, :, None] * s).sum(-2) / ((phi(q) * z).sum(-1, keepdim=True) + eps)

    assert check(name, with_eps) is True
    assert check(name, _in_float32(with_eps)) is True
    _wrong(name, quadratic, "L x L = 65,536", capsys)
    _wrong(name, everything, "prefix sums", capsys)
    _wrong(name, exclusive, "include the current token", capsys)
    _wrong(name, unnormalised, "normaliser", capsys)
    _wrong(name, relu_features, "not relu", capsys)
    _wrong(name, softmax, "softmax attention", capsys)


def test_indexer_topk_mask_mistakes(capsys):
    name = "modern.indexer_topk_mask"

    def future(scores, k):
        idx = scores.topk(min(k, scores.shape[-1]), -1).indices
        return torch.zeros(scores.shape, dtype=torch.bool).scatter(-1, idx, True)

    def keeps_masked(scores, k):
        L = scores.shape[-1]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        idx = scores.masked_fill(~causal, -math.inf).topk(min(k, L), -1).indices
        return torch.zeros(scores.shape, dtype=torch.bool).scatter(-1, idx, True)

    def lowest(scores, k):
        L = scores.shape[-1]
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        idx = scores.masked_fill(~causal, math.inf).topk(min(k, L), -1, largest=False).indices
        return torch.zeros(scores.shape, dtype=torch.bool).scatter(-1, idx, True) & causal

    def future_then_causal(scores, k):
        L = scores.shape[-1]
        return future(scores, k) & torch.ones(L, L, dtype=torch.bool).tril()

    _wrong(name, future, "mask the future", capsys)
    _wrong(name, future_then_causal, "*before* the top k", capsys)
    _wrong(name, keeps_masked, "fewer than k allowed keys", capsys)
    _wrong(name, lowest, "*highest*", capsys)
    _wrong(name, lambda s, k: ~solution(name)(s, k), "inverted", capsys)


def test_global_layers_mistakes(capsys):
    name = "modern.global_layers"
    _wrong(name, lambda n, r: (torch.arange(n) + 1) % max(r, 1) == 0, "the period is", capsys)
    _wrong(name, lambda n, r: torch.arange(n) % (r + 1) == 0, "starts with local layers", capsys)
    _wrong(name, lambda n, r: ((torch.arange(n) + 1) % (r + 1) == 0).nonzero().flatten(), "", capsys)
    _wrong(name, lambda n, r: (torch.arange(n) + 1) % (r + 1) != 0, "marks the local ones", capsys)
