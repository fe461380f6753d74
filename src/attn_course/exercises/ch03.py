"""Chapter 3 exercises: Gumbel noise, the REINFORCE surrogate, local-p weights, receptive fields."""

from __future__ import annotations

import math

import torch

from .. import variants
from ._core import Case, Exercise


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- ch03.gumbel_softmax ----------------------------------------------------------------------

def _gumbel_solution(logits, uniform, tau):
    gumbel = -torch.log(-torch.log(uniform))        # Gumbel(0, 1) noise from uniform samples
    return torch.softmax((logits + gumbel) / tau, dim=-1)


def _gumbel_expected(logits, uniform, tau):
    g = -torch.log(-torch.log(uniform.double()))
    return torch.softmax((logits.double() + g) / tau, dim=-1).to(logits.dtype)


def _gumbel_cases():
    g = _gen(30)
    cases = []
    for shape, tau in (((5,), 1.0), ((3, 4), 0.5), ((2, 6), 2.0), ((4, 3), 0.1)):
        u = torch.rand(*shape, generator=g).clamp(1e-6, 1 - 1e-6)
        cases.append(Case(f"logits {shape}, tau {tau}", (torch.randn(*shape, generator=g), u, tau)))
    return cases


def _gumbel_hint(case, got, expected):
    logits, u, tau = case.args
    if torch.allclose(got.double(), torch.softmax((logits.double() - torch.log(u.double())) / tau, -1), atol=1e-5):
        return "Gumbel noise is -log(-log(u)), not -log(u)."
    if torch.allclose(got.double(), torch.softmax(logits.double() + (-torch.log(-torch.log(u.double()))), -1), atol=1e-5):
        return "divide (logits + noise) by the temperature tau before the softmax."
    return "y = softmax((logits + g) / tau) with g = -log(-log(u)), over the last axis."


# --- ch03.reinforce_surrogate -----------------------------------------------------------------

def _reinforce_solution(log_probs, losses, baseline):
    advantage = losses.detach() - baseline          # how much worse than usual this sample was
    return (advantage * log_probs).mean()           # its gradient is the score-function estimator


def _reinforce_expected(log_probs, losses, baseline):
    return ((losses - baseline) * log_probs).mean()


def _reinforce_cases():
    g = _gen(31)
    return [Case(f"batch of {n}, baseline {b}", (-torch.rand(n, generator=g) * 3, torch.rand(n, generator=g) * 2, b))
            for n, b in ((4, 0.0), (8, 0.5), (16, 1.2))]


def _reinforce_hint(case, got, expected):
    log_p, losses, b = case.args
    value = float(got) if isinstance(got, torch.Tensor) and got.numel() == 1 else None
    if value is not None and math.isclose(value, float((losses * log_p).mean()), rel_tol=1e-4) and b:
        return "subtract the baseline from each loss: (loss - baseline) * log_prob."
    if value is not None and math.isclose(value, -float(expected), rel_tol=1e-4):
        return "check the sign: minimising (loss - baseline) * log_prob lowers the probability of bad samples."
    return "the surrogate is the mean over the batch of (loss - baseline) * log_prob."


# --- ch03.local_p_weights --------------------------------------------------------------------

def _localp_solution(scores, centres, window):
    S = scores.shape[-1]
    s = torch.arange(S, dtype=scores.dtype)
    inside = (s[None, :] - torch.round(centres)[:, None]).abs() <= window       # (T, S)
    weights = torch.softmax(scores.masked_fill(~inside, float("-inf")), dim=-1)
    sigma = max(window, 1) / 2
    return weights * torch.exp(-((s[None, :] - centres[:, None]) ** 2) / (2 * sigma**2))


def _localp_expected(scores, centres, window):
    return variants.local_window_weights(scores, centres, window, gaussian=True)


def _localp_cases():
    g = _gen(32)
    cases = []
    for T, S, D in ((2, 6, 1), (4, 10, 2), (3, 16, 4)):
        cases.append(Case(f"scores ({T}, {S}), window {D}",
                          (torch.randn(T, S, generator=g), (S - 1) * torch.rand(T, generator=g), D)))
    return cases


def _localp_hint(case, got, expected):
    scores, centres, D = case.args
    plain = variants.local_window_weights(scores, centres, D)
    if got.shape == expected.shape and torch.allclose(got, plain, atol=1e-5):
        return "local-p also scales the window softmax by exp(-(s - p_t)^2 / (2 sigma^2)), sigma = window / 2."
    return "softmax over |s - round(p_t)| <= window only, then multiply by the Gaussian centred at p_t."


# --- ch03.conv_receptive_field ---------------------------------------------------------------

def _rf_solution(num_layers, kernel_size, dilation):
    return 1 + num_layers * (kernel_size - 1) * dilation  # each layer widens the view by (K - 1) * d


def _rf_cases():
    return [Case(f"{n} layers, kernel {k}, dilation {d}", (n, k, d))
            for n, k, d in ((1, 3, 1), (4, 3, 1), (3, 5, 1), (3, 3, 2), (5, 2, 4))]


def _rf_hint(case, got, expected):
    n, k, d = case.args
    if got == n * k:
        return "stacked layers overlap: each one adds kernel_size - 1 positions, not kernel_size."
    if got == 1 + n * (k - 1) and d > 1:
        return "a dilation d spreads each kernel's taps d apart: multiply the growth by d."
    return None


EXERCISES = [
    Exercise("ch03.gumbel_softmax", "gumbel_softmax(logits, uniform, tau) -> soft sample, same shape",
             _gumbel_cases, _gumbel_expected, _gumbel_solution, _gumbel_hint),
    Exercise("ch03.reinforce_surrogate",
             "reinforce_surrogate(log_probs (B,), losses (B,), baseline) -> scalar tensor",
             _reinforce_cases, _reinforce_expected, _reinforce_solution, _reinforce_hint),
    Exercise("ch03.local_p_weights", "local_p_weights(scores (T, S), centres (T,), window) -> (T, S)",
             _localp_cases, _localp_expected, _localp_solution, _localp_hint),
    Exercise("ch03.conv_receptive_field", "conv_receptive_field(num_layers, kernel_size, dilation) -> int",
             _rf_cases, variants.conv_receptive_field, _rf_solution, _rf_hint, atol=0, rtol=0),
]
