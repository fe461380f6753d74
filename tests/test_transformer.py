"""The capstone model and the interpretability helpers."""

import pytest
import torch
import torch.nn.functional as F

from attn_course.interpret import attention_rollout, gradient_attribution
from attn_course.transformer import (
    ATTENTION_KINDS,
    Block,
    CausalSelfAttention,
    TinyTransformer,
    pattern_mask,
)


def test_pattern_masks():
    assert torch.equal(pattern_mask("global", 4, 1), torch.ones(4, 4, dtype=torch.bool).tril())
    w = pattern_mask("window", 6, 2)
    assert w[5].tolist() == [False, False, False, True, True, True]
    d = pattern_mask("dilated", 9, 2, 2)
    assert d[8].tolist() == [False, False, False, False, True, False, True, True, True]
    with pytest.raises(ValueError, match="kind"):
        pattern_mask("random", 4, 1)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_fast_path_equals_the_weights_path(kind):
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, kind=kind, window=3).double()
    x = torch.randn(3, 20, 16, dtype=torch.float64)
    fast, none = layer(x)
    slow, w = layer(x, need_weights=True)
    assert none is None and w.shape == (3, 2, 20, 20)
    torch.testing.assert_close(fast, slow)
    assert torch.all(w[..., ~pattern_mask(kind, 20, 3)] == 0)


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_a_causal_output_never_depends_on_later_tokens(kind):
    torch.manual_seed(0)
    model = TinyTransformer(12, 16, 2, 2, kind=kind, window=2).double()
    ids = torch.randint(0, 12, (2, 10))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 5) % 12
    a, _ = model(ids)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_kv_cache_generation_equals_full_recomputation(kind):
    torch.manual_seed(1)
    model = TinyTransformer(12, 16, 2, 3, kind=kind, window=3).double().eval()
    prompt = torch.randint(0, 12, (3, 5))
    cached = model.generate(prompt, 8, use_cache=True)
    full = model.generate(prompt, 8, use_cache=False)
    assert torch.equal(cached, full) and cached.shape == (3, 13)
    # and the cached logits themselves match the full pass
    from attn_course.multihead import KVCache

    caches = [KVCache() for _ in model.blocks]
    steps = [model(full[:, :5], caches=caches)[0]] + [model(full[:, t:t + 1], caches=caches)[0] for t in range(5, 13)]
    torch.testing.assert_close(torch.cat(steps, 1), model(full)[0])


def test_the_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = TinyTransformer(10, 32, 4, 2)
    ids = torch.randint(0, 10, (4, 12))
    opt = torch.optim.AdamW(model.parameters(), 3e-3)
    for _ in range(150):
        logits, _ = model(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_ablation_flags_remove_the_parts():
    block = Block(8, 2, residual=False, norm=False)
    assert isinstance(block.norm1, torch.nn.Identity)
    x = torch.randn(1, 4, 8)
    out, _ = block(x)
    a, _ = block.attn(x)
    torch.testing.assert_close(out, block.mlp(a))


def test_rollout_closed_form_and_rows():
    a1 = torch.softmax(torch.randn(1, 2, 4, 4, dtype=torch.float64), -1)
    a2 = torch.softmax(torch.randn(1, 2, 4, 4, dtype=torch.float64), -1)
    eye = torch.eye(4, dtype=torch.float64)
    r1 = 0.5 * a1.mean(1) + 0.5 * eye
    r2 = 0.5 * a2.mean(1) + 0.5 * eye
    torch.testing.assert_close(attention_rollout([a1, a2]), r2 @ r1)
    torch.testing.assert_close(attention_rollout([a1, a2], residual=False), a2.mean(1) @ a1.mean(1))
    torch.testing.assert_close(attention_rollout([a1, a2]).sum(-1), torch.ones(1, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="weights"):
        attention_rollout([])


def test_gradient_attribution_is_a_directional_derivative():
    torch.manual_seed(0)
    model = TinyTransformer(10, 16, 2, 2).double().eval()
    ids = torch.randint(0, 10, (2, 7))
    attr = gradient_attribution(model, ids, position=6, token=torch.tensor([3, 4]))
    emb = model.embed(ids).detach()

    def logit(e):
        return model(ids, embeddings=e)[0][:, 6].gather(-1, torch.tensor([[3], [4]])).squeeze(-1)

    eps = 1e-6
    for j in range(7):
        bump = torch.zeros_like(emb)
        bump[:, j] = emb[:, j]
        numeric = (logit(emb + eps * bump) - logit(emb - eps * bump)) / (2 * eps)
        torch.testing.assert_close(attr[:, j], numeric, atol=1e-6, rtol=1e-5)
    later = gradient_attribution(model, ids, position=3)
    assert torch.all(later[:, 4:] == 0)  # causal: later tokens cannot matter


@pytest.mark.parametrize("call, exc, word", [
    (lambda: CausalSelfAttention(8, 2, kind="full"), ValueError, "kind"),
    (lambda: CausalSelfAttention(12, 4), ValueError, "even head width"),
    (lambda: TinyTransformer(10, num_layers=0), ValueError, "num_layers"),
    (lambda: TinyTransformer(10)(torch.zeros(1, 3)), TypeError, "ids"),
    (lambda: TinyTransformer(10, 16, 2, 1).generate(torch.zeros(1, 2, dtype=torch.long), 0), ValueError, "steps"),
])
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()
