"""Exercises of the transformer chapter: language-model targets, counting a transformer's parameters.

Expected answers come from package functions bound here at import time. Above each
exercise, a comment lists the mistakes learners make; a case catches each one.
"""

from __future__ import annotations

import torch

from ..multihead import count_parameters as _count_parameters
from ..transformer import TinyTransformer as _TinyTransformer
from ._core import Case, Exercise


def _number(got):
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    return got if type(got) in (int, float) else None


# --- transformer.lm_targets ---------------------------------------------------------------------------
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


# --- transformer.transformer_parameters -----------------------------------------------------------------
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
    Exercise("transformer.lm_targets", "lm_targets(ids (B, T), prompt_length) -> (B, T) int64 targets, -100 = ignored",
             _targets_cases, _targets_expected, _targets_solution, _targets_hint),
    Exercise("transformer.transformer_parameters",
             "transformer_parameters(vocab_size, embed_dim, num_layers, mlp_ratio) -> int",
             _params_cases, _params_expected, _params_solution, _params_hint, atol=0, rtol=0),
]
