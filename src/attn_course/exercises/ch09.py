"""Chapter 9 exercises: language-model targets, attention rollout (plain and with heads and a
residual weight), counting a transformer's parameters.

Expected answers come from package functions bound here at import time. Above each
exercise, a comment lists the mistakes learners make; a case catches each one.
"""

from __future__ import annotations

import torch

from ..interpret import attention_rollout as _attention_rollout
from ..multihead import count_parameters as _count_parameters
from ..transformer import TinyTransformer as _TinyTransformer
from ._core import Case, Exercise, finite, matches


def _number(got):
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    return got if type(got) in (int, float) else None


# --- ch09.lm_targets ---------------------------------------------------------------------------
# Mistakes: no shift (position t scored against token t); the shift the wrong way (t - 1);
# the prompt not ignored (targets from position 0); starting at prompt_length instead of
# prompt_length - 1; the last position given a target (torch.roll wraps around); 0 instead of
# -100 for ignored positions; a float tensor.

def _targets_solution(ids, prompt_length):
    targets = torch.full_like(ids, -100)
    targets[:, prompt_length - 1:-1] = ids[:, prompt_length:]   # position t predicts token t + 1
    return targets


def _targets_expected(ids, prompt_length):
    targets = torch.full_like(ids, -100)
    for t in range(prompt_length - 1, ids.shape[1] - 1):
        targets[:, t] = ids[:, t + 1]
    return targets


def _targets_cases():
    g = torch.Generator().manual_seed(70)
    return [Case(f"ids {s}, prompt_length {p}", (torch.randint(0, 10, s, generator=g), p))
            for s, p in (((1, 6), 3), ((2, 9), 5), ((3, 17), 9), ((2, 4), 1))]


def _targets_hint(case, got, expected):
    ids, p = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or got.is_floating_point():
        return None
    got = got.cpu()
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


# --- ch09.attention_rollout --------------------------------------------------------------------
# Mistakes: the residual left out (plain product of the maps); later layers multiplied on the
# right (A_1 A_2 ... instead of A_L ... A_1); no row renormalisation (the cases include maps
# whose rows do not sum to 1, e.g. after head pruning); renormalising before mixing in the
# identity; the elementwise product instead of the matrix product.

def _rollout_solution(weights):
    L = weights[0].shape[-1]
    eye = torch.eye(L, dtype=weights[0].dtype)
    rollout = eye
    for a in weights:                                # first layer first
        a = 0.5 * a + 0.5 * eye                      # the residual connection keeps half of each token
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout
    return rollout


def _rollout_expected(weights):
    return _attention_rollout([w[None] for w in weights])[0]


def _rollout_cases():
    g = torch.Generator().manual_seed(71)
    cases = []
    for layers, L in ((1, 3), (2, 4), (3, 6)):
        ws = [torch.softmax(torch.randn(L, L, generator=g), -1) for _ in range(layers)]
        cases.append(Case(f"{layers} layer(s) of {L} x {L} weights", (ws,)))
    for layers, L in ((1, 4), (2, 5)):
        ws = [torch.softmax(torch.randn(L, L, generator=g), -1) * (0.3 + torch.rand(L, 1, generator=g))
              for _ in range(layers)]
        cases.append(Case(f"{layers} layer(s) of {L} x {L} maps whose rows sum to 0.3 .. 1.3", (ws,)))
    return cases


def _rollout_variant(ws, *, residual=True, order="left", renorm="after", product="matmul"):
    ws = [w.double() for w in ws]
    eye = torch.eye(ws[0].shape[-1], dtype=torch.float64)
    out = eye
    for a in ws:
        if renorm == "before":
            a = a / a.sum(-1, keepdim=True)
        if residual:
            a = 0.5 * a + 0.5 * eye
        if renorm == "after":
            a = a / a.sum(-1, keepdim=True)
        if product == "elementwise":
            out = a * out if out is not eye else a
        else:
            out = a @ out if order == "left" else out @ a
    return out


def _rollout_hint(case, got, expected):
    (ws,) = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    for kwargs, text in (
            ({"residual": False, "renorm": "none"}, "account for the residual connection: use 0.5 * A + "
                                                    "0.5 * I per layer."),
            ({"residual": False}, "account for the residual connection: use 0.5 * A + 0.5 * I per layer."),
            ({"order": "right"}, "multiply later layers on the left: R = A_L ... A_2 A_1."),
            ({"renorm": "none"}, "renormalise each row of 0.5 * A + 0.5 * I to sum to 1: these maps' rows "
                                 "do not sum to 1."),
            ({"renorm": "before"}, "renormalise AFTER adding the identity (0.5 * A + 0.5 * I, then divide "
                                   "each row by its sum)."),
            ({"product": "elementwise"}, "combine the layers with a matrix product (@), not elementwise.")):
        if matches(got, _rollout_variant(ws, **kwargs), expected):
            return text
    return None


# --- ch09.rollout_with_residual ----------------------------------------------------------------
# Per layer: average the heads, A_hat = (1 - r) * A_mean + r * I, renormalise the rows, then
# R = A_hat_L ... A_hat_1 for every batch element. Mistakes: the residual weight on the wrong
# term (r * A + (1 - r) * I); rolling out each head and averaging afterwards; summing the heads
# instead of averaging them; no renormalisation (rows that do not sum to 1 in two cases); the
# layers multiplied in the wrong order.

def _rr_solution(weights, residual):
    B, H, L, _ = weights[0].shape
    eye = torch.eye(L, dtype=weights[0].dtype)
    rollout = eye.expand(B, L, L)
    for w in weights:                                      # first layer first
        a = (1 - residual) * w.mean(dim=1) + residual * eye  # heads averaged, then the skip connection
        a = a / a.sum(-1, keepdim=True)
        rollout = a @ rollout                              # later layers on the left
    return rollout


def _rr_expected(weights, residual):
    r = float(residual)
    if r == 0:
        return _attention_rollout([(w.mean(1) / w.mean(1).sum(-1, keepdim=True)) for w in weights],
                                  residual=False)
    # (1 - r) A + r I is proportional to 0.5 A' + 0.5 I with A' = A (1 - r) / r; rows are renormalised
    return _attention_rollout([w.mean(1) * ((1 - r) / r) for w in weights])


def _rr_cases():
    g = torch.Generator().manual_seed(72)
    cases = []
    for (layers, B, H, L), r, stochastic in (((1, 1, 2, 3), 0.5, True), ((2, 2, 3, 4), 0.5, True),
                                             ((3, 2, 2, 5), 0.9, True), ((2, 1, 4, 4), 0.0, True),
                                             ((2, 2, 2, 5), 0.25, False), ((3, 1, 3, 4), 0.7, False)):
        ws = []
        for _ in range(layers):
            w = torch.softmax(torch.randn(B, H, L, L, generator=g), -1)
            if not stochastic:
                w = w * (0.3 + torch.rand(B, H, L, 1, generator=g))
            ws.append(w)
        rows = "" if stochastic else ", rows summing to 0.3 .. 1.3"
        cases.append(Case(f"{layers} layer(s) of (B, H, L, L) = {(B, H, L, L)}, residual {r}{rows}", (ws, r)))
    return cases


def _rr_variant(ws, r, *, swap=False, per_head=False, heads="mean", renorm=True, order="left"):
    ws = [w.double() for w in ws]
    B, H, L, _ = ws[0].shape
    eye = torch.eye(L, dtype=torch.float64)

    def mix(a):
        a = (r * a + (1 - r) * eye) if swap else ((1 - r) * a + r * eye)
        return a / a.sum(-1, keepdim=True) if renorm else a

    if per_head:
        out = eye.expand(B, H, L, L)
        for w in ws:
            out = mix(w) @ out
        return out.mean(1)
    out = eye.expand(B, L, L)
    for w in ws:
        a = mix(w.mean(1) if heads == "mean" else w.sum(1))
        out = a @ out if order == "left" else out @ a
    return out


def _rr_hint(case, got, expected):
    ws, r = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    for kwargs, text in (
            ({"swap": True}, "r is the weight of the identity (the skip connection): (1 - r) * A + r * I."),
            ({"per_head": True}, "average the heads first, then roll out the averaged maps (rolling out "
                                 "each head separately mixes paths through different heads)."),
            ({"heads": "sum"}, "average the heads (mean over dim 1), do not sum them."),
            ({"renorm": False}, "renormalise the rows of (1 - r) * A + r * I to sum to 1."),
            ({"order": "right"}, "multiply later layers on the left: R = A_L ... A_1.")):
        if matches(got, _rr_variant(ws, r, **kwargs), expected):
            return text
    return None


# --- ch09.transformer_parameters -----------------------------------------------------------------
# Mistakes: the LayerNorms left out (two per block and the final one, a weight and a bias each);
# the output head left out (it is not tied to the embedding here); the attention or MLP biases
# left out; the MLP ratio ignored (a hidden width of d).

def _params_solution(vocab_size, embed_dim, num_layers, mlp_ratio):
    d, h = embed_dim, mlp_ratio * embed_dim
    norms = 2 * (2 * d)                                      # two LayerNorms, a weight and a bias each
    attention = (3 * d * d + 3 * d) + (d * d + d)            # fused Q, K, V projection and the output one
    mlp = (d * h + h) + (h * d + d)
    return vocab_size * d + num_layers * (norms + attention + mlp) + 2 * d + (d * vocab_size + vocab_size)


def _params_expected(vocab_size, embed_dim, num_layers, mlp_ratio):
    model = _TinyTransformer(vocab_size, embed_dim, 2, num_layers, mlp_ratio=mlp_ratio)
    return _count_parameters(model)


def _params_cases():
    return [Case(f"vocab {V}, width {d}, {n} layers, MLP x{r}", (V, d, n, r))
            for V, d, n, r in ((11, 64, 2, 4), (100, 32, 1, 4), (50, 128, 6, 2), (8, 16, 3, 1))]


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
        (d * V + V, "the output head (d x vocab weights and vocab biases) has its own parameters here"),
        (n * (r * d + d), "count the MLP's biases: r*d for the first layer, d for the second, per block"),
        (n * (2 * d * d + d) * (r - 1), "the MLP's hidden width is mlp_ratio * embed_dim"))
        if missing and got == expected - missing]
    if len(fits) == 1:
        return fits[0] + "."
    if fits:
        return "several parts would explain the difference: " + "; or ".join(fits) + "."
    return None


EXERCISES = [
    Exercise("ch09.lm_targets", "lm_targets(ids (B, T), prompt_length) -> (B, T) int64 targets, -100 = ignored",
             _targets_cases, _targets_expected, _targets_solution, _targets_hint),
    Exercise("ch09.attention_rollout", "attention_rollout(weights: list of (L, L), first layer first) -> (L, L)",
             _rollout_cases, _rollout_expected, _rollout_solution, _rollout_hint),
    Exercise("ch09.rollout_with_residual",
             "rollout_with_residual(weights: list of (B, H, L, L), first layer first, residual: float) "
             "-> (B, L, L)",
             _rr_cases, _rr_expected, _rr_solution, _rr_hint),
    Exercise("ch09.transformer_parameters",
             "transformer_parameters(vocab_size, embed_dim, num_layers, mlp_ratio) -> int",
             _params_cases, _params_expected, _params_solution, _params_hint, atol=0, rtol=0),
]
