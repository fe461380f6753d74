"""The transformer chapter's exercises: each listed mistake is rejected with a hint that names it,
and right answers written in another style pass."""

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attn_course.exercises import check, list_exercises, solution
from attn_course.multihead import count_parameters
from attn_course.positional import apply_rope
from attn_course.transformer import TinyTransformer

NAMES = [n for n in list_exercises() if n.startswith("transformer.")]


def test_the_chapter_has_four_auto_checked_exercises_named_by_topic():
    assert NAMES == ["transformer.block_forward", "transformer.decode_step", "transformer.lm_targets",
                     "transformer.transformer_parameters"]


@pytest.mark.parametrize("name", NAMES)
def test_the_solutions_pass_strictly(name, capsys):
    assert check(name, solution(name), strict=True)
    assert "✅" in capsys.readouterr().out


# --- a learner's block, with the usual mistakes as switches -----------------------------------------------

def _rope_halves(t, positions):
    d = t.shape[-1]
    theta = positions.to(t.dtype)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=t.dtype) / d)
    a, b = t[..., : d // 2], t[..., d // 2:]
    return torch.cat([a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()], -1)


def _attention(x, w, H, *, prefix="attn.", rope="pairs", rope_v=False, causal=True, scale_d=False,
               no_transpose=False):
    B, L, d = x.shape
    q, k, v = F.linear(x, w[prefix + "qkv.weight"], w[prefix + "qkv.bias"]).split(d, -1)
    if no_transpose:
        q, k, v = (t.reshape(B, H, L, d // H) for t in (q, k, v))
    else:
        q, k, v = (t.view(B, L, H, d // H).permute(0, 2, 1, 3) for t in (q, k, v))
    pos = torch.arange(L)
    if rope == "pairs":
        q, k = apply_rope(q, pos), apply_rope(k, pos)
        if rope_v:
            v = apply_rope(v, pos)
    elif rope == "halves":
        q, k = _rope_halves(q, pos), _rope_halves(k, pos)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1 / math.sqrt(d) if scale_d else None)
    o = o.reshape(B, L, d) if no_transpose else o.permute(0, 2, 1, 3).reshape(B, L, d)
    return F.linear(o, w[prefix + "proj.weight"], w[prefix + "proj.bias"])


def _block(form):
    def block_forward(x, w, H):
        d = x.shape[-1]
        ln1 = lambda t: F.layer_norm(t, (d,), w["norm1.weight"], w["norm1.bias"])  # noqa: E731
        ln2 = lambda t: F.layer_norm(t, (d,), w["norm2.weight"], w["norm2.bias"])  # noqa: E731
        act = {"relu": F.relu, "tanh": lambda t: F.gelu(t, approximate="tanh")}.get(form, F.gelu)
        mlp = lambda t: F.linear(act(F.linear(t, w["mlp.0.weight"], w["mlp.0.bias"])),  # noqa: E731
                                 w["mlp.2.weight"], w["mlp.2.bias"])
        options = {"no mask": {"causal": False}, "no rope": {"rope": None}, "rope v": {"rope_v": True},
                   "halves": {"rope": "halves"}, "scale d": {"scale_d": True},
                   "no transpose": {"no_transpose": True}}.get(form, {})
        attn = lambda t: _attention(t, w, H, **options)  # noqa: E731
        if form == "post-norm":
            h = ln1(x + attn(x))
            return ln2(h + mlp(h))
        if form == "no residual":
            return mlp(ln2(attn(ln1(x))))
        if form == "parallel":
            return x + attn(ln1(x)) + mlp(ln2(x))
        if form == "one norm":
            h = x + attn(ln1(x))
            return h + mlp(ln1(h))
        if form == "untransposed":
            return x @ w["attn.qkv.weight"]
        h = x + attn(ln1(x))
        return h + mlp(ln2(h))
    return block_forward


# --- a learner's decode step ------------------------------------------------------------------------------

def _decode(form):
    def decode_step(x, ck, cv, w, H):
        B, _, d = x.shape
        T = ck.shape[2]
        q, k, v = (F.linear(x, w["qkv.weight"], w["qkv.bias"])
                   .view(B, 1, 3, H, d // H).permute(2, 0, 3, 1, 4))          # 3 x (B, H, 1, d_h)
        p = {"position 0": 0, "position T+1": T + 1}.get(form, T)
        raw_k = k
        if form != "no rope":
            q, k = apply_rope(q, torch.tensor([p])), apply_rope(k, torch.tensor([p]))
        keys, values = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
        if form == "rerotate":
            keys = apply_rope(torch.cat([ck, raw_k], 2))
        read_k, read_v = (ck, cv) if form == "not appended" else (keys, values)
        s = q @ read_k.transpose(-2, -1) / math.sqrt(d if form == "scale d" else d // H)
        if form == "top left":
            s = s.masked_fill(~torch.ones(1, read_k.shape[2], dtype=torch.bool).tril(), float("-inf"))
        o = s.softmax(-1) @ read_v
        o = o.transpose(1, 2).reshape(B, 1, d)
        out = F.linear(o, w["proj.weight"], w["proj.bias"])
        if form == "raw key cached":
            keys = torch.cat([ck, raw_k], 2)
        return out, keys, values
    return decode_step


def _targets(form):
    def targets(ids, p):
        t = torch.full_like(ids, -100)
        T = ids.shape[1]
        if form == "no shift":
            t[:, p:] = ids[:, p:]
        elif form == "backwards":
            t[:, p:] = ids[:, p - 1:-1]
        elif form == "prompt kept":
            t[:, :-1] = ids[:, 1:]
        elif form == "late start":
            t[:, p:-1] = ids[:, p + 1:]
        elif form == "roll":
            t[:, p - 1:] = torch.roll(ids, -1, 1)[:, p - 1:]
        elif form == "zeros":
            t = torch.zeros_like(ids)
            t[:, p - 1:T - 1] = ids[:, p:]
        elif form == "full_like":              # right values, but the dtype of the ids (int32 in one test)
            t[:, p - 1:-1] = ids[:, p:]
        return t
    return targets


def _params(missing):
    def count(V, d, n, r):
        right = solution("transformer.transformer_parameters")(V, d, n, r)
        return right - {"tied, no bias": d * V + V, "tied": d * V, "head bias": V, "final norm": 2 * d,
                        "attention biases": n * 4 * d, "mlp biases": n * (r * d + d)}[missing]
    return count


WRONG = [
    ("transformer.block_forward", _block("post-norm"), "pre-norm", None),
    ("transformer.block_forward", _block("no residual"), "residual connections", None),
    ("transformer.block_forward", _block("parallel"), "AFTER the attention's residual", None),
    ("transformer.block_forward", _block("one norm"), "its own LayerNorm", None),
    ("transformer.block_forward", _block("no mask"), "mask the future", None),
    ("transformer.block_forward", _block("no rope"), "rotate the queries and keys", None),
    ("transformer.block_forward", _block("rope v"), "never the values", None),
    ("transformer.block_forward", _block("halves"), "interleaved", None),
    ("transformer.block_forward", _block("scale d"), "1 / sqrt\\(d_head\\)", None),
    ("transformer.block_forward", _block("no transpose"), "then transpose", None),
    ("transformer.block_forward", _block("relu"), "GELU, not ReLU", None),
    ("transformer.block_forward", _block("tanh"), "tanh approximation", None),
    ("transformer.block_forward", _block("untransposed"), "x @ W.T", None),
    ("transformer.decode_step", _decode("position 0"), "position T = cache_k.shape\\[2\\]", None),
    ("transformer.decode_step", _decode("position T+1"), "not T \\+ 1", None),
    ("transformer.decode_step", _decode("no rope"), "no rotation at all", None),
    ("transformer.decode_step", _decode("not appended"), "BEFORE attending", None),
    ("transformer.decode_step", _decode("top left"), "LAST position", None),
    ("transformer.decode_step", _decode("rerotate"), "already rotated", None),
    ("transformer.decode_step", _decode("raw key cached"), "ROTATED new key", None),
    ("transformer.decode_step", _decode("scale d"), "1 / sqrt\\(d_head\\)", None),
    ("transformer.lm_targets", _targets("no shift"), "shift by one", None),
    ("transformer.lm_targets", _targets("backwards"), "the other way", None),
    ("transformer.lm_targets", _targets("prompt kept"), "ignore the prompt", None),
    ("transformer.lm_targets", _targets("late start"), "prompt_length - 1", None),
    ("transformer.lm_targets", _targets("roll"), "wraps", None),
    ("transformer.lm_targets", _targets("zeros"), "not 0", None),
    ("transformer.lm_targets", _targets("full_like"), "int64.*full_like\\(ids, ...\\) copies", "the rule"),
    ("transformer.lm_targets", lambda ids, p: solution("transformer.lm_targets")(ids, p).int(),
     "only the dtype", "the rule"),
    ("transformer.transformer_parameters",
     lambda V, d, n, r: V * d + n * (4 * d * d + 4 * d + 2 * r * d * d + r * d + d) + d * V + V, "LayerNorms", None),
    ("transformer.transformer_parameters", _params("final norm"), "final LayerNorm", None),
    ("transformer.transformer_parameters", _params("tied, no bias"), "not tied to the embedding", None),
    ("transformer.transformer_parameters", _params("tied"), "not tied to the embedding", None),
    ("transformer.transformer_parameters", _params("head bias"), "bias of size vocab", None),
    ("transformer.transformer_parameters", _params("attention biases"), "attention projections", None),
    ("transformer.transformer_parameters", _params("mlp biases"), "MLP's biases", None),
    ("transformer.transformer_parameters", lambda V, d, n, r: solution("transformer.transformer_parameters")(V, d, n, 1),
     "mlp_ratio", None),
    # building the model works for the small tests and fails at the shapes no machine can hold
    ("transformer.transformer_parameters",
     lambda V, d, n, r: count_parameters(TinyTransformer(V, d, 2, n, mlp_ratio=r)), "derive the count", None),
]


@pytest.mark.parametrize("name, wrong, words, not_words", WRONG,
                         ids=[f"{row[0]}-{i}" for i, row in enumerate(WRONG)])
def test_every_listed_mistake_is_rejected_with_a_hint_that_names_it(name, wrong, words, not_words, capsys):
    assert check(name, wrong) is False
    out = capsys.readouterr().out
    assert out.startswith("❌ " + name), out
    assert re.search(words, out, re.S), out
    if not_words:
        assert not re.search(not_words, out), out


def test_every_exercise_has_at_least_two_listed_mistakes():
    for name in NAMES:
        assert sum(row[0] == name for row in WRONG) >= 2, name


def test_the_parameter_count_cannot_be_passed_by_building_the_model(capsys):
    """Building works for the first tests, then the 4 TiB embedding fails at once (no hang, no crash)."""
    assert check("transformer.transformer_parameters",
                 lambda V, d, n, r: count_parameters(TinyTransformer(V, d, 2, n, mlp_ratio=r))) is False
    out = capsys.readouterr().out
    assert "test 5 of 6" in out and "raised" in out


# --- right answers in another style -----------------------------------------------------------------------

class _MyBlock(torch.nn.Module):
    """The chapter's block written as modules: loads the weights dict, float64 inside."""

    def __init__(self, d, H):
        super().__init__()
        self.H = H
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.ModuleDict({"qkv": torch.nn.Linear(d, 3 * d), "proj": torch.nn.Linear(d, d)})
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x):
        h = x + _attention(self.norm1(x), self.state_dict(), self.H)
        return h + self.mlp(self.norm2(h))


def _block_as_module(x, w, H):
    block = _MyBlock(x.shape[-1], H).double()
    block.load_state_dict({k: v.double() for k, v in w.items()})
    with torch.no_grad():
        return block(x.double()).to(x.dtype)


def _block_einsum(x, w, H):
    B, L, d = x.shape
    ln = lambda t, n: (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5) \
        * w[n + ".weight"] + w[n + ".bias"]  # noqa: E731
    qkv = torch.einsum("bld,ed->ble", ln(x, "norm1"), w["attn.qkv.weight"]) + w["attn.qkv.bias"]
    q, k, v = (t.unflatten(-1, (H, d // H)).transpose(1, 2) for t in qkv.chunk(3, -1))
    q, k = apply_rope(q), apply_rope(k)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d // H)
    s = torch.where(torch.ones(L, L, dtype=torch.bool).tril(), s, torch.tensor(float("-inf"), dtype=s.dtype))
    o = torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v).transpose(1, 2).flatten(2)
    h = x + o @ w["attn.proj.weight"].T + w["attn.proj.bias"]
    u = ln(h, "norm2") @ w["mlp.0.weight"].T + w["mlp.0.bias"]
    return h + (0.5 * u * (1 + torch.erf(u / math.sqrt(2)))) @ w["mlp.2.weight"].T + w["mlp.2.bias"]


def _decode_by_recomputing(x, ck, cv, w, H):
    """SDPA over the cache plus the new token, in float64; the keys returned as a list."""
    B, _, d = x.shape
    T = ck.shape[2]
    q, k, v = F.linear(x.double(), w["qkv.weight"].double(), w["qkv.bias"].double()).chunk(3, -1)
    q, k, v = (t.unflatten(-1, (H, d // H)).transpose(1, 2) for t in (q, k, v))
    q, k = apply_rope(q, torch.full((1,), T)), apply_rope(k, torch.full((1,), T))
    keys, values = torch.cat([ck.double(), k], 2), torch.cat([cv.double(), v], 2)
    o = F.scaled_dot_product_attention(q, keys, values)            # one query: no mask needed
    out = F.linear(o.transpose(1, 2).flatten(2), w["proj.weight"].double(), w["proj.bias"].double())
    return [out.to(x.dtype), keys.to(x.dtype), values.to(x.dtype)]


def _targets_where(ids, p):
    t = torch.arange(ids.shape[1])
    shifted = torch.cat([ids[:, 1:], ids[:, :1]], 1).long()
    keep = (t >= p - 1) & (t < ids.shape[1] - 1)
    return torch.where(keep, shifted, torch.tensor(-100))


def _params_numpy(V, d, n, r):
    per_block = np.int64(4) * d + (4 * d * d + 4 * d) + (2 * r * d * d + r * d + d)
    return np.int64(V) * (2 * d + 1) + n * per_block + 2 * d


def _params_on_meta(V, d, n, r):
    with torch.device("meta"):
        return count_parameters(TinyTransformer(V, d, 2, n, mlp_ratio=r))


@pytest.mark.parametrize("name, fn", [
    ("transformer.block_forward", _block_as_module),
    ("transformer.block_forward", _block_einsum),
    ("transformer.decode_step", _decode_by_recomputing),
    ("transformer.lm_targets", _targets_where),
    ("transformer.transformer_parameters", _params_numpy),
    ("transformer.transformer_parameters", _params_on_meta),
])
def test_a_right_answer_in_another_style_passes(name, fn, capsys):
    assert check(name, fn) is True, capsys.readouterr().out


def test_inputs_changed_in_place_are_reported(capsys):
    def in_place(ids, p):
        t = solution("transformer.lm_targets")(ids, p)
        ids.zero_()
        return t

    assert check("transformer.lm_targets", in_place) is False
    assert "in place" in capsys.readouterr().out


def test_the_targets_of_the_checker_do_not_move_when_the_package_is_patched(monkeypatch, capsys):
    import attn_course.positional
    import attn_course.transformer

    monkeypatch.setattr(attn_course.positional, "apply_rope", lambda x, positions=None, base=10000.0: x)
    monkeypatch.setattr(attn_course.transformer, "apply_rope", lambda x, positions=None, base=10000.0: x)
    for name in NAMES:
        assert check(name, solution(name)) is True, capsys.readouterr().out
