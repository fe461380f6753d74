"""Exercises: Gumbel noise, straight-through Gumbel, the REINFORCE surrogate, local-p
weights, receptive fields.

Expected answers come from package functions bound here at import time; for the two
estimators the checker also checks gradients, not only values. Above each exercise, a
comment lists the mistakes learners make; a case catches each one, and a hint names a
mistake only when the answer is that mistake (``_core.Hint``). Each exercise's
``conditions`` list what its statement names; floating inputs run in float32 and float64.
"""

from __future__ import annotations

import torch

from ..variants import conv_receptive_field as _conv_receptive_field
from ..variants import local_window_weights as _local_window_weights
from ._core import Case, Exercise, close, finite, first_match, generic, in_both_precisions


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _gumbel(u):
    return -torch.log(-torch.log(u))


# --- variants.gumbel_softmax ----------------------------------------------------------------------
# Mistakes: -log(u) as the noise; +log(-log(u)) (the sign); no temperature, or multiplying by
# tau (the cases use tau != 1); dividing only the logits by tau; the softmax over the wrong
# axis (2-D cases); drawing fresh noise instead of using the given uniform samples.

def _gumbel_solution(logits, uniform, tau):
    gumbel = -torch.log(-torch.log(uniform))        # Gumbel(0, 1) noise from uniform samples
    return torch.softmax((logits + gumbel) / tau, dim=-1)


def _gumbel_expected(logits, uniform, tau):
    return torch.softmax((logits.double() + _gumbel(uniform.double())) / tau, dim=-1).to(logits.dtype)


def _gumbel_cases():
    g = _gen(30)
    cases = []
    for shape, tau in (((5,), 0.7), ((3, 4), 0.5), ((2, 6), 2.0), ((4, 3), 0.1)):
        u = torch.rand(*shape, generator=g).clamp(1e-6, 1 - 1e-6)
        cases.append(Case(f"logits {shape}, tau {tau}", (torch.randn(*shape, generator=g), u, tau)))
    for shape, tau in (((6,), 3.0), ((3, 5), 0.5)):
        u = torch.rand(*shape, generator=g)
        u.view(-1)[1], u.view(-1)[-2], u.view(-1)[-1] = 1e-6, 1 - 1e-6, 1e-6
        cases.append(Case(f"logits {shape}, tau {tau}, uniform samples at the ends, 1e-6 and 1 - 1e-6",
                          (torch.randn(*shape, generator=g), u, tau)))
    return in_both_precisions(cases)


_GUMBEL_CONDITIONS = {
    "one vector of logits": lambda lg, u, tau: lg.ndim == 1,
    "a batch of rows": lambda lg, u, tau: lg.ndim == 2,
    "tau below 1": lambda lg, u, tau: tau < 1,
    "tau above 1": lambda lg, u, tau: tau > 1,
    "uniform samples at the ends (1e-6, 1 - 1e-6)": lambda lg, u, tau: bool(
        (u.double() <= 1.5e-6).any() and (u.double() >= 1 - 1.5e-6).any()),
}
_GUMBEL_EXCLUSIVE = (("one vector of logits", "a batch of rows"), ("tau below 1", "tau above 1"))


def _gumbel_hint(case, got, expected):
    logits, u, tau = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    lg, u = logits.double(), u.double()
    g = _gumbel(u)
    return first_match(got, expected, [
        (torch.softmax((lg - torch.log(u)) / tau, -1), "Gumbel noise is -log(-log(u)), not -log(u)."),
        (torch.softmax((lg - g) / tau, -1), "check the sign: g = -log(-log(u))."),
        (torch.softmax(lg + g, -1), "divide (logits + noise) by the temperature tau before the softmax."),
        (torch.softmax((lg + g) * tau, -1), "divide by the temperature tau, do not multiply."),
        (torch.softmax(lg / tau + g, -1), "divide the noisy logits (logits + g) by tau, not the "
                                         "logits alone."),
        (torch.softmax((lg + g) / tau, 0), "the softmax goes over the last axis (dim=-1)."),
        (torch.softmax(lg / tau, -1), "add the Gumbel noise g = -log(-log(u)) to the logits.")]) \
        or generic("y = softmax((logits + g) / tau) with g = -log(-log(uniform)), from the uniform samples "
                   "you are given (not fresh noise, such as F.gumbel_softmax draws, and not clamped).")


# --- variants.straight_through_gumbel ---------------------------------------------------------------
# Mistakes: returning the soft sample (the forward value must be one-hot); the one-hot of
# argmax(logits) without the noise; a one-hot with no gradient at all (F.one_hot alone, or
# an int tensor); onehot - y + y without detach (value right, gradient exactly zero); the
# gradient of softmax(logits) or of y without the temperature; fresh noise.

def _st_solution(logits, uniform, tau):
    y = torch.softmax((logits - torch.log(-torch.log(uniform))) / tau, dim=-1)   # the soft sample
    index = y.argmax(dim=-1, keepdim=True)
    hard = torch.zeros_like(y).scatter(-1, index, 1.0)                            # one-hot, no gradient
    return hard - y.detach() + y          # forward: hard; backward: the gradient of y


def _st_expected(logits, uniform, tau):
    y = torch.softmax((logits.double() + _gumbel(uniform.double())) / tau, dim=-1)
    return torch.nn.functional.one_hot(y.argmax(-1), y.shape[-1]).to(logits.dtype)


def _st_cases():
    g = _gen(33)
    cases = []
    for shape, tau in (((6,), 0.5), ((3, 5), 0.5), ((4, 4), 2.0), ((2, 8), 0.25), ((5,), 1.5)):
        u = torch.rand(*shape, generator=g).clamp(1e-6, 1 - 1e-6)
        cases.append(Case(f"logits {shape}, tau {tau}", (torch.randn(*shape, generator=g), u, tau)))
    return in_both_precisions(cases)


_ST_CONDITIONS = {k: v for k, v in _GUMBEL_CONDITIONS.items() if "ends" not in k}
_ST_EXCLUSIVE = tuple(p for p in _GUMBEL_EXCLUSIVE if not any("ends" in c for c in p))


def _st_hint(case, got, expected):
    logits, u, tau = case.args
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    y = torch.softmax((logits.double() + _gumbel(u.double())) / tau, -1)
    plain = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return first_match(got, expected, [
        (y, "that is the soft sample y: the forward value must be its one-hot arg-max; keep y's "
            "gradient with onehot - y.detach() + y."),
        (plain, "take the arg-max of the noisy sample y = softmax((logits + g) / tau), not of the logits.")]) \
        or generic("the forward value is one_hot(argmax(y)), with y = softmax((logits + g) / tau).")


def _st_verify(case, fn, got):
    logits, u, tau = case.args
    weights = torch.randn(logits.shape, generator=_gen(34), dtype=torch.float64)
    with torch.enable_grad():
        x = logits.clone().requires_grad_(True)
        out = fn(x, u.clone(), tau)
        if not isinstance(out, torch.Tensor) or not out.requires_grad or out.grad_fn is None:
            return ("the value is right but no gradient reaches the logits: a one-hot has none. Return "
                    "onehot - y.detach() + y, which is the one-hot going forward and y going backward.")
        (grad,) = torch.autograd.grad((out.double() * weights).sum(), x, allow_unused=True)
        x2 = logits.double().clone().requires_grad_(True)
        y = torch.softmax((x2 + _gumbel(u.double())) / tau, -1)
        (want,) = torch.autograd.grad((y * weights).sum(), x2)
        x3 = logits.double().clone().requires_grad_(True)
        (no_tau,) = torch.autograd.grad((torch.softmax(x3 + _gumbel(u.double()), -1) * weights).sum(), x3)
    if grad is None or not bool(grad.abs().gt(1e-12).any()):
        return ("the value is right but the gradient is zero: in onehot - y + y the two y cancel in the "
                "backward pass too. Detach the one you subtract: onehot - y.detach() + y.")
    if close(grad, want, atol=1e-5, rtol=1e-3):
        return None
    if close(grad, no_tau, atol=1e-5, rtol=1e-3):
        return "the gradient must be that of y = softmax((logits + g) / tau): the temperature is missing."
    return ("the value is right but the gradient is not that of the soft sample y = softmax((logits + g) "
            "/ tau): return onehot - y.detach() + y.")


# --- variants.reinforce_surrogate -----------------------------------------------------------------
# Mistakes: log_probs.detach() (the value is right, but no gradient reaches the scorer);
# not detaching the losses (a gradient flows into the losses, which are rewards here);
# no baseline (the cases use b != 0); the wrong sign; the sum instead of the mean;
# probabilities instead of log-probabilities.

def _reinforce_solution(log_probs, losses, baseline):
    advantage = losses.detach() - baseline          # how much worse than usual this sample was
    return (advantage * log_probs).mean()           # its gradient is the score-function estimator


def _reinforce_expected(log_probs, losses, baseline):
    return ((losses - baseline) * log_probs).mean()


def _reinforce_cases():
    g = _gen(31)
    cases = [Case(f"batch of {n}, baseline {b}", (-torch.rand(n, generator=g) * 3, torch.rand(n, generator=g) * 2, b))
             for n, b in ((4, 0.0), (8, 0.5), (16, 1.2))]
    cases.append(Case("batch of 5, baseline given as a tensor (a running mean)",
                      (-torch.rand(5, generator=g) * 3, torch.rand(5, generator=g) * 2, torch.tensor(0.8))))
    for b in (1.5, 0.0, torch.tensor(0.3)):
        cases.append(Case(f"batch of 1, baseline {float(b)}" + (" as a tensor" if isinstance(b, torch.Tensor) else ""),
                          (-torch.rand(1, generator=g) * 3, torch.rand(1, generator=g), b)))
    return in_both_precisions(cases)


_REINFORCE_CONDITIONS = {
    "baseline 0": lambda lp, ls, b: not isinstance(b, torch.Tensor) and b == 0,
    "a baseline above 0, as a number": lambda lp, ls, b: not isinstance(b, torch.Tensor) and b > 0,
    "a baseline given as a tensor": lambda lp, ls, b: isinstance(b, torch.Tensor),
    "a batch of one": lambda lp, ls, b: lp.numel() == 1,
    "a batch of several": lambda lp, ls, b: lp.numel() > 1,
}
_REINFORCE_EXCLUSIVE = (("baseline 0", "a baseline above 0, as a number"), ("baseline 0", "a baseline given as a tensor"),
                        ("a baseline above 0, as a number", "a baseline given as a tensor"),
                        ("a batch of one", "a batch of several"))


def _scalar(got):
    return got.reshape(())


def _reinforce_hint(case, got, expected):
    log_p, losses, b = (t.double() if isinstance(t, torch.Tensor) else t for t in case.args)
    if not isinstance(got, torch.Tensor) or got.numel() != 1 or not finite(got):
        return None
    exp = expected.double()
    return first_match(got, exp, [
        ((losses * log_p).mean(), "subtract the baseline from each loss: (loss - baseline) * log_prob."),
        (-exp.reshape(()), "check the sign: minimising (loss - baseline) * log_prob lowers the probability of "
                           "bad samples."),
        (((losses - b) * log_p).sum(), "take the mean over the batch, not the sum."),
        (((losses - b) * log_p.exp()).mean(), "use the log-probabilities: their gradient is the "
                                              "score function."),
        (((losses.mean() - b) * log_p.mean()), "weight each sample's log-probability by its own "
                                               "(loss - baseline), then average.")], where=_scalar)


def _reinforce_verify(case, fn, got):
    log_probs, losses, baseline = case.args
    with torch.enable_grad():
        lp = log_probs.clone().requires_grad_(True)
        ls = losses.clone().requires_grad_(True)
        out = fn(lp, ls, baseline)
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            return ("the value is right but no gradient reaches log_probs: did you detach them? The "
                    "gradient of this surrogate with respect to log_probs is the whole point: it is the "
                    "REINFORCE estimator.")
        g_lp, g_ls = torch.autograd.grad(out.sum(), [lp, ls], allow_unused=True)
    if g_ls is not None and bool(g_ls.abs().gt(1e-12).any()):
        return ("the value is right but a gradient flows into the losses: treat them as constants "
                "(losses.detach()). The losses score the sampled choice; REINFORCE differentiates only "
                "the log-probability of that choice.")
    want = (losses.double() - float(baseline)) / losses.numel()
    if g_lp is None or not close(g_lp, want, atol=1e-6, rtol=1e-4):
        return ("the gradient with respect to log_probs should be (loss - baseline) / batch size for "
                "each sample.")
    return None


# --- variants.local_p_weights --------------------------------------------------------------------
# Mistakes: no Gaussian (plain local-m weights); the window around p_t unrounded
# (|s - p_t| <= D); the Gaussian centred on round(p_t); sigma = D instead of D / 2; the softmax
# over all positions instead of the window; renormalising after the Gaussian (local-p's
# weights do not sum to 1).

def _localp_solution(scores, centres, window):
    S = scores.shape[-1]
    s = torch.arange(S, dtype=scores.dtype)
    inside = (s[None, :] - torch.round(centres)[:, None]).abs() <= window       # (T, S)
    weights = torch.softmax(scores.masked_fill(~inside, float("-inf")), dim=-1)
    sigma = max(window, 1) / 2
    return weights * torch.exp(-((s[None, :] - centres[:, None]) ** 2) / (2 * sigma**2))


def _localp_expected(scores, centres, window):
    return _local_window_weights(scores, centres, window, gaussian=True)


def _localp_cases():
    g = _gen(32)
    cases = []
    for T, S, D in ((2, 6, 1), (4, 10, 2), (3, 16, 4)):
        cases.append(Case(f"scores ({T}, {S}), window {D}",
                          (torch.randn(T, S, generator=g), (S - 1) * torch.rand(T, generator=g), D)))
    cases.append(Case("centres near both ends, window 3",
                      (torch.randn(3, 12, generator=g), torch.tensor([0.3, 10.7, 5.4]), 3)))
    cases.append(Case("window 0: one position, centres near both ends",
                      (torch.randn(3, 7, generator=g), torch.tensor([0.2, 5.9, 3.3]), 0)))
    cases.append(Case("a window wider than the sequence (5 > 6 / 2), centres near both ends",
                      (torch.randn(2, 6, generator=g), torch.tensor([0.4, 4.8]), 5)))
    return in_both_precisions(cases)


def _near_ends(scores, centres, window):
    S = scores.shape[-1]
    return bool((centres < window).any() and (centres > S - 1 - window).any())


_LOCALP_CONDITIONS = {
    "window 0 (sigma = 1/2 of max(window, 1))": lambda sc, c, D: D == 0,
    "window 1 or more": lambda sc, c, D: D >= 1,
    "windows cut by both ends of the sequence": _near_ends,
    "a window wider than the sequence": lambda sc, c, D: 2 * D + 1 > sc.shape[-1],
}
_LOCALP_EXCLUSIVE = (("window 0 (sigma = 1/2 of max(window, 1))", "window 1 or more"),
                     ("window 0 (sigma = 1/2 of max(window, 1))", "windows cut by both ends of the sequence"),
                     ("window 0 (sigma = 1/2 of max(window, 1))", "a window wider than the sequence"))


def _localp_hint(case, got, expected):
    scores, centres, D = (t.double() if isinstance(t, torch.Tensor) else t for t in case.args)
    if not isinstance(got, torch.Tensor) or got.shape != expected.shape or not finite(got):
        return None
    s = torch.arange(scores.shape[-1], dtype=torch.float64)

    def window_softmax(inside):
        return torch.softmax(scores.masked_fill(~inside, float("-inf")), -1).nan_to_num(0.0)

    def gauss(centre, sigma):
        return torch.exp(-((s[None, :] - centre[:, None]) ** 2) / (2 * sigma**2))

    rounded = (s[None, :] - torch.round(centres)[:, None]).abs() <= D
    sigma = max(D, 1) / 2
    local_m = window_softmax(rounded)
    right = local_m * gauss(centres, sigma)
    return first_match(got, expected, [
            (local_m, "local-p also scales the window softmax by exp(-(s - p_t)^2 / (2 sigma^2)), "
                      "sigma = window / 2."),
            (window_softmax((s[None, :] - centres[:, None]).abs() <= D) * gauss(centres, sigma),
             "the window is |s - round(p_t)| <= D: round the centre for the window (only the Gaussian "
             "uses p_t itself)."),
            (local_m * gauss(torch.round(centres), sigma), "centre the Gaussian on p_t itself, not on "
                                                           "round(p_t)."),
            (local_m * gauss(centres, max(D, 1)), "sigma = window / 2, not window."),
            (torch.softmax(scores, -1) * gauss(centres, sigma), "the softmax covers only the window "
                                                               "|s - round(p_t)| <= D."),
            (right / right.sum(-1, keepdim=True), "do not renormalise after the Gaussian: local-p's "
                                                  "weights are the window softmax times the Gaussian.")])


# --- variants.conv_receptive_field ---------------------------------------------------------------
# Mistakes: num_layers * kernel_size (layers overlap: each adds kernel_size - 1); dilation
# ignored; the + 1 for the output position itself forgotten; dilation applied as d ** layer.

def _rf_solution(num_layers, kernel_size, dilation):
    return 1 + num_layers * (kernel_size - 1) * dilation  # each layer widens the view by (K - 1) * d


def _rf_cases():
    return [Case(f"{n} layers, kernel {k}, dilation {d}", (n, k, d))
            for n, k, d in ((1, 3, 1), (4, 3, 1), (3, 5, 1), (3, 3, 2), (5, 2, 4), (1, 4, 3), (3, 1, 2),
                                     (1, 1, 2), (2, 1, 1))]


_RF_CONDITIONS = {
    "one layer": lambda n, k, d: n == 1,
    "several layers": lambda n, k, d: n > 1,
    "dilation 1": lambda n, k, d: d == 1,
    "dilation above 1": lambda n, k, d: d > 1,
    "kernel 1 (no growth)": lambda n, k, d: k == 1,
}
_RF_EXCLUSIVE = (("one layer", "several layers"), ("dilation 1", "dilation above 1"))


def _rf_hint(case, got, expected):
    n, k, d = case.args
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        got = got.item()
    if type(got) not in (int, float):
        return None
    return first_match(got, expected, [
        (n * k, "stacked layers overlap: each one adds kernel_size - 1 positions, not kernel_size."),
        (1 + n * (k - 1), "a dilation d spreads each kernel's taps d apart: multiply the growth by d."),
        (n * (k - 1) * d, "count the output's own position too: 1 + ..."),
        (1 + (k - 1) * sum(d**i for i in range(n)), "here every layer has the same dilation d (not "
                                                     "d ** layer as in WaveNet).")], atol=0, rtol=0)


EXERCISES = [
    Exercise("variants.gumbel_softmax", "gumbel_softmax(logits, uniform, tau) -> soft sample, same shape",
             _gumbel_cases, _gumbel_expected, _gumbel_solution, _gumbel_hint,
             conditions=_GUMBEL_CONDITIONS, exclusive=_GUMBEL_EXCLUSIVE),
    Exercise("variants.straight_through_gumbel",
             "straight_through_gumbel(logits, uniform, tau) -> one-hot sample (float, same shape) whose "
             "gradient is that of softmax((logits + g) / tau)",
             _st_cases, _st_expected, _st_solution, _st_hint, verify=_st_verify,
             conditions=_ST_CONDITIONS, exclusive=_ST_EXCLUSIVE),
    Exercise("variants.reinforce_surrogate",
             "reinforce_surrogate(log_probs (B,), losses (B,), baseline) -> scalar tensor",
             _reinforce_cases, _reinforce_expected, _reinforce_solution, _reinforce_hint,
             verify=_reinforce_verify, conditions=_REINFORCE_CONDITIONS, exclusive=_REINFORCE_EXCLUSIVE),
    Exercise("variants.local_p_weights", "local_p_weights(scores (T, S), centres (T,), window) -> (T, S)",
             _localp_cases, _localp_expected, _localp_solution, _localp_hint,
             conditions=_LOCALP_CONDITIONS, exclusive=_LOCALP_EXCLUSIVE),
    Exercise("variants.conv_receptive_field", "conv_receptive_field(num_layers, kernel_size, dilation) -> int",
             _rf_cases, _conv_receptive_field, _rf_solution, _rf_hint, atol=0, rtol=0,
             conditions=_RF_CONDITIONS, exclusive=_RF_EXCLUSIVE),
]
