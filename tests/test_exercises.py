"""The exercise checker: solutions pass strictly, wrong answers are rejected with useful
feedback, and nothing a learner writes crashes or hangs the checker."""

import math
import re
import time

import numpy as np
import pytest
import torch

from attn_course.exercises import check, list_exercises, solution

NAMES = list_exercises()


def test_names_have_a_chapter_prefix_and_chapter_one_has_at_least_three():
    assert all(re.fullmatch(r"ch\d\d\.[a-z_]+", n) for n in NAMES)
    assert sum(n.startswith("ch01.") for n in NAMES) >= 3


@pytest.mark.parametrize("name", NAMES)
def test_every_solution_passes_strictly(name, capsys):
    assert check(name, solution(name), strict=True) is True
    assert "✅" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_a_slightly_wrong_answer_is_rejected(name, capsys):
    ref = solution(name)

    def off_by_a_bit(*args, **kwargs):
        out = ref(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + 1e-2, *out[1:])
        if isinstance(out, int):
            return out + 1
        if out.dtype == torch.bool:
            return ~out
        if not out.is_floating_point():
            return out + 1
        return out + 1e-2

    assert check(name, off_by_a_bit) is False
    words = "differs from the answer|times that|Hint"
    assert re.search(words, capsys.readouterr().out)
    with pytest.raises(AssertionError, match=words):
        check(name, off_by_a_bit, strict=True)


def _raises(*a, **k):
    raise ZeroDivisionError("boom")


def _returns_none(*a, **k):
    return None


def _returns_string(*a, **k):
    return "attention"


def _returns_numpy(*a, **k):
    return np.zeros(3)


def _loops_forever(*a, **k):
    while True:
        pass


def _not_implemented(*a, **k):
    raise NotImplementedError


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad, words", [
    (_raises, "raised ZeroDivisionError: boom"),
    (_returns_none, "None: did you forget the `return`"),
    (_returns_string, "got a str"),
    (_returns_numpy, "NumPy array"),
    (_not_implemented, "not answered yet"),
    (42, "check needs your function itself"),
])
def test_broken_answers_get_feedback_never_a_crash(name, bad, words, capsys):
    assert check(name, bad) is False
    out = capsys.readouterr().out
    assert words in out, out
    assert out.startswith(("❌ " + name, "✏️ " + name)), out


@pytest.mark.parametrize("name", NAMES)
def test_nan_and_wrong_shapes_are_reported(name, capsys):
    ref = solution(name)

    def nan_answer(*args, **kwargs):
        out = ref(*args, **kwargs)
        if isinstance(out, int):
            return float("nan")
        if isinstance(out, tuple):
            return tuple(torch.full_like(o, float("nan")) for o in out)
        return torch.full_like(out, float("nan"), dtype=torch.float32)  # wrong dtype for int/bool answers

    def wrong_shape(*args, **kwargs):
        out = ref(*args, **kwargs)
        if isinstance(out, int):
            return [out]
        if isinstance(out, torch.Tensor) and out.ndim == 0:
            return out.repeat(2)
        return tuple(o[..., :-1] if o.shape[-1] > 1 else o[..., :0] for o in out) if isinstance(out, tuple) \
            else torch.cat([out, out], dim=-1)

    assert check(name, nan_answer) is False
    out = capsys.readouterr().out
    assert "NaN" in out or "dtype" in out or "bool" in out, out
    assert check(name, wrong_shape) is False
    out = capsys.readouterr().out
    assert "has shape" in out or "should be a number" in out, out


@pytest.mark.parametrize("name", NAMES)
def test_code_that_never_returns_is_stopped_for_every_exercise(name, capsys):
    assert check(name, _loops_forever, timeout=0.2) is False
    assert "did not finish within 0.2 s" in capsys.readouterr().out


def test_an_endless_loop_is_stopped_by_the_time_limit(capsys):
    start = time.perf_counter()
    assert check("ch01.masked_softmax", _loops_forever, timeout=0.5) is False
    assert time.perf_counter() - start < 5
    assert "did not finish within 0.5 s" in capsys.readouterr().out


def test_changing_the_inputs_in_place_is_reported(capsys):
    def in_place(scores, mask):
        scores.masked_fill_(~mask, float("-inf"))
        return solution("ch01.masked_softmax")(scores, mask)

    assert check("ch01.masked_softmax", in_place) is False
    assert "changed its inputs in place" in capsys.readouterr().out


def test_masked_softmax_hints(capsys):
    assert check("ch01.masked_softmax", lambda s, m: torch.softmax(s, -1)) is False
    assert "masked keys got weight" in capsys.readouterr().out
    assert check("ch01.masked_softmax",
                 lambda s, m: torch.softmax(s.masked_fill(~m, -math.inf), 0).nan_to_num()) is False
    assert "did you normalise over the last axis" in capsys.readouterr().out

    def naive(s, m):
        e = torch.exp(s) * m
        return e / e.sum(-1, keepdim=True)

    assert check("ch01.masked_softmax", naive) is False
    assert "NaN" in capsys.readouterr().out


def test_sdpa_hint_for_missing_scale(capsys):
    def unscaled(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        w = torch.softmax(s, -1).nan_to_num()
        return w @ v, w

    assert check("ch01.scaled_dot_product_attention", unscaled) is False
    assert "sqrt(d_k)" in capsys.readouterr().out


def test_sdpa_rejects_an_answer_that_forgets_fully_masked_rows(capsys):
    def nan_rows(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        w = torch.softmax(s, -1)
        return w @ v, w

    assert check("ch01.scaled_dot_product_attention", nan_rows) is False
    assert "NaN" in capsys.readouterr().out


def test_nadaraya_watson_hints(capsys):
    def no_half(x, y, q, h):
        w = torch.softmax(-((q[:, None] - x[None, :]) / h) ** 2, 1)
        return w @ y, w

    assert check("ch01.nadaraya_watson", no_half) is False
    assert "dropped the 1/2" in capsys.readouterr().out

    def unnormalised(x, y, q, h):
        w = torch.exp(-0.5 * ((q[:, None] - x[None, :]) / h) ** 2)
        return w @ y, w

    assert check("ch01.nadaraya_watson", unnormalised) is False
    assert "sum to 1" in capsys.readouterr().out


def test_additive_hint_for_missing_tanh(capsys):
    def no_tanh(q, k, W_q, W_k, w_v):
        return ((q @ W_q.T)[:, None, :] + (k @ W_k.T)[None, :, :]) @ w_v

    assert check("ch01.additive_scores", no_tanh) is False
    assert "apply tanh" in capsys.readouterr().out


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="ch01.masked_softmax"):
        check("ch01.no_such_thing", lambda: None)
    with pytest.raises(KeyError, match="known exercises"):
        solution("nope")
    with pytest.raises(TypeError, match="name must be a str"):
        check(3, lambda: None)


def test_bad_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout"):
        check("ch01.masked_softmax", solution("ch01.masked_softmax"), timeout=0)


def test_solutions_are_independent_of_the_package_code():
    """The reference solutions are written from scratch, not wrappers of attn_course.basics."""
    import inspect

    for name in NAMES:
        src = inspect.getsource(solution(name))
        assert "basics." not in src, name


def test_chapter_four_hints(capsys):
    assert check("ch04.split_heads", lambda x, h: x.reshape(x.shape[0], x.shape[1], h, -1)) is False
    assert "transpose(1, 2)" in capsys.readouterr().out
    assert check("ch04.split_heads", lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1)) is False
    assert "mixes positions and heads" in capsys.readouterr().out
    assert check("ch04.masks_from_torch", lambda a, p: a[None, None] | p[:, None, None]) is False
    assert "invert both masks" in capsys.readouterr().out
    assert check("ch04.mha_parameter_count", lambda E, H, k, v, b: 3 * E * E + (3 * E if b else 0)) is False
    assert "output projection" in capsys.readouterr().out
    assert check("ch04.kv_cache_bytes", lambda n, g, d, L, B, s: n * g * d * L * B * s) is False
    assert "keys AND values" in capsys.readouterr().out


def test_chapter_five_hints(capsys):
    from attn_course.positional import apply_rope

    assert check("ch05.apply_rope", lambda x, p: apply_rope(x, -p)) is False
    assert "rotate the wrong way" in capsys.readouterr().out

    def halves(x, p):
        d = x.shape[-1]
        t = p[:, None].double() * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * t.cos() - b * t.sin(), a * t.sin() + b * t.cos()], -1).to(x.dtype)

    assert check("ch05.apply_rope", halves) is False
    assert "interleaved" in capsys.readouterr().out
    assert check("ch05.relative_position_index",
                 lambda a, b, k: (torch.arange(a)[:, None] - torch.arange(b)[None, :]).clamp(-k, k) + k) is False
    assert "j - i" in capsys.readouterr().out
    assert check("ch05.relative_position_index", lambda a, b, k: torch.zeros(a, b)) is False
    assert "integer tensor" in capsys.readouterr().out
    assert check("ch05.alibi_slopes", lambda n: torch.tensor([2 ** (-8 * (k + 1) / n) for k in range(n)])) is False
    assert "not a power of two" in capsys.readouterr().out


def test_chapter_two_hints(capsys):
    assert check("ch02.padding_mask", lambda lengths, m: torch.arange(m)[None, :] >= lengths[:, None]) is False
    assert "True marks the real tokens" in capsys.readouterr().out
    assert check("ch02.causal_mask", lambda n: torch.ones(n, n, dtype=torch.bool).triu()) is False
    assert "lower triangle" in capsys.readouterr().out
    assert check("ch02.causal_mask", lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1)) is False
    assert "keep the diagonal" in capsys.readouterr().out
