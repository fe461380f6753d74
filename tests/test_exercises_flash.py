"""Chapter 8's exercises: each checker rejects the mistakes learners make, with a hint that names
the mistake, and accepts right answers written in another style. The references the checkers
use are themselves checked against independent ones (autograd, SDPA, a loop that counts)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from attn_course.exercises import check, solution
from attn_course.exercises import flash as ex


def run(name, fn, capsys):
    passed = check(name, fn)
    return passed, capsys.readouterr().out


# --- flash.merge_attention: shifting by one part's lse -------------------------------------------

def _merge_shift_by_first(out1, lse1, out2, lse2):
    safe = torch.where(torch.isfinite(lse1), lse1, torch.zeros_like(lse1))
    w1, w2 = torch.exp(lse1 - safe), torch.exp(lse2 - safe)
    total = w1 + w2
    return (w1[..., None] * out1 + w2[..., None] * out2) / total[..., None], safe + torch.log(total)


def test_merge_rejects_shifting_by_one_parts_lse(capsys):
    passed, out = run("flash.merge_attention", _merge_shift_by_first, capsys)
    assert not passed and "one part's lse" in out


# --- flash.flash_tile_step: a fully masked tile after finite scores, float32 extremes ----------------

def _tile_local_max(m, z, o, s, v):
    """FlashAttention-1 style: the tile's own max, then rescale both sides (NaN for an all -inf row)."""
    m_tile = s.amax(-1)
    p = torch.exp(s - m_tile[:, None])
    m_new = torch.maximum(m, m_tile)
    m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
    a_old, a_new = torch.exp(m - m_safe), torch.exp(m_tile - m_safe)
    return m_new, a_old * z + a_new * p.sum(-1), a_old[:, None] * o + a_new[:, None] * (p @ v)


def _tile_exp_without_max(m, z, o, s, v):
    p = torch.exp(s)
    return torch.maximum(m, s.amax(-1)), z + p.sum(-1), o + p @ v


def test_tile_step_rejects_the_tile_local_max_and_overflow(capsys):
    passed, out = run("flash.flash_tile_step", _tile_local_max, capsys)
    assert not passed and "fully masked row after finite scores" in out and "running max" in out
    passed, out = run("flash.flash_tile_step", _tile_exp_without_max, capsys)
    assert not passed


# --- flash.causal_flash_forward ---------------------------------------------------------------------

def _loop(q, k, v, bq, bk, mask_fn, skip=True):
    L_q, L_k = q.shape[0], k.shape[0]
    out = torch.zeros(L_q, v.shape[1], dtype=v.dtype)
    for q0 in range(0, L_q, bq):
        q1 = min(q0 + bq, L_q)
        qt = q[q0:q1] / math.sqrt(q.shape[1])
        m = torch.full((q1 - q0,), -math.inf, dtype=q.dtype)
        z = torch.zeros(q1 - q0, dtype=q.dtype)
        o = torch.zeros(q1 - q0, v.shape[1], dtype=q.dtype)
        for k0 in range(0, min(L_k, q1) if skip else L_k, bk):
            k1 = min(k0 + bk, L_k)
            s = mask_fn(qt @ k[k0:k1].T, q0, q1, k0, k1)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
            p = torch.exp(s - m_safe[:, None])
            a = torch.exp(m - m_safe)
            z, o, m = a * z + p.sum(-1), a[:, None] * o + p @ v[k0:k1], m_new
        out[q0:q1] = o / z[:, None]
    return out


def _pairs(s, q0, q1, k0, k1):
    return s.masked_fill(torch.arange(k0, k1)[None, :] > torch.arange(q0, q1)[:, None], -math.inf)


def _forward_not_causal(q, k, v, bq, bk):
    return _loop(q, k, v, bq, bk, lambda s, *_: s, skip=False)


def _forward_whole_tiles_only(q, k, v, bq, bk):
    return _loop(q, k, v, bq, bk, lambda s, q0, q1, k0, k1: s if k0 // bk <= q0 // bq else s - math.inf)


def _forward_no_skip(q, k, v, bq, bk):
    return _loop(q, k, v, bq, bk, _pairs, skip=False)


def _forward_full_mask(q, k, v, bq, bk):
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril()      # L x L: the memory saved
    return _loop(q, k, v, bq, bk, lambda s, q0, q1, k0, k1: s.masked_fill(~mask[q0:q1, k0:k1], -math.inf))


def _forward_by_sdpa(q, k, v, bq, bk):
    return F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]


@pytest.mark.parametrize("wrong, words", [
    (_forward_not_causal, "full attention"),
    (_forward_whole_tiles_only, "inside the diagonal"),
    (_forward_no_skip, "skip the key tiles"),
    (_forward_full_mask, "never an L x L mask"),
    (_forward_by_sdpa, "never an L x L|skip the key tiles|differs"),
])
def test_causal_forward_rejects_the_usual_mistakes(wrong, words, capsys):
    passed, out = run("flash.causal_flash_forward", wrong, capsys)
    assert not passed and re.search(words, out), out


def test_causal_forward_accepts_the_loop_in_another_style(capsys):
    def with_merge(q, k, v, bq, bk):
        """Attention per tile with its lse, merged tile by tile (the other way to write it)."""
        L_q, L_k = q.shape[0], k.shape[0]
        outs = []
        for q0 in range(0, L_q, bq):
            q1 = min(q0 + bq, L_q)
            acc = None
            for k0 in range(0, min(L_k, q1), bk):
                k1 = min(k0 + bk, L_k)
                s = _pairs(q[q0:q1] @ k[k0:k1].T / math.sqrt(q.shape[1]), q0, q1, k0, k1)
                lse = torch.logsumexp(s, -1)
                o = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[:, None]) @ v[k0:k1]
                acc = (o, lse) if acc is None else solution("flash.merge_attention")(acc[0], acc[1], o, lse)
            outs.append(acc[0])
        return torch.cat(outs)

    assert check("flash.causal_flash_forward", with_merge) is True
    capsys.readouterr()


def test_causal_forward_solution_equals_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(37, 8, generator=g, dtype=torch.float64) for _ in range(3))
    got = solution("flash.causal_flash_forward")(q, k, v, 6, 5)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True))


# --- flash.backward_tile_step -----------------------------------------------------------------------

def _bwd_parts(q, k, v, dout, lse, delta, scale, mask):
    s = (q @ k.T * scale).masked_fill(~mask, -math.inf)
    safe = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, math.inf))
    return s, torch.exp(s - safe[:, None])


def _bwd_no_delta(q, k, v, dout, lse, delta, scale, mask):
    _, p = _bwd_parts(q, k, v, dout, lse, delta, scale, mask)
    ds = p * (dout @ v.T)
    return ds @ k * scale, ds.T @ q * scale, p.T @ dout


def _bwd_no_scale(q, k, v, dout, lse, delta, scale, mask):
    _, p = _bwd_parts(q, k, v, dout, lse, delta, scale, mask)
    ds = p * (dout @ v.T - delta[:, None])
    return ds @ k, ds.T @ q, p.T @ dout


def _bwd_tile_softmax(q, k, v, dout, lse, delta, scale, mask):
    s, _ = _bwd_parts(q, k, v, dout, lse, delta, scale, mask)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    ds = p * (dout @ v.T - delta[:, None])
    return ds @ k * scale, ds.T @ q * scale, p.T @ dout


def _bwd_no_mask(q, k, v, dout, lse, delta, scale, mask):
    return solution("flash.backward_tile_step")(q, k, v, dout, lse, delta, scale, torch.ones_like(mask))


def _bwd_nan_without_keys(q, k, v, dout, lse, delta, scale, mask):
    p = torch.exp((q @ k.T * scale).masked_fill(~mask, -math.inf) - lse[:, None])
    ds = p * (dout @ v.T - delta[:, None])
    return ds @ k * scale, ds.T @ q * scale, p.T @ dout


def _bwd_exp_over_exp(q, k, v, dout, lse, delta, scale, mask):
    s = (q @ k.T * scale).masked_fill(~mask, -math.inf)
    p = torch.exp(s) / torch.exp(lse)[:, None]
    ds = p * (dout @ v.T - delta[:, None])
    return ds @ k * scale, ds.T @ q * scale, p.T @ dout


@pytest.mark.parametrize("wrong, words", [
    (_bwd_no_delta, "left out D"),
    (_bwd_no_scale, "multiply by the scale"),
    (_bwd_tile_softmax, "not a softmax over this tile"),
    (_bwd_no_mask, "weight 0"),
    (_bwd_nan_without_keys, "sees no key"),
    (_bwd_exp_over_exp, "overflows|NaN|inf"),
])
def test_backward_tile_rejects_the_usual_mistakes(wrong, words, capsys):
    passed, out = run("flash.backward_tile_step", wrong, capsys)
    assert not passed and re.search(words, out), out


def test_backward_tile_accepts_einsum_style(capsys):
    def einsum_style(q, k, v, dout, lse, delta, scale, mask):
        s = torch.einsum("id,jd->ij", q, k) * scale
        p = torch.where(mask & torch.isfinite(lse)[:, None], torch.exp(s - lse.nan_to_num(0.0, neginf=0.0)[:, None]),
                        torch.zeros_like(s))
        ds = p * (torch.einsum("ie,je->ij", dout, v) - delta[:, None])
        return (torch.einsum("ij,jd->id", ds, k) * scale, torch.einsum("ij,id->jd", ds, q) * scale,
                torch.einsum("ij,ie->je", p, dout))

    assert check("flash.backward_tile_step", einsum_style) is True
    capsys.readouterr()


@pytest.mark.parametrize("L_q, L_k, bq, bk, bottom_right", [(11, 11, 4, 3, False), (5, 13, 2, 4, True),
                                                            (9, 4, 3, 2, True)])
def test_backward_tile_contributions_sum_to_autograds_gradients(L_q, L_k, bq, bk, bottom_right):
    """The exercise's reference, summed over every tile, is the gradient of dense attention."""
    g = torch.Generator().manual_seed(L_q)
    q, k = (torch.randn(n, 6, generator=g, dtype=torch.float64).requires_grad_() for n in (L_q, L_k))
    v = torch.randn(L_k, 4, generator=g, dtype=torch.float64).requires_grad_()
    dout = torch.randn(L_q, 4, generator=g, dtype=torch.float64)
    offset = L_k - L_q if bottom_right else 0
    mask = torch.arange(L_k)[None, :] <= torch.arange(L_q)[:, None] + offset
    scale = 0.4
    s = (q @ k.T * scale).masked_fill(~mask, -math.inf)
    out = torch.softmax(s, -1).nan_to_num(0.0) @ v
    want = torch.autograd.grad(out, (q, k, v), dout)
    lse = torch.logsumexp(s.detach(), -1)
    delta = (dout * out.detach()).sum(-1)
    got = [torch.zeros_like(x) for x in (q, k, v)]
    step = solution("flash.backward_tile_step")
    for q0 in range(0, L_q, bq):
        for k0 in range(0, L_k, bk):
            qs, ks = slice(q0, q0 + bq), slice(k0, k0 + bk)
            dq, dk, dv = step(q.detach()[qs], k.detach()[ks], v.detach()[ks], dout[qs], lse[qs], delta[qs],
                              scale, mask[qs, ks])
            got[0][qs] += dq
            got[1][ks] += dk
            got[2][ks] += dv
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


# --- flash.softmax_delta ----------------------------------------------------------------------------

def test_softmax_delta_rejects_the_usual_mistakes(capsys):
    passed, out = run("flash.softmax_delta", lambda do, o: (do * o).sum(-1), capsys)
    assert not passed and "float32" in out                                      # half overflows
    passed, out = run("flash.softmax_delta", lambda do, o: do.sum(-1) * o.sum(-1), capsys)
    assert not passed and "not the product of the two rowsums" in out
    passed, out = run("flash.softmax_delta", lambda do, o: (do.double() * o.double()).sum(-2), capsys)
    assert not passed and "last axis" in out
    passed, out = run("flash.softmax_delta", lambda do, o: (do.float() * o.float()).sum(-1).to(do.dtype), capsys)
    assert not passed and "float32" in out


def test_softmax_delta_accepts_einsum_and_the_p_dp_form(capsys):
    def einsum_style(dout, out):
        acc = torch.promote_types(dout.dtype, torch.float32)
        return torch.einsum("...e,...e->...", dout.to(acc), out.to(acc))

    assert check("flash.softmax_delta", einsum_style) is True
    capsys.readouterr()
    # the identity the trick rests on: rowsum(P * dP) = rowsum(dO * O), with dP = dO V^T and O = P V
    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(5, 7, generator=g, dtype=torch.float64), -1)
    v, dout = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close((p * (dout @ v.T)).sum(-1), solution("flash.softmax_delta")(dout, p @ v))


# --- flash.end_aligned_skipped_tiles -----------------------------------------------------------------

def _skip_rule(offset_fn, strict=True):
    def fn(lq, lk, bq, bk):
        first_key = torch.arange(-(-lk // bk))[None, :] * bk
        last_query = (torch.arange(-(-lq // bq))[:, None] * bq + bq - 1).clamp(max=lq - 1)
        bound = last_query + offset_fn(lq, lk)
        return first_key > bound if strict else first_key >= bound
    return fn


@pytest.mark.parametrize("wrong, words", [
    (_skip_rule(lambda lq, lk: 0), "top-left rule"),
    (_skip_rule(lambda lq, lk: lq - lk), "not L_q - L_k"),
    (_skip_rule(lambda lq, lk: lk - lq, strict=False), "diagonal tiles are needed"),
    (lambda lq, lk, bq, bk: torch.ones(-(-lq // bq), -(-lk // bk), dtype=torch.bool).triu(1 + (lk - lq) // bk),
     "compare positions|diagonal tiles|top-left"),
])
def test_end_aligned_skip_rejects_the_usual_mistakes(wrong, words, capsys):
    passed, out = run("flash.end_aligned_skipped_tiles", wrong, capsys)
    assert not passed and re.search(words, out), out


def test_end_aligned_skip_accepts_a_brute_force_answer_and_matches_the_mask(capsys):
    def brute(lq, lk, bq, bk):
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        return torch.tensor([[not allowed[a:a + bq, b:b + bk].any() for b in range(0, lk, bk)]
                             for a in range(0, lq, bq)], dtype=torch.bool)

    assert check("flash.end_aligned_skipped_tiles", brute) is True
    capsys.readouterr()


# --- flash.io_bytes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("wrong, words", [
    (lambda n, d, m, b: __import__("attn_course.flash", fromlist=["x"]).flash_hbm_bytes(n, d, m, bytes_per_value=b),
     "first loop order"),
    (lambda n, d, m, b: (2 * n * d + 2 * n * d * (n // (m // b // (4 * d)))) * b, "ceil"),
    (lambda n, d, m, b: (2 * n * d + 2 * n * d * -(-n // (m // (4 * d)))) * b, "tile size counts elements"),
    (lambda n, d, m, b: 2 * n * d + 2 * n * d * -(-n // (m // b // (4 * d))), "return bytes"),
    (lambda n, d, m, b: (2 * n * d + n * d * -(-n // (m // b // (4 * d)))) * b, "both K and V"),
])
def test_io_bytes_rejects_the_usual_mistakes(wrong, words, capsys):
    passed, out = run("flash.io_bytes", wrong, capsys)
    assert not passed and re.search(words, out), out


def test_io_bytes_accepts_a_loop_that_counts(capsys):
    def count(n, d, m, b):
        block = m // b // (4 * d)
        moved = 0
        for q0 in range(0, n, block):
            moved += 2 * min(block, n - q0) * d              # Q tile in, O tile out
            moved += 2 * n * d                               # every K and V tile
        return moved * b

    assert check("flash.io_bytes", count) is True
    capsys.readouterr()


def test_every_flash_exercise_has_at_least_five_cases_and_its_solution_passes(capsys):
    names = [e.name for e in ex.EXERCISES]
    assert len(names) == 8
    for name in names:
        assert check(name, solution(name), strict=True)
        assert len(next(e for e in ex.EXERCISES if e.name == name).prepared()) >= 5
    capsys.readouterr()


def test_softmax_delta_must_be_float32_for_half_inputs(capsys):
    def bf16_out(dout, out):
        d = (dout.float() * out.float()).sum(-1)
        return d.bfloat16() if dout.dtype == torch.bfloat16 else d

    passed, out = run("flash.softmax_delta", bf16_out, capsys)
    assert not passed and "float32" in out
