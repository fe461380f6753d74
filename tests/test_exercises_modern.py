"""Chapter 11's chunked delta rule exercise (``modern.delta_chunk``): the checker rejects the
mistakes learners make, each with a hint that names it, and a loop over the tokens (right values,
sequential work); it accepts right answers written in other styles. Its reference (the package's
recurrence) is itself checked against an independent step-by-step loop."""

import pytest
import torch
import torch.nn.functional as F

from attn_course.exercises import check, solution
from attn_course.exercises import modern as ex


def run(fn, capsys):
    passed = check("modern.delta_chunk", fn)
    return passed, capsys.readouterr().out


def _tokens_loop(state, q, k, v, beta):
    """The recurrence, token by token: right values, C sequential steps."""
    S, outs = state.clone(), []
    for t in range(k.shape[-2]):
        kt, b = k[..., t, :], beta[..., t, None, None]
        S = S + b * (v[..., t, :, None] - S @ kt[..., :, None]) * kt[..., None, :]
        outs.append((S @ q[..., t, :, None])[..., 0])
    return torch.stack(outs, -2), S


def _parts(state, q, k, v, beta, *, plus=True, rhs_state=True, start=True, diagonal=0, solve=True):
    C = k.shape[-2]
    b = beta[..., :, None]
    A = (b * (k @ k.mT)).tril(-1)
    eye = torch.eye(C, dtype=k.dtype)
    rhs = b * (v - k @ state.mT) if rhs_state else b * v
    U = torch.linalg.solve_triangular(eye + A if plus else eye - A, rhs, upper=False) if solve else b * v
    S0 = state if start else torch.zeros_like(state)
    return q @ S0.mT + (q @ k.mT).tril(diagonal) @ U, S0 + U.mT @ k


@pytest.mark.parametrize("wrong, words", [
    (lambda *a: _parts(*a, solve=False), "additive update"),
    (lambda *a: _parts(*a, start=False, rhs_state=False), "start from the given state"),
    (lambda *a: _parts(*a, plus=False), "(I + A) U, not (I - A) U"),
    (lambda *a: _parts(*a, diagonal=-1), "keeps the diagonal"),
    (lambda *a: _parts(*a, rhs_state=False), "right-hand side is beta_t (v_t - S_0 k_t)"),
])
def test_chunk_rejects_each_listed_mistake_with_its_hint(wrong, words, capsys):
    passed, out = run(wrong, capsys)
    assert not passed and words in out, out


def test_chunk_rejects_a_loop_over_the_tokens(capsys):
    passed, out = run(_tokens_loop, capsys)
    assert not passed and "torch operations" in out and "C = 64" in out, out


def _by_inverse(state, q, k, v, beta):
    """Another style: the explicit inverse T = (I + A)^{-1} (the UT transform) and einsum."""
    C = k.shape[-2]
    b = beta.unsqueeze(-1)
    T = torch.linalg.inv(torch.eye(C, dtype=k.dtype) + torch.tril(b * torch.einsum("...td,...sd->...ts", k, k), -1))
    U = T @ (b * v - b * torch.einsum("...td,...vd->...tv", k, state))
    out = torch.einsum("...td,...vd->...tv", q, state) + torch.tril(torch.einsum("...td,...sd->...ts", q, k)) @ U
    return out, state + torch.einsum("...tv,...td->...vd", U, k)


@pytest.mark.parametrize("right", [solution("modern.delta_chunk"), _by_inverse])
def test_chunk_accepts_right_answers_in_other_styles(right, capsys):
    passed, out = run(right, capsys)
    assert passed, out


def test_chunk_reference_equals_an_independent_loop():
    g = torch.Generator().manual_seed(3)
    S = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    q, k = (F.normalize(torch.randn(2, 3, 11, 5, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    v = torch.randn(2, 3, 11, 4, generator=g, dtype=torch.float64)
    beta = torch.rand(2, 3, 11, generator=g, dtype=torch.float64)
    want_out, want_S = _tokens_loop(S, q, k, v, beta)
    for fn in (ex._chunk_expected, ex._chunk_solution):
        out, new_S = fn(S, q, k, v, beta)
        torch.testing.assert_close(out, want_out)
        torch.testing.assert_close(new_S, want_S)


def test_chunk_checker_leaves_no_case_untested_in_float32():
    described = [case.description for case, _ in ex.EXERCISES[[e.name for e in ex.EXERCISES].index(
        "modern.delta_chunk")].prepared()]
    assert any("float32" in d for d in described) and any("C = 64" in d for d in described)
