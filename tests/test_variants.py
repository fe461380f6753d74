"""attn_course.variants against closed forms and independent references."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attn_course import basics
from attn_course.data import copy_after_marker_task, marked_item_task
from attn_course.train import fit_stream, sequence_cross_entropy
from attn_course.variants import (
    ConvTagger,
    DynamicConvTagger,
    LocalAttentionTagger,
    LuongAttention,
    MarkerSelector,
    StackedMarkerSelectors,
    conv_receptive_field,
    fit_seeds,
    gumbel_softmax,
    local_window_weights,
    receptive_field,
    sample_hard,
    scorer_gradient_draws,
    shifted_copy_task,
    window_recall_task,
)


def test_gumbel_straight_through_is_one_hot_forward_and_soft_backward():
    logits = torch.randn(4, 6, dtype=torch.float64)
    c = torch.randn(6, dtype=torch.float64)
    a = logits.clone().requires_grad_()
    hard = gumbel_softmax(a, 0.7, hard=True, generator=torch.Generator().manual_seed(1))
    assert torch.all((hard == 0) | (hard == 1)) and torch.all(hard.sum(-1) == 1)
    (hard @ c).sum().backward()
    b = logits.clone().requires_grad_()
    soft = gumbel_softmax(b, 0.7, generator=torch.Generator().manual_seed(1))     # the same noise
    (soft @ c).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.equal(hard.detach().argmax(-1), soft.detach().argmax(-1))


def test_gumbel_samples_follow_the_softmax():
    logits = torch.tensor([1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    counts = torch.stack([gumbel_softmax(logits, hard=True, generator=g).detach() for _ in range(4000)]).mean(0)
    torch.testing.assert_close(counts, torch.softmax(logits, 0), atol=0.03, rtol=0)


def test_sample_hard_returns_log_probabilities_of_the_sampled_positions():
    scores = torch.randn(5, 7)
    idx, log_p = sample_hard(scores, torch.Generator().manual_seed(0))
    torch.testing.assert_close(log_p, torch.log_softmax(scores, -1).gather(-1, idx[:, None]).squeeze(-1))


@given(st.integers(0, 2**31 - 1), st.integers(0, 4))
def test_local_p_weights_are_the_gaussian_scaled_window_softmax(seed, window):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    centres = 8 * torch.rand(2, 3, generator=g, dtype=torch.float64)
    w = local_window_weights(scores, centres, window, gaussian=True)
    sigma = max(window, 1) / 2
    for b in range(2):
        for t in range(3):
            p = centres[b, t].item()
            keep = [s for s in range(9) if abs(s - round(p)) <= window]
            soft = torch.softmax(scores[b, t, keep], 0)
            ref = torch.zeros(9, dtype=torch.float64)
            for i, s in enumerate(keep):
                ref[s] = soft[i] * math.exp(-((s - p) ** 2) / (2 * sigma**2))
            torch.testing.assert_close(w[b, t], ref)


def test_local_m_equals_global_attention_restricted_to_the_window():
    torch.manual_seed(0)
    layer = LuongAttention(4, 5, "local-m", window=2).double()
    q, k, v = torch.randn(2, 6, 4).double(), torch.randn(2, 6, 5).double(), torch.randn(2, 6, 3).double()
    out, w, centres = layer(q, k, v)
    torch.testing.assert_close(centres[0], torch.arange(6, dtype=torch.float64))
    band = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs() <= 2
    ref, ref_w = basics.scaled_dot_product_attention(q, layer.W(k), v, band, scale=1.0)
    torch.testing.assert_close(w, ref_w)
    torch.testing.assert_close(out, ref)
    g = LuongAttention(4, 5, "global").double()
    g.load_state_dict(layer.state_dict())
    torch.testing.assert_close(g(q, k, v)[1], torch.softmax(q @ layer.W(k).transpose(-2, -1), -1))
    lp = LuongAttention(4, 5, "local-p", window=2).double()
    _, wp, cp = lp(q, k, v)
    # Luong et al. (2015), eq. 9: p_t = S * sigmoid(v_p^T tanh(W_p h_t)), S = source length (6 here)
    want = 6 * torch.sigmoid(lp.v_p(torch.tanh(lp.W_p(q)))).squeeze(-1)
    torch.testing.assert_close(cp, want)
    assert torch.all((cp >= 0) & (cp <= 6)) and wp.shape == (2, 6, 6)
    assert torch.all(wp.sum(-1) < 1)                             # the Gaussian is not renormalised


@given(st.integers(0, 2**31 - 1), st.integers(0, 4))
def test_local_p_rows_sum_to_less_than_one(seed, window):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 12, generator=g, dtype=torch.float64)
    centres = 12 * torch.rand(3, generator=g, dtype=torch.float64)
    sums = local_window_weights(scores, centres, window, gaussian=True).sum(-1)
    # (a centre above S - 1/2 with window 0 has no key in its window: zero weights, never NaN)
    assert torch.all(sums <= 1 + 1e-12) and torch.all(sums >= 0)
    inside = local_window_weights(scores, centres.clamp(max=11), window, gaussian=True).sum(-1)
    assert torch.all(inside > 0) and torch.all(inside <= 1 + 1e-12)
    # local-m (no Gaussian) rows with a key in the window sum to exactly 1
    torch.testing.assert_close(local_window_weights(scores, centres.clamp(max=11), window).sum(-1),
                               torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("layers, k, d", [(1, 3, 1), (3, 3, 1), (2, 5, 1), (4, 3, 2)])
def test_receptive_field_of_conv_stacks_is_the_closed_form(layers, k, d):
    convs = torch.nn.Sequential(*[torch.nn.Conv1d(2, 2, k, padding=(k // 2) * d, dilation=d) for _ in range(layers)]).double()
    rf = receptive_field(lambda x: convs(x.transpose(1, 2)).transpose(1, 2), 64, 2, 32).nonzero().flatten()
    span = int(rf.max() - rf.min()) + 1
    assert span == conv_receptive_field(layers, k, d)          # the closed form is the span
    assert int(rf.min() + rf.max()) == 64                       # centred on position 32
    if d == 1:
        assert len(rf) == span                                  # without dilation: no holes


def test_receptive_field_of_local_attention_grows_by_the_window_per_layer():
    torch.manual_seed(0)
    layers = [LocalAttentionTagger(4, 4, window=2).double() for _ in range(3)]

    def stack(n):
        def f(x):
            for layer in layers[:n]:
                x = layer(x)[0]
            return x
        return f

    for n in (1, 2, 3):
        assert int(receptive_field(stack(n), 40, 4, 20).sum()) == 1 + 2 * 2 * n


@pytest.mark.parametrize("mode", ["soft", "reinforce", "gumbel"])
def test_every_selector_learns_the_marked_item(mode):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = MarkerSelector(9, 8, mode)
    opt = torch.optim.Adam(model.parameters(), 0.02)
    for _ in range(300):
        x, y = marked_item_task(64, 10, generator=g)
        loss, _ = model.loss(x, y, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, y = marked_item_task(500, 10, generator=g)
    assert (model(x)[0].argmax(-1) == y).float().mean() > 0.95


def test_local_attention_solves_copy_after_marker():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = LocalAttentionTagger(10, 8, window=4)

    def batch(step):
        return copy_after_marker_task(64, 36, 4, generator=g)

    fit_stream(model, batch, loss_fn=sequence_cross_entropy, steps=400, lr=1e-2)
    x, y = copy_after_marker_task(300, 36, 4, generator=g)
    keep = y != -100
    assert (model(x)[0].argmax(-1)[keep] == y[keep]).float().mean() > 0.97


def test_task_generators():
    x, y = marked_item_task(5, 6, 4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 6, 5) and torch.equal(x[..., 4].sum(1), torch.ones(5))
    assert torch.equal(y, x[..., :4][x[..., 4] == 1].argmax(-1))
    x, y = copy_after_marker_task(3, 20, 2, 5, generator=torch.Generator().manual_seed(0))
    for b in range(3):
        m = int(x[b, :, 5].argmax())
        assert int(x[b, :, 6].argmax()) == m + 1
        assert set(y[b][y[b] != -100].tolist()) == {int(x[b, m + 1, :5].argmax())}
        assert int((y[b] != -100).sum()) == len([t for t in range(20) if abs(t - m - 1) <= 2])


def test_conv_tagger_shapes():
    logits, none = ConvTagger(10, 8, 4, depth=2)(torch.randn(2, 36, 10))
    assert logits.shape == (2, 36, 8) and none is None


@pytest.mark.parametrize("call, exc, word", [
    (lambda: gumbel_softmax(torch.zeros(3), tau=0), ValueError, "tau"),
    (lambda: local_window_weights(torch.zeros(2, 3), torch.zeros(3), 1), ValueError, "centres"),
    (lambda: local_window_weights(torch.zeros(2, 3), torch.zeros(2), -1), ValueError, "window"),
    (lambda: LuongAttention(2, 2, "nearby"), ValueError, "mode"),
    (lambda: MarkerSelector(3, 2, "argmax"), ValueError, "mode"),
    (lambda: ConvTagger(3, 2, 3, depth=4), ValueError, "depth"),
    (lambda: DynamicConvTagger(3, 2, 2, hidden=6, heads=4), ValueError, "heads"),
    (lambda: shifted_copy_task(2, 4, 4), ValueError, "shift"),
    (lambda: StackedMarkerSelectors([MarkerSelector(3, 2), MarkerSelector(3, 2, "gumbel")]), ValueError, "mode"),
    (lambda: StackedMarkerSelectors([]), TypeError, "models"),
    (lambda: StackedMarkerSelectors([MarkerSelector(3, 2)] * 2).scores(torch.zeros(3, 4, 5, 3)), ValueError, "x"),
    (lambda: scorer_gradient_draws(MarkerSelector(3, 2), torch.zeros(2, 4, 3), torch.zeros(2).long(), 0),
     ValueError, "draws"),
    (lambda: receptive_field(lambda x: x, 5, 1, 7), ValueError, "position"),
    (lambda: conv_receptive_field(0, 3), ValueError, "num_layers"),
    (lambda: window_recall_task(2, 36, 4, num_keys=7), ValueError, "num_keys"),
    (lambda: window_recall_task(2, 8, 4), ValueError, "length"),
    (lambda: window_recall_task(2, 36, 0), ValueError, "window"),
])
def test_bad_input_names_the_argument(call, exc, word):
    with pytest.raises(exc, match=word):
        call()


def test_reinforce_baseline_updates_only_when_asked():
    g = torch.Generator().manual_seed(0)
    x, y = marked_item_task(16, 10, generator=g)
    model = MarkerSelector(9, 8, "reinforce")
    model.loss(x, y, g, update_baseline=False)
    assert model.baseline.item() == 0.0
    model.loss(x, y, torch.Generator().manual_seed(5))
    idx, _ = sample_hard(model.scores(x), torch.Generator().manual_seed(5))
    w = torch.nn.functional.one_hot(idx, 10).float()
    per_example = torch.nn.functional.cross_entropy(model.classifier((w[..., None] * x).sum(1)), y, reduction="none")
    torch.testing.assert_close(model.baseline, 0.1 * per_example.mean().detach())


@pytest.mark.parametrize("mode", ["soft", "reinforce", "gumbel"])
def test_a_stack_of_one_equals_the_model(mode):
    torch.manual_seed(0)
    model = MarkerSelector(9, 8, mode).double()
    stack = StackedMarkerSelectors([model])
    x, y = marked_item_task(12, 7, generator=torch.Generator().manual_seed(1))
    x = x.double()
    for _ in range(2):                                          # the second call uses the updated baseline
        loss, acc = model.loss(x, y, torch.Generator().manual_seed(2))
        s_loss, s_acc = stack.loss(x[None], y[None], torch.Generator().manual_seed(2))
        torch.testing.assert_close(s_loss, loss)
        assert s_acc.item() == acc
        torch.testing.assert_close(stack.baseline[0], model.baseline)
        g_model = torch.autograd.grad(loss, model.scorer.weight)[0][0]
        g_stack = torch.autograd.grad(s_loss, stack.scorer_weight)[0][0]
        torch.testing.assert_close(g_stack, g_model)
    torch.testing.assert_close(stack(x)[0][0], model(x)[0])


def test_stacked_selectors_give_each_copy_its_own_gradient():
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(MarkerSelector(9, 8, "soft").double())
    stack = StackedMarkerSelectors(models)
    x, y = marked_item_task(3 * 10, 6, generator=torch.Generator().manual_seed(0))
    x, y = x.double().view(3, 10, 6, 9), y.view(3, 10)
    loss, _ = stack.loss(x, y)
    loss.backward()
    for m, model in enumerate(models):
        model.loss(x[m], y[m])[0].backward()
        torch.testing.assert_close(stack.scorer_weight.grad[m], model.scorer.weight.grad[0])
        torch.testing.assert_close(stack.classifier_weight.grad[m], model.classifier.weight.grad)
        assert all(torch.equal(a, b) for a, b in zip(stack.unstack(m).state_dict().values(),
                                                      model.state_dict().values()))


@pytest.mark.parametrize("mode", ["soft", "reinforce", "gumbel"])
def test_gradient_draws_leave_the_model_unchanged(mode):
    torch.manual_seed(0)
    model = MarkerSelector(9, 8, mode).double()
    model.baseline.fill_(0.7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = marked_item_task(8, 6, generator=torch.Generator().manual_seed(1))
    draws = scorer_gradient_draws(model, x.double(), y, 5, generator=torch.Generator().manual_seed(2))
    assert draws.shape == (5, 9)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.scorer.weight.grad is None
    if mode == "soft":                                          # no sampling: every draw is the gradient
        (want,) = torch.autograd.grad(model.loss(x.double(), y)[0], model.scorer.weight)
        torch.testing.assert_close(draws, want.expand(5, -1))
    else:
        assert not torch.allclose(draws[0], draws[1])


def test_relative_position_bias_is_a_bias_per_offset():
    torch.manual_seed(0)
    layer = LocalAttentionTagger(5, 3, window=2, relative_positions=True).double()
    with torch.no_grad():
        layer.offset_bias.copy_(torch.randn(5))
    x = torch.randn(2, 7, 5, dtype=torch.float64)
    _, w = layer(x)
    scores = layer.q(x) @ layer.k(x).transpose(-2, -1) / 4.0
    for i in range(7):
        for j in range(7):
            if abs(i - j) <= 2:
                scores[:, i, j] += layer.offset_bias[j - i + 2]
    band = (torch.arange(7)[:, None] - torch.arange(7)[None, :]).abs() <= 2
    torch.testing.assert_close(w, torch.softmax(scores.masked_fill(~band, float("-inf")), -1))


def test_dynamic_convolution_against_a_loop():
    torch.manual_seed(0)
    layer = DynamicConvTagger(6, 3, window=2, hidden=8, heads=2).double()
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    logits, kernels = layer(x)
    assert kernels.shape == (2, 9, 2, 5)
    torch.testing.assert_close(kernels.sum(-1), torch.ones(2, 9, 2, dtype=torch.float64))
    a, b = layer.inp(x).chunk(2, -1)
    v = a * torch.sigmoid(b)                                            # GLU
    ref = torch.zeros(2, 9, 8, dtype=torch.float64)
    for i in range(9):
        k = torch.softmax(layer.kernel(v[:, i]).view(2, 2, 5), -1)      # from position i only
        for o in range(-2, 3):
            if 0 <= i + o < 9:
                for h in range(2):
                    ref[:, i, 4 * h:4 * h + 4] += k[:, h, o + 2, None] * v[:, i + o, 4 * h:4 * h + 4]
    torch.testing.assert_close(logits, layer.out(ref))
    assert int(receptive_field(lambda t: layer(t)[0], 20, 6, 10).sum()) == 5


def test_shifted_copy_task():
    x, y = shifted_copy_task(4, 10, 3, 5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 10, 5) and torch.all(y[:, :3] == -100)
    assert torch.equal(y[:, 3:], x.argmax(-1)[:, :7])


def test_fit_seeds_equals_separate_trainings():
    torch.manual_seed(0)
    data = [copy_after_marker_task(2 * 8, 12, 2, generator=torch.Generator().manual_seed(s)) for s in range(5)]

    # float64: Adam divides by the root of the squared gradients, so float32 rounding differences
    # between the vmapped and the plain forward pass grow wherever a gradient is near zero
    data = [(x.double(), y) for x, y in data]

    def batch(step):
        x, y = data[step - 1]
        return x.view(2, 8, 12, -1), y.view(2, 8, 12)

    models = fit_seeds(lambda: LocalAttentionTagger(10, 8, 2).double(), [3, 4], batch,
                       loss_fn=sequence_cross_entropy, steps=5, lr=1e-2)
    for m, seed in enumerate([3, 4]):
        torch.manual_seed(seed)
        ref = LocalAttentionTagger(10, 8, 2).double()
        opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
        for x, y in data:
            loss = sequence_cross_entropy(ref(x.view(2, 8, 12, -1)[m])[0], y.view(2, 8, 12)[m])
            opt.zero_grad()
            loss.backward()
            opt.step()
        for a, b in zip(models[m].parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


@given(st.integers(1, 4), st.integers(0, 12), st.integers(0, 3), st.integers(0, 1000))
def test_window_recall_task_against_a_loop(window, extra_length, extra_keys, seed):
    L, num_keys, V = 2 * window + 1 + extra_length, 2 * window + extra_keys, 5
    x, y = window_recall_task(3, L, window, num_keys, V, generator=torch.Generator().manual_seed(seed))
    keys, symbols, query_keys = x[..., :num_keys], x[..., num_keys:num_keys + V], x[..., num_keys + V:]
    assert x.shape == (3, L, 2 * num_keys + V) and torch.equal(symbols.sum(-1), torch.ones(3, L))
    block = 2 * window + 1
    for b in range(3):
        for t in range(L):
            start = t - t % block
            if t % block == window and start + block <= L:            # a query
                assert query_keys[b, t].sum() == 1 and keys[b, t].sum() == 0
                nbrs = [start + o for o in range(block) if o != window]
                assert len({int(keys[b, j].argmax()) for j in nbrs}) == 2 * window      # distinct keys
                match = [j for j in nbrs if torch.equal(keys[b, j], query_keys[b, t])]
                assert len(match) == 1 and y[b, t] == symbols[b, match[0]].argmax()
            else:
                assert y[b, t] == -100 and query_keys[b, t].sum() == 0


def test_local_attention_solves_window_recall_where_a_cnn_does_not():
    g = torch.Generator().manual_seed(0)
    x_t, y_t = window_recall_task(200, 36, 4, generator=torch.Generator().manual_seed(1))
    accuracy = {}
    for name, make in {"attention": lambda: LocalAttentionTagger(24, 8, 4),
                       "cnn": lambda: ConvTagger(24, 8, 4, hidden=32, depth=2)}.items():
        torch.manual_seed(0)
        model = make()
        fit_stream(model, lambda step: window_recall_task(32, 36, 4, generator=g), loss_fn=sequence_cross_entropy,
                   steps=300, lr=1e-2)
        keep = y_t != -100
        with torch.no_grad():
            accuracy[name] = (model(x_t)[0].argmax(-1)[keep] == y_t[keep]).float().mean().item()
    assert accuracy["attention"] > 0.95 and accuracy["cnn"] < 0.6, accuracy
