"""The capstone's attributions and their references, against independent computations.

(Rollout, the permutation and uniform weights of attention are tested in test_transformer.py,
beside the model whose hooks they use.)
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attn_course.interpret import (
    GRULanguageModel,
    GRUStack,
    gradient_attribution,
    gradient_times_input,
    input_gradient,
    jensen_shannon,
    leave_one_out,
    rank_correlation,
    top1_drop,
    total_variation,
)
from attn_course.transformer import TinyTransformer

# --- gradients ---------------------------------------------------------------------------------


def test_gradient_times_input_of_a_linear_score_is_each_tokens_exact_contribution():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    attribution = gradient_times_input(lambda e: (e * w).sum((1, 2)), x)
    torch.testing.assert_close(attribution, (x * w).sum(-1))
    # completeness: for a linear score the attributions add up to the score
    torch.testing.assert_close(attribution.sum(-1), (x * w).sum((1, 2)))


def test_input_gradient_equals_the_jacobian_of_each_example_and_leaves_the_input_alone():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    before = x.clone()

    def score(e):                                    # nonlinear, with interactions between tokens
        return torch.tanh(e[:, 0] * e[:, 1]).sum(-1) + (e[:, 2] ** 3).sum(-1)

    grad = input_gradient(score, x)
    for b in range(4):
        jac = torch.autograd.functional.jacobian(lambda e: score(e[None])[0], x[b])
        torch.testing.assert_close(grad[b], jac)
    assert torch.equal(x, before) and not x.requires_grad


def test_input_gradient_rejects_a_score_that_is_not_one_number_per_example():
    with pytest.raises(ValueError, match="one score per example"):
        input_gradient(lambda e: e.sum(-1), torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="inputs"):
        input_gradient(lambda e: e.sum((1, 2)), torch.ones(2, 3, 4, dtype=torch.long))


@pytest.mark.parametrize("method", ["times_input", "norm"])
def test_gradient_attribution_of_a_transformer_matches_autograd_per_example(method):
    torch.manual_seed(0)
    model = TinyTransformer(7, 16, 2, 2).double()
    ids = torch.randint(0, 7, (3, 6))
    token = torch.tensor([1, 2, 3])
    got = gradient_attribution(model, ids, 4, token, method=method)
    for b in range(3):
        e = model.embed(ids[b:b + 1]).detach().requires_grad_(True)
        model(ids[b:b + 1], embeddings=e)[0][0, 4, token[b]].backward()
        want = (e.grad * e).sum(-1)[0] if method == "times_input" else e.grad.norm(dim=-1)[0]
        torch.testing.assert_close(got[b], want.detach())
    with pytest.raises(ValueError, match="method"):
        gradient_attribution(model, ids, 4, method="integrated")


# --- leave one out -----------------------------------------------------------------------------


def _weighted_mean(values):
    def score(keep):                                  # the mean of the kept values: erasure has interactions
        k = keep.double()
        return (values * k).sum(-1) / k.sum(-1).clamp_min(1)
    return score


def test_leave_one_out_equals_erasing_each_token_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, -1.0, 5.0, 2.0]], dtype=torch.float64)
    keep = torch.tensor([[True, True, True, True], [True, False, True, True]])
    before = keep.clone()
    drops = leave_one_out(_weighted_mean(values), keep)
    assert torch.equal(keep, before)
    full = torch.tensor([3.0, 7 / 3], dtype=torch.float64)
    want = torch.empty(2, 4, dtype=torch.float64)
    for b in range(2):
        for j in range(4):
            rest = [values[b, i].item() for i in range(4) if keep[b, i] and i != j]
            want[b, j] = full[b] - sum(rest) / max(1, len(rest))
    torch.testing.assert_close(drops, want)
    assert drops[1, 1] == 0                             # already hidden: erasing it changes nothing


def test_leave_one_out_keeps_the_scores_trailing_axes_and_takes_a_subset_of_positions():
    values = torch.randn(3, 5, dtype=torch.float64)

    def score(keep):                                  # (B, 2): two scores per example
        s = _weighted_mean(values)(keep)
        return torch.stack([s, 2 * s], -1)

    keep = torch.ones(3, 5, dtype=torch.bool)
    drops = leave_one_out(score, keep, positions=[4, 0])
    assert drops.shape == (3, 2, 2)
    torch.testing.assert_close(drops[..., 1], 2 * drops[..., 0])
    torch.testing.assert_close(drops[:, :, 0], leave_one_out(_weighted_mean(values), keep)[:, [4, 0]])
    with pytest.raises(ValueError, match="positions"):
        leave_one_out(score, keep, positions=[5])
    with pytest.raises(TypeError, match="keep"):
        leave_one_out(score, keep.float())


def test_leave_one_out_of_a_transformer_is_the_drop_when_its_key_is_masked():
    torch.manual_seed(0)
    model = TinyTransformer(7, 16, 2, 2).double().eval()
    ids = torch.randint(0, 7, (2, 6))

    def p_last(keep):
        with torch.no_grad():
            return model(ids, key_mask=keep)[0][:, -1].softmax(-1)[:, 3]

    drops = leave_one_out(p_last, torch.ones(2, 6, dtype=torch.bool), positions=[1])
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[:, 1] = False
    torch.testing.assert_close(drops[:, 0], p_last(torch.ones(2, 6, dtype=torch.bool)) - p_last(keep))


# --- comparing attributions --------------------------------------------------------------------


def _spearman_reference(a, b):
    """Spearman's rho the textbook way: sort, give ties the mean of their positions, Pearson of ranks."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        i = 0
        while i < len(x):
            j = i
            while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
                j += 1
            r[order[i:j + 1]] = (i + j) / 2 + 1
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def test_rank_correlation_examples():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0], [0.0, 5.0, 5.0, 9.0]])
    b = torch.tensor([[10.0, 20.0, 30.0, 400.0], [4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    rho = rank_correlation(a, b)
    torch.testing.assert_close(rho[:3], torch.tensor([1.0, -1.0, 0.0]))
    assert rho[3].item() == pytest.approx(_spearman_reference(a[3], b[3]))
    with pytest.raises(ValueError, match="one shape"):
        rank_correlation(a, b[:, :3])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=2, max_size=9))
def test_rank_correlation_matches_the_textbook_computation_with_ties(pairs):
    a = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    b = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    rho = rank_correlation(a, b).item()
    assert rho == pytest.approx(_spearman_reference(a.numpy(), b.numpy()), abs=1e-12)
    assert -1 - 1e-12 <= rho <= 1 + 1e-12
    # ranks only: a strictly increasing transform of either input changes nothing
    assert rank_correlation(torch.exp(a), b ** 3).item() == pytest.approx(rho, abs=1e-12)
    assert rank_correlation(b, a).item() == pytest.approx(rho, abs=1e-12)


def test_top1_drop_picks_the_allowed_position_of_largest_attribution():
    attribution = torch.tensor([[0.1, 0.9, 0.3, 0.9], [5.0, -1.0, 2.0, 0.0]])
    drops = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    torch.testing.assert_close(top1_drop(attribution, drops), torch.tensor([2.0, 10.0]))   # first of ties
    allowed = torch.tensor([[True, False, True, True], [False, True, True, True]])
    torch.testing.assert_close(top1_drop(attribution, drops, allowed), torch.tensor([4.0, 30.0]))
    torch.testing.assert_close(top1_drop(drops, drops, allowed), torch.tensor([4.0, 40.0]))   # the best possible
    with pytest.raises(ValueError, match="one shape"):
        top1_drop(attribution, drops[:, :3])
    with pytest.raises(TypeError, match="allowed"):
        top1_drop(attribution, drops, allowed.float())


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(2, 8))
def test_top1_drop_is_at_most_the_best_possible(seed, L):
    g = torch.Generator().manual_seed(seed)
    attribution, drops = torch.randn(5, L, generator=g), torch.randn(5, L, generator=g)
    assert (top1_drop(attribution, drops) <= top1_drop(drops, drops)).all()
    assert torch.equal(top1_drop(drops, drops), drops.max(-1).values)


def test_total_variation_and_jensen_shannon_closed_forms():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.75, 0.25]], dtype=torch.float64)
    torch.testing.assert_close(total_variation(p, q), torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64))
    m = 0.5
    kl = 0.25 * math.log(0.25 / m) + 0.75 * math.log(0.75 / m)
    torch.testing.assert_close(jensen_shannon(p, q), torch.tensor([math.log(2), 0.0, kl], dtype=torch.float64))


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(2, 7))
def test_jensen_shannon_is_symmetric_bounded_and_zero_only_for_equal_distributions(seed, K):
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(3 * torch.randn(4, K, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(3 * torch.randn(4, K, generator=g, dtype=torch.float64), -1)
    js = jensen_shannon(p, q)
    torch.testing.assert_close(js, jensen_shannon(q, p))
    assert (js >= 0).all() and (js <= math.log(2) + 1e-12).all()
    torch.testing.assert_close(jensen_shannon(p, p), torch.zeros(4, dtype=torch.float64))
    # Pinsker on each half: KL(p || m) >= 2 TV(p, m)^2 = TV(p, q)^2 / 2, so JSD >= TVD^2 / 2
    assert (total_variation(p, q) ** 2 / 2 <= js + 1e-12).all()


# --- the recurrent baseline --------------------------------------------------------------------


def test_gru_language_model_equals_torch_gru_with_the_same_weights():
    torch.manual_seed(0)
    model = GRULanguageModel(11, 34, 2).double()
    ids = torch.randint(0, 11, (3, 9))
    states, _ = model.gru(model.embed(ids))                 # torch's fused kernel
    torch.testing.assert_close(model(ids)[0], model.head(states))
    assert sum(p.numel() for p in model.parameters()) == 15039
    assert sum(p.numel() for p in TinyTransformer(11, 24, 4, 2).parameters()) == 15035


def test_gru_language_model_is_causal_and_rejects_bad_ids():
    torch.manual_seed(0)
    model = GRULanguageModel(8, 12, 1)
    ids = torch.randint(0, 8, (2, 7))
    later = ids.clone()
    later[:, 4:] = (later[:, 4:] + 3) % 8
    torch.testing.assert_close(model(ids)[0][:, :4], model(later)[0][:, :4])
    with pytest.raises(ValueError, match="ids"):
        model(torch.full((1, 3), 8))
    with pytest.raises(TypeError, match="ids"):
        model(ids.float())


def test_gru_stack_gives_each_copy_its_own_output_and_its_own_gradient():
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(GRULanguageModel(9, 10, 2).double())
    stack = GRUStack(models)
    ids = torch.randint(0, 9, (3, 4, 6))
    out = stack(ids)
    for m, model in enumerate(models):
        torch.testing.assert_close(out[m], model(ids[m])[0])
    out[1].square().sum().backward()
    models[1](ids[1])[0].square().sum().backward()
    grads = dict(zip(stack._names, stack.stacked))
    for name, p in models[1].named_parameters():
        torch.testing.assert_close(grads[name].grad[1], p.grad)
        assert grads[name].grad[0].abs().max() == 0
    with pytest.raises(TypeError, match="ids"):
        stack(ids[:2])
    with pytest.raises(ValueError, match="ids"):
        stack(torch.full((3, 1, 2), 9))
    with pytest.raises(TypeError, match="GRULanguageModel"):
        GRUStack([TinyTransformer(9, 8, 2, 1)])
