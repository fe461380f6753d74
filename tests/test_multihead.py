"""attn_course.multihead against torch.nn.MultiheadAttention and closed forms."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from attn_course import basics
from attn_course.multihead import (
    GroupedQueryAttention,
    MultiHeadAttention,
    attention_flops,
    count_parameters,
    kv_cache_bytes,
    masks_from_torch,
    merge_heads,
    split_heads,
)


def _torch_mha(E, H, **kw):
    m = nn.MultiheadAttention(E, H, batch_first=True, **kw).double()
    with torch.no_grad():  # torch initialises biases to zero: make them matter
        for p in m.parameters():
            if p.ndim == 1:
                p.normal_()
    return m.eval()


@given(st.sampled_from([(8, 1), (8, 2), (12, 3), (16, 4)]), st.booleans(), st.integers(0, 2**31 - 1))
def test_from_torch_self_attention_equals_torch(EH, bias, seed):
    E, H = EH
    torch.manual_seed(seed)
    ref = _torch_mha(E, H, bias=bias)
    ours = MultiHeadAttention.from_torch(ref)
    x = torch.randn(2, 5, E, dtype=torch.float64)
    out_ref, w_ref = ref(x, x, x, average_attn_weights=False)
    out, w = ours(x, x, x)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(w, w_ref)


def test_from_torch_with_kdim_vdim_and_masks_equals_torch():
    torch.manual_seed(0)
    ref = _torch_mha(12, 3, kdim=5, vdim=7)
    ours = MultiHeadAttention.from_torch(ref)
    q, k, v = torch.randn(2, 4, 12).double(), torch.randn(2, 6, 5).double(), torch.randn(2, 6, 7).double()
    blocked = torch.rand(4, 6) > 0.7
    blocked[:, 0] = False
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    out_ref, w_ref = ref(q, k, v, attn_mask=blocked, key_padding_mask=pad, average_attn_weights=False)
    out, w = ours(q, k, v, masks_from_torch(blocked, pad))
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(w, w_ref)
    out2, none = ours(q, k, v, masks_from_torch(blocked, pad), need_weights=False)
    assert none is None
    torch.testing.assert_close(out2, out_ref)


def test_from_torch_causal_and_not_batch_first():
    torch.manual_seed(1)
    ref = nn.MultiheadAttention(8, 2).double().eval()  # sequence-first module
    ours = MultiHeadAttention.from_torch(ref)
    x = torch.randn(3, 5, 8, dtype=torch.float64)  # (B, L, E)
    causal_blocked = torch.ones(5, 5, dtype=torch.bool).triu(1)
    out_ref, _ = ref(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), attn_mask=causal_blocked)
    out, w = ours(x, x, x, is_causal=True)
    torch.testing.assert_close(out, out_ref.transpose(0, 1))
    assert torch.all(w.triu(1) == 0)


def test_from_torch_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(TypeError, match="module must be"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))


def test_cross_attention_path_equals_the_fused_self_attention_path():
    m = MultiHeadAttention(8, 2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    fused, _ = m(x, x, x)
    separate, _ = m(x, x.clone(), x.clone())
    torch.testing.assert_close(fused, separate)


def test_one_head_is_single_head_attention_with_projections():
    m = MultiHeadAttention(6, 1).double()
    x, y = torch.randn(2, 4, 6).double(), torch.randn(2, 3, 6).double()
    out, w = m(x, y, y)
    ref, ref_w = basics.scaled_dot_product_attention(m.q_proj(x), m.k_proj(y), m.v_proj(y))
    torch.testing.assert_close(out, m.out_proj(ref))
    torch.testing.assert_close(w[:, 0], ref_w)


def test_fully_masked_queries_get_zero_heads_in_both_paths():
    m = MultiHeadAttention(8, 2, bias=False).double()
    x = torch.randn(1, 3, 8).double()
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    mask[..., 1, :] = False
    for need in (True, False):
        out, _ = m(x, x, x, mask, need_weights=need)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out[0, 1], torch.zeros(8, dtype=torch.float64))


def test_head_mask_removes_heads():
    m = MultiHeadAttention(8, 2).double()
    x = torch.randn(2, 4, 8).double()
    full, _ = m(x, x, x)
    kept, _ = m(x, x, x, head_mask=torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(full, kept)
    none, _ = m(x, x, x, head_mask=torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(none, m.out_proj.bias.expand_as(none))


def test_dropout_only_in_training():
    m = MultiHeadAttention(8, 2, dropout=0.5)
    x = torch.randn(2, 6, 8)
    m.eval()
    a, _ = m(x, x, x)
    b, _ = m(x, x, x)
    torch.testing.assert_close(a, b)
    m.train()
    _, w = m(x, x, x)
    assert (w == 0).any()


@given(st.integers(1, 3), st.integers(1, 6), st.sampled_from([1, 2, 4, 8]))
def test_split_merge_round_trip(B, L, H):
    x = torch.randn(B, L, 16)
    s = split_heads(x, H)
    assert s.shape == (B, H, L, 16 // H)
    torch.testing.assert_close(s[:, 1 % H, :, 0], x[:, :, (1 % H) * (16 // H)])
    torch.testing.assert_close(merge_heads(s), x)


def test_gqa_with_as_many_groups_as_heads_equals_mha():
    torch.manual_seed(0)
    mha = MultiHeadAttention(12, 3).double()
    gqa = GroupedQueryAttention(12, 3, 3).double()
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 5, 12).double()
    torch.testing.assert_close(gqa(x, is_causal=True)[0], mha(x, x, x, is_causal=True)[0])


def test_mqa_shares_keys_and_values_across_heads():
    gqa = GroupedQueryAttention(8, 4, 1).double()
    assert gqa.k_proj.out_features == 2 and count_parameters(gqa) < count_parameters(MultiHeadAttention(8, 4))
    x = torch.randn(1, 5, 8).double()
    out, w = gqa(x)
    k = gqa.k_proj(x)  # one key head, used by all four query heads
    q = split_heads(gqa.q_proj(x), 4)
    torch.testing.assert_close(w, torch.softmax(q @ k[:, None].transpose(-2, -1) / 2**0.5, -1))


def test_parameters_and_flops_do_not_depend_on_the_number_of_heads():
    counts = {count_parameters(MultiHeadAttention(64, h)) for h in (1, 2, 4, 8, 16)}
    assert counts == {4 * (64 * 64 + 64)}
    flops = {sum(attention_flops(10, 12, 64, h).values()) for h in (1, 2, 4, 8)}
    assert len(flops) == 1
    f = attention_flops(10, 12, 64, 4)
    assert f["scores"] == 2 * 10 * 12 * 64 and f["projections"] == 2 * 64 * 64 * (20 + 24)


def test_kv_cache_bytes_closed_form():
    # 32 layers, 8 KV heads of 128, 4096 tokens, fp16: 2*32*8*128*4096*2 bytes = 512 MiB
    assert kv_cache_bytes(32, 8, 128, 4096) == 512 * 2**20
    assert kv_cache_bytes(1, 1, 1, 1, batch_size=3, bytes_per_value=4) == 24
    with pytest.raises(ValueError, match="seq_len"):
        kv_cache_bytes(1, 1, 1, 0)


@pytest.mark.parametrize("call, exc, word", [
    (lambda: MultiHeadAttention(10, 3), ValueError, "divisible"),
    (lambda: MultiHeadAttention(8, 0), ValueError, "num_heads"),
    (lambda: MultiHeadAttention(8, 2, dropout=1.5), ValueError, "dropout"),
    (lambda: MultiHeadAttention(8, 2)(torch.zeros(2, 3, 7), torch.zeros(2, 3, 8), torch.zeros(2, 3, 8)), ValueError, "query has 7"),
    (lambda: MultiHeadAttention(8, 2)(torch.zeros(3, 8), torch.zeros(3, 8), torch.zeros(3, 8)), ValueError, "query must have 3"),
    (lambda: MultiHeadAttention(8, 2)(torch.zeros(2, 3, 8), torch.zeros(1, 4, 8), torch.zeros(1, 4, 8)), ValueError, "agree on B"),
    (lambda: MultiHeadAttention(8, 2)(torch.zeros(2, 3, 8), torch.zeros(2, 4, 8), torch.zeros(2, 4, 8),
                                      torch.ones(3, 3, dtype=torch.bool)), ValueError, "mask"),
    (lambda: MultiHeadAttention(8, 2)(torch.zeros(2, 3, 8), torch.zeros(2, 3, 8), torch.zeros(2, 3, 8),
                                      head_mask=torch.ones(3)), ValueError, "head_mask"),
    (lambda: split_heads(torch.zeros(2, 3, 10), 3), ValueError, "not divisible"),
    (lambda: merge_heads(torch.zeros(2, 3, 10)), ValueError, "x must have 4"),
    (lambda: masks_from_torch(torch.zeros(3, 3)), TypeError, "attn_mask must be a bool"),
    (lambda: GroupedQueryAttention(8, 4, 3), ValueError, "num_kv_heads"),
    (lambda: count_parameters("x"), TypeError, "module"),
])
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_decoding_with_a_kv_cache_equals_the_full_causal_pass():
    from attn_course.multihead import KVCache

    torch.manual_seed(0)
    for G in (4, 2, 1):
        gqa = GroupedQueryAttention(16, 4, G).double()
        x = torch.randn(2, 7, 16).double()
        full, _ = gqa(x, is_causal=True)
        cache = KVCache()
        first, _ = gqa(x[:, :3], is_causal=True, cache=cache)  # a prompt of 3 tokens
        steps = [gqa(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(3, 7)]
        torch.testing.assert_close(torch.cat([first, *steps], dim=1), full)
        assert cache.length == 7
        assert cache.nbytes == kv_cache_bytes(1, G, 4, 7, batch_size=2, bytes_per_value=8)


def test_attention_classifier_shapes_and_head_mask():
    from attn_course.multihead import AttentionClassifier

    m = AttentionClassifier(20, 16, 12, 4, 100)
    ids = torch.randint(0, 20, (3, 16))
    logits, w = m(ids)
    assert logits.shape == (3, 16, 100) and w.shape == (3, 4, 16, 16)
    assert torch.all(w.triu(1) == 0)
    with pytest.raises(TypeError, match="ids must be an int64"):
        m(ids.float())
    with pytest.raises(ValueError, match="knows 16 positions"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_two_relation_task_targets():
    from attn_course.data import two_relation_task

    ids, targets = two_relation_task(50, 10, 16, generator=torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (50, 16)
    for b in range(50):
        m = int((ids[b] >= 10).nonzero()[0])
        marked = int(ids[b, m]) - 10
        for i in range(16):
            if i > m + 1:
                assert int(targets[b, i]) == (int(ids[b, i - 1]) % 10) * 10 + marked
            else:
                assert int(targets[b, i]) == -100


def _classifiers(n, H=4, seed=0):
    from attn_course.multihead import AttentionClassifier

    torch.manual_seed(seed)
    models = [AttentionClassifier(20, 16, 12, H, 30).double() for _ in range(n)]
    with torch.no_grad():  # biases start at zero: make them matter
        for m in models:
            for p in m.parameters():
                if p.ndim == 1:
                    p.normal_()
    return models


@pytest.mark.parametrize("H", [1, 3, 4])
def test_parallel_classifiers_equal_each_model(H):
    from attn_course.multihead import ParallelAttentionClassifiers

    models = _classifiers(3, H)
    stack = ParallelAttentionClassifiers.from_models(models)
    ids = torch.randint(0, 20, (3, 5, 16))
    head_mask = torch.rand(3, H, dtype=torch.float64)
    logits, w = stack(ids, head_mask)
    fused, none = stack(ids, head_mask, need_weights=False)
    assert none is None and logits.shape == (3, 5, 16, 30) and w.shape == (3, 5, H, 16, 16)
    torch.testing.assert_close(fused, logits)
    shared, _ = stack(ids[0])  # one (B, L) batch for every copy
    for m, model in enumerate(models):
        ref, ref_w = model(ids[m], head_mask=head_mask[m])
        torch.testing.assert_close(logits[m], ref)
        torch.testing.assert_close(w[m], ref_w)
        torch.testing.assert_close(shared[m], model(ids[0])[0])
        torch.testing.assert_close(stack.model(m)(ids[m])[0], model(ids[m])[0])


def test_parallel_classifiers_summed_loss_gives_each_model_its_own_gradient():
    from attn_course.multihead import ParallelAttentionClassifiers

    models = _classifiers(2)
    stack = ParallelAttentionClassifiers.from_models(models)
    ids, targets = torch.randint(0, 20, (2, 4, 16)), torch.randint(0, 30, (2, 4, 16))
    logits, _ = stack(ids, need_weights=False)
    sum(nn.functional.cross_entropy(logits[m].flatten(0, 1), targets[m].flatten()) for m in range(2)).backward()
    for m, model in enumerate(models):
        nn.functional.cross_entropy(model(ids[m])[0].flatten(0, 1), targets[m].flatten()).backward()
        torch.testing.assert_close(stack.params["attention_q_proj_weight"].grad[m],
                                   model.attention.q_proj.weight.grad)
        torch.testing.assert_close(stack.params["tokens_weight"].grad[m], model.tokens.weight.grad)


def test_parallel_classifiers_refuse_bad_input():
    from attn_course.multihead import AttentionClassifier, ParallelAttentionClassifiers

    stack = ParallelAttentionClassifiers.from_models(_classifiers(2))
    with pytest.raises(TypeError, match="int64"):
        stack(torch.zeros(3, 4, 16, dtype=torch.long))  # 3 copies of ids for 2 models
    with pytest.raises(ValueError, match="knows|know 16"):
        stack(torch.zeros(2, 4, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="head_mask"):
        stack(torch.zeros(2, 4, 16, dtype=torch.long), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="one shape"):
        ParallelAttentionClassifiers.from_models([AttentionClassifier(20, 16, 12, 4, 30),
                                                  AttentionClassifier(20, 16, 12, 2, 30)])
    with pytest.raises(TypeError, match="AttentionClassifier"):
        ParallelAttentionClassifiers.from_models([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="m must be"):
        stack.model(2)
