"""The transformer of chapter 6 (built line by line there, proven equal here) and the
interpretability helpers the capstone uses."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attn_course.interpret import (
    attention_rollout,
    gradient_attribution,
    permute_weights,
    uniform_weights,
)
from attn_course.multihead import KVCache, merge_heads, split_heads
from attn_course.positional import apply_rope
from attn_course.transformer import (
    ATTENTION_KINDS,
    Block,
    CausalSelfAttention,
    SeedStack,
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


# --- ablations, interpretability hooks and seed stacks (chapter 9's tests of explanations) -------

def test_nope_attention_is_plain_causal_attention():
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, rope=False).double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    q, k, v = (t.unflatten(-1, (2, 8)).transpose(1, 2) for t in layer.qkv(x).chunk(3, -1))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(-2)
    torch.testing.assert_close(layer(x)[0], layer.proj(ref))


def test_uniform_attention_is_the_running_mean_of_the_values():
    torch.manual_seed(0)
    layer = CausalSelfAttention(16, 2, kind="uniform").double()
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    v = layer.qkv(x).chunk(3, -1)[2]
    ref = torch.stack([v[:, : i + 1].mean(1) for i in range(6)], 1)
    torch.testing.assert_close(layer(x)[0], layer.proj(ref))
    _, w = layer(x, need_weights=True)
    torch.testing.assert_close(w[0, 0, 3], torch.tensor([0.25] * 4 + [0.0] * 2, dtype=torch.float64))


def test_a_hidden_token_changes_no_other_position():
    torch.manual_seed(0)
    model = TinyTransformer(12, 16, 2, 2).double().eval()
    ids = torch.randint(0, 12, (3, 9))
    keep = torch.ones(3, 9, dtype=torch.bool)
    keep[:, 2] = False
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 3) % 12
    a, _ = model(ids, key_mask=keep)
    b, _ = model(changed, key_mask=keep)
    others = [i for i in range(9) if i != 2]
    torch.testing.assert_close(a[:, others], b[:, others])
    torch.testing.assert_close(model(ids, key_mask=torch.ones_like(keep))[0], model(ids)[0])
    # a hidden token is the same as a token that is not there, for positions before it ...
    torch.testing.assert_close(a[:, :2], model(ids[:, :2])[0])
    # ... and no query reads the hidden key, in any layer
    _, w = model(ids, key_mask=keep, need_weights=True)
    assert all(torch.all(layer_w[..., 2] == 0) for layer_w in w)
    with pytest.raises(ValueError, match="key_mask"):
        model(ids, key_mask=keep[:, :5])


def test_edit_weights_hook():
    torch.manual_seed(0)
    model = TinyTransformer(12, 16, 2, 2).double().eval()
    ids = torch.randint(0, 12, (2, 8))
    torch.testing.assert_close(model(ids, edit_weights=lambda layer, w, m: w)[0], model(ids)[0])
    uniform = TinyTransformer(12, 16, 2, 2, kind="uniform").double().eval()
    uniform.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(ids, edit_weights=lambda layer, w, m: uniform_weights(w, m))[0], uniform(ids)[0])
    seen = []
    model(ids, edit_weights=lambda layer, w, m: seen.append((layer, w.shape)) or w)
    assert seen == [(0, (2, 2, 8, 8)), (1, (2, 2, 8, 8))]


@pytest.mark.parametrize("seed", range(5))
def test_permuted_weights_shuffle_each_row_among_its_allowed_keys(seed):
    g = torch.Generator().manual_seed(seed)
    L = 7
    mask = torch.rand(L, L, generator=g) < 0.6
    mask |= torch.eye(L, dtype=torch.bool)
    w = torch.softmax(torch.randn(3, 2, L, L, generator=g, dtype=torch.float64).masked_fill(~mask, -torch.inf), -1)
    p = permute_weights(w, mask, generator=g)
    assert torch.all(p[..., ~mask] == 0)
    for row_w, row_p, allowed in zip(w.reshape(-1, L, L), p.reshape(-1, L, L), [mask] * 6):
        for i in range(L):
            torch.testing.assert_close(row_p[i, allowed[i]].sort().values, row_w[i, allowed[i]].sort().values)
    assert not torch.equal(p, w)
    torch.testing.assert_close(permute_weights(w, mask, generator=torch.Generator().manual_seed(1)).sum(-1),
                               torch.ones(3, 2, L, dtype=torch.float64))


def test_uniform_weights_closed_form():
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    mask[3, 0] = False
    w = uniform_weights(torch.zeros(1, 4, 4), mask)
    torch.testing.assert_close(w[0, 3], torch.tensor([0.0, 1 / 3, 1 / 3, 1 / 3]))
    torch.testing.assert_close(w[0, 0], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.all(uniform_weights(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)) == 0)


@pytest.mark.parametrize("options", [{}, {"rope": False}, {"residual": False, "norm": False}, {"kind": "uniform"},
                                     {"kind": "window", "window": 2}])
def test_seed_stack_equals_each_model_and_trains_each_alone(options):
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(TinyTransformer(11, 16, 2, 2, **options).double())
    stack = SeedStack(models)
    ids = torch.randint(0, 11, (3, 4, 9))
    out = stack(ids)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m(ids[i])[0])
    # the summed loss gives copy m the gradient of model m alone
    out.square().mean((1, 2, 3)).sum().backward()
    for i, m in enumerate(models):
        m(ids[i])[0].square().mean().backward()
        grads = dict((n, p.grad) for n, p in m.named_parameters())
        for name, p in zip(stack._names, stack.stacked):
            torch.testing.assert_close(p.grad[i], grads[name])
    with torch.no_grad():
        stack.stacked[0].add_(1.0)
    stack.write_back(models)
    torch.testing.assert_close(stack(ids)[1], models[1](ids[1])[0])


def test_seed_stack_bad_input():
    a, b = TinyTransformer(11, 16, 2, 2), TinyTransformer(11, 16, 2, 2, rope=False)
    with pytest.raises(ValueError, match="configuration"):
        SeedStack([a, b])
    with pytest.raises(TypeError, match="models"):
        SeedStack([])
    stack = SeedStack([a, TinyTransformer(11, 16, 2, 2)])
    with pytest.raises(TypeError, match="ids"):
        stack(torch.zeros(3, 2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="ids"):
        stack(torch.full((2, 1, 5), 11))


def test_seed_stack_with_masks_equals_each_model_with_that_pattern():
    kinds = [("window", "global"), ("window", "window"), ("global", "dilated"), ("global", "global")]
    models = []
    for seed in range(4):
        torch.manual_seed(seed)
        models.append(TinyTransformer(11, 16, 2, 2, window=3).double())
    stack = SeedStack(models)
    L = 9
    ids = torch.randint(0, 11, (4, 4, L))
    masks = torch.stack([torch.stack([pattern_mask(kd, L, 3) for kd in ks]) for ks in kinds])
    out = stack(ids, masks)
    for i, (model, ks) in enumerate(zip(models, kinds)):
        for block, kind in zip(model.blocks, ks):  # the reference: each model built with that pattern per layer
            block.attn.kind = kind
        torch.testing.assert_close(out[i], model(ids[i])[0])
        torch.testing.assert_close(model(ids[i], attn_masks=masks[i])[0], out[i])


def test_uniform_kind_with_a_mask_averages_over_the_mask():
    torch.manual_seed(0)
    model = TinyTransformer(11, 16, 2, 1, kind="uniform").double()
    ids = torch.randint(0, 11, (2, 6))
    window = pattern_mask("window", 6, 2)[None]
    x = model.embed(ids)
    attn = model.blocks[0].attn
    q, k, v = (split_heads(t, 2) for t in attn.qkv(model.blocks[0].norm1(x)).chunk(3, dim=-1))
    w = window[0].double() / window[0].sum(-1, keepdim=True)
    expected = attn.proj(merge_heads(w @ v))
    out, _ = attn(model.blocks[0].norm1(x), attn_mask=window[0])
    torch.testing.assert_close(out, expected)
    # the explicit path (need_weights) agrees and reports those weights
    out2, weights = attn(model.blocks[0].norm1(x), attn_mask=window[0], need_weights=True)
    torch.testing.assert_close(out2, expected)
    torch.testing.assert_close(weights, w.expand(2, 2, 6, 6))


def test_attention_masks_bad_input():
    model = TinyTransformer(11, 16, 2, 2)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="attn_masks"):
        model(ids, attn_masks=torch.ones(1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_masks"):
        model(ids, attn_masks=torch.ones(2, 5, 5))
    attn = model.blocks[0].attn
    with pytest.raises(ValueError, match="attn_mask"):
        attn(torch.zeros(1, 5, 16), attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="cache"):
        attn(torch.zeros(1, 5, 16), attn_mask=torch.ones(5, 5, dtype=torch.bool), cache=KVCache())
    stack = SeedStack([model, TinyTransformer(11, 16, 2, 2)])
    with pytest.raises(ValueError, match="masks"):
        stack(torch.zeros(2, 1, 5, dtype=torch.long), torch.ones(2, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="TinyTransformer"):
        stack.write_back([model, torch.nn.Linear(2, 2)])


# --- chapter 6: the model written line by line (nanoGPT's style) equals the package's -------------
# The same code as the chapter's notebook: torch's layers, chapter 5's apply_rope, and the attention
# written out (scores, causal mask, softmax), so that it is an independent reference.

class _Attention(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x, cache=None):                       # x (B, L, d): the new tokens
        B, L, d = x.shape
        past = cache["k"].shape[2] if cache else 0
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(B, L, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))   # (B, H, L, d_h)
        pos = torch.arange(past, past + L)
        q, k = apply_rope(q, pos), apply_rope(k, pos)
        if cache is not None:
            if cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])                        # (B, H, L, T)
        future = torch.ones(L, k.shape[2], dtype=torch.bool).triu(past + 1)
        weights = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(B, L, d))


class _Block(nn.Module):
    def __init__(self, d, n_heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(d), _Attention(d, n_heads)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, cache=None):
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class _GPT(nn.Module):
    def __init__(self, vocab, d, n_heads, n_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d, n_heads) for _ in range(n_layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids, caches=None):
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(self.norm(x))


def _pair(vocab=13, d=16, heads=2, layers=3, seed=0):
    torch.manual_seed(seed)
    package = TinyTransformer(vocab, d, heads, layers).double()
    with torch.no_grad():                                    # LayerNorms away from their initial 1 and 0
        for name, p in package.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    mine = _GPT(vocab, d, heads, layers).double()
    mine.load_state_dict(package.state_dict())               # strict: every name and shape matches
    return mine, package


def test_the_line_by_line_model_has_the_packages_parameters_by_name():
    mine, package = _pair()
    assert {n: p.shape for n, p in mine.named_parameters()} == {n: p.shape for n, p in package.named_parameters()}


@pytest.mark.parametrize("seed", range(3))
def test_the_line_by_line_model_gives_the_same_outputs_and_gradients(seed):
    mine, package = _pair(seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 13, (3, 11), generator=g)
    targets = torch.randint(0, 13, (3, 11), generator=g)
    ours, theirs = mine(ids), package(ids)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=1e-10)
    F.cross_entropy(ours.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(theirs.flatten(0, 1), targets.flatten()).backward()
    grads = dict(package.named_parameters())
    for name, p in mine.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-12, rtol=1e-10, msg=name)


def test_the_line_by_line_cache_equals_the_full_pass_and_the_packages_cache():
    mine, package = _pair(seed=4)
    ids = torch.randint(0, 13, (2, 9), generator=torch.Generator().manual_seed(4))
    full = mine(ids)
    mine_caches, package_caches = [{} for _ in mine.blocks], [KVCache() for _ in package.blocks]
    steps = [mine(ids[:, :4], mine_caches)] + [mine(ids[:, t:t + 1], mine_caches) for t in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-12, rtol=1e-10)
    package(ids[:, :4], caches=package_caches)
    for t in range(4, 9):
        package(ids[:, t:t + 1], caches=package_caches)
    for ours, theirs in zip(mine_caches, package_caches):     # the same (rotated) keys and the values
        torch.testing.assert_close(ours["k"], theirs.key, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(ours["v"], theirs.value, atol=1e-12, rtol=1e-10)


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 12), cut=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_a_prefix_gets_the_same_logits_alone_or_followed_by_more_tokens(length, cut, seed):
    """Causality as an invariant: the logits of the first ``cut`` tokens do not depend on what follows."""
    cut = min(cut, length)
    torch.manual_seed(seed)
    model = TinyTransformer(9, 8, 2, 2).double().eval()
    ids = torch.randint(0, 9, (2, length))
    torch.testing.assert_close(model(ids)[0][:, :cut], model(ids[:, :cut])[0], atol=1e-10, rtol=1e-8)


def test_greedy_generation_equals_the_argmax_of_the_full_pass_at_every_step():
    torch.manual_seed(5)
    model = TinyTransformer(10, 16, 2, 2).double().eval()
    prompt = torch.randint(0, 10, (3, 4))
    out = model.generate(prompt, 6)
    assert torch.equal(out[:, :4], prompt)
    for t in range(4, 10):   # token t is the argmax of the logits at t - 1, given the tokens before it
        assert torch.equal(out[:, t], model(out[:, :t])[0][:, -1].argmax(-1))
