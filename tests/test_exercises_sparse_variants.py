"""New exercises of chapters 3 and 7: each checker rejects the mistakes learners make, with a hint
that names the mistake, and accepts right answers written in another style. The references the
checkers use are checked against independent ones (a loop over vectors, the dense causal mask)."""

import pytest
import torch
import torch.nn.functional as F

from attn_course import sparse
from attn_course.exercises import check
from attn_course.exercises import sparse as ex


def run(name, fn, capsys):
    passed = check(name, fn)
    return passed, capsys.readouterr().out


# --- sparse.lsh_buckets ------------------------------------------------------------------------------

def _proj(x, R):
    return x @ R


@pytest.mark.parametrize("wrong, words", [
    (lambda x, R: _proj(x, R).argmax(-1), "both signs"),
    (lambda x, R: torch.cat([-_proj(x, R), _proj(x, R)], -1).argmax(-1), "[x R, -x R]"),
    (lambda x, R: _proj(x, R).abs().argmax(-1), "the sign matters"),
    (lambda x, R: torch.cat([_proj(x, R), -_proj(x, R)], -1).argmin(-1), "argmax, not argmin"),
    (lambda x, R: torch.cat([_proj(x, R), -_proj(x, R)], -1).argmax(-1).float(), "integer"),
])
def test_lsh_buckets_rejects_the_usual_mistakes(wrong, words, capsys):
    passed, out = run("sparse.lsh_buckets", wrong, capsys)
    assert not passed and words in out, out


def test_lsh_buckets_rejects_modifying_the_input(capsys):
    def in_place(x, R):
        x /= x.norm(dim=-1, keepdim=True)
        p = x @ R
        return torch.cat([p, -p], -1).argmax(-1)

    passed, out = run("sparse.lsh_buckets", in_place, capsys)
    assert not passed and "in place" in out


def test_lsh_buckets_accepts_the_normalised_sign_style(capsys):
    def sign_style(x, R):
        p = torch.einsum("...d,dn->...n", F.normalize(x, dim=-1), R)
        best = p.abs().argmax(-1, keepdim=True)
        return (best + R.shape[1] * (p.gather(-1, best) < 0)).squeeze(-1)

    passed, out = run("sparse.lsh_buckets", sign_style, capsys)
    assert passed, out


def test_lsh_buckets_reference_against_a_loop():
    g = torch.Generator().manual_seed(0)
    x, R = torch.randn(2, 7, 5, generator=g), torch.randn(5, 3, generator=g)
    got = sparse.lsh_buckets(x, R)
    for b in range(2):
        for i in range(7):
            dirs = [R[:, j] for j in range(3)] + [-R[:, j] for j in range(3)]
            assert got[b, i] == max(range(6), key=lambda j: float(x[b, i] @ dirs[j]))


# --- sparse.causal_window_mask_mod -----------------------------------------------------------------

@pytest.mark.parametrize("wrong, words", [
    (lambda b, h, q, k, window: (q - k).abs() <= window, "causal"),
    (lambda b, h, q, k, window: (q >= k) & (q - k < window), "w + 1 keys"),
    (lambda b, h, q, k, window: (k >= q) & (k - q <= window), "kv_idx - q_idx"),
    (lambda b, h, q, k, window: q >= k, "more than `window` positions back"),
    (lambda b, h, q, k, window: q >= k and q - k <= window, "& and |"),
])
def test_mask_mod_rejects_the_usual_mistakes(wrong, words, capsys):
    passed, out = run("sparse.causal_window_mask_mod", wrong, capsys)
    assert not passed and words in out, out


def test_mask_mod_accepts_another_style(capsys):
    def between(b, h, q_idx, kv_idx, window):
        return (kv_idx <= q_idx) & (kv_idx >= q_idx - window)

    passed, out = run("sparse.causal_window_mask_mod", between, capsys)
    assert passed, out


@pytest.mark.skipif(not sparse.flex_available(), reason="FlexAttention needs torch >= 2.5")
def test_mask_mod_that_flex_cannot_trace_is_rejected(capsys):
    def data_dependent(b, h, q_idx, kv_idx, window):
        diff = q_idx - kv_idx
        if diff.numel() == 1:                            # under FlexAttention's vmap: a 0-d tensor
            return torch.tensor(bool(0 <= diff.item() <= window))
        return (diff >= 0) & (diff <= window)

    passed, out = run("sparse.causal_window_mask_mod", data_dependent, capsys)
    assert not passed and "FlexAttention could not use your mask_mod" in out, out


def test_mask_mod_reference_is_the_dense_causal_window():
    q, k = torch.arange(3, 9)[:, None], torch.arange(12)[None, :]
    expected = ex._mask_mod_expected(torch.tensor(0), torch.tensor(0), q, k, 2)
    for i in range(6):
        for j in range(12):
            assert bool(expected[i, j]) == (0 <= (i + 3) - j <= 2)
