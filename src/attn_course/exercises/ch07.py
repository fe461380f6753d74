"""Chapter 7 exercises: language-model targets, attention rollout, counting a transformer's parameters."""

from __future__ import annotations

import torch

from .. import interpret, multihead, transformer
from ._core import Case, Exercise


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
    if got.shape != expected.shape or got.is_floating_point():
        return None
    aligned = torch.full_like(ids, -100)
    aligned[:, p:] = ids[:, p:]
    if torch.equal(got, aligned):
        return "shift by one: the output at position t is scored against token t + 1."
    return "targets[:, t] = ids[:, t + 1] for t from prompt_length - 1 to T - 2, and -100 elsewhere."


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
    return interpret.attention_rollout([w[None] for w in weights])[0]


def _rollout_cases():
    g = torch.Generator().manual_seed(71)
    cases = []
    for layers, L in ((1, 3), (2, 4), (3, 6)):
        ws = [torch.softmax(torch.randn(L, L, generator=g), -1) for _ in range(layers)]
        cases.append(Case(f"{layers} layer(s) of {L} x {L} weights", (ws,)))
    return cases


def _rollout_hint(case, got, expected):
    (ws,) = case.args
    plain = ws[0]
    for a in ws[1:]:
        plain = a @ plain
    if got.shape == expected.shape and torch.allclose(got, plain, atol=1e-5):
        return "account for the residual connection: use 0.5 * A + 0.5 * I per layer."
    reverse = None
    for a in ws:
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1])
        reverse = a if reverse is None else reverse @ a
    if got.shape == expected.shape and torch.allclose(got, reverse, atol=1e-5):
        return "multiply later layers on the left: R = A_L ... A_2 A_1."
    return None


def _params_solution(vocab_size, embed_dim, num_layers, mlp_ratio):
    d, h = embed_dim, mlp_ratio * embed_dim
    norms = 2 * (2 * d)                                      # two LayerNorms, a weight and a bias each
    attention = (3 * d * d + 3 * d) + (d * d + d)            # fused Q, K, V projection and the output one
    mlp = (d * h + h) + (h * d + d)
    return vocab_size * d + num_layers * (norms + attention + mlp) + 2 * d + (d * vocab_size + vocab_size)


def _params_expected(vocab_size, embed_dim, num_layers, mlp_ratio):
    model = transformer.TinyTransformer(vocab_size, embed_dim, 2, num_layers, mlp_ratio=mlp_ratio)
    return multihead.count_parameters(model)


def _params_cases():
    return [Case(f"vocab {V}, width {d}, {n} layers, MLP x{r}", (V, d, n, r))
            for V, d, n, r in ((11, 64, 2, 4), (100, 32, 1, 4), (50, 128, 6, 2), (8, 16, 3, 1))]


def _params_hint(case, got, expected):
    V, d, n, r = case.args
    if not isinstance(got, int):
        return None
    if got == expected - 2 * d - n * 4 * d:
        return "count the LayerNorms: a weight and a bias of size d each, two per block plus the final one."
    if got == expected - d * V - V:
        return "the output head (d x vocab weights and vocab biases) has its own parameters here."
    return "per block: two LayerNorms, Q/K/V (3d x d + 3d), the output projection (d x d + d), the MLP."


EXERCISES = [
    Exercise("ch07.lm_targets", "lm_targets(ids (B, T), prompt_length) -> (B, T) int64 targets, -100 = ignored",
             _targets_cases, _targets_expected, _targets_solution, _targets_hint),
    Exercise("ch07.attention_rollout", "attention_rollout(weights: list of (L, L), first layer first) -> (L, L)",
             _rollout_cases, _rollout_expected, _rollout_solution, _rollout_hint),
    Exercise("ch07.transformer_parameters",
             "transformer_parameters(vocab_size, embed_dim, num_layers, mlp_ratio) -> int",
             _params_cases, _params_expected, _params_solution, _params_hint, atol=0, rtol=0),
]
