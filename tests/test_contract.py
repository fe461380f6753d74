"""The API contract for every function that takes query/key/value, tested the way learners call them.

- aliasing: ``f(x, x, x)`` (self-attention as learners write it) equals ``f`` of three clones;
- layouts: non-contiguous (transposed views) and expanded (stride-0) inputs give the same result;
- dtypes: float16, bfloat16, float32 and float64 keep their dtype and device;
- devices: on the ``meta`` device (no data, no CPU), nothing is created on the CPU: a tensor made
  on the wrong device inside a function fails here, the bug that a GPU would show and a CPU hides.
"""

import pytest
import torch

from attn_course import basics, flash, sparse

B, H, L, D = 2, 2, 32, 8


def _q(x):
    return x


# name -> (function of (q, k, v) for (B, H, L, d) inputs, meta-device support or the reason it has none)
QKV = {
    "basics.scaled_dot_product_attention": (lambda q, k, v: basics.scaled_dot_product_attention(q, k, v)[0], True),
    "basics.scaled_dot_product_attention causal": (
        lambda q, k, v: basics.scaled_dot_product_attention(q, k, v, is_causal=True)[0], True),
    "flash.attention_with_lse": (lambda q, k, v: flash.attention_with_lse(q, k, v, is_causal=True)[0], True),
    "flash.flash_attention": (lambda q, k, v: flash.flash_attention(q, k, v, block_q=8, block_k=16), True),
    "flash.flash_attention causal": (
        lambda q, k, v: flash.flash_attention(q, k, v, is_causal=True, block_q=16, block_k=8), True),
    "sparse.dense_attention": (lambda q, k, v: sparse.dense_attention(q, k, v), True),
    "sparse.sliding_window_attention": (lambda q, k, v: sparse.sliding_window_attention(q, k, v, 3), True),
    "sparse.sliding_window_attention causal": (
        lambda q, k, v: sparse.sliding_window_attention(q, k, v, 3, is_causal=True), True),
    "sparse.dilated_window_attention": (lambda q, k, v: sparse.dilated_window_attention(q, k, v, 2, 2), True),
    "sparse.longformer_attention": (lambda q, k, v: sparse.longformer_attention(q, k, v, 2, [0, 5]), True),
    "sparse.block_sparse_attention": (
        lambda q, k, v: sparse.block_sparse_attention(q, k, v, sparse.bigbird_layout(4, num_random_blocks=1), 8),
        True),
    "sparse.bigbird_attention": (lambda q, k, v: sparse.bigbird_attention(q, k, v, 8, num_random_blocks=1), True),
    "sparse.topk_attention": (lambda q, k, v: sparse.topk_attention(q, k, v, 5), True),
    "sparse.performer_attention": (lambda q, k, v: sparse.performer_attention(q, k, v, 16), True),
    "sparse.lsh_attention": (lambda q, k, v: sparse.lsh_attention(q, k, v, 8, 2),
                             "hashing sorts by bucket (argsort of data), which has no meaning without data"),
}

try:  # chapter 8's module
    from attn_course import modern

    QKV["modern.linear_attention causal"] = (lambda q, k, v: modern.linear_attention(q, k, v), True)
    QKV["modern.linear_attention"] = (lambda q, k, v: modern.linear_attention(q, k, v, is_causal=False), True)

    def _gdr(q, k, v, chunk):
        beta = torch.sigmoid(q[..., 0])
        gate = torch.sigmoid(k[..., 1])
        kn = torch.nn.functional.normalize(k, dim=-1)
        return modern.gated_delta_rule(q, kn, v, beta, gate, chunk_size=chunk)[0]

    QKV["modern.gated_delta_rule"] = (lambda q, k, v: _gdr(q, k, v, None), True)
    QKV["modern.gated_delta_rule chunked"] = (lambda q, k, v: _gdr(q, k, v, 8), True)
except ImportError:  # pragma: no cover
    pass

NAMES = sorted(QKV)
# Methods whose selection of keys is discontinuous in the scores: half-precision rounding may pick
# other keys (a different, equally valid answer), so only dtype and device are checked for them.
SELECTING = {"sparse.topk_attention", "sparse.lsh_attention"}


def inputs(dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
            for _ in range(3)]


@pytest.mark.parametrize("name", NAMES)
def test_self_attention_with_one_tensor_equals_three_clones(name):
    fn, _ = QKV[name]
    x = inputs()[0]
    torch.testing.assert_close(fn(x, x, x), fn(x.clone(), x.clone(), x.clone()), atol=1e-12, rtol=1e-12)
    q, k, _ = inputs(seed=1)
    torch.testing.assert_close(fn(q, k, k), fn(q.clone(), k.clone(), k.clone()), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_non_contiguous_and_expanded_inputs_give_the_same_result(name):
    fn, _ = QKV[name]
    q, k, v = inputs()
    ref = fn(q, k, v)
    # transposed views: the same values, laid out (B, L, H, d) in memory
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qt.is_contiguous()
    torch.testing.assert_close(fn(qt, kt, vt), ref, atol=1e-12, rtol=1e-12)
    # expanded (stride 0) along the batch: every batch row equals batch row 0's result
    qe, ke, ve = (x[:1].expand(B, -1, -1, -1) for x in (q, k, v))
    assert qe.stride(0) == 0
    out = fn(qe, ke, ve)
    torch.testing.assert_close(out, fn(q[:1], k[:1], v[:1]).expand_as(out), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_and_device_are_kept(name, dtype):
    fn, _ = QKV[name]
    q, k, v = inputs(dtype)
    out = fn(q, k, v)
    assert out.dtype == dtype and out.device == q.device and out.shape[:3] == (B, H, L)
    assert torch.isfinite(out.float()).all()
    # close to the float64 answer, except where rounding may change which keys are selected
    if dtype in (torch.float16, torch.bfloat16) and name not in SELECTING:
        ref = fn(*inputs(torch.float64))
        assert (out.double() - ref).abs().max() < 0.1


@pytest.mark.parametrize("name", NAMES)
def test_nothing_is_created_on_the_cpu_when_inputs_live_elsewhere(name):
    fn, meta_ok = QKV[name]
    if meta_ok is not True:
        pytest.skip(f"no meta run: {meta_ok}")
    q, k, v = inputs(torch.float32, "meta")
    out = fn(q, k, v)
    assert out.device.type == "meta"


def test_modules_run_on_the_meta_device():
    from attn_course.basics import AdditiveAttention, MultiplicativeAttention
    from attn_course.multihead import GroupedQueryAttention, MultiHeadAttention
    from attn_course.transformer import TinyTransformer

    x = torch.randn(2, 5, 16, device="meta")
    with torch.device("meta"):
        mha, gqa = MultiHeadAttention(16, 4), GroupedQueryAttention(16, 4, 2)
        add, mul = AdditiveAttention(16, 16, 8), MultiplicativeAttention(16, 16)
        tiny = TinyTransformer(12, 16, 2, 2)
    assert mha(x, x, x, is_causal=True)[0].device.type == "meta"
    assert gqa(x, is_causal=True)[0].device.type == "meta"
    assert add(x, x, x)[0].device.type == "meta" and mul(x, x, x)[0].device.type == "meta"
    ids = torch.zeros(2, 5, dtype=torch.long, device="meta")
    assert tiny(ids)[0].device.type == "meta"


def test_more_public_functions_and_models_stay_on_the_meta_device():
    """Everything else that takes tensors: nothing may be created on the CPU behind the caller's back."""
    from attn_course import interpret, modern, positional, seq2seq, variants
    from attn_course.multihead import GroupedQueryAttention, MultiHeadAttention

    meta = torch.device("meta")
    x = torch.randn(2, 6, 16, device=meta)
    assert positional.apply_rope(torch.randn(2, 3, 6, 8, device=meta)).device == meta
    assert positional.apply_rope(torch.randn(2, 6, 8, device=meta), torch.arange(6, device=meta)).device == meta
    assert basics.masked_softmax(x, torch.ones(6, 16, dtype=torch.bool, device=meta)).device == meta
    assert variants.gumbel_softmax(torch.randn(2, 6, device=meta), hard=True).device == meta
    assert interpret.attention_rollout([torch.rand(2, 6, 6, device=meta)] * 2).device == meta
    # (seq2seq.padding_mask is left out: it checks the lengths' values, which need data)
    with torch.device("meta"):
        mha, gqa = MultiHeadAttention(16, 4), GroupedQueryAttention(16, 4, 2)
        mla = modern.MultiHeadLatentAttention(16, 4, 8, rope_dim=4)
        self_attn, cross = seq2seq.SelfAttention(16, 4), seq2seq.CrossAttention(16, 16, 4)
        psas = [positional.PositionalSelfAttention(16, 4, enc) for enc in ("rope", "relative", "alibi")]
    assert mha(x, x, x)[0].device == meta and gqa(x)[0].device == meta
    out, cache = mla(x)
    assert out.device == meta and mla(x[:, :1], cache=cache)[0].device == meta
    assert mla(x, absorb=True)[0].device == meta
    assert self_attn(x)[0].device == meta and cross(x, x)[0].device == meta
    assert all(psa(x)[0].device == meta for psa in psas)


@pytest.mark.parametrize("module_name", ["mha", "gqa_free", "mla"])
def test_modules_give_the_same_result_for_aliased_and_cloned_inputs(module_name):
    from attn_course import modern
    from attn_course.multihead import MultiHeadAttention

    torch.manual_seed(0)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    if module_name == "mha":
        m = MultiHeadAttention(16, 4).double()
        a, b = m(x, x, x)[0], m(x.clone(), x.clone(), x.clone())[0]
        c = m(x.transpose(0, 1).contiguous().transpose(0, 1), x, x)[0]
    elif module_name == "gqa_free":
        m = MultiHeadAttention(16, 4).double()
        a, b = m(x, x, x, is_causal=True)[0], m(x[:1].expand(2, -1, -1), x, x, is_causal=True)[0][:1]
        a, c = a[:1], m(x[:1], x[:1], x[:1], is_causal=True)[0]
    else:
        m = modern.MultiHeadLatentAttention(16, 4, 8, rope_dim=4).double()
        a, b = m(x)[0], m(x.clone())[0]
        c = m(x.transpose(0, 1).contiguous().transpose(0, 1))[0]
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
