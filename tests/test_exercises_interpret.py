"""The capstone's exercises (``interpret.*``): each checker rejects the plausible wrong answers
with a hint that names the mistake, and accepts right answers written in another style."""

import re

import numpy as np
import pytest
import torch

from attn_course.exercises import check, list_exercises, solution

INTERPRET = [n for n in list_exercises() if n.startswith("interpret.")]


def test_the_capstone_has_its_six_auto_checked_exercises():
    assert INTERPRET == sorted(["interpret.attention_rollout", "interpret.rollout_with_residual",
                                "interpret.leave_one_out", "interpret.gradient_times_input",
                                "interpret.rank_correlation", "interpret.top1_drop"])


@pytest.mark.parametrize("name", INTERPRET)
def test_the_reference_solution_passes_strictly(name, capsys):
    assert check(name, solution(name), strict=True) is True
    assert "✅" in capsys.readouterr().out


# --- wrong answers ---------------------------------------------------------------------------------

def _rollout(mistake):
    def fn(weights):
        eye = torch.eye(weights[0].shape[-1], dtype=weights[0].dtype)
        out = eye
        for a in weights:
            if mistake == "renormalise first":
                a = a / a.sum(-1, keepdim=True)
            if mistake != "no residual":
                a = 0.5 * a + 0.5 * eye
            if mistake == "columns":
                a = a / a.sum(-2, keepdim=True)
            elif mistake not in ("no renormalisation", "renormalise first"):
                a = a / a.sum(-1, keepdim=True)
            if mistake == "right":
                out = out @ a
            elif mistake == "elementwise":
                out = a * out if out is not eye else a
            else:
                out = a @ out
        return out
    return fn


def _rollout_residual(mistake):
    def fn(weights, r):
        B, H, L, _ = weights[0].shape
        eye = torch.eye(L, dtype=weights[0].dtype)
        if mistake == "per head":
            out = eye.expand(B, H, L, L)
            for w in weights:
                a = (1 - r) * w + r * eye
                out = (a / a.sum(-1, keepdim=True)) @ out
            return out.mean(1)
        out = eye.expand(B, L, L)
        for w in weights:
            m = w.sum(1) if mistake == "sum" else w.mean(1)
            a = r * m + (1 - r) * eye if mistake == "swap" else (1 - r) * m + r * eye
            if mistake == "columns":
                a = a / a.sum(-2, keepdim=True)
            elif mistake != "no renormalisation":
                a = a / a.sum(-1, keepdim=True)
            out = out @ a if mistake == "right" else a @ out
        return out
    return fn


def _loo(mistake):
    def fn(score, keep):
        start = torch.ones_like(keep) if mistake == "all true" else keep
        full = score(start)
        drops, erased = [], start.clone()
        for j in range(keep.shape[1]):
            if mistake == "only":
                erased = torch.zeros_like(keep)
                erased[:, j] = keep[:, j]
            else:
                if mistake != "cumulative":
                    erased = start.clone()
                erased[:, j] = False
            d = full - score(erased)
            drops.append({"sign": -d, "relative": d / full, "abs": d.abs()}.get(mistake, d))
        return torch.stack(drops, dim=1)
    return fn


def _loo_in_place(score, keep):
    full = score(keep)
    drops = []
    for j in range(keep.shape[1]):
        was = keep[:, j].clone()
        keep[:, j] = False                      # modifies the caller's tensor ...
        drops.append(full - score(keep))
        keep[:, j] = ~was                       # ... and puts it back wrongly
    return torch.stack(drops, dim=1)


def _loo_float_mask(score, keep):
    return torch.stack([score(keep) - score(keep.float()) for _ in range(keep.shape[1])], 1)


def _gxi(mistake):
    def fn(f, inputs):
        x = inputs.clone().requires_grad_(True)
        out = f(x)
        (out.mean() if mistake == "mean" else out.sum()).backward()
        g = x.grad
        return {"grad": g.sum(-1), "norm": g.norm(dim=-1), "abs": (g * inputs).sum(-1).abs(),
                "mean": (g * inputs).sum(-1), "tokens": (g * inputs).sum(-2)}[mistake]
    return fn


def _gxi_in_place(f, inputs):
    inputs.requires_grad_(True)
    f(inputs).sum().backward()
    with torch.no_grad():
        inputs.mul_(inputs.grad)                # overwrites the caller's inputs
    return inputs.sum(-1).detach()


def _pearson(x, y):
    x, y = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.square().sum(-1) * y.square().sum(-1)).sqrt()


def _mean_ranks(x):
    return (x[:, None, :] < x[:, :, None]).sum(-1) + ((x[:, None, :] == x[:, :, None]).sum(-1) + 1) / 2


def _spearman(mistake):
    def fn(a, b):
        if mistake == "pearson":
            return torch.nan_to_num(_pearson(a, b))
        if mistake == "argsort":
            return torch.nan_to_num(_pearson(a.argsort(-1).float(), b.argsort(-1).float()))
        if mistake == "ordinal":
            def ordinal(x):
                return torch.argsort(torch.argsort(x, dim=-1, stable=True), dim=-1).float()
            return torch.nan_to_num(_pearson(ordinal(a), ordinal(b)))
        ra, rb = _mean_ranks(a).float(), _mean_ranks(b).float()
        if mistake == "formula":
            n = a.shape[-1]
            return 1 - 6 * (ra - rb).square().sum(-1) / (n * (n * n - 1))
        if mistake == "nan":
            return _pearson(ra, rb)
        if mistake == "flat":
            flat = solution("interpret.rank_correlation")(a.reshape(1, -1), b.reshape(1, -1))
            return flat.expand(a.shape[0])
        raise AssertionError(mistake)
    return fn


def _top1(mistake):
    def fn(attribution, drops, allowed):
        a = {"argmin": -attribution, "abs": attribution.abs()}.get(mistake, attribution)
        ok = torch.ones_like(allowed) if mistake == "no mask" else allowed
        ranked = a.masked_fill(~ok, float("-inf"))
        if mistake == "last tie":
            idx = ranked.shape[-1] - 1 - ranked.flip(-1).argmax(-1, keepdim=True)
        else:
            idx = ranked.argmax(-1, keepdim=True)
        best_ok = torch.ones_like(allowed) if mistake in ("no mask", "best unmasked") else allowed
        best = drops.masked_fill(~best_ok, float("-inf")).max(-1).values
        top = best if mistake == "best twice" else drops.gather(-1, idx)[:, 0]
        return top, best
    return fn


WRONG = [
    ("interpret.attention_rollout", _rollout("no residual"), "residual connection"),
    ("interpret.attention_rollout", _rollout("right"), "on the left"),
    ("interpret.attention_rollout", _rollout("no renormalisation"), "renormalise each row"),
    ("interpret.attention_rollout", _rollout("columns"), r"ROWS \(a.sum\(-1\)\), not the columns"),
    ("interpret.attention_rollout", _rollout("renormalise first"), "AFTER adding the identity"),
    ("interpret.attention_rollout", _rollout("elementwise"), "matrix product"),
    ("interpret.rollout_with_residual", _rollout_residual("swap"), "weight of the identity"),
    ("interpret.rollout_with_residual", _rollout_residual("per head"), "average the heads first"),
    ("interpret.rollout_with_residual", _rollout_residual("sum"), "do not sum them"),
    ("interpret.rollout_with_residual", _rollout_residual("no renormalisation"), "renormalise the rows"),
    ("interpret.rollout_with_residual", _rollout_residual("columns"), "ROWS .*not the columns"),
    ("interpret.rollout_with_residual", _rollout_residual("right"), "on the left"),
    ("interpret.leave_one_out", _loo("sign"), "MINUS the score with token j hidden"),
    ("interpret.leave_one_out", _loo("only"), "hide only token j"),
    ("interpret.leave_one_out", _loo("cumulative"), "start every erasure from the given keep"),
    ("interpret.leave_one_out", _loo("all true"), "not from all True"),
    ("interpret.leave_one_out", _loo("relative"), "not divided by the full score"),
    ("interpret.leave_one_out", _loo("abs"), "keep the sign"),
    ("interpret.leave_one_out", _loo_in_place, "changed its inputs in place"),
    ("interpret.leave_one_out", _loo_float_mask, "needs keep as a bool tensor"),
    ("interpret.gradient_times_input", _gxi("grad"), "multiply the gradient by the input"),
    ("interpret.gradient_times_input", _gxi("norm"), "gradient's norm"),
    ("interpret.gradient_times_input", _gxi("abs"), "keep the sign"),
    ("interpret.gradient_times_input", _gxi("mean"), "SUM of the scores"),
    ("interpret.gradient_times_input", _gxi("tokens"), "not over the tokens"),
    ("interpret.gradient_times_input", _gxi_in_place, "changed its inputs in place"),
    ("interpret.rank_correlation", _spearman("pearson"), "rank the values first"),
    ("interpret.rank_correlation", _spearman("argsort"), "argsort of argsort"),
    ("interpret.rank_correlation", _spearman("ordinal"), "mean of their ranks"),
    ("interpret.rank_correlation", _spearman("formula"), "holds only without ties"),
    ("interpret.rank_correlation", _spearman("nan"), "return 0 for it, not NaN"),
    ("interpret.rank_correlation", _spearman("flat"), "one correlation per row"),
    ("interpret.top1_drop", _top1("argmin"), "LARGEST attribution"),
    ("interpret.top1_drop", _top1("abs"), "signed"),
    ("interpret.top1_drop", _top1("no mask"), "only among the allowed positions"),
    ("interpret.top1_drop", _top1("best unmasked"), "allowed positions only"),
    ("interpret.top1_drop", _top1("last tie"), "FIRST position"),
    ("interpret.top1_drop", _top1("best twice"), "the ATTRIBUTION ranks first"),
]


@pytest.mark.parametrize("name, wrong, words", WRONG, ids=[f"{row[0]}-{i}" for i, row in enumerate(WRONG)])
def test_a_plausible_mistake_is_rejected_with_a_hint_that_names_it(name, wrong, words, capsys):
    assert check(name, wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ " + name), out
    assert re.search(words, out), out


def test_every_exercise_has_at_least_four_listed_mistakes():
    for name in INTERPRET:
        assert sum(row[0] == name for row in WRONG) >= 4, name


# --- right answers in another style -----------------------------------------------------------------

def _loo_batched(score, keep):
    """All erasures in one call is not possible (score takes (B, L)); a comprehension over positions."""
    eye = torch.eye(keep.shape[1], dtype=torch.bool)
    return torch.stack([score(keep) - score(keep & ~eye[j]) for j in range(keep.shape[1])], dim=-1)


def _gxi_functorch(fn, inputs):
    grad = torch.func.vmap(torch.func.grad(lambda e: fn(e[None])[0]))(inputs)   # per example, no backward()
    return (grad * inputs).sum(-1)


def _gxi_jacobian(fn, inputs):
    out = []
    for b in range(inputs.shape[0]):                    # one example at a time, with the full Jacobian
        jac = torch.autograd.functional.jacobian(lambda e: fn(e[None])[0], inputs[b])
        out.append((jac * inputs[b]).sum(-1))
    return torch.stack(out)


def _spearman_numpy(a, b):
    def ranks(x):
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
    rows = []
    for x, y in zip(a.numpy(), b.numpy()):
        rx, ry = ranks(x), ranks(y)
        rows.append(0.0 if rx.std() == 0 or ry.std() == 0 else np.corrcoef(rx, ry)[0, 1])
    return torch.tensor(rows, dtype=a.dtype)


def _top1_loop(attribution, drops, allowed):
    tops, bests = [], []
    for a, d, ok in zip(attribution.tolist(), drops.tolist(), allowed.tolist()):
        candidates = [j for j in range(len(a)) if ok[j]]
        top = max(candidates, key=lambda j: (a[j], -j))      # the largest, the first of ties
        tops.append(d[top])
        bests.append(max(d[j] for j in candidates))
    return [torch.tensor(tops), torch.tensor(bests)]        # a list for the tuple


@pytest.mark.parametrize("name, fn", [
    ("interpret.leave_one_out", _loo_batched),
    ("interpret.gradient_times_input", _gxi_functorch),
    ("interpret.gradient_times_input", _gxi_jacobian),
    ("interpret.rank_correlation", _spearman_numpy),
    ("interpret.top1_drop", _top1_loop),
], ids=["loo-mask-algebra", "gxi-functorch", "gxi-jacobian", "spearman-numpy", "top1-loop"])
def test_a_right_answer_in_another_style_passes(name, fn, capsys):
    assert check(name, fn) is True, capsys.readouterr().out
