"""Exercises of what attention explains: attention rollout (plain, and with heads and a
residual weight).

Expected answers come from package functions bound here at import time. Above each
exercise, a comment lists the mistakes learners make; a case catches each one.
"""

from __future__ import annotations

import torch

from ..interpret import attention_rollout as _attention_rollout
from ._core import Case, Exercise, finite, matches


def _number(got):
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    return got if type(got) in (int, float) else None


# --- interpret.attention_rollout --------------------------------------------------------------------
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


# --- interpret.rollout_with_residual ----------------------------------------------------------------
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


EXERCISES = [
    Exercise("interpret.attention_rollout", "attention_rollout(weights: list of (L, L), first layer first) -> (L, L)",
             _rollout_cases, _rollout_expected, _rollout_solution, _rollout_hint),
    Exercise("interpret.rollout_with_residual",
             "rollout_with_residual(weights: list of (B, H, L, L), first layer first, residual: float) "
             "-> (B, L, L)",
             _rr_cases, _rr_expected, _rr_solution, _rr_hint),
]
