"""The exercise checker: solutions pass strictly, wrong answers are rejected with useful
feedback, and nothing a learner writes crashes or hangs the checker."""

import importlib
import itertools
import math
import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attn_course.exercises import _REGISTRY, check, list_exercises, solution
from attn_course.exercises._core import (
    Case,
    Exercise,
    Footprint,
    Hint,
    agrees,
    arg_names,
    evaluate,
    float_dtypes,
    hint_text,
    mistake,
)

NAMES = list_exercises()


TOPICS = sorted({n.split(".")[0] for n in NAMES})


def test_names_have_a_topic_prefix_never_a_chapter_number():
    """Ids are ``<topic>.<name>``, the topic a module of the exercises package, so chapters can move."""
    import attn_course.exercises as ex

    assert all(re.fullmatch(r"[a-z][a-z0-9_]*\.[a-z_0-9]+", n) for n in NAMES)
    assert not any(re.match(r"ch\d", n) for n in NAMES)
    for topic in TOPICS:
        module = importlib.import_module(f"{ex.__name__}.{topic}")
        assert all(e.name.startswith(topic + ".") for e in module.EXERCISES)


def test_an_old_chapter_numbered_id_names_its_new_topic_id():
    with pytest.raises(KeyError, match="'flash.merge_attention'"):
        check("ch07.merge_attention", lambda: None)


@pytest.mark.parametrize("name", NAMES)
def test_every_solution_passes_strictly(name, capsys):
    assert check(name, solution(name), strict=True) is True
    assert "✅" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_a_slightly_wrong_answer_is_rejected(name, capsys):
    ref = solution(name)

    def off_by_a_bit(*args, **kwargs):
        out = ref(*args, **kwargs)
        if isinstance(out, (tuple, list)):
            return type(out)([off_by_a_bit_item(out[0]), *out[1:]])
        return off_by_a_bit_item(out)

    def off_by_a_bit_item(out):
        if isinstance(out, int):
            return out + 1
        if isinstance(out, float):
            return out * 1.01 + 1e-2
        if out.dtype == torch.bool:
            return ~out
        if not out.is_floating_point():
            return out + 1
        return out + 1e-2

    assert check(name, off_by_a_bit) is False
    words = "differs from the answer|off by|is wrong in|Hint"
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
        if isinstance(out, (int, float)):
            return float("nan")
        if isinstance(out, (tuple, list)):
            return type(out)(torch.full_like(o, float("nan")) for o in out)
        return torch.full_like(out, float("nan"), dtype=torch.float32)  # wrong dtype for int/bool answers

    def wrong_shape(*args, **kwargs):
        out = ref(*args, **kwargs)
        if isinstance(out, (int, float)):
            return [out]
        if isinstance(out, torch.Tensor) and out.ndim == 0:
            return out.repeat(2)
        return type(out)(o[..., :-1] if o.shape[-1] > 1 else o[..., :0] for o in out) \
            if isinstance(out, (tuple, list)) else torch.cat([out, out], dim=-1)

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
    assert check("basics.masked_softmax", _loops_forever, timeout=0.5) is False
    assert time.perf_counter() - start < 5
    assert "did not finish within 0.5 s" in capsys.readouterr().out


def test_changing_the_inputs_in_place_is_reported(capsys):
    def in_place(scores, mask):
        scores.masked_fill_(~mask, float("-inf"))
        return solution("basics.masked_softmax")(scores, mask)

    assert check("basics.masked_softmax", in_place) is False
    assert "changed its inputs in place" in capsys.readouterr().out


def test_masked_softmax_hints(capsys):
    assert check("basics.masked_softmax", lambda s, m: torch.softmax(s, -1)) is False
    assert "masked keys got weight" in capsys.readouterr().out
    assert check("basics.masked_softmax",
                 lambda s, m: torch.softmax(s.masked_fill(~m, -math.inf), 0).nan_to_num()) is False
    assert "did you normalise over the last axis" in capsys.readouterr().out

    def naive(s, m):
        e = torch.exp(s) * m
        return e / e.sum(-1, keepdim=True)

    assert check("basics.masked_softmax", naive) is False
    assert "NaN" in capsys.readouterr().out


def test_sdpa_hint_for_missing_scale(capsys):
    def unscaled(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1)
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        w = torch.softmax(s, -1).nan_to_num()
        return w @ v, w

    assert check("basics.scaled_dot_product_attention", unscaled) is False
    assert "sqrt(d_k)" in capsys.readouterr().out


def test_sdpa_rejects_an_answer_that_forgets_fully_masked_rows(capsys):
    def nan_rows(q, k, v, mask=None):
        s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if mask is not None:
            s = s.masked_fill(~mask, -math.inf)
        w = torch.softmax(s, -1)
        return w @ v, w

    assert check("basics.scaled_dot_product_attention", nan_rows) is False
    assert "NaN" in capsys.readouterr().out


def test_nadaraya_watson_hints(capsys):
    def no_half(x, y, q, h):
        w = torch.softmax(-((q[:, None] - x[None, :]) / h) ** 2, 1)
        return w @ y, w

    assert check("basics.nadaraya_watson", no_half) is False
    assert "dropped the 1/2" in capsys.readouterr().out

    def unnormalised(x, y, q, h):
        w = torch.exp(-0.5 * ((q[:, None] - x[None, :]) / h) ** 2)
        return w @ y, w

    assert check("basics.nadaraya_watson", unnormalised) is False
    assert "sum to 1" in capsys.readouterr().out


def test_additive_hint_for_missing_tanh(capsys):
    def no_tanh(q, k, W_q, W_k, w_v):
        return ((q @ W_q.T)[:, None, :] + (k @ W_k.T)[None, :, :]) @ w_v

    assert check("basics.additive_scores", no_tanh) is False
    assert "apply tanh" in capsys.readouterr().out


def test_unknown_names_list_the_known_ones():
    with pytest.raises(KeyError, match="basics.masked_softmax"):
        check("ch01.no_such_thing", lambda: None)
    with pytest.raises(KeyError, match="known exercises"):
        solution("nope")
    with pytest.raises(TypeError, match="name must be a str"):
        check(3, lambda: None)


def test_bad_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout"):
        check("basics.masked_softmax", solution("basics.masked_softmax"), timeout=0)


def test_solutions_are_independent_of_the_package_code():
    """The reference solutions are written from scratch, not wrappers of attn_course.basics."""
    import inspect

    for name in NAMES:
        src = inspect.getsource(solution(name))
        assert "basics." not in src, name


def test_chapter_four_hints(capsys):
    assert check("multihead.split_heads", lambda x, h: x.reshape(x.shape[0], x.shape[1], h, -1)) is False
    assert "transpose(1, 2)" in capsys.readouterr().out
    assert check("multihead.split_heads", lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1)) is False
    assert "mixes positions and heads" in capsys.readouterr().out
    assert check("multihead.masks_from_torch", lambda a, p: a[None, None] | p[:, None, None]) is False
    assert "invert both masks" in capsys.readouterr().out
    assert check("multihead.mha_parameter_count", lambda E, H, k, v, b: 3 * E * E + (3 * E if b else 0)) is False
    assert "output projection" in capsys.readouterr().out
    assert check("multihead.kv_cache_bytes", lambda n, g, d, L, B, s: n * g * d * L * B * s) is False
    assert "keys AND values" in capsys.readouterr().out


def test_chapter_five_hints(capsys):
    from attn_course.positional import apply_rope

    assert check("positional.apply_rope", lambda x, p: apply_rope(x, -p)) is False
    assert "rotate the wrong way" in capsys.readouterr().out

    def halves(x, p):
        d = x.shape[-1]
        t = p[:, None].double() * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        a, b = x[..., : d // 2], x[..., d // 2:]
        return torch.cat([a * t.cos() - b * t.sin(), a * t.sin() + b * t.cos()], -1).to(x.dtype)

    assert check("positional.apply_rope", halves) is False
    out = capsys.readouterr().out
    assert "interleaved" in out and "not wrong" in out  # rotate-half is a permutation, not a bug
    assert check("positional.relative_position_index",
                 lambda a, b, k: (torch.arange(a)[:, None] - torch.arange(b)[None, :]).clamp(-k, k) + k) is False
    assert "j - i" in capsys.readouterr().out
    assert check("positional.relative_position_index", lambda a, b, k: torch.zeros(a, b)) is False
    assert "integer tensor" in capsys.readouterr().out
    assert check("positional.alibi_slopes", lambda n: torch.tensor([2 ** (-8 * (k + 1) / n) for k in range(n)])) is False
    assert "not a power of two" in capsys.readouterr().out


def test_chapter_two_hints(capsys):
    assert check("seq2seq.padding_mask", lambda lengths, m: torch.arange(m)[None, :] >= lengths[:, None]) is False
    assert "True marks the real tokens" in capsys.readouterr().out
    assert check("seq2seq.causal_mask", lambda n: torch.ones(n, n, dtype=torch.bool).triu()) is False
    assert "lower triangle" in capsys.readouterr().out
    assert check("seq2seq.causal_mask", lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1)) is False
    assert "keep the diagonal" in capsys.readouterr().out


# --- the course as a whole ------------------------------------------------------------------------

def test_at_least_forty_auto_checked_exercises_and_four_per_chapter():
    assert len(NAMES) >= 40
    for topic in TOPICS:
        assert sum(n.startswith(topic + ".") for n in NAMES) >= 4, topic


# --- chapters 1-5 and 7: the mistakes learners make, each rejected with a hint that names it -------
# One row per mistake listed above each exercise in attn_course/exercises/<topic>.py:
# (exercise, wrong answer, words the feedback must contain, words it must not contain).

def _sm(s, m, dim=-1):
    return torch.softmax(s.masked_fill(~m, -math.inf), dim)


def _nw_kernel(kernel):
    def nw(x, y, q, h):
        w = torch.softmax(kernel(q[:, None] - x[None, :], h), 1)
        return w @ y, w
    return nw


def _nw_dim0(x, y, q, h):
    w = torch.softmax(-0.5 * ((q[:, None] - x[None, :]) / h) ** 2, 0)
    return w @ y, w


def _nw_unnormalised(x, y, q, h):
    w = torch.exp(-0.5 * ((q[:, None] - x[None, :]) / h) ** 2)
    return w @ y, w


def _nw_naive(x, y, q, h):
    w = torch.exp(-0.5 * ((q[:, None] - x[None, :]) / h) ** 2)
    w = w / w.sum(1, keepdim=True)
    return w @ y, w


def _nw_bad_prediction(x, y, q, h):
    w = torch.softmax(-0.5 * ((q[:, None] - x[None, :]) / h) ** 2, 1)
    return w.sum(1) * y.mean(), w


def _fit(*, accumulate=False, on="log_h", log=False, reduce="mean", sign=1.0, queries="val"):
    def fit(x, y, xv, yv, steps, lr):
        p = torch.zeros((), requires_grad=True) if on == "log_h" else torch.ones((), requires_grad=True)
        xq, yq = (xv, yv) if queries == "val" else (x, y)
        for _ in range(steps):
            h = p.exp() if on == "log_h" else p
            pred = torch.softmax(-0.5 * ((xq[:, None] - x[None, :]) / h) ** 2, 1) @ y
            err = (pred - yq) ** 2
            (err.mean() if reduce == "mean" else err.sum()).backward()
            with torch.no_grad():
                p -= sign * lr * p.grad
            if not accumulate:
                p.grad = None
        h = (p.exp() if on == "log_h" else p).detach()
        return float(h.log()) if log else float(h)
    return fit


def _ms_max_over_all(s, m):
    e = torch.exp(s - s.amax(-1, keepdim=True)) * m
    return (e / e.sum(-1, keepdim=True)).nan_to_num()


def _ms_no_max(s, m):
    e = torch.exp(s) * m
    return e / e.sum(-1, keepdim=True).clamp_min(1e-30)


def _sdpa(scale=None, dim=-1, fill=-math.inf, invert=False, values="value", nan_rows=False, swap=False,
          use_mask=True):
    def attention(q, k, v, mask=None):
        d_k = q.shape[-1]
        s = q @ k.transpose(-2, -1) * (1 / math.sqrt(d_k) if scale is None else scale(q, v))
        if mask is not None and use_mask:
            s = s.masked_fill(mask if invert else ~mask, fill)
        w = torch.softmax(s, dim)
        if not nan_rows:
            w = w.nan_to_num()
        out = w @ (v if values == "value" else k)
        return (w, out) if swap else (out, w)
    return attention


def _sdpa_bmm(q, k, v, mask=None):
    s = torch.bmm(q, k.transpose(1, 2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    w = torch.softmax(s, -1).nan_to_num()
    return torch.bmm(w, v), w


def _additive(form):
    def scores(q, k, W_q, W_k, w_v):
        qq, kk = q @ W_q.T, k @ W_k.T
        hidden = qq[:, None, :] + kk[None, :, :]
        if form == "separate tanh":
            return (torch.tanh(qq)[:, None] + torch.tanh(kk)[None]) @ w_v
        if form == "sum":
            return torch.tanh(hidden).sum(-1)
        if form == "softmax":
            return torch.softmax(torch.tanh(hidden) @ w_v, -1)
        if form == "untransposed":
            return torch.tanh((q @ W_q)[:, None] + (k @ W_k)[None]) @ w_v
        if form == "transposed":
            return (torch.tanh(hidden) @ w_v).T
        return hidden @ w_v
    return scores


def _cross(form):
    def cross(x, c, W_q, W_k, W_v):
        q, k, v = x @ W_q.T, c @ W_k.T, c @ W_v.T
        scale = 1 / math.sqrt(q.shape[-1])
        if form == "roles":       # queries from the context, keys and values from x
            q, k, v = c @ W_q.T, x @ W_k.T, x @ W_v.T
        if form == "sqrt E":
            scale = 1 / math.sqrt(x.shape[-1])
        if form == "no scale":
            scale = 1.0
        if form == "kv swapped":
            k, v = c @ W_v.T, c @ W_k.T
        if form == "untransposed":
            q, k, v = x @ W_q, c @ W_k, c @ W_v
        dim = -2 if form == "dim" else -1
        return torch.softmax(q @ k.transpose(-2, -1) * scale, dim) @ v
    return cross


def _decoder(form):
    def step(state, enc, mask, W, b):
        s = (enc @ state[:, :, None])[:, :, 0]
        if form != "no scale":
            s = s / math.sqrt(state.shape[-1])
        if form != "no mask":
            s = s.masked_fill(mask if form == "inverted" else ~mask, -math.inf)
        w = torch.softmax(s, -1).nan_to_num()
        c = enc.mean(1) if form == "mean" else (w[:, :, None] * enc).sum(1)
        x = torch.cat([c, state] if form == "order" else [state, c], -1)
        logits = x @ W.T + (0 if form == "no bias" else b)
        return logits, (w[:, None, :] if form == "3-D weights" else w)
    return step


def _gumbel(form):
    def sample(logits, u, tau):
        g = -torch.log(-torch.log(u))
        return {"-log u": lambda: torch.softmax((logits - torch.log(u)) / tau, -1),
                "sign": lambda: torch.softmax((logits - g) / tau, -1),
                "no tau": lambda: torch.softmax(logits + g, -1),
                "times tau": lambda: torch.softmax((logits + g) * tau, -1),
                "logits only": lambda: torch.softmax(logits / tau + g, -1),
                "dim 0": lambda: torch.softmax((logits + g) / tau, 0),
                "no noise": lambda: torch.softmax(logits / tau, -1)}[form]()
    return sample


def _straight_through(form):
    def sample(logits, u, tau):
        g = -torch.log(-torch.log(u))
        y = torch.softmax((logits + g) / tau, -1)
        hard = torch.nn.functional.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)
        if form == "soft":
            return y
        if form == "hard only":
            return hard
        if form == "no detach":
            return hard - y + y
        if form == "argmax of logits":
            plain = torch.nn.functional.one_hot(logits.argmax(-1), y.shape[-1]).to(y.dtype)
            return plain - y.detach() + y
        if form == "no tau in the gradient":
            y1 = torch.softmax(logits + g, -1)
            return hard - y1.detach() + y1
        return hard.long()
    return sample


def _reinforce(form):
    def surrogate(lp, ls, b):
        return {"detached log_probs": lambda: ((ls.detach() - b) * lp.detach()).mean(),
                "losses not detached": lambda: ((ls - b) * lp).mean(),
                "no baseline": lambda: (ls.detach() * lp).mean(),
                "sign": lambda: -((ls.detach() - b) * lp).mean(),
                "sum": lambda: ((ls.detach() - b) * lp).sum(),
                "probabilities": lambda: ((ls.detach() - b) * lp.exp()).mean()}[form]()
    return surrogate


def _local_p(form):
    def weights(scores, centres, D):
        s = torch.arange(scores.shape[-1], dtype=scores.dtype)
        centre_w = centres if form == "unrounded window" else torch.round(centres)
        inside = (s[None, :] - centre_w[:, None]).abs() <= D
        w = torch.softmax(scores if form == "no window" else scores.masked_fill(~inside, -math.inf), -1)
        sigma = max(D, 1) if form == "sigma = D" else max(D, 1) / 2
        centre_g = torch.round(centres) if form == "gaussian on round" else centres
        out = w if form == "no gaussian" else w * torch.exp(-((s[None, :] - centre_g[:, None]) ** 2) / (2 * sigma**2))
        return out / out.sum(-1, keepdim=True) if form == "renormalised" else out
    return weights


def _mha(form):
    def forward(q, k, v, W_q, W_k, W_v, W_o, H):
        B, L_q, E = q.shape
        H = 1 if form == "one head" else H
        d = E // H
        proj = (lambda x, W: x @ W) if form == "untransposed" else (lambda x, W: x @ W.T)

        def heads(x):
            if form == "split no transpose":
                return x.reshape(B, H, x.shape[1], d)
            return x.reshape(B, x.shape[1], H, d).transpose(1, 2)

        s = heads(proj(q, W_q)) @ heads(proj(k, W_k)).transpose(-2, -1) / math.sqrt(E if form == "sqrt E" else d)
        o = torch.softmax(s, -2 if form == "dim" else -1) @ heads(proj(v, W_v))
        o = o.reshape(B, L_q, E) if form == "merge no transpose" else o.transpose(1, 2).reshape(B, L_q, E)
        return o if form == "no W_o" else proj(o, W_o)
    return forward


def _sin(form):
    def table(L, d):
        p = torch.arange(L, dtype=torch.float64)[:, None] + (1 if form == "from 1" else 0)
        i = torch.arange(d // 2, dtype=torch.float64) if form == "i/d" else torch.arange(0, d, 2, dtype=torch.float64)
        a = p * 10000.0 ** (-i / d)
        first, second = (a.cos(), a.sin()) if form == "swapped" else (a.sin(), a.cos())
        if form == "halves":
            return torch.cat([first, second], -1).float()
        return torch.stack([first, second], -1).flatten(-2).float()
    return table


def _rope(form):
    def rope(x, pos):
        d = x.shape[-1]
        if form == "arange":
            pos = torch.arange(x.shape[-2])
        i = torch.arange(d // 2) if form == "i/d" else torch.arange(0, d, 2)
        t = pos[:, None].double() * 10000.0 ** (-i.double() / d) * (-1 if form == "direction" else 1)
        c, s = t.cos().to(x.dtype), t.sin().to(x.dtype)
        if form == "halves":
            a, b = x[..., : d // 2], x[..., d // 2:]
            return torch.cat([a * c - b * s, a * s + b * c], -1)
        a, b = x[..., 0::2], x[..., 1::2]
        new_a = a * c - b * s
        return torch.stack([new_a, (new_a if form == "sequential" else a) * s + b * c], -1).flatten(-2)
    return rope


def _rope_scores(form):
    from attn_course.positional import apply_rope

    def scores(q, k, pq, pk):
        d = q.shape[-1]
        rq = {"k only": q, "swapped positions": apply_rope(q, pk) if len(pq) == len(pk) else apply_rope(q, pq),
              "sign": apply_rope(q, -pq), "arange": apply_rope(q, torch.arange(len(pq)))}.get(form, apply_rope(q, pq))
        rk = {"q only": k, "swapped positions": apply_rope(k, pq) if len(pq) == len(pk) else apply_rope(k, pk)}.get(
            form, apply_rope(k, pk))
        if form == "halves":
            rq, rk = _rope("halves")(q, pq), _rope("halves")(k, pk)
        return rq @ rk.transpose(-2, -1) / (1.0 if form == "no scale" else math.sqrt(d))
    return scores


def _topk(form):
    def attention(q, k, v, kk):
        s = q @ k.transpose(-2, -1) / (1.0 if form == "no scale" else math.sqrt(q.shape[-1]))
        if form == "dense":
            return torch.softmax(s, -1) @ v
        if form == "no min":
            kth = s.topk(kk, dim=-1).values[..., -1:]
        else:
            kth = s.topk(min(kk, s.shape[-1]), dim=-1, largest=form != "smallest").values[..., -1:]
        keep = {"smallest": s <= kth, "strict": s > kth}.get(form, s >= kth)
        return torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num() @ v
    return attention


def _banded(form):
    def attention(q, k, v, w):
        B, H, L, d = q.shape
        if form in ("dense", "all keys", "causal", "strict", "no scale"):
            i = torch.arange(L)
            diff = i[:, None] - i[None, :]
            m = {"dense": diff.abs() <= w, "all keys": diff.abs() >= 0, "causal": (diff >= 0) & (diff <= w),
                 "strict": diff.abs() < w, "no scale": diff.abs() <= w}[form]
            s = (q @ k.transpose(-2, -1) / (1.0 if form == "no scale" else math.sqrt(d))).masked_fill(~m, -math.inf)
            return torch.softmax(s, -1).nan_to_num() @ v
        w = min(w, L - 1)   # "padding": the zero-padded slots take part in the softmax
        kk = torch.nn.functional.pad(k, (0, 0, w, w)).unfold(2, 2 * w + 1, 1)
        vv = torch.nn.functional.pad(v, (0, 0, w, w)).unfold(2, 2 * w + 1, 1)
        weights = torch.softmax((q[..., None] * kk).sum(-2) / math.sqrt(d), -1)
        return (vv * weights[..., None, :]).sum(-1)
    return attention


def _favor(form):
    def attention(q, k, v, omega):
        d, m = q.shape[-1], omega.shape[0]
        if form == "no scale":
            qs, ks = q, k
        elif form == "query only":
            qs, ks = q / math.sqrt(d), k
        else:
            qs, ks = q * d**-0.25, k * d**-0.25
        W = omega if form == "untransposed" else omega.T

        def phi(x, norm=True):
            return torch.exp(x @ W - ((x * x).sum(-1, keepdim=True) / 2 if norm else 0)) / math.sqrt(m)

        pq, pk = phi(qs), phi(ks, form != "no norm")
        if form == "quadratic":
            a = pq @ pk.transpose(-2, -1)
            return (a @ v) / a.sum(-1, keepdim=True)
        out = pq @ (pk.transpose(-2, -1) @ v)
        return out if form == "no normaliser" else out / (pq @ pk.sum(-2)[..., None])
    return attention


def _ti(x, y):
    return torch.tril(torch.ones(x, y))


WRONG = [
    # chapter 1
    ("basics.nadaraya_watson", _nw_dim0, "normalise over the training points", None),
    ("basics.nadaraya_watson", _nw_unnormalised, "sum to 1", None),
    ("basics.nadaraya_watson", _nw_kernel(lambda d, h: -((d / h) ** 2)), "dropped the 1/2", None),
    ("basics.nadaraya_watson", _nw_kernel(lambda d, h: -0.5 * d**2 / h), "divide the distance by sigma before squaring", None),
    ("basics.nadaraya_watson", _nw_kernel(lambda d, h: -0.5 * (d * h) ** 2), "do not multiply", None),
    ("basics.nadaraya_watson", _nw_kernel(lambda d, h: -0.5 * (d / h).abs()), "square the distance", None),
    ("basics.nadaraya_watson", _nw_naive, "underflows", "sum to 1"),
    ("basics.nadaraya_watson", _nw_bad_prediction, "weights @ y_train", "divide|multiply|1/2"),
    ("basics.fit_bandwidth", _fit(accumulate=True), "zero the gradient", None),
    ("basics.fit_bandwidth", _fit(on="h"), "on log_sigma", None),
    ("basics.fit_bandwidth", _fit(log=True), "that is log sigma", None),
    ("basics.fit_bandwidth", _fit(reduce="sum"), "not the sum", None),
    ("basics.fit_bandwidth", _fit(sign=-1.0), "step downhill", None),
    ("basics.fit_bandwidth", _fit(queries="train"), "predict at x_val", None),
    ("basics.masked_softmax", lambda s, m: torch.softmax(s, -1), "masked keys got weight", None),
    ("basics.masked_softmax", lambda s, m: _sm(s, ~m).nan_to_num(), "inverted", "last axis"),
    ("basics.masked_softmax", lambda s, m: torch.softmax(s, -1) * m, "after the softmax", None),
    ("basics.masked_softmax", lambda s, m: _sm(s, m, -2).nan_to_num(), "did you normalise over the last axis", None),
    ("basics.masked_softmax", lambda s, m: _sm(s, m), "all-zero weights", "sum to 1"),
    ("basics.masked_softmax", lambda s, m: torch.softmax(s.masked_fill(~m, -1e9), -1), "not uniform", None),
    ("basics.masked_softmax", _ms_max_over_all, "ALLOWED keys only", None),
    ("basics.masked_softmax", _ms_no_max, "overflows", "sum to 1"),
    ("basics.scaled_dot_product_attention", _sdpa(scale=lambda q, v: 1.0), "sqrt\\(d_k\\)", None),
    ("basics.scaled_dot_product_attention", _sdpa(scale=lambda q, v: 1 / q.shape[-1]), "not by d_k", None),
    ("basics.scaled_dot_product_attention", _sdpa(scale=lambda q, v: 1 / math.sqrt(v.shape[-1])), "not of the value size", None),
    ("basics.scaled_dot_product_attention", _sdpa_bmm, "not torch.bmm", None),
    ("basics.scaled_dot_product_attention", _sdpa(dim=-2), "the softmax goes over the keys", None),
    ("basics.scaled_dot_product_attention", _sdpa(values="key"), "multiply the weights by value", None),
    ("basics.scaled_dot_product_attention", _sdpa(use_mask=False), "the mask is ignored", None),
    ("basics.scaled_dot_product_attention", _sdpa(invert=True), "inverted", None),
    ("basics.scaled_dot_product_attention", _sdpa(nan_rows=True), "zero weights and a zero output", None),
    ("basics.scaled_dot_product_attention", _sdpa(fill=-1e9), "not uniform", None),
    ("basics.scaled_dot_product_attention", _sdpa(swap=True), "in that order", None),
    ("basics.additive_scores", _additive("no tanh"), "apply tanh", None),
    ("basics.additive_scores", _additive("separate tanh"), "tanh goes around the sum", None),
    ("basics.additive_scores", _additive("untransposed"), "query @ W_q.T", None),
    ("basics.additive_scores", _additive("sum"), "not the plain sum", None),
    ("basics.additive_scores", _additive("softmax"), "before any softmax", None),
    ("basics.additive_scores", _additive("transposed"), "swapped", None),
    # chapter 2
    ("seq2seq.padding_mask", lambda n, m: torch.arange(m)[None, :] >= n[:, None], "True marks the real tokens", None),
    ("seq2seq.padding_mask", lambda n, m: torch.arange(m)[None, :] <= n[:, None], "use <, not <=", None),
    ("seq2seq.padding_mask", lambda n, m: (torch.arange(m)[None, :] < n[:, None]).float(), "dtype", None),
    ("seq2seq.padding_mask", lambda n, m: torch.arange(m)[:, None] < n[None, :], "has shape", None),
    ("seq2seq.causal_mask", lambda n: torch.ones(n, n, dtype=torch.bool).triu(), "lower triangle", None),
    ("seq2seq.causal_mask", lambda n: torch.ones(n, n, dtype=torch.bool).tril(-1), "keep the diagonal", None),
    ("seq2seq.causal_mask", lambda n: torch.ones(n, n, dtype=torch.bool).triu(1), "may attend|keep the diagonal", None),
    ("seq2seq.causal_mask", lambda n: _ti(n, n), "dtype", None),
    ("seq2seq.cross_attention", _cross("roles"), "one row per query|has shape", None),
    ("seq2seq.cross_attention", _cross("sqrt E"), "not by x's width", None),
    ("seq2seq.cross_attention", _cross("no scale"), "divide the scores by sqrt\\(d\\)", None),
    ("seq2seq.cross_attention", _cross("kv swapped"), "keys use W_k", None),
    ("seq2seq.cross_attention", _cross("untransposed"), "x @ W_q.T", None),
    ("seq2seq.cross_attention", _cross("dim"), "over the keys", None),
    ("seq2seq.attentive_decoder_step", _decoder("no mask"), "padding got weight", None),
    ("seq2seq.attentive_decoder_step", _decoder("inverted"), "inverted", None),
    ("seq2seq.attentive_decoder_step", _decoder("no scale"), "1 / sqrt\\(H\\)", None),
    ("seq2seq.attentive_decoder_step", _decoder("order"), "in that order", None),
    ("seq2seq.attentive_decoder_step", _decoder("no bias"), "add the bias", None),
    ("seq2seq.attentive_decoder_step", _decoder("mean"), "not their mean|padding got weight", None),
    ("seq2seq.attentive_decoder_step", _decoder("3-D weights"), "squeeze", None),
    # chapter 3
    ("variants.gumbel_softmax", _gumbel("-log u"), "not -log\\(u\\)", None),
    ("variants.gumbel_softmax", _gumbel("sign"), "check the sign", None),
    ("variants.gumbel_softmax", _gumbel("no tau"), "by the temperature tau before", None),
    ("variants.gumbel_softmax", _gumbel("times tau"), "do not multiply", None),
    ("variants.gumbel_softmax", _gumbel("logits only"), "not the logits alone", None),
    ("variants.gumbel_softmax", _gumbel("dim 0"), "last axis", None),
    ("variants.gumbel_softmax", _gumbel("no noise"), "add the Gumbel noise", None),
    ("variants.straight_through_gumbel", _straight_through("soft"), "that is the soft sample", None),
    ("variants.straight_through_gumbel", _straight_through("hard only"), "no gradient reaches the logits", None),
    ("variants.straight_through_gumbel", _straight_through("no detach"), "gradient is zero", None),
    ("variants.straight_through_gumbel", _straight_through("argmax of logits"), "not of the logits", None),
    ("variants.straight_through_gumbel", _straight_through("no tau in the gradient"), "temperature is missing", None),
    ("variants.straight_through_gumbel", _straight_through("long"), "dtype", None),
    ("variants.reinforce_surrogate", _reinforce("detached log_probs"), "no gradient reaches log_probs", None),
    ("variants.reinforce_surrogate", _reinforce("losses not detached"), "flows into the losses", None),
    ("variants.reinforce_surrogate", _reinforce("no baseline"), "subtract the baseline", None),
    ("variants.reinforce_surrogate", _reinforce("sign"), "check the sign", None),
    ("variants.reinforce_surrogate", _reinforce("sum"), "not the sum", None),
    ("variants.reinforce_surrogate", _reinforce("probabilities"), "use the log-probabilities", None),
    ("variants.local_p_weights", _local_p("no gaussian"), "also scales the window softmax", None),
    ("variants.local_p_weights", _local_p("unrounded window"), "round the centre", None),
    ("variants.local_p_weights", _local_p("gaussian on round"), "on p_t itself", None),
    ("variants.local_p_weights", _local_p("sigma = D"), "sigma = window / 2, not window", None),
    ("variants.local_p_weights", _local_p("no window"), "covers only the window", None),
    ("variants.local_p_weights", _local_p("renormalised"), "do not renormalise", None),
    ("variants.conv_receptive_field", lambda n, k, d: n * k, "overlap", None),
    ("variants.conv_receptive_field", lambda n, k, d: 1 + n * (k - 1), "multiply the growth by d", None),
    ("variants.conv_receptive_field", lambda n, k, d: n * (k - 1) * d, "own position", None),
    ("variants.conv_receptive_field", lambda n, k, d: 1 + (k - 1) * sum(d**i for i in range(n)), "not d \\*\\* layer", None),
    # chapter 4
    ("multihead.split_heads", lambda x, h: x.reshape(x.shape[0], x.shape[1], h, -1), "transpose\\(1, 2\\)", None),
    ("multihead.split_heads", lambda x, h: x.reshape(x.shape[0], h, x.shape[1], -1), "mixes positions and heads", None),
    ("multihead.split_heads", lambda x, h: x.reshape(x.shape[0], x.shape[1], -1, h).permute(0, 3, 1, 2), "contiguous features", None),
    ("multihead.merge_heads", lambda x: x.reshape(x.shape[0], x.shape[2], -1), "transpose back", None),
    ("multihead.merge_heads", lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], x.shape[2], -1), "keep each head's d features together", None),
    ("multihead.masks_from_torch", lambda a, p: a[None, None] | p[:, None, None], "invert both masks", None),
    ("multihead.masks_from_torch", lambda a, p: (~a)[None, None] & p[:, None, None], "invert the key_padding_mask too", None),
    ("multihead.masks_from_torch", lambda a, p: a[None, None] & (~p)[:, None, None], "invert the attn_mask too", None),
    ("multihead.masks_from_torch", lambda a, p: (~a)[None, None] | (~p)[:, None, None], "BOTH masks", None),
    ("multihead.masks_from_torch", lambda a, p: (~a)[None] & (~p)[:, None], "add a head axis", None),
    ("multihead.multihead_forward", _mha("sqrt E"), "not sqrt\\(E\\)", None),
    ("multihead.multihead_forward", _mha("split no transpose"), "mixes positions and heads", None),
    ("multihead.multihead_forward", _mha("merge no transpose"), "side by side", None),
    ("multihead.multihead_forward", _mha("no W_o"), "output projection W_o", None),
    ("multihead.multihead_forward", _mha("untransposed"), "x @ W.T", None),
    ("multihead.multihead_forward", _mha("dim"), "over the keys", None),
    ("multihead.multihead_forward", _mha("one head"), "split into num_heads heads", None),
    ("multihead.mha_parameter_count", lambda E, H, k, v, b: 3 * E * E + (3 * E if b else 0), "output projection", None),
    ("multihead.mha_parameter_count", lambda E, H, k, v, b: E * (2 * E + k + v), "bias of size E", None),
    ("multihead.mha_parameter_count", lambda E, H, k, v, b: E * (2 * E + k + v) + 4 * E, "no biases at all", None),
    ("multihead.mha_parameter_count", lambda E, H, k, v, b: 4 * E * E + (4 * E if b else 0), "maps kdim", None),
    ("multihead.mha_parameter_count", lambda E, H, k, v, b: H * (E * (2 * E + k + v) + (4 * E if b else 0)), "does not change the count", None),
    ("multihead.kv_cache_bytes", lambda n, g, d, L, B, s: n * g * d * L * B * s, "keys AND values", None),
    ("multihead.kv_cache_bytes", lambda n, g, d, L, B, s: 2 * g * d * L * B * s, "num_layers", None),
    ("multihead.kv_cache_bytes", lambda n, g, d, L, B, s: 2 * n * g * d * L * s, "batch_size", None),
    ("multihead.kv_cache_bytes", lambda n, g, d, L, B, s: 2 * n * g * d * L * B, "bytes_per_value", None),
    # chapter 5
    ("positional.sinusoidal_encoding", _sin("swapped"), "sine goes in the even columns", None),
    ("positional.sinusoidal_encoding", _sin("i/d"), "2i/dim", None),
    ("positional.sinusoidal_encoding", _sin("halves"), "interleave", None),
    ("positional.sinusoidal_encoding", _sin("from 1"), "positions start at 0", None),
    ("positional.apply_rope", _rope("direction"), "rotate the wrong way", None),
    ("positional.apply_rope", _rope("halves"), "interleaved", None),
    ("positional.apply_rope", _rope("i/d"), "10000\\*\\*\\(-2i/d\\)", None),
    ("positional.apply_rope", _rope("sequential"), "OLD pair", None),
    ("positional.apply_rope", _rope("arange"), "positions you are given", None),
    ("positional.rope_scores", _rope_scores("q only"), "rotate k too", None),
    ("positional.rope_scores", _rope_scores("k only"), "rotate q too", None),
    ("positional.rope_scores", _rope_scores("sign"), "m \\+ n", None),
    ("positional.rope_scores", _rope_scores("no scale"), "1 / sqrt\\(d\\)", None),
    ("positional.rope_scores", _rope_scores("arange"), "decoding step", None),
    ("positional.rope_scores", _rope_scores("swapped positions"), "rotate q by q_positions", None),
    ("positional.rope_scores", _rope_scores("halves"), "rotate-half", None),
    ("positional.alibi_slopes", lambda n: torch.tensor([2 ** (-8 * (k + 1) / n) for k in range(n)]), "not a power of two", None),
    ("positional.alibi_slopes", lambda n: torch.tensor([2 ** (-8 * k / n) for k in range(n)]), "count k from 1", None),
    ("positional.alibi_slopes", lambda n: torch.arange(n), "dtype", None),
    ("positional.relative_position_index", lambda a, b, k: (torch.arange(a)[:, None] - torch.arange(b)[None, :]).clamp(-k, k) + k, "j - i", None),
    ("positional.relative_position_index", lambda a, b, k: torch.arange(b)[None, :] - torch.arange(a)[:, None] + k, "clip the distance", None),
    ("positional.relative_position_index", lambda a, b, k: (torch.arange(b)[None, :] - torch.arange(a)[:, None]).clamp(-k, k), "add max_distance", None),
    ("positional.relative_position_index", lambda a, b, k: torch.zeros(a, b), "integer tensor", None),
    # chapter 7 (sparse)
    ("sparse.dilated_window_mask", lambda L, w, r: ((torch.arange(L)[:, None] - torch.arange(L)).abs() <= w) & ((torch.arange(L)[:, None] - torch.arange(L)) % r == 0), "window \\* dilation positions", None),
    ("sparse.dilated_window_mask", lambda L, w, r: (torch.arange(L)[:, None] - torch.arange(L)).abs() <= w * r, "every dilation-th key", None),
    ("sparse.dilated_window_mask", lambda L, w, r: ((torch.arange(L)[:, None] - torch.arange(L)) >= 0) & ((torch.arange(L)[:, None] - torch.arange(L)) <= w * r) & ((torch.arange(L)[:, None] - torch.arange(L)) % r == 0), "both sides", None),
    ("sparse.dilated_window_mask", lambda L, w, r: ((torch.arange(L)[:, None] - torch.arange(L)).abs() < w * r) & ((torch.arange(L)[:, None] - torch.arange(L)) % r == 0), "<=, not <", None),
    ("sparse.band_pairs", lambda L, w: L * (2 * min(w, L - 1) + 1), "fewer than 2w \\+ 1", None),
    ("sparse.band_pairs", lambda L, w: L * 2 * min(w, L - 1) - min(w, L - 1) * (min(w, L - 1) + 1), "itself", None),
    ("sparse.band_pairs", lambda L, w: L * (2 * min(w, L - 1) + 1) - min(w, L - 1) * (min(w, L - 1) + 1) // 2, "both ends", None),
    ("sparse.band_pairs", lambda L, w: L * (2 * w + 1) - w * (w + 1), "cap it at L - 1", None),
    ("sparse.bigbird_kept_blocks", lambda n, g: 3 * n - 2 + 2 * g * n, "the band overlaps", None),
    ("sparse.bigbird_kept_blocks", lambda n, g: 2 * g * n + (3 * (n - g) - 2 if n - g >= 2 else n - g), "share g \\* g", None),
    ("sparse.bigbird_kept_blocks", lambda n, g: 2 * g * n - g * g + 3 * (n - g), "2 neighbours", None),
    ("sparse.topk_attention", _topk("dense"), "attend to every key", None),
    ("sparse.topk_attention", _topk("smallest"), "LARGEST", None),
    ("sparse.topk_attention", _topk("strict"), "k - 1", None),
    ("sparse.topk_attention", _topk("no scale"), "1 / sqrt\\(d\\)", None),
    ("sparse.topk_attention", _topk("no min"), "min\\(k, L\\)", None),
    ("sparse.banded_attention", _banded("dense"), "never build an L x L tensor", None),
    ("sparse.banded_attention", _banded("padding"), "padding at the two ends is not a key", None),
    ("sparse.banded_attention", _banded("all keys"), "every key", None),
    ("sparse.banded_attention", _banded("causal"), "both sides", None),
    ("sparse.banded_attention", _banded("strict"), "<=, not <", None),
    ("sparse.banded_attention", _banded("no scale"), "1 / sqrt\\(d\\)", None),
    ("sparse.performer_attention", _favor("quadratic"), "never build an L x L tensor", None),
    ("sparse.performer_attention", _favor("no normaliser"), "normaliser", None),
    ("sparse.performer_attention", _favor("no norm"), "-\\|x\\|\\^2 / 2", None),
    ("sparse.performer_attention", _favor("no scale"), "d\\*\\*-0.25 each", None),
    ("sparse.performer_attention", _favor("query only"), "BOTH", None),
    ("sparse.performer_attention", _favor("untransposed"), "x @ omega.T", None),
    # chapter 7's new exercises (more cases in tests/test_exercises_sparse_variants.py)
    ("sparse.lsh_buckets", lambda x, R: (x @ R).argmax(-1), "both signs", None),
    ("sparse.lsh_buckets", lambda x, R: (x @ R).abs().argmax(-1), "the sign matters", None),
    ("sparse.causal_window_mask_mod", lambda b, h, q, k, window: (q - k).abs() <= window, "causal", None),
    ("sparse.causal_window_mask_mod", lambda b, h, q, k, window: (q >= k) & (q - k < window), "w \\+ 1 keys",
     None),
]


@pytest.mark.parametrize("name, wrong, words, not_words", WRONG,
                         ids=[f"{row[0]}-{i}" for i, row in enumerate(WRONG)])
def test_every_listed_mistake_is_rejected_with_a_hint_that_names_it(name, wrong, words, not_words, capsys):
    assert check(name, wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ " + name), out
    assert re.search(words, out), out
    if not_words:
        assert not re.search(not_words, out), out


def test_every_exercise_of_chapters_one_to_five_and_seven_has_listed_mistakes():
    """The topics whose tables of mistakes live here; the others keep theirs beside their own tests
    (tests/test_exercises_transformer.py, test_exercises_interpret.py, test_modern.py, ...)."""
    for name in NAMES:
        if name.split(".")[0] in {"basics", "seq2seq", "variants", "multihead", "positional", "sparse"}:
            assert sum(row[0] == name for row in WRONG) >= 2, name


def test_a_right_answer_in_another_style_passes(capsys):
    """float64 inside, NumPy inside, lists for tuples, views: all accepted."""
    def masked_softmax_numpy(scores, mask):
        s = np.where(mask.numpy(), scores.double().numpy(), -np.inf)
        top = s.max(-1, keepdims=True)
        e = np.exp(s - np.where(np.isfinite(top), top, 0.0))
        total = e.sum(-1, keepdims=True)
        return torch.from_numpy(np.divide(e, total, out=np.zeros_like(e), where=total > 0))

    def sdpa_list(q, k, v, mask=None):
        out, w = solution("basics.scaled_dot_product_attention")(q.double(), k.double(), v.double(), mask)
        return [out.float(), w.float()]

    def split_view(x, h):
        return x.view(x.shape[0], x.shape[1], h, -1).permute(0, 2, 1, 3)

    def band_pairs_float(L, w):
        return float(solution("sparse.band_pairs")(L, w))

    def fit_with_sgd(x, y, xv, yv, steps, lr):
        log_h = torch.zeros((), requires_grad=True)
        opt = torch.optim.SGD([log_h], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            pred = torch.softmax(-0.5 * ((xv[:, None] - x[None, :]) / log_h.exp()) ** 2, 1) @ y
            ((pred - yv) ** 2).mean().backward()
            opt.step()
        return log_h.exp()                       # a 0-d tensor that requires grad

    for name, fn in (("basics.masked_softmax", masked_softmax_numpy),
                     ("basics.scaled_dot_product_attention", sdpa_list), ("multihead.split_heads", split_view),
                     ("sparse.band_pairs", band_pairs_float), ("basics.fit_bandwidth", fit_with_sgd),
                     ("sparse.banded_attention", _banded_loop)):
        assert check(name, fn) is True, capsys.readouterr().out


def _banded_loop(q, k, v, w):
    B, H, L, d = q.shape
    out = torch.empty(B, H, L, v.shape[-1], dtype=q.dtype)
    for i in range(L):
        lo, hi = max(0, i - w), min(L, i + w + 1)
        s = q[:, :, i:i + 1] @ k[:, :, lo:hi].transpose(-2, -1) / math.sqrt(d)
        out[:, :, i] = (torch.softmax(s, -1) @ v[:, :, lo:hi])[:, :, 0]
    return out


def test_hints_are_given_only_when_they_distinguish_the_mistake(capsys):
    # at bandwidth 1 the kernel variants equal the right kernel: no kernel hint for a wrong prediction
    assert check("basics.nadaraya_watson", _nw_bad_prediction) is False
    out = capsys.readouterr().out
    assert "test 1 of" in out and "Hint: the weights are right" in out
    # NaN is reported as NaN, never as "rows must sum to 1"
    assert check("basics.nadaraya_watson", _nw_naive) is False
    assert "sum to 1" not in capsys.readouterr().out
    # an inverted mask is not told to normalise over the last axis
    assert check("basics.masked_softmax", lambda s, m: _sm(s, ~m).nan_to_num()) is False
    assert "last axis" not in capsys.readouterr().out
    # counts: got X, expected Y (off by Z), never "times that"
    assert check("multihead.mha_parameter_count", lambda E, H, k, v, b: 16576) is False
    out = capsys.readouterr().out
    assert "got 16,576, expected 16,640 (off by -64)" in out and "times that" not in out
    assert check("multihead.kv_cache_bytes", lambda n, g, d, L, B, s: n * g * d * L * B * s) is False
    assert "2 times too small" in capsys.readouterr().out


# --- the checker never crashes and cannot be fooled -----------------------------------------------

class _Hostile:
    def __eq__(self, other):
        raise RuntimeError("__eq__")

    def __repr__(self):
        raise RuntimeError("__repr__")

    __str__ = __repr__
    __hash__ = object.__hash__

    def __len__(self):
        raise RuntimeError("__len__")

    def __float__(self):
        raise RuntimeError("__float__")


class _HostileList(list):
    def __len__(self):
        raise RuntimeError("__len__")

    def __iter__(self):
        raise RuntimeError("__iter__")


class _HostileInt(int):
    def __eq__(self, other):
        raise RuntimeError("__eq__")

    def __format__(self, spec):
        raise RuntimeError("__format__")

    __hash__ = int.__hash__


class _HostileError(Exception):
    def __str__(self):
        raise RuntimeError("__str__")


def _raise_hostile(*a, **k):
    raise _HostileError()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad, words", [
    (lambda *a, **k: torch.zeros(3, 4).to_sparse(), "sparse|should be a tuple"),
    (lambda *a, **k: torch.zeros(3, 4, device="meta"), "meta|should be a tuple"),
    (lambda *a, **k: torch.zeros(3, 4, dtype=torch.complex64), "complex|should be a tuple"),
    (lambda *a, **k: 10**400, "too large|should be a torch.Tensor|should be a tuple"),
    (lambda *a, **k: 10**5000, "too large|should be a torch.Tensor|should be a tuple"),
    (lambda *a, **k: float("inf"), "infinite|should be a torch.Tensor|should be a tuple"),
    (lambda *a, **k: 3 + 4j, "complex"),
    (lambda *a, **k: (i for i in range(3)), "generator"),
    (lambda *a, **k: _Hostile(), "_Hostile"),
    (lambda *a, **k: _HostileList([1, 2]), "_HostileList"),
    (lambda *a, **k: _HostileInt(7), "got 7|should be a"),
    (lambda *a, **k: [torch.zeros(2)] * 10_000, "10000 items"),
    (_raise_hostile, "raised _HostileError"),
])
def test_strange_returns_become_feedback(name, bad, words, capsys):
    assert check(name, bad) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ " + name), out
    assert re.search(words, out), out


def test_reassigning_package_functions_does_not_move_the_targets(monkeypatch, capsys):
    import attn_course.basics
    import attn_course.interpret
    import attn_course.multihead
    import attn_course.positional
    import attn_course.sparse

    zeros = lambda x, *a, **k: torch.zeros_like(x)  # noqa: E731
    monkeypatch.setattr(attn_course.basics, "masked_softmax", lambda s, m=None, dim=-1: torch.zeros_like(s))
    monkeypatch.setattr(attn_course.basics, "scaled_dot_product_attention", lambda q, k, v, m=None: (q, q))
    monkeypatch.setattr(attn_course.sparse, "topk_attention", zeros)
    monkeypatch.setattr(attn_course.sparse, "sliding_window_attention", zeros)
    monkeypatch.setattr(attn_course.positional, "apply_rope", lambda x, p=None: x)
    monkeypatch.setattr(attn_course.multihead, "split_heads", lambda x, h: x)
    monkeypatch.setattr(attn_course.interpret, "attention_rollout", lambda w, residual=True: w[0])
    for name in ("basics.masked_softmax", "basics.scaled_dot_product_attention", "seq2seq.cross_attention",
                 "sparse.topk_attention", "sparse.banded_attention", "positional.apply_rope", "positional.rope_scores",
                 "multihead.split_heads", "interpret.attention_rollout", "interpret.rollout_with_residual"):
        assert check(name, solution(name)) is True, capsys.readouterr().out
    # and the patched (wrong) functions are still rejected
    assert check("basics.masked_softmax", attn_course.basics.masked_softmax) is False
    assert check("sparse.topk_attention", attn_course.sparse.topk_attention) is False


def test_printed_output_is_captured_and_capped(capsys):
    def chatty(scores, mask):
        for i in range(20_000):
            print("line", i)
        return solution("basics.masked_softmax")(scores, mask)

    assert check("basics.masked_softmax", chatty) is True
    out = capsys.readouterr().out
    assert out.startswith("✅ basics.masked_softmax")
    assert "printed" in out and "the first 2,000 are shown" in out
    assert len(out) < 3000


def _coverage_active() -> bool:
    try:
        import coverage
    except ImportError:  # pragma: no cover
        return False
    return coverage.Coverage.current() is not None


# Under coverage's tracer the checker's join on a thread sleeping in C returns only when the
# sleep ends, so the "still running" branch cannot be reached; `make unit` runs this test a
# second time without coverage.
@pytest.mark.skipif(_coverage_active(), reason="needs a run without coverage (make unit does one)")
def test_a_sleep_past_the_time_limit_says_so_and_asks_for_a_restart(capsys):
    # a sleep long enough to outlast the limit and the grace period even on a busy machine
    assert check("basics.masked_softmax", lambda s, m: time.sleep(10), timeout=0.2) is False
    out = capsys.readouterr().out
    assert "did not finish within 0.2 s" in out
    assert "slow operation" in out and "sleep" in out and "restart the kernel" in out
    assert check("basics.masked_softmax", _loops_forever, timeout=0.2) is False
    out = capsys.readouterr().out
    assert "loop that never ends" in out and "restart the kernel" not in out


def test_memory_spy_sees_only_the_checked_thread():
    from attn_course.exercises._core import LargestTensor

    with LargestTensor() as spy:
        torch.ones(8, 8) @ torch.ones(8, 3)
        torch.arange(5).expand(100, 5)     # a view: no new storage
    assert spy.largest == 64 and spy.shape == (8, 8)


def test_a_broken_reference_is_a_course_bug_not_feedback():
    from attn_course.exercises._core import Case, Exercise, evaluate

    def boom():
        raise ValueError("bad reference")

    ex = Exercise("ch99.broken", "f()", lambda: [Case("one", ())], boom, lambda: 0)
    with pytest.raises(RuntimeError, match="bug in the course"):
        evaluate(ex, lambda: 0, 1.0)


# --- chapter 7: the mistakes learners make, each rejected with a hint that names it ----------------

def _merge_average(out1, lse1, out2, lse2):
    return (out1 + out2) / 2, torch.logaddexp(lse1, lse2)


def _merge_unstable(out1, lse1, out2, lse2):
    w1, w2 = torch.exp(lse1), torch.exp(lse2)
    return (w1[..., None] * out1 + w2[..., None] * out2) / (w1 + w2)[..., None], torch.log(w1 + w2)


def _merge_max_lse(out1, lse1, out2, lse2):
    out, _ = solution("flash.merge_attention")(out1, lse1, out2, lse2)
    return out, torch.maximum(lse1, lse2)


def _merge_nan_when_both_empty(out1, lse1, out2, lse2):
    top = torch.maximum(lse1, lse2)          # -inf - (-inf) = NaN where both parts are empty
    w1, w2 = torch.exp(lse1 - top), torch.exp(lse2 - top)
    return (w1[..., None] * out1 + w2[..., None] * out2) / (w1 + w2)[..., None], top + torch.log(w1 + w2)


def _merge_in_float32(out1, lse1, out2, lse2):
    out, lse = solution("flash.merge_attention")(out1.float(), lse1.float(), out2.float(), lse2.float())
    return out.double(), lse.double()


def _tile_no_rescale(m, z, o, s, v):
    m_new = torch.maximum(m, s.amax(-1))
    p = torch.exp(s - m_new[:, None])
    return m_new, z + p.sum(-1), o + p @ v


def _tile_nan_on_masked_rows(m, z, o, s, v):
    m_new = torch.maximum(m, s.amax(-1))
    p, a = torch.exp(s - m_new[:, None]), torch.exp(m - m_new)
    return m_new, a * z + p.sum(-1), a[:, None] * o + p @ v


def _skip_diagonal_too(L, bq, bk):
    nq, nk = -(-L // bq), -(-L // bk)
    return torch.arange(nk)[None, :] * bk >= torch.arange(nq)[:, None] * bq


def _skip_by_tile_index(L, bq, bk):
    return torch.ones(-(-L // bq), -(-L // bk), dtype=torch.bool).triu(1)


@pytest.mark.parametrize("name, wrong, words", [
    ("flash.merge_attention", _merge_average, "not equally important"),
    ("flash.merge_attention", _merge_unstable, "overflows"),
    ("flash.merge_attention", _merge_max_lse, "logaddexp"),
    ("flash.flash_tile_step", _tile_no_rescale, "exp\\(m_old - m_new\\)"),
    ("flash.flash_tile_step", _tile_nan_on_masked_rows, "NaN"),
    ("serving.kv_bytes", lambda a, b, c, d, e, f, g: a * c * d * e * f * g, "AND values"),
    ("serving.kv_bytes", lambda a, b, c, d, e, f, g: 2 * a * b * d * e * f * g, "num_kv_heads"),
    ("serving.kv_bytes", lambda a, b, c, d, e, f, g: 2 * a * c * d * e * g, "batch_size"),
    ("serving.kv_bytes", lambda a, b, c, d, e, f, g: 2 * a * c * d * e * f, "bytes_per_value"),
    ("serving.kv_bytes", lambda a, b, c, d, e, f, g: 2 * a * (b // c) * d * e * f * g, "not num_heads // num_kv_heads"),
    ("flash.merge_attention", _merge_nan_when_both_empty, "NaN"),
    ("flash.causal_skipped_tiles", _skip_diagonal_too, "diagonal tiles are needed"),
    ("flash.causal_skipped_tiles", _skip_by_tile_index, "diagonal tiles are needed|compare positions"),
    ("distributed.ring_source", lambda r, s, w: (r + s) % w, "rank r - s"),
    ("distributed.ring_source", lambda r, s, w: r - s, "modulo"),
])
def test_chapter_seven_rejects_the_usual_mistakes(name, wrong, words, capsys):
    assert check(name, wrong) is False
    assert re.search(words, capsys.readouterr().out)


def test_chapter_seven_accepts_a_float32_answer(capsys):
    assert check("flash.merge_attention", _merge_in_float32) is True


def test_chapter_seven_targets_do_not_move_when_the_package_is_patched(monkeypatch, capsys):
    import attn_course.flash

    monkeypatch.setattr(attn_course.flash, "merge_attention", lambda outs, lses: (outs[0], lses[0]))
    assert check("flash.merge_attention", solution("flash.merge_attention")) is True


# --- issue 28: no plausible wrong answer passes, every statement says what is enforced ----------
# One test per class of hole, through the checker's machinery (_core), for every exercise it applies
# to. "Mine" are the exercise modules whose statements are in chapters 1-5, 7 and 11; the machinery
# tests (odd returns, dtypes, in-place) run over every exercise.

MINE = ("basics", "seq2seq", "variants", "multihead", "positional", "sparse", "modern")
MY_NAMES = [n for n in NAMES if n.split(".")[0] in MINE]
_BOTH = {torch.float32, torch.float64}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


# class 1: every condition a statement names is tested, in each precision and with every other

@pytest.mark.parametrize("name", MY_NAMES)
def test_every_stated_condition_is_tested_in_both_precisions_and_with_every_other(name):
    ex = _REGISTRY[name]
    assert ex.conditions, f"{name}: list the conditions its statement names"
    cases = [case for case, _ in ex.prepared()]
    floating = any(float_dtypes(case) for case in cases)
    met = {}
    for cond, holds in ex.conditions.items():
        met[cond] = {i for i, case in enumerate(cases) if holds(*case.args, **case.kwargs)}
        assert met[cond], f"{name}: no case has {cond!r}"
        if floating and not getattr(holds, "any_precision", False):
            dtypes = set().union(*(float_dtypes(cases[i]) for i in met[cond]))
            assert _BOTH <= dtypes, f"{name}: {cond!r} only in {dtypes}"
    apart = {frozenset(pair) for pair in ex.exclusive}
    assert all(set(pair) <= set(ex.conditions) for pair in apart), f"{name}: exclusive names unknown conditions"
    for a, b in itertools.combinations(ex.conditions, 2):
        if frozenset((a, b)) in apart:
            assert not met[a] & met[b], f"{name}: {a!r} and {b!r} are declared exclusive but meet"
        else:
            assert met[a] & met[b], f"{name}: {a!r} and {b!r} are never tested together"


def _off_in(dtype):
    """The reference solution, but wrong (by 0.1) when the inputs are in ``dtype``."""
    def make(name):
        ref = solution(name)

        def answer(*args, **kwargs):
            out = ref(*args, **kwargs)
            if dtype not in {t.dtype for t in _tensors((args, kwargs))}:
                return out
            if isinstance(out, tuple):
                return (out[0] + 0.1, *out[1:])
            return out + 0.1
        return answer
    return make


@pytest.mark.parametrize("name", [n for n in MY_NAMES
                                  if any(float_dtypes(c) for c, _ in _REGISTRY[n].prepared())])
def test_an_answer_right_in_one_precision_only_is_rejected(name, capsys):
    for dtype in _BOTH:
        assert check(name, _off_in(dtype)(name)) is False, (dtype, capsys.readouterr().out)


def _fill(value, zero_dead_rows=True):
    def masked_softmax(s, m):
        w = torch.softmax(s.masked_fill(~m, value), -1)
        return w * m.any(-1, keepdim=True) if zero_dead_rows else w
    return masked_softmax


def test_extremes_the_statements_promise_are_tested(capsys):
    # scores of magnitude 1e4: a finite fill of -1e4 hands the weight to masked keys
    assert check("basics.masked_softmax", _fill(-1e4)) is False
    assert "a finite fill such as -1e4" in capsys.readouterr().out
    assert check("basics.masked_softmax", _fill(-1e4, zero_dead_rows=False)) is False
    # a fill far below every allowed score is right, in either precision
    assert check("basics.masked_softmax", _fill(-1e30)) is True
    assert check("basics.masked_softmax", lambda s, m: _fill(torch.finfo(s.dtype).min)(s, m)) is True

    # uniform samples at the ends: clamping them "for safety" changes the sample
    def clamped(logits, u, tau):
        return torch.softmax((logits - torch.log(-torch.log(u.clamp(1e-4, 1 - 1e-4)))) / tau, -1)

    assert check("variants.gumbel_softmax", clamped) is False
    assert "at the ends" in capsys.readouterr().out

    # queries 60 bandwidths away, with near ones in the same call
    def naive(x, y, q, h):
        w = torch.exp(-0.5 * ((q[:, None] - x[None, :]) / h) ** 2)
        w = w / w.sum(1, keepdim=True)
        return w @ y, w

    assert check("basics.nadaraya_watson", naive) is False
    assert "underflows" in capsys.readouterr().out


# class 2: the memory spy sees NumPy (and Python lists) too

def test_the_footprint_sees_numpy_and_python_allocations():
    with Footprint() as spy:
        a = np.ones((512, 512))          # 2 MB in NumPy: invisible to a torch dispatch mode
        del a
    assert spy.largest == 0 and spy.host_bytes >= 512 * 512 * 8
    with Footprint() as spy:
        rows = [[0.0] * 300 for _ in range(300)]
        del rows
    assert spy.host_bytes >= 300 * 300 * 8
    with Footprint() as spy:
        torch.ones(512, 512).sum()
    assert spy.largest == 512 * 512 and spy.host_bytes < 100_000


def _numpy_dense_banded(q, k, v, w):
    qn, kn, vn = q.double().numpy(), k.double().numpy(), v.double().numpy()
    i = np.arange(q.shape[-2])
    s = np.where(np.abs(i[:, None] - i[None, :]) <= w, qn @ kn.swapaxes(-1, -2) / math.sqrt(q.shape[-1]), -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    return torch.from_numpy((e / e.sum(-1, keepdims=True)) @ vn).to(q.dtype)


def _numpy_performer(q, k, v, omega):
    d, m = q.shape[-1], omega.shape[0]
    qn, kn, vn, om = (t.double().numpy() for t in (q, k, v, omega))

    def phi(x):
        x = x * d**-0.25
        return np.exp(x @ om.T - (x * x).sum(-1, keepdims=True) / 2) / math.sqrt(m)

    a = phi(qn) @ phi(kn).swapaxes(-1, -2)                     # L x L, in NumPy
    return torch.from_numpy((a @ vn) / a.sum(-1, keepdims=True)).to(q.dtype)


def _numpy_causal_linear(q, k, v):
    def phi(x):
        x = x.double().numpy()
        return np.where(x > 0, x + 1, np.exp(x))

    a = np.tril(phi(q) @ phi(k).swapaxes(-1, -2))              # L x L, in NumPy
    return torch.from_numpy((a @ v.double().numpy()) / a.sum(-1, keepdims=True)).to(q.dtype)


@pytest.mark.parametrize("name, quadratic_in_numpy", [
    ("sparse.banded_attention", _numpy_dense_banded),
    ("sparse.performer_attention", _numpy_performer),
    ("modern.causal_linear_attention", _numpy_causal_linear),
])
def test_an_l_by_l_array_in_numpy_is_caught(name, quadratic_in_numpy, capsys):
    assert check(name, quadratic_in_numpy) is False
    out = capsys.readouterr().out
    assert "outside torch" in out and "L x L float32 array" in out, out


# class 3: linear memory is not linear work

def test_the_work_counter_counts_products_and_elements():
    a, b = torch.randn(8, 5), torch.randn(5, 3)
    with Footprint(host=False) as spy:
        a @ b                                            # 8 * 5 * 3 multiply-adds
    assert spy.work == 120 and spy.arithmetic == 120
    with Footprint(host=False) as spy:
        torch.exp(a).sum()                               # 40 produced, 40 read
        a.T.expand(2, 5, 8)                              # views are free
    assert spy.work == 80
    with Footprint(host=False) as spy:
        torch.cat([a, a]).clone()                        # data movement, no arithmetic
    assert spy.work == 160 and spy.arithmetic == 0
    q = torch.randn(1, 2, 16, 4)
    with Footprint(host=False) as spy:
        F.scaled_dot_product_attention(q, q, q)          # one fused op: 2 heads, 16 x 16 pairs, d + d_v
    assert spy.work == 2 * 16 * 16 * 8 and spy.products == spy.work
    with Footprint(host=False) as spy:
        torch.exp(a) @ b                                 # products count the matrix product alone
        torch.mv(a, b[:, 0])
    assert spy.products == 120 + 40 and spy.work == 40 + 120 + 40


def _banded_64_queries_at_a_time(q, k, v, w):
    """Dense scores for 64 queries at a time: no L x L tensor, but L^2 work."""
    L, outs = q.shape[-2], []
    for start in range(0, L, 64):
        i, j = torch.arange(start, min(L, start + 64)), torch.arange(L)
        s = q[..., start:start + 64, :] @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        outs.append(torch.softmax(s.masked_fill((i[:, None] - j[None, :]).abs() > w, -math.inf), -1) @ v)
    return torch.cat(outs, -2)


def _banded_unfold(q, k, v, w):
    B, H, L, d = q.shape
    w = min(w, L - 1)
    ks = F.pad(k, (0, 0, w, w)).unfold(2, 2 * w + 1, 1)          # (B, H, L, d, 2w + 1): a view
    vs = F.pad(v, (0, 0, w, w)).unfold(2, 2 * w + 1, 1)
    s = torch.einsum("bhld,bhldw->bhlw", q, ks) / math.sqrt(d)
    j = torch.arange(L)[:, None] + torch.arange(-w, w + 1)[None, :]
    s = s.masked_fill((j < 0) | (j >= L), -math.inf)
    return torch.einsum("bhlw,bhldw->bhld", torch.softmax(s, -1), vs)


def _phi_features(q, k, omega):
    d, m = q.shape[-1], omega.shape[0]

    def phi(x):
        x = x * d**-0.25
        return torch.exp(x @ omega.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)
    return phi(q), phi(k)


def _performer_half_the_queries_at_a_time(q, k, v, omega):
    pq, pk = _phi_features(q, k, omega)
    L, outs = q.shape[-2], []
    for part in (slice(0, L // 2), slice(L // 2, L)):
        a = pq[..., part, :] @ pk.transpose(-2, -1)             # (L / 2) x L: no L x L tensor
        outs.append((a @ v) / a.sum(-1, keepdim=True))
    return torch.cat(outs, -2)


def _performer_einsum(q, k, v, omega):
    pq, pk = _phi_features(q, k, omega)
    kv, z = torch.einsum("bhlm,bhld->bhmd", pk, v), pk.sum(-2)
    return torch.einsum("bhlm,bhmd->bhld", pq, kv) / torch.einsum("bhlm,bhm->bhl", pq, z)[..., None]


def _elu1(x):
    return F.elu(x) + 1


def _causal_linear_per_query_loop(q, k, v):
    """Each query attends to its whole prefix: linear memory, L^2 / 2 work."""
    fq, fk = _elu1(q), _elu1(k)
    outs = []
    for i in range(q.shape[-2]):
        a = fq[..., i:i + 1, :] @ fk[..., :i + 1, :].transpose(-2, -1)
        outs.append((a @ v[..., :i + 1, :]) / a.sum(-1, keepdim=True))
    return torch.cat(outs, -2)


def _causal_linear_chunks(q, k, v, size=16):
    fq, fk = _elu1(q), _elu1(k)
    S = q.new_zeros(*q.shape[:-2], q.shape[-1], v.shape[-1])
    z = q.new_zeros(*q.shape[:-2], q.shape[-1])
    outs = []
    for a in range(0, q.shape[-2], size):
        qc, kc, vc = fq[..., a:a + size, :], fk[..., a:a + size, :], v[..., a:a + size, :]
        inner = (qc @ kc.transpose(-2, -1)).tril()                # within the chunk only
        outs.append((qc @ S + inner @ vc) / (qc @ z[..., None] + inner.sum(-1, keepdim=True)))
        S, z = S + kc.transpose(-2, -1) @ vc, z + kc.sum(-2)
    return torch.cat(outs, -2)


def _numpy_banded_loop(q, k, v, w):
    """Linear, but in NumPy, where the work cannot be counted."""
    qn, kn, vn = q.double().numpy(), k.double().numpy(), v.double().numpy()
    out = np.zeros(v.shape)
    L = q.shape[-2]
    for i in range(L):
        lo, hi = max(0, i - w), min(L, i + w + 1)
        s = np.einsum("bhd,bhjd->bhj", qn[:, :, i], kn[:, :, lo:hi]) / math.sqrt(q.shape[-1])
        e = np.exp(s - s.max(-1, keepdims=True))
        out[:, :, i] = np.einsum("bhj,bhjd->bhd", e / e.sum(-1, keepdims=True), vn[:, :, lo:hi])
    return torch.from_numpy(out).to(q.dtype)


@pytest.mark.parametrize("name, quadratic, right", [
    ("sparse.banded_attention", _banded_64_queries_at_a_time, (_banded_unfold, _banded_loop)),
    ("sparse.performer_attention", _performer_half_the_queries_at_a_time,
     (_performer_einsum, solution("sparse.performer_attention"))),
    ("modern.causal_linear_attention", _causal_linear_per_query_loop,
     (_causal_linear_chunks, solution("modern.causal_linear_attention"))),
])
def test_quadratic_work_in_linear_memory_is_caught_and_linear_answers_pass(name, quadratic, right, capsys):
    assert check(name, quadratic, timeout=120) is False
    out = capsys.readouterr().out
    assert "units of work" in out and "grows like L^2" in out, out
    for fn in right:
        assert check(name, fn, timeout=120) is True, capsys.readouterr().out


def test_work_done_outside_torch_is_not_counted_so_it_is_refused(capsys):
    assert check("sparse.banded_attention", _numpy_banded_loop, timeout=60) is False
    assert "almost no arithmetic in torch" in capsys.readouterr().out


def test_counting_exercises_want_a_derivation_not_a_built_object(capsys):
    from attn_course.multihead import MultiHeadAttention, count_parameters
    from attn_course.sparse import bigbird_layout, sliding_window_mask

    def by_module(E, H, k, v, b):
        return count_parameters(MultiHeadAttention(E, H, kdim=k, vdim=v, bias=b))

    for name, fn in (("multihead.mha_parameter_count", by_module),
                     ("sparse.band_pairs", lambda L, w: int(sliding_window_mask(L, w).sum())),
                     ("sparse.bigbird_kept_blocks",
                      lambda n, g: int(bigbird_layout(n, num_random_blocks=0, num_global_blocks=g).sum()))):
        assert check(name, fn) is False
        assert "instead of deriving the count" in capsys.readouterr().out


# class 4: integer outputs in the dtype the next line of real code needs

def _integer_outputs(name):
    case, expected = _REGISTRY[name].prepared()[0]
    return [t.dtype for t in _tensors(expected) if not t.is_floating_point()]


@pytest.mark.parametrize("name", [n for n in NAMES if _integer_outputs(n)])
def test_an_index_or_mask_in_another_dtype_is_rejected(name, capsys):
    ref = solution(name)
    wanted = _integer_outputs(name)[0]
    others = [torch.int32, torch.uint8, torch.float32] + ([torch.int64] if wanted == torch.bool else [torch.bool])
    for dtype in others:
        def cast(*args, dtype=dtype, **kwargs):
            out = ref(*args, **kwargs)
            if isinstance(out, tuple):
                return tuple(o.to(dtype) if not o.is_floating_point() else o for o in out)
            return out.to(dtype)
        assert check(name, cast) is False, dtype
        out = capsys.readouterr().out
        assert "dtype" in out and str(dtype) in out, out


def test_int64_is_named_with_the_code_that_needs_it(capsys):
    assert check("positional.relative_position_index",
                 lambda a, b, k: solution("positional.relative_position_index")(a, b, k).int()) is False
    out = capsys.readouterr().out
    assert "torch.int32" in out and "int64" in out and "nn.Embedding" in out


# class 5: inputs must not change, and the statements say so

def _first_changeable(case, may_modify):
    for i, a in enumerate(case.args):
        if isinstance(a, torch.Tensor) and i not in may_modify and a.numel():
            return i
    return None


@pytest.mark.parametrize("name", [n for n in NAMES
                                  if _first_changeable(_REGISTRY[n].prepared()[0][0], _REGISTRY[n].may_modify)
                                  is not None])
def test_changing_any_input_in_place_is_rejected_and_named(name, capsys):
    ex = _REGISTRY[name]
    i = _first_changeable(ex.prepared()[0][0], ex.may_modify)
    ref = solution(name)

    def changes_an_input(*args, **kwargs):
        out = ref(*clone_args(args), **kwargs)
        x = args[i]
        if x.dtype == torch.bool:
            x.logical_not_()
        else:
            x.add_(1)
        return out

    assert check(name, changes_an_input) is False
    out = capsys.readouterr().out
    assert "changed its inputs in place" in out, out
    named = arg_names(ex.signature)[i]
    assert (f"`{named}`" if named else f"argument {i + 1}") in out, out


def clone_args(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def test_a_state_update_may_be_done_in_place_where_the_statement_allows_it(capsys):
    def delta_in_place(state, key, value, beta, gate):
        g, b = gate[..., None, None], beta[..., None, None]
        read = state @ key[..., :, None]
        state.mul_(g).add_(b * (value[..., :, None] - g * read) * key[..., None, :])
        return state

    assert check("modern.delta_rule_step", delta_in_place) is True, capsys.readouterr().out

    def also_changes_the_key(state, key, value, beta, gate):
        out = solution("modern.delta_rule_step")(state, key, value, beta, gate)
        key.mul_(2)
        return out

    assert check("modern.delta_rule_step", also_changes_the_key) is False
    out = capsys.readouterr().out
    assert "changed its inputs in place (`key`)" in out and "only `state`" in out, out


IN_PLACE_SENTENCE = "Leave the inputs unchanged: the checker rejects a function that modifies its arguments in place."


def _statements():
    """(exercise id, statement text) for every auto-checked exercise of my chapters."""
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "chapters"
    out = {}
    for path in sorted(root.glob("*.ipynb")):
        if path.name[:2] not in ("01", "02", "03", "04", "05", "07", "11"):
            continue
        cells = json.loads(path.read_text())["cells"]
        for before, cell in zip(cells, cells[1:]):
            found = re.search(r'^check\("([\w.]+)"', "".join(cell["source"]), re.M)
            if cell["cell_type"] == "code" and found and "strict=True" not in "".join(cell["source"]):
                out[found.group(1)] = "".join(before["source"])
    return out


def test_every_statement_says_what_the_checker_enforces():
    statements = _statements()
    assert set(MY_NAMES) <= set(statements), set(MY_NAMES) - set(statements)
    for name in MY_NAMES:
        text = " ".join(statements[name].split())
        case = _REGISTRY[name].prepared()[0][0]
        if _REGISTRY[name].may_modify:
            assert "in place" in text and "return it" in text, name
        elif _tensors((case.args, case.kwargs)):
            assert IN_PLACE_SENTENCE in text, name
    text = lambda n: " ".join(statements[n].split())  # noqa: E731
    assert "not `(output, weights)`" in text("multihead.multihead_forward")
    assert "Python `float`" in text("basics.fit_bandwidth")
    assert "-10^4" in text("basics.masked_softmax") or "-10^{4}" in text("basics.masked_softmax")
    for name in ("sparse.banded_attention", "sparse.performer_attention", "modern.causal_linear_attention"):
        assert "torch operations" in text(name) and "work" in text(name), name
    for name in ("multihead.mha_parameter_count", "sparse.band_pairs", "sparse.bigbird_kept_blocks"):
        assert "without building" in text(name).lower() or "without a module" in text(name).lower(), name


# class 6: a hint names the mistake the answer made, or none

def _generic_wrong_answers(expected):
    """Plausible slips, as functions of the right answer: scaled, shifted, transposed, cast..."""
    def each(fn):
        def apply(x):
            if isinstance(x, tuple):
                return tuple(fn(v) for v in x)
            return fn(x)
        return apply

    def number(f):
        return lambda x: f(x) if type(x) in (int, float) else x

    def tensor(f, kinds=("float",)):
        def g(x):
            if not isinstance(x, torch.Tensor):
                return x
            kind = "bool" if x.dtype == torch.bool else "float" if x.is_floating_point() else "int"
            return f(x) if kind in kinds else x
        return g

    slips = {
        "times 8": number(lambda x: x * 8), "times 2": number(lambda x: x * 2),
        "halved": number(lambda x: x / 2), "plus one": number(lambda x: x + 1),
        "minus one": number(lambda x: x - 1), "negated": number(lambda x: -x),
        "float times 2": tensor(lambda x: x * 2), "float times 8": tensor(lambda x: x * 8),
        "float plus 0.5": tensor(lambda x: x + 0.5), "float negated": tensor(lambda x: -x),
        "float transposed": tensor(lambda x: x.transpose(-2, -1) if x.ndim >= 2 else x.flip(-1)),
        "float rolled": tensor(lambda x: x.roll(1, -1) if x.ndim else x), "zeros": tensor(torch.zeros_like),
        "uniform rows": tensor(lambda x: torch.full_like(x, 1.0 / x.shape[-1]) if x.ndim else x),
        "inverted": tensor(lambda x: ~x, ("bool",)), "transposed mask": tensor(
            lambda x: x.transpose(-2, -1) if x.ndim >= 2 else x.flip(-1), ("bool", "int")),
        "all True": tensor(torch.ones_like, ("bool",)), "shifted": tensor(lambda x: x.roll(1, -1) if x.ndim else x, ("bool", "int")),
        "int plus one": tensor(lambda x: x + 1, ("int",)), "int minus one": tensor(lambda x: x - 1, ("int",)),
    }
    for slip, fn in slips.items():
        wrong = each(fn)(expected)
        if not agrees(wrong, expected):
            yield slip, wrong


@pytest.mark.parametrize("name", MY_NAMES)
def test_a_hint_never_names_a_mistake_the_answer_did_not_make(name):
    ex = _REGISTRY[name]
    for i, (case, expected) in enumerate(ex.prepared()):
        if any(max(t.shape, default=0) >= 256 for t in _tensors(case.args)):
            continue                                             # the long memory and work cases
        for j, (slip, wrong) in enumerate(_generic_wrong_answers(expected)):
            if (i + j) % 2:
                continue                                         # every slip on every other case: quick
            hint = ex.hint(Case(case.description, case.args, case.kwargs), wrong, expected)
            if hint is None:
                continue
            assert isinstance(hint, Hint), f"{name}: hints say why they may be shown, got {hint!r}"
            if hint.kind == "mistake":
                part = hint.where or (lambda x: x)
                assert agrees(part(wrong), hint.variant, hint.atol, hint.rtol), (name, slip, hint.text)
                assert not agrees(part(expected), hint.variant, hint.atol, hint.rtol), (name, slip, hint.text)
            assert hint_text(hint, wrong, expected) is not None


def test_the_checker_drops_a_hint_whose_mistake_the_answer_did_not_make(capsys):
    def hint(case, got, expected):
        return mistake("use the KV heads, not the query heads.", expected * 4)   # claims x 4

    ex = Exercise("ch99.bytes", "f() -> int", lambda: [Case("one", ())], lambda: 100, lambda: 100, hint,
                  atol=0, rtol=0)
    passed, out = evaluate(ex, lambda: 800, 5.0)                                   # x 8: bits
    assert not passed and "KV heads" not in out and "8 times too large" in out
    passed, out = evaluate(ex, lambda: 400, 5.0)
    assert "Hint: use the KV heads" in out


def test_bits_and_coinciding_factors_are_named_for_what_they_are(capsys):
    assert check("multihead.kv_cache_bytes", lambda n, g, d, L, B, s: 16 * n * g * d * L * B * s) is False
    out = capsys.readouterr().out
    assert "8 times too large" in out and "counts bits" in out and "KV heads" not in out
    # case 4 of mla_cache_bytes has 8 heads: x 8 is bits or num_heads, and the hint says both
    def times_8(n, h, c, r, b):
        return 8 * n * (c + r) * b
    assert check("modern.mla_cache_bytes", times_8) is False
    out = capsys.readouterr().out
    assert "counts bits" in out


# class 7: no checker crashes on any return value

class _Sub(torch.Tensor):
    pass


class _Refusing(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("no")


class _NoBool:
    def __bool__(self):
        raise RuntimeError("__bool__")

    def __eq__(self, other):
        raise RuntimeError("__eq__")

    def __repr__(self):
        raise RuntimeError("__repr__")

    def __array__(self, *a, **k):
        raise RuntimeError("__array__")

    __hash__ = object.__hash__


def _odd_returns(out):
    """Odd things a learner's function may return, built from the right answer."""
    first = out[0] if isinstance(out, tuple) else out
    t = first if isinstance(first, torch.Tensor) else torch.as_tensor(first)
    floaty = t.double() if not t.is_floating_point() else t
    return {
        "a subclass": lambda: t.as_subclass(_Sub),
        "a subclass that refuses every op": lambda: t.as_subclass(_Refusing),
        "an object that cannot be compared, printed or tested": _NoBool,
        "a huge expanded tensor": lambda: torch.zeros(1).expand(10**6, 10**6),
        "NaN everywhere": lambda: torch.full_like(floaty, float("nan")),
        "inf everywhere": lambda: torch.full_like(floaty, float("inf")),
        "a tuple of one": lambda: (t,),
        "a tuple of three": lambda: (t, t, t),
        "a NumPy array": lambda: t.detach().numpy(),
        "a Python float": lambda: float(floaty.flatten()[0]) if t.numel() else 0.0,
        "a dict": lambda: {"out": t},
        "a tensor that requires grad": lambda: floaty.detach().clone().requires_grad_(True),
        "a string": lambda: "0.5",
        "a generator": lambda: (x for x in [t]),
    }


@pytest.mark.parametrize("name", NAMES)
def test_no_checker_crashes_on_any_return_value(name, capsys):
    case, expected = _REGISTRY[name].prepared()[0]
    for what, make in _odd_returns(expected).items():
        value = make()
        assert check(name, lambda *a, value=value, **k: value) in (True, False), what
        out = capsys.readouterr().out
        assert out.startswith(("❌ " + name, "✅ " + name)), (what, out)
