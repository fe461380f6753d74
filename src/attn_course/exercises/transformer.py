"""Exercises of the transformer chapter: a pre-norm block's forward pass from its weights, one
cached decode step, language-model targets, and a transformer's parameter count derived from
its shapes.

Expected answers come from package functions bound here at import time (the block, the
attention layer and its cache, the model built on the ``meta`` device, which holds shapes and no
values). Above each exercise, a comment lists the mistakes learners make; a case catches each one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..multihead import KVCache as _KVCache
from ..multihead import count_parameters as _count_parameters
from ..positional import apply_rope as _apply_rope
from ..transformer import Block as _Block
from ..transformer import CausalSelfAttention as _CausalSelfAttention
from ..transformer import TinyTransformer as _TinyTransformer
from ._core import Case, Exercise, as_number, matches

_INF = float("-inf")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


_number = as_number  # one definition, in _core


def _random_weights(module: torch.nn.Module, g: torch.Generator, dtype) -> dict:
    """The module's state_dict with every tensor drawn at random (LayerNorms away from 1 and 0)."""
    weights = {}
    for name, t in module.state_dict().items():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight"):
            w = 1 + 0.5 * torch.randn(t.shape, generator=g)
        elif t.ndim == 1:
            w = 0.2 * torch.randn(t.shape, generator=g)
        else:
            w = torch.randn(t.shape, generator=g) / math.sqrt(t.shape[1])
        weights[name] = w.to(dtype)
    return weights


# --- helpers for the hints: the right computation and its usual mistakes, in float64 -------------

def _heads(t, H, split="transpose"):              # (B, L, d) -> (B, H, L, d_h)
    B, L, d = t.shape
    if split == "no transpose":
        return t.reshape(B, H, L, d // H)
    return t.reshape(B, L, H, d // H).transpose(1, 2)


def _rope(t, positions, layout):
    if layout is None:
        return t
    if layout == "interleaved":
        return _apply_rope(t, positions)
    d = t.shape[-1]                                # "halves": GPT-NeoX / Llama pairs x[i], x[i + d/2]
    theta = positions.to(t.dtype)[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=t.dtype) / d)
    a, b = t[..., : d // 2], t[..., d // 2:]
    return torch.cat([a * theta.cos() - b * theta.sin(), a * theta.sin() + b * theta.cos()], -1)


def _attention_variant(x, w, H, *, prefix="attn.", rope="interleaved", rope_values=False, causal=True,
                       scale="head", split="transpose", past_k=None, past_v=None, position="right",
                       append=True, rerotate=False, cached_key="rotated"):
    """Causal self-attention of the new tokens ``x (B, L, d)`` after ``T`` cached tokens.

    Returns ``(output, keys, values)``; the keys and values include the cached ones when given.
    """
    B, L, d = x.shape
    T = 0 if past_k is None else past_k.shape[2]
    q, k, v = F.linear(x, w[prefix + "qkv.weight"], w[prefix + "qkv.bias"]).chunk(3, -1)
    q, k, v = (_heads(t, H, split) for t in (q, k, v))
    start = {"right": T, "zero": 0, "one late": T + 1}[position]
    pos = torch.arange(start, start + L)
    k_raw = k
    q, k = _rope(q, pos, rope), _rope(k, pos, rope)
    if rope_values:
        v = _rope(v, pos, rope)
    if past_k is not None:
        if rerotate:               # the cached keys rotated a second time, with the new one
            keys = _rope(torch.cat([past_k, k_raw], 2), torch.arange(T + L), rope)
        else:
            keys = torch.cat([past_k, k], 2) if append else past_k
        values = torch.cat([past_v, v], 2) if append else past_v
    else:
        keys, values = k, v
    s = q @ keys.transpose(-2, -1) / math.sqrt(q.shape[-1] if scale == "head" else d)
    if causal == "top left":
        s = s.masked_fill(~torch.ones(L, keys.shape[2], dtype=torch.bool).tril(), _INF)
    elif causal:
        s = s.masked_fill(~torch.ones(L, keys.shape[2], dtype=torch.bool).tril(keys.shape[2] - L), _INF)
    o = s.softmax(-1) @ values
    o = o.reshape(B, L, d) if split == "no transpose" else o.transpose(1, 2).reshape(B, L, d)
    out = F.linear(o, w[prefix + "proj.weight"], w[prefix + "proj.bias"])
    if past_k is not None and append and cached_key == "raw":
        keys = torch.cat([past_k, k_raw], 2)
    return out, keys, values


# --- transformer.block_forward ----------------------------------------------------------------------
# Mistakes: post-norm (LN(x + attn(x)), the 2017 arrangement) instead of pre-norm; no residual
# connections; a "parallel" block whose MLP reads x instead of x + attn(LN(x)); one LayerNorm for
# both sub-layers; no causal mask; no rotary positions; RoPE on the values too; RoPE's pairs taken
# as halves (Llama's layout) instead of interleaved (chapter 5's apply_rope); scaling by sqrt(d)
# instead of sqrt(d_head); splitting heads without the transpose; ReLU or tanh-GELU in the MLP;
# nn.Linear's weight used untransposed (raises: explained by the raise hint).

def _block_solution(x, weights, num_heads):
    w, H = weights, num_heads
    B, L, d = x.shape

    def linear(t, name):                          # nn.Linear: weight (out, in), so t @ W.T + b
        return t @ w[name + ".weight"].T + w[name + ".bias"]

    def norm(t, name):                            # LayerNorm over the features, eps 1e-5
        return F.layer_norm(t, (d,), w[name + ".weight"], w[name + ".bias"], eps=1e-5)

    def attention(t):                             # causal self-attention, RoPE on queries and keys
        q, k, v = (u.reshape(B, L, H, d // H).transpose(1, 2) for u in linear(t, "attn.qkv").chunk(3, -1))
        q, k = _apply_rope(q), _apply_rope(k)     # (B, H, L, d_h), rotated by positions 0 .. L-1
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // H)
        future = torch.ones(L, L, dtype=torch.bool, device=t.device).triu(1)
        o = scores.masked_fill(future, _INF).softmax(-1) @ v
        return linear(o.transpose(1, 2).reshape(B, L, d), "attn.proj")

    x = x + attention(norm(x, "norm1"))                                   # pre-norm, residual
    return x + linear(F.gelu(linear(norm(x, "norm2"), "mlp.0")), "mlp.2")


def _block_expected(x, weights, num_heads):
    block = _Block(x.shape[-1], num_heads).to(x.dtype)
    block.load_state_dict(weights)
    with torch.no_grad():
        return block(x)[0]


def _block_cases():
    g = _gen(60)
    cases = []
    for B, L, d, H, dtype in ((2, 5, 16, 2, torch.float32), (1, 1, 8, 1, torch.float32),
                              (3, 9, 32, 4, torch.float32), (2, 7, 24, 3, torch.float64)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(60 + L)
            block = _Block(d, H)
        weights = _random_weights(block, g, dtype)
        x = torch.randn(B, L, d, generator=g).to(dtype)
        name = "float64, " if dtype == torch.float64 else ""
        cases.append(Case(f"{name}x of shape {(B, L, d)}, {H} heads", (x, weights, H)))
    return cases


def _block_variant(x, w, H, *, order="pre", act="gelu", norms="two", **attention):
    d = x.shape[-1]

    def norm(t, name):
        return F.layer_norm(t, (d,), w[name + ".weight"], w[name + ".bias"])

    second = "norm1" if norms == "one" else "norm2"
    fn = {"gelu": F.gelu, "relu": F.relu, "tanh": lambda t: F.gelu(t, approximate="tanh")}[act]

    def attn(t):
        return _attention_variant(t, w, H, **attention)[0]

    def mlp(t):
        return F.linear(fn(F.linear(t, w["mlp.0.weight"], w["mlp.0.bias"])), w["mlp.2.weight"], w["mlp.2.bias"])

    if order == "post":
        h = norm(x + attn(x), "norm1")
        return norm(h + mlp(h), second)
    if order == "parallel":
        return x + attn(norm(x, "norm1")) + mlp(norm(x, second))
    if order == "no residual":
        return mlp(norm(attn(norm(x, "norm1")), second))
    h = x + attn(norm(x, "norm1"))
    return h + mlp(norm(h, second))


def _block_hint(case, got, expected):
    x, w, H = case.args
    x, w = x.double(), {k: v.double() for k, v in w.items()}
    for options, text in (
            ({"order": "post"}, "pre-norm: normalise each sub-layer's INPUT, x + attn(LN1(x)), not "
                                "LN1(x + attn(x)) (post-norm, the 2017 arrangement)."),
            ({"order": "no residual"}, "add each sub-layer's output to its input (the residual "
                                       "connections): x = x + attn(LN1(x)), then x = x + mlp(LN2(x))."),
            ({"order": "parallel"}, "the MLP reads x AFTER the attention's residual: x + mlp(LN2(x + attn(LN1(x)))), "
                                    "not mlp(LN2(x)) of the block's input."),
            ({"norms": "one"}, "each sub-layer has its own LayerNorm: norm1 before the attention, norm2 "
                               "before the MLP."),
            ({"causal": False}, "mask the future: position i attends to keys j <= i only."),
            ({"rope": None}, "rotate the queries and keys by their positions (RoPE, chapter 5) before "
                             "the scores."),
            ({"rope_values": True}, "rotate the queries and keys only, never the values."),
            ({"rope": "halves"}, "RoPE's pairs are interleaved, (x[2i], x[2i+1]) as in apply_rope, not "
                                 "the halves (x[i], x[i + d/2])."),
            ({"scale": "model"}, "scale the scores by 1 / sqrt(d_head), the width of one head, not "
                                 "1 / sqrt(d)."),
            ({"split": "no transpose"}, "split heads as (B, L, H, d_head), then transpose to "
                                        "(B, H, L, d_head) (and back before merging)."),
            ({"act": "relu"}, "the MLP's nonlinearity is GELU, not ReLU."),
            ({"act": "tanh"}, "nn.GELU() is the exact GELU (with erf), not the tanh approximation.")):
        try:
            variant = _block_variant(x, w, H, **options)
        except Exception:  # noqa: BLE001 - a variant that does not apply to this case
            continue
        if matches(got, variant, expected):
            return text
    return None


def _linear_raise_hint(case, message):
    if "cannot be multiplied" in message or "size of tensor a" in message:
        return ("nn.Linear stores its weight as (out_features, in_features): the layer computes "
                "x @ W.T + b (or F.linear(x, W, b)).")
    if "not divisible" in message or "invalid for input of size" in message:
        return "each head has d / num_heads features: reshape (B, L, d) to (B, L, H, d // H)."
    return None


# --- transformer.decode_step --------------------------------------------------------------------------
# Mistakes: the new token rotated as position 0 (the same as no RoPE) or T + 1 instead of T, the
# number of cached tokens; the new key and value not appended before attending (the token cannot see
# itself); a causal mask aligned to the top left (tril of (1, T + 1): only key 0); the cached keys
# rotated a second time; the raw (unrotated) new key stored in the cache; scaling by sqrt(d).
# (With one new token, splitting heads without the transpose gives the same numbers: not a mistake
# here.) One case starts from an empty cache (T = 0).

def _decode_solution(x, cache_k, cache_v, weights, num_heads):
    w, H = weights, num_heads
    B, _, d = x.shape
    T = cache_k.shape[2]                                                # tokens already cached
    q, k, v = (x @ w["qkv.weight"].T + w["qkv.bias"]).chunk(3, -1)      # (B, 1, d) each
    q, k, v = (t.reshape(B, 1, H, d // H).transpose(1, 2) for t in (q, k, v))   # (B, H, 1, d_h)
    position = torch.tensor([T], device=x.device)                      # the new token sits at T
    q, k = _apply_rope(q, position), _apply_rope(k, position)
    keys, values = torch.cat([cache_k, k], 2), torch.cat([cache_v, v], 2)        # (B, H, T + 1, d_h)
    weights_ = torch.softmax(q @ keys.transpose(-2, -1) / math.sqrt(d // H), -1)  # the last query: every key
    out = (weights_ @ values).transpose(1, 2).reshape(B, 1, d) @ w["proj.weight"].T + w["proj.bias"]
    return out, keys, values


def _decode_expected(x, cache_k, cache_v, weights, num_heads):
    layer = _CausalSelfAttention(x.shape[-1], num_heads).to(x.dtype)
    layer.load_state_dict(weights)
    cache = _KVCache(key=cache_k, value=cache_v) if cache_k.shape[2] else _KVCache()
    with torch.no_grad():
        out, _ = layer(x, cache=cache)
    return out, cache.key, cache.value


def _decode_cases():
    g = _gen(61)
    cases = []
    for B, T, d, H, dtype in ((2, 5, 16, 2, torch.float32), (1, 0, 8, 1, torch.float32),
                              (3, 12, 32, 4, torch.float32), (2, 40, 16, 2, torch.float64)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(61 + T)
            layer = _CausalSelfAttention(d, H).to(dtype)
        weights = _random_weights(layer, g, dtype)
        layer.load_state_dict(weights)
        prefix = torch.randn(B, T, d, generator=g).to(dtype)
        if T:
            cache = _KVCache()
            with torch.no_grad():
                layer(prefix, cache=cache)                      # the cache as decoding fills it
            cache_k, cache_v = cache.key, cache.value
        else:
            cache_k = cache_v = torch.zeros(B, H, 0, d // H, dtype=dtype)
        x = torch.randn(B, 1, d, generator=g).to(dtype)
        name = "float64, " if dtype == torch.float64 else ""
        what = "an empty cache" if T == 0 else f"{T} cached tokens"
        cases.append(Case(f"{name}x of shape {(B, 1, d)}, {what}, {H} heads", (x, cache_k, cache_v, weights, H)))
    return cases


def _decode_hint(case, got, expected):
    x, ck, cv, w, H = case.args
    if not (isinstance(got, (tuple, list)) and len(got) == 3):
        return None
    x, ck, cv, w = x.double(), ck.double(), cv.double(), {k: v.double() for k, v in w.items()}
    got_out, got_k, _ = got
    for options, text in (
            ({"position": "zero"}, "the new token sits at position T = cache_k.shape[2] (the number of "
                                   "cached tokens): rotate its query and key by T (not by 0, which is "
                                   "no rotation at all)."),
            ({"position": "one late"}, "positions count from 0: with T cached tokens the new one is at "
                                       "position T, not T + 1."),
            ({"append": False}, "append the new key and value to the cache BEFORE attending: a token "
                                "attends to itself too."),
            ({"causal": "top left"}, "the one query is the LAST position: it may read every cached key "
                                     "(a causal mask aligned to the top left lets it see only key 0)."),
            ({"rerotate": True}, "the cached keys are already rotated: rotate only the new key."),
            ({"scale": "model"}, "scale the scores by 1 / sqrt(d_head), not 1 / sqrt(d).")):
        try:
            out, keys, values = _attention_variant(x, w, H, prefix="", past_k=ck, past_v=cv, **options)
        except Exception:  # noqa: BLE001
            continue
        if matches(got_out, out, expected[0]):
            return text
    raw = _attention_variant(x, w, H, prefix="", past_k=ck, past_v=cv, cached_key="raw")[1]
    if matches(got_k, raw, expected[1]):
        return "store the ROTATED new key: the cache holds keys as the scores use them."
    return None


# --- transformer.lm_targets ---------------------------------------------------------------------------
# Mistakes: no shift (position t scored against token t); the shift the wrong way (t - 1);
# the prompt not ignored (targets from position 0); starting at prompt_length instead of
# prompt_length - 1; the last position given a target (torch.roll wraps around); 0 instead of
# -100 for ignored positions; a float tensor; int32 targets (full_like of int32 ids): F.cross_entropy
# needs int64 class indices (checked by _targets_verify once the values are right).

def _targets_solution(ids, prompt_length):
    targets = torch.full(ids.shape, -100, dtype=torch.long, device=ids.device)
    targets[:, prompt_length - 1:-1] = ids[:, prompt_length:]   # position t predicts token t + 1
    return targets


def _targets_expected(ids, prompt_length):
    targets = torch.full(ids.shape, -100, dtype=torch.long)
    for t in range(prompt_length - 1, ids.shape[1] - 1):
        targets[:, t] = ids[:, t + 1]
    return targets


def _targets_cases():
    g = _gen(70)
    return [Case(f"ids {s}{' int32' if i32 else ''}, prompt_length {p}",
                 (torch.randint(0, 10, s, generator=g).to(torch.int32 if i32 else torch.long), p))
            for s, p, i32 in (((1, 6), 3, False), ((2, 9), 5, False), ((3, 17), 9, False), ((2, 4), 1, False),
                              ((2, 8), 4, True))]


def _targets_hint(case, got, expected):
    ids, p = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.is_floating_point():
        return None
    if got.dtype != torch.long and torch.equal(got.cpu().long(), expected):
        why = (" The ids of this test are int32, as some tokenizers give them, and torch.full_like(ids, ...) "
               "copies their dtype." if ids.dtype == torch.int32 else "")
        return ("the values are right, only the dtype is not: F.cross_entropy needs int64 targets "
                "(dtype=torch.long)." + why)
    got = got.cpu().long()
    ids = ids.long()
    T = ids.shape[1]

    def targets(start, stop, source):
        t = torch.full_like(ids, -100)
        t[:, start:stop] = source
        return t

    wrapped = expected.clone()
    wrapped[:, -1] = ids[:, 0]
    zeros = expected.masked_fill(expected == -100, 0)
    for variant, text in (
            (targets(p, T, ids[:, p:]), "shift by one: the output at position t is scored against token t + 1."),
            (targets(p, T, ids[:, p - 1:-1]), "the shift goes the other way: targets[:, t] = ids[:, t + 1]."),
            (targets(0, T - 1, ids[:, 1:]), "ignore the prompt: only positions from prompt_length - 1 on "
                                            "predict tokens of the answer."),
            (targets(p, T - 1, ids[:, p + 1:]), "start at position prompt_length - 1: it predicts the first "
                                                "answer token."),
            (wrapped, "the last position has nothing to predict: -100 (torch.roll wraps the first token "
                      "around)."),
            (zeros, "ignored positions are -100, the ignore_index of cross_entropy, not 0.")):
        if torch.equal(got, variant) and not torch.equal(variant, expected):
            return text
    return ("the rule: targets[:, t] = ids[:, t + 1] for t from prompt_length - 1 to T - 2, and -100 "
            "elsewhere.")


def _targets_verify(case, fn, got):
    if isinstance(got, torch.Tensor) and got.dtype != torch.long:
        return (f"the values are right, but the targets have dtype {got.dtype}: F.cross_entropy needs "
                f"int64 (torch.long) class indices and raises on {got.dtype}. The ids of this test are "
                f"{case.args[0].dtype} (some tokenizers give int32): build the targets as int64 "
                f"(dtype=torch.long, or .long()).")
    return None


# --- transformer.transformer_parameters -----------------------------------------------------------------
# Mistakes: the LayerNorms left out (two per block and the final one, a weight and a bias each);
# the output head left out, or counted as tied to the embedding (GPT-2 ties them; this model does
# not); the head's bias left out; the attention or MLP biases left out; the MLP ratio ignored (a
# hidden width of d). The last two cases are shapes no computer here can build (a 4 TiB embedding;
# GPT-3's shapes): only a formula passes them, and building the model raises (the raise hint says so).

def _params_solution(vocab_size, embed_dim, num_layers, mlp_ratio):
    d, h = embed_dim, mlp_ratio * embed_dim
    norms = 2 * (2 * d)                                      # two LayerNorms, a weight and a bias each
    attention = (3 * d * d + 3 * d) + (d * d + d)            # fused Q, K, V projection and the output one
    mlp = (d * h + h) + (h * d + d)
    return vocab_size * d + num_layers * (norms + attention + mlp) + 2 * d + (d * vocab_size + vocab_size)


def _params_expected(vocab_size, embed_dim, num_layers, mlp_ratio):
    with torch.device("meta"):                               # shapes only: nothing is allocated
        model = _TinyTransformer(vocab_size, embed_dim, 2, num_layers, mlp_ratio=mlp_ratio)
    return _count_parameters(model)


_HUGE = 2**20


def _params_cases():
    cases = [Case(f"vocab {V}, width {d}, {n} layers, MLP x{r}", (V, d, n, r))
             for V, d, n, r in ((11, 64, 2, 4), (100, 32, 1, 4), (50, 128, 6, 2), (8, 16, 3, 1))]
    cases.append(Case(f"vocab {_HUGE:,}, width {_HUGE:,}, 2 layers, MLP x4 (4 TiB of float32 for the "
                      f"embedding alone: no computer here can build it)", (_HUGE, _HUGE, 2, 4)))
    cases.append(Case("GPT-3's shapes: vocab 50,257, width 12,288, 96 layers, MLP x4", (50257, 12288, 96, 4)))
    return cases


def _params_hint(case, got, expected):
    V, d, n, r = case.args
    got = _number(got)
    if got is None or got == expected:
        return None
    fits = [text for missing, text in (
        (2 * d + n * 4 * d, "count the LayerNorms: a weight and a bias of size d each, two per block plus "
                            "the final one"),
        (2 * d, "count the final LayerNorm (a weight and a bias of size d)"),
        (n * 4 * d, "count the two LayerNorms of every block (4d parameters per block)"),
        (n * 4 * d, "count the biases of the attention projections: 3d for Q, K, V and d for the output, "
                    "per block"),
        (d * V + V, "the output head is not tied to the embedding here (GPT-2 ties them; TinyTransformer "
                    "does not): count its d x vocab weights and its vocab biases"),
        (d * V, "the output head's weight is not tied to the embedding here: count its d x vocab weights "
                "as well as the embedding's"),
        (V, "the output head has a bias of size vocab"),
        (n * (r * d + d), "count the MLP's biases: r*d for the first layer, d for the second, per block"),
        (n * (2 * d * d + d) * (r - 1), "the MLP's hidden width is mlp_ratio * embed_dim"))
        if missing and got == expected - missing]
    if len(fits) == 1:
        return fits[0] + "."
    if fits:
        return "several parts would explain the difference: " + "; or ".join(fits) + "."
    return None


def _params_raise_hint(case, message):
    if any(word in message.lower() for word in ("allocate", "memory", "out of")):
        return ("building the model at these shapes is impossible (its weights would not fit in any "
                "machine's memory): derive the count from the shapes, part by part, as a formula.")
    return None


EXERCISES = [
    Exercise("transformer.block_forward",
             "block_forward(x (B, L, d), weights (dict of the Block's state_dict), num_heads) -> (B, L, d)",
             _block_cases, _block_expected, _block_solution, _block_hint, raise_hint=_linear_raise_hint),
    Exercise("transformer.decode_step",
             "decode_step(x (B, 1, d), cache_k (B, H, T, d_h), cache_v (B, H, T, d_h), weights (dict: qkv.weight, "
             "qkv.bias, proj.weight, proj.bias), num_heads) -> (output (B, 1, d), keys (B, H, T + 1, d_h), "
             "values (B, H, T + 1, d_h))",
             _decode_cases, _decode_expected, _decode_solution, _decode_hint, raise_hint=_linear_raise_hint),
    Exercise("transformer.lm_targets",
             "lm_targets(ids (B, T), prompt_length) -> (B, T) int64 targets, -100 = ignored",
             _targets_cases, _targets_expected, _targets_solution, _targets_hint, verify=_targets_verify),
    Exercise("transformer.transformer_parameters",
             "transformer_parameters(vocab_size, embed_dim, num_layers, mlp_ratio) -> int",
             _params_cases, _params_expected, _params_solution, _params_hint, atol=0, rtol=0,
             raise_hint=_params_raise_hint),
]
