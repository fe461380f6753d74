"""Chapter 3, soft, hard, local and global attention.

Soft attention averages; hard attention picks one position, which is not
differentiable, so it is trained with REINFORCE (a score-function gradient with a
baseline; Williams, 1992) or relaxed with Gumbel-softmax and the straight-through
estimator (Jang et al., 2017). Global attention (Luong et al., 2015) scores every
source position; local-m attends to a window around the aligned position, local-p to
a window around a predicted position, scaled by a Gaussian. The module also measures
receptive fields, to compare local attention with convolutions, and holds the baselines a
skeptic asks for beside local attention: a CNN with the same window and a dynamic
convolution (Wu et al., 2019), whose kernel is computed from the content of one position.
Several seeds of a model train together as one stacked model (:func:`fit_seeds`,
:class:`StackedMarkerSelectors`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .basics import masked_softmax
from .sparse import sliding_window_mask

__all__ = [
    "gumbel_softmax",
    "sample_hard",
    "local_window_weights",
    "LuongAttention",
    "MarkerSelector",
    "StackedMarkerSelectors",
    "scorer_gradient_draws",
    "LocalAttentionTagger",
    "ConvTagger",
    "DynamicConvTagger",
    "shifted_copy_task",
    "window_recall_task",
    "fit_seeds",
    "receptive_field",
    "conv_receptive_field",
]


def gumbel_softmax(logits: torch.Tensor, tau: float = 1.0, *, hard: bool = False,
                   generator: torch.Generator | None = None, dim: int = -1) -> torch.Tensor:
    r"""A Gumbel-softmax sample (Jang et al., 2017; Maddison et al., 2017).

    .. math:: y = \mathrm{softmax}\big((\ell + g) / \tau\big),\qquad g_i = -\log(-\log u_i),\ u_i \sim U(0, 1)

    With ``hard=True`` the forward value is the one-hot arg-max of ``y`` and the
    gradient is that of ``y`` (straight-through: ``onehot - y.detach() + y``).
    Unlike ``torch.nn.functional.gumbel_softmax`` it takes a ``generator``, so that
    samples can be reproduced.

    Example:
        Hard samples are one-hot and drawn with the probabilities ``softmax(logits)``:

        >>> import torch
        >>> from attn_course.variants import gumbel_softmax
        >>> logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
        >>> soft = gumbel_softmax(logits, tau=0.5, generator=torch.Generator().manual_seed(0))
        >>> round(soft.sum().item(), 4)
        1.0
        >>> hard = gumbel_softmax(logits.expand(20000, 3), hard=True,
        ...                       generator=torch.Generator().manual_seed(0))
        >>> hard.sum(-1).unique().tolist(), [round(p, 1) for p in hard.mean(0).tolist()]
        ([1.0], [0.7, 0.2, 0.1])
    """
    _checks.float_tensor("logits", logits)
    tau = _checks.positive_number("tau", tau)
    u = torch.rand(logits.shape, generator=generator, dtype=logits.dtype,
                   device="cpu" if generator is not None else logits.device).to(logits.device)
    g = -torch.log((-torch.log(u.clamp(1e-20, 1.0))).clamp_min(1e-20))
    y = torch.softmax((logits + g) / tau, dim=dim)
    if not hard:
        return y
    onehot = F.one_hot(y.argmax(dim), y.shape[dim]).movedim(-1, dim).to(y.dtype)
    return onehot - y.detach() + y


def sample_hard(scores: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard attention: sample one position per row from ``softmax(scores)``.

    Returns the positions ``(...)`` and their log-probabilities, for REINFORCE.

    Example:
        >>> import torch
        >>> from attn_course.variants import sample_hard
        >>> scores = torch.zeros(1000, 4)                     # uniform: every position 1/4
        >>> idx, log_p = sample_hard(scores, torch.Generator().manual_seed(0))
        >>> tuple(idx.shape), sorted(set(idx.tolist())), round(log_p[0].exp().item(), 4)
        ((1000,), [0, 1, 2, 3], 0.25)
    """
    _checks.float_tensor("scores", scores)
    log_p = torch.log_softmax(scores, dim=-1)
    flat = log_p.detach().exp().reshape(-1, scores.shape[-1])
    idx = torch.multinomial(flat.cpu() if generator is not None else flat, 1, generator=generator)
    idx = idx.to(scores.device).view(scores.shape[:-1])
    return idx, log_p.gather(-1, idx[..., None]).squeeze(-1)


def local_window_weights(scores: torch.Tensor, centres: torch.Tensor, window: int, *,
                         gaussian: bool = False) -> torch.Tensor:
    r"""Luong et al.'s (2015) local attention weights.

    ``scores (..., T, S)`` and window centres ``p_t (..., T)`` (float). Each query
    attends to sources ``s`` with ``|s - round(p_t)| <= window``; with ``gaussian``
    (local-p) the softmax is then scaled by
    :math:`\exp(-(s - p_t)^2 / (2\sigma^2))`, :math:`\sigma = \mathrm{window} / 2`.
    As in the paper (eq. 10), the scaled weights are not renormalised: a row of local-p
    weights sums to less than 1 (to exactly 1 only in the limit of a flat Gaussian).

    Example:
        >>> import torch
        >>> from attn_course.variants import local_window_weights
        >>> scores, centre = torch.zeros(1, 7), torch.tensor([3.0])
        >>> local_window_weights(scores, centre, window=1)             # local-m: 3 keys, uniform
        tensor([[0.0000, 0.0000, 0.3333, 0.3333, 0.3333, 0.0000, 0.0000]])
        >>> w = local_window_weights(scores, centre, window=1, gaussian=True)   # local-p, sigma 0.5
        >>> [round(a, 4) for a in w[0, 2:5].tolist()], round(w.sum().item(), 4)  # exp(-2) at +-1
        ([0.0451, 0.3333, 0.0451], 0.4236)
    """
    _checks.float_tensor("scores", scores, min_ndim=2)
    _checks.float_tensor("centres", centres)
    if centres.shape != scores.shape[:-1]:
        raise ValueError(f"centres must have shape {tuple(scores.shape[:-1])} (one per query), "
                         f"got {tuple(centres.shape)}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    s = torch.arange(scores.shape[-1], device=scores.device, dtype=scores.dtype)
    offset = s - centres[..., None]                                     # (..., T, S)
    mask = (s - torch.round(centres)[..., None]).abs() <= window
    weights = masked_softmax(scores, mask)
    if gaussian:
        sigma = max(window, 1) / 2
        weights = weights * torch.exp(-(offset**2) / (2 * sigma**2))
    return weights


class LuongAttention(nn.Module):
    r"""Luong attention with the "general" score ``q^T W k``: global, local-m or local-p.

    .. math:: \alpha_{ij} = \mathrm{softmax}_{j \in \mathcal J_i}\big(\mathbf q_i^\top W \mathbf k_j\big),
              \qquad \mathbf o_i = \sum_j \alpha_{ij}\, \mathbf v_j

    with :math:`\mathcal J_i` every key (global) or the window
    :math:`|j - \mathrm{round}(p_i)| \le w` around a centre :math:`p_i` (local); local-p then
    multiplies :math:`\alpha_{ij}` by :math:`\exp(-(j - p_i)^2 / 2\sigma^2)`, :math:`\sigma = w / 2`
    (Luong et al., 2015, who write :math:`h_t`, :math:`\bar h_s` and :math:`D` for the window).

    ``forward(query (B, T, dq), keys (B, S, dk), values (B, S, dv)) -> (output, weights (B, T, S),
    centres (B, T) or None)``. local-m centres the window at ``t * (S - 1) / (T - 1)`` (the
    monotonic alignment, Luong et al.'s ``p_t = t`` for ``T = S``); local-p predicts
    ``p_t = S * sigmoid(v_p^T tanh(W_p h_t))`` with ``S`` the source length, so
    ``p_t`` lies in ``[0, S]`` (Luong et al., 2015, eq. 9; a window around ``p_t`` near
    ``S`` is cut at the last position, ``S - 1``).

    Example:
        >>> import torch
        >>> from attn_course.variants import LuongAttention
        >>> _ = torch.manual_seed(0)
        >>> query, keys = torch.randn(1, 3, 4), torch.randn(1, 5, 4)
        >>> out, weights, centres = LuongAttention(4, 4, mode="local-m", window=1)(query, keys, keys)
        >>> tuple(out.shape), centres.tolist()           # monotonic centres t (S - 1) / (T - 1)
        ((1, 3, 4), [[0.0, 2.0, 4.0]])
        >>> (weights[0] > 0).int()                       # each query sees the window around its centre
        tensor([[1, 1, 0, 0, 0],
                [0, 1, 1, 1, 0],
                [0, 0, 0, 1, 1]], dtype=torch.int32)
        >>> LuongAttention(4, 4)(query, keys, keys)[2] is None    # global: no centres
        True
    """

    def __init__(self, query_dim: int, key_dim: int, mode: str = "global", window: int = 2):
        super().__init__()
        if mode not in ("global", "local-m", "local-p"):
            raise ValueError(f"mode must be 'global', 'local-m' or 'local-p', got {mode!r}")
        self.mode, self.window = mode, window
        self.W = nn.Linear(key_dim, query_dim, bias=False)
        if mode == "local-p":
            self.W_p = nn.Linear(query_dim, query_dim)
            self.v_p = nn.Linear(query_dim, 1, bias=False)

    def forward(self, query, keys, values):
        _checks.float_tensor("query", query, ndim=3)
        _checks.float_tensor("keys", keys, ndim=3)
        scores = query @ self.W(keys).transpose(-2, -1)                 # (B, T, S)
        T, S = scores.shape[-2:]
        if self.mode == "global":
            weights, centres = torch.softmax(scores, dim=-1), None
        else:
            if self.mode == "local-m":
                step = (S - 1) / max(T - 1, 1)
                centres = (torch.arange(T, device=query.device, dtype=query.dtype) * step).expand(scores.shape[:-1])
            else:
                centres = S * torch.sigmoid(self.v_p(torch.tanh(self.W_p(query)))).squeeze(-1)  # in [0, S]
            weights = local_window_weights(scores, centres, self.window, gaussian=self.mode == "local-p")
        return weights @ values, weights, centres


def _selection_losses(s, x, y, classifier, mode, tau, generator):
    """Per-example losses ``(..., B)``, log-probabilities of the sampled items (REINFORCE, else
    None) and logits, for scores ``s (..., B, L)`` over items ``x (..., B, L, F)``."""
    log_p = None
    if mode == "soft":
        w = torch.softmax(s, -1)
    elif mode == "gumbel":
        w = gumbel_softmax(s, tau, hard=True, generator=generator)
    else:
        idx, log_p = sample_hard(s, generator)
        w = F.one_hot(idx, s.shape[-1]).to(x.dtype)
    logits = classifier((w[..., None] * x).sum(-2))                     # (..., B, C)
    per_example = F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)
    return per_example, log_p, logits


def _select(scores: torch.Tensor, mode: str) -> torch.Tensor:
    """Weights over the last axis of ``scores``: their softmax (``mode="soft"``), else a one-hot arg-max."""
    if mode == "soft":
        return torch.softmax(scores, -1)
    return F.one_hot(scores.argmax(-1), scores.shape[-1]).to(scores.dtype)


class MarkerSelector(nn.Module):
    r"""The "find the marked item" model: score every item, select, classify.

    .. math:: s_i = \mathbf u^\top \mathbf x_i + c,\qquad
              \hat y = \mathrm{classifier}\Big(\sum_i \alpha_i \mathbf x_i\Big),\qquad
              \alpha = \mathrm{softmax}(s) \text{ (soft) or } \mathrm{onehot}(j),\ j \sim \mathrm{softmax}(s) \text{ (hard)}

    Soft and hard attention as Xu et al. (2015) compare them; the hard choice is trained with
    REINFORCE (Williams, 1992) or a straight-through Gumbel-softmax (Jang et al., 2017).

    ``mode="soft"`` averages the items with softmax weights; ``"reinforce"`` samples one
    item (hard attention) and learns the scorer with REINFORCE and a running-mean
    baseline; ``"gumbel"`` selects one item with straight-through Gumbel-softmax.
    ``loss(x (B, L, F), y (B,), generator) -> (loss, accuracy)``; ``select(x)`` gives
    the weights used at test time (soft weights, or the one-hot arg-max).

    Example:
        >>> import torch
        >>> from attn_course.data import marked_item_task
        >>> from attn_course.variants import MarkerSelector
        >>> _ = torch.manual_seed(0)
        >>> x, y = marked_item_task(16, length=6, vocab_size=4)           # x (16, 6, 5)
        >>> model = MarkerSelector(num_features=5, num_classes=4, mode="reinforce")
        >>> loss, accuracy = model.loss(x, y, torch.Generator().manual_seed(0))
        >>> loss.requires_grad, 0.0 <= accuracy <= 1.0, model.baseline.item() > 0   # baseline moved
        (True, True, True)
        >>> model.select(x).sum(-1).unique().tolist()                    # test time: one-hot arg-max
        [1.0]
        >>> logits, weights = MarkerSelector(5, 4, mode="soft")(x)
        >>> tuple(logits.shape), torch.allclose(weights.sum(-1), torch.ones(16))
        ((16, 4), True)
    """

    def __init__(self, num_features: int, num_classes: int, mode: str = "soft", tau: float = 1.0):
        super().__init__()
        if mode not in ("soft", "reinforce", "gumbel"):
            raise ValueError(f"mode must be 'soft', 'reinforce' or 'gumbel', got {mode!r}")
        self.mode, self.tau = mode, tau
        self.scorer = nn.Linear(num_features, 1)
        self.classifier = nn.Linear(num_features, num_classes)
        self.register_buffer("baseline", torch.tensor(0.0))

    def scores(self, x):
        """Selection scores, one per position: ``x (B, L, F) -> (B, L)``."""
        return self.scorer(x).squeeze(-1)                                # (B, L)

    def select(self, x):
        """Weights over positions ``(B, L)``: the softmax of the scores (soft), else a one-hot argmax."""
        return _select(self.scores(x), self.mode)

    def forward(self, x):
        w = self.select(x)
        return self.classifier((w[..., None] * x).sum(1)), w

    def loss(self, x, y, generator=None, *, update_baseline: bool = True):
        """Training loss and accuracy on ``(x (B, L, F), y (B,))``.

        Soft: cross-entropy through the softmax weights. Gumbel: a straight-through
        Gumbel-softmax sample (Jang et al., 2017). REINFORCE: a sampled position and the
        score-function term ``(loss - baseline) log p`` (Williams, 1992), with a running-mean
        baseline ``b <- 0.9 b + 0.1 mean(loss)`` updated after each call, unless
        ``update_baseline=False`` (to measure gradients without changing the training state).
        """
        per_example, log_p, logits = _selection_losses(self.scores(x), x, y, self.classifier, self.mode,
                                                       self.tau, generator)
        loss = per_example.mean()
        if self.mode == "reinforce":
            advantage = per_example.detach() - self.baseline
            loss = loss + (advantage * log_p).mean()                      # score-function gradient
            if update_baseline:
                with torch.no_grad():
                    self.baseline.mul_(0.9).add_(0.1 * per_example.mean())
        return loss, (logits.argmax(-1) == y).float().mean().item()

class StackedMarkerSelectors(nn.Module):
    r"""``M`` :class:`MarkerSelector` of one mode, each with its own weights and REINFORCE
    baseline, evaluated and trained as one batched model (a leading model axis ``M``).

    .. math:: \mathcal L = \sum_{m=1}^{n_\text{seeds}} \mathcal L_m(\theta_m),\qquad
              \nabla_{\theta_m} \mathcal L = \nabla_{\theta_m} \mathcal L_m

    each :math:`\mathcal L_m` the loss of :class:`MarkerSelector` (soft attention; REINFORCE,
    Williams, 1992; or Gumbel-softmax, Jang et al., 2017).

    Summing the ``M`` losses gives each copy exactly its own gradient, and Adam works element
    by element, so one training of the stack is ``M`` independent trainings (seeds) at the
    cost of about one. Built from trained or fresh models; :meth:`unstack` gives copy ``m``
    back as a :class:`MarkerSelector`. The models' own weights are copied, never changed.

    ``scores(x (M, B, L, F) or (B, L, F)) -> (M, B, L)``; ``forward(x) -> (logits (M, B, C),
    weights (M, B, L))``; ``loss(x, y (M, B), generator, update_baseline=True) -> (sum of the
    M losses, accuracies (M,))``, each copy's loss as in :meth:`MarkerSelector.loss`.

    Example:
        >>> import torch
        >>> from attn_course.data import marked_item_task
        >>> from attn_course.variants import MarkerSelector, StackedMarkerSelectors
        >>> _ = torch.manual_seed(0)
        >>> models = [MarkerSelector(5, 4) for _ in range(3)]               # three seeds
        >>> stack = StackedMarkerSelectors(models)
        >>> x, y = marked_item_task(8, length=6, vocab_size=4)               # one batch, shared
        >>> logits, weights = stack(x)
        >>> tuple(logits.shape), tuple(weights.shape)
        ((3, 8, 4), (3, 8, 6))
        >>> torch.allclose(logits[1], models[1](x)[0], atol=1e-6)          # copy 1 is model 1
        True
        >>> loss, accuracies = stack.loss(x, y)
        >>> tuple(accuracies.shape)
        (3,)
    """

    def __init__(self, models: Sequence[MarkerSelector]):
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, MarkerSelector) for m in models):
            raise TypeError(f"models must be a non-empty list of MarkerSelector, got "
                            f"{[type(m).__name__ for m in models]}")
        if len({(m.mode, m.tau) for m in models}) != 1:
            raise ValueError(f"models must share one mode and tau, got {[(m.mode, m.tau) for m in models]}")
        self.mode, self.tau = models[0].mode, models[0].tau
        with torch.no_grad():
            self.scorer_weight = nn.Parameter(torch.stack([m.scorer.weight[0] for m in models]).clone())  # (M, F)
            self.scorer_bias = nn.Parameter(torch.stack([m.scorer.bias[0] for m in models]).clone())      # (M,)
            self.classifier_weight = nn.Parameter(torch.stack([m.classifier.weight for m in models]).clone())  # (M, C, F)
            self.classifier_bias = nn.Parameter(torch.stack([m.classifier.bias for m in models]).clone())      # (M, C)
            self.register_buffer("baseline", torch.stack([m.baseline for m in models]).clone())              # (M,)

    @property
    def num_models(self) -> int:
        return self.scorer_weight.shape[0]

    def _items(self, x):
        _checks.float_tensor("x", x)
        M, Fdim = self.scorer_weight.shape
        if x.ndim == 3:
            x = x.expand(M, *x.shape)
        if x.ndim != 4 or x.shape[0] != M or x.shape[-1] != Fdim:
            raise ValueError(f"x must have shape (B, L, {Fdim}) or ({M}, B, L, {Fdim}), got {tuple(x.shape)}")
        return x

    def _classify(self, pooled):                                         # (M, B, F) -> (M, B, C)
        return torch.einsum("mbf,mcf->mbc", pooled, self.classifier_weight) + self.classifier_bias[:, None]

    def scores(self, x):
        """Selection scores ``(M, B, L)``."""
        x = self._items(x)
        return torch.einsum("mblf,mf->mbl", x, self.scorer_weight) + self.scorer_bias[:, None, None]

    def select(self, x):
        """Weights ``(M, B, L)``: softmax of the scores (soft), else a one-hot arg-max."""
        return _select(self.scores(x), self.mode)

    def forward(self, x):
        x = self._items(x)
        w = self.select(x)
        return self._classify((w[..., None] * x).sum(-2)), w

    def loss(self, x, y, generator=None, *, update_baseline: bool = True):
        """The sum over copies of each copy's training loss, and each copy's accuracy ``(M,)``."""
        x = self._items(x)
        if y.ndim == 1:
            y = y.expand(self.num_models, *y.shape)
        per_example, log_p, logits = _selection_losses(self.scores(x), x, y, self._classify, self.mode,
                                                       self.tau, generator)      # (M, B)
        loss = per_example.mean(1).sum()
        if self.mode == "reinforce":
            advantage = per_example.detach() - self.baseline[:, None]
            loss = loss + (advantage * log_p).mean(1).sum()
            if update_baseline:
                with torch.no_grad():
                    self.baseline.mul_(0.9).add_(0.1 * per_example.mean(1))
        return loss, (logits.argmax(-1) == y).float().mean(1)

    def unstack(self, m: int) -> MarkerSelector:
        """Copy ``m`` as a :class:`MarkerSelector` (a new module with copies of its weights)."""
        F_, C = self.classifier_weight.shape[2], self.classifier_weight.shape[1]
        model = MarkerSelector(F_, C, self.mode, self.tau).to(self.scorer_weight.device, self.scorer_weight.dtype)
        with torch.no_grad():
            model.scorer.weight.copy_(self.scorer_weight[m][None])
            model.scorer.bias.copy_(self.scorer_bias[m][None])
            model.classifier.weight.copy_(self.classifier_weight[m])
            model.classifier.bias.copy_(self.classifier_bias[m])
            model.baseline.copy_(self.baseline[m])
        return model


def scorer_gradient_draws(model: MarkerSelector, x: torch.Tensor, y: torch.Tensor, draws: int = 200, *,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """``draws`` gradient estimates of ``model``'s training loss with respect to its scorer's
    weights, each with fresh sampling noise, on one fixed batch ``x (B, L, F), y (B,)``:
    ``(draws, F)``.

    The estimates are taken on copies (a :class:`StackedMarkerSelectors` of ``draws``
    copies, one backward pass): ``model``'s weights, gradients and REINFORCE baseline are
    left as they were, and every draw uses the same baseline, the model's current one.

    Example:
        Soft attention's gradient has no sampling noise; REINFORCE's does:

        >>> import torch
        >>> from attn_course.data import marked_item_task
        >>> from attn_course.variants import MarkerSelector, scorer_gradient_draws
        >>> _ = torch.manual_seed(0)
        >>> x, y = marked_item_task(16, length=6, vocab_size=4)
        >>> soft = scorer_gradient_draws(MarkerSelector(5, 4, "soft"), x, y, draws=20)
        >>> hard = scorer_gradient_draws(MarkerSelector(5, 4, "reinforce"), x, y, draws=20,
        ...                              generator=torch.Generator().manual_seed(0))
        >>> tuple(hard.shape), soft.std(0).max().item() < 1e-6, hard.std(0).max().item() > 1e-3
        ((20, 5), True, True)
    """
    draws = _checks.positive_number("draws", draws, integer=True)
    if not isinstance(model, MarkerSelector):
        raise TypeError(f"model must be a MarkerSelector, got {type(model).__name__}")
    stack = StackedMarkerSelectors([model] * draws)
    loss, _ = stack.loss(x, y, generator, update_baseline=False)
    (grad,) = torch.autograd.grad(loss, stack.scorer_weight)
    return grad


class LocalAttentionTagger(nn.Module):
    r"""One local self-attention layer (window ``+-window``) and a per-position readout.

    .. math:: \alpha_{ij} = \mathrm{softmax}_{|j - i| \le w}\Big(\frac{\mathbf q_i \cdot \mathbf k_j}{\sqrt{d}}
              \;[+\; b_{j - i}]\Big),\qquad
              \mathrm{logits}_i = W_\text{out} \sum_j \alpha_{ij} \mathbf v_j

    local attention as in Luong et al. (2015) and Longformer's window (Beltagy et al., 2020).

    ``forward(x (B, L, F)) -> (logits (B, L, C), weights (B, L, L))``. Without positions
    (the default) the weights depend only on the content: within its window the layer sees
    a set, not a sequence. ``relative_positions=True`` adds a learned bias per offset
    ``j - i`` to the scores (a relative position bias, as in Shaw et al., 2018, in its
    scalar form), with which a head can attend to a fixed offset, as a convolution does
    (Cordonnier et al., 2020).

    Example:
        >>> import torch
        >>> from attn_course.sparse import sliding_window_mask
        >>> from attn_course.variants import LocalAttentionTagger
        >>> _ = torch.manual_seed(0)
        >>> tagger = LocalAttentionTagger(num_features=5, num_classes=3, window=2)
        >>> logits, weights = tagger(torch.randn(4, 10, 5))
        >>> tuple(logits.shape), tuple(weights.shape)
        ((4, 10, 3), (4, 10, 10))
        >>> torch.equal(weights[0] > 0, sliding_window_mask(10, 2))   # nothing outside the window
        True
    """

    def __init__(self, num_features: int, num_classes: int, window: int, hidden: int = 16, *,
                 relative_positions: bool = False):
        super().__init__()
        self.window = window
        self.q, self.k, self.v = (nn.Linear(num_features, hidden) for _ in range(3))
        self.out = nn.Linear(hidden, num_classes)
        self.offset_bias = nn.Parameter(torch.zeros(2 * window + 1)) if relative_positions else None

    def forward(self, x):
        L = x.shape[-2]
        mask = sliding_window_mask(L, self.window).to(x.device)
        scores = self.q(x) @ self.k(x).transpose(-2, -1) / math.sqrt(self.q.out_features)
        if self.offset_bias is not None:
            pos = torch.arange(L, device=x.device)
            offset = (pos[None, :] - pos[:, None]).clamp(-self.window, self.window) + self.window
            scores = scores + self.offset_bias[offset]                     # b_{j - i}, (L, L)
        weights = masked_softmax(scores, mask)
        return self.out(weights @ self.v(x)), weights


class ConvTagger(nn.Module):
    r"""A 1-D CNN with the same receptive field: ``depth`` layers whose kernels together span
    ``2 * window + 1`` positions. ``forward(x (B, L, F)) -> (logits (B, L, C), None)``.

    .. math:: \mathbf h^{(l)}_i = \mathrm{ReLU}\Big(\sum_{|o| \le w / n_\text{layers}} W^{(l)}_o\,
              \mathbf h^{(l-1)}_{i+o} + \mathbf b^{(l)}\Big),\qquad
              \mathrm{logits}_i = W_\text{out} \mathbf h^{(n_\text{layers})}_i

    with ``depth`` :math:`= n_\text{layers}`: the convolutional tagger of Collobert et al.
    (2011). The kernel :math:`W^{(l)}_o` depends on the offset :math:`o` only, never on the
    content.

    Example:
        >>> import torch
        >>> from attn_course.variants import ConvTagger, receptive_field
        >>> tagger = ConvTagger(num_features=3, num_classes=2, window=2, depth=2)
        >>> logits, _ = tagger(torch.randn(4, 10, 3))
        >>> tuple(logits.shape)
        (4, 10, 2)
        >>> receptive_field(tagger.double(), 10, 3, position=5).nonzero().flatten().tolist()
        [3, 4, 5, 6, 7]
    """

    def __init__(self, num_features: int, num_classes: int, window: int, hidden: int = 16, depth: int = 1):
        super().__init__()
        depth = _checks.positive_number("depth", depth, integer=True)
        if (2 * window) % depth:
            raise ValueError(f"2 * window = {2 * window} must be divisible by depth={depth}")
        k = 2 * window // depth + 1
        layers, ch = [], num_features
        for _ in range(depth):
            layers += [nn.Conv1d(ch, hidden, k, padding=k // 2), nn.ReLU()]
            ch = hidden
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv1d(hidden, num_classes, 1)

    def forward(self, x):
        return self.out(self.body(x.transpose(1, 2))).transpose(1, 2), None

class DynamicConvTagger(nn.Module):
    r"""A dynamic convolution layer (Wu et al., 2019) with window ``+-window`` and a
    per-position readout: the skeptic's content-dependent baseline for local attention.

    As in the paper: a linear input projection with a GLU, then at each position ``i`` a
    kernel of ``2 * window + 1`` weights per head computed from that position alone,
    :math:`\mathrm{softmax}(W_k v_i)` over the kernel (channels of a head share it), applied
    to the window of values; then a readout. Unlike attention, the weight of position
    ``i + o`` depends on the content of ``i`` and the offset ``o``, not on the content of
    ``i + o``. (The paper's DropConnect on the kernel and its output projection before the
    readout are left out.) ``forward(x (B, L, F)) -> (logits (B, L, C), kernels (B, L, H, 2w + 1))``.

    .. math:: \mathbf v_i = \mathrm{GLU}(W_\text{in} \mathbf x_i),\qquad
              \pi^h_i = \mathrm{softmax}\big(W^h_\pi \mathbf v_i\big) \in \mathbb R^{2w+1},\qquad
              \mathbf o^h_i = \sum_{|o| \le w} \pi^h_{i, o}\, \mathbf v^h_{i+o}

    Example:
        >>> import torch
        >>> from attn_course.variants import DynamicConvTagger
        >>> _ = torch.manual_seed(0)
        >>> tagger = DynamicConvTagger(num_features=5, num_classes=3, window=2, hidden=8, heads=4)
        >>> logits, kernels = tagger(torch.randn(2, 7, 5))
        >>> tuple(logits.shape), tuple(kernels.shape)            # a kernel per position and head
        ((2, 7, 3), (2, 7, 4, 5))
        >>> torch.allclose(kernels.sum(-1), torch.ones(2, 7, 4))
        True
    """

    def __init__(self, num_features: int, num_classes: int, window: int, hidden: int = 16, heads: int = 4):
        super().__init__()
        hidden = _checks.positive_number("hidden", hidden, integer=True)
        heads = _checks.positive_number("heads", heads, integer=True)
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.window, self.heads = window, heads
        self.inp = nn.Linear(num_features, 2 * hidden)                       # GLU input projection
        self.kernel = nn.Linear(hidden, heads * (2 * window + 1))
        self.out = nn.Linear(hidden, num_classes)

    def forward(self, x):
        _checks.float_tensor("x", x, ndim=3)
        B, L, _ = x.shape
        K, H = 2 * self.window + 1, self.heads
        v = F.glu(self.inp(x), dim=-1)                                        # (B, L, hidden)
        kernels = torch.softmax(self.kernel(v).view(B, L, H, K), dim=-1)     # (B, L, H, K)
        padded = F.pad(v, (0, 0, self.window, self.window))                   # zeros beyond the ends
        windows = padded.unfold(-2, K, 1).reshape(B * L * H, -1, K)           # (B L H, hidden / H, K)
        mixed = torch.bmm(windows, kernels.reshape(B * L * H, K, 1)).reshape(B, L, -1)   # sum_o k_o v_{i+o}
        return self.out(mixed), kernels


def shifted_copy_task(num_examples: int, length: int = 36, shift: int = 3, vocab_size: int = 8, *,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the symbol ``shift`` positions to the left (chapter 3): where to look is a fixed
    offset, the same at every position, and nothing in the content says where it is.

    Returns one-hot symbols ``x (num_examples, length, vocab_size)`` and targets
    ``(num_examples, length)``: ``y[:, t] = symbol[t - shift]``, ``-100`` (ignored) for ``t < shift``.

    Example:
        >>> import torch
        >>> from attn_course.variants import shifted_copy_task
        >>> x, y = shifted_copy_task(2, length=8, shift=3, generator=torch.Generator().manual_seed(0))
        >>> tuple(x.shape), y[:, :3].tolist()
        ((2, 8, 8), [[-100, -100, -100], [-100, -100, -100]])
        >>> torch.equal(y[:, 3:], x.argmax(-1)[:, :-3])
        True
    """
    n = _checks.positive_number("num_examples", num_examples, integer=True)
    L = _checks.positive_number("length", length, integer=True)
    V = _checks.positive_number("vocab_size", vocab_size, integer=True)
    shift = _checks.positive_number("shift", shift, integer=True)
    if shift >= L:
        raise ValueError(f"shift={shift} must be smaller than length={L}")
    symbols = torch.randint(0, V, (n, L), generator=generator)
    y = torch.full((n, L), -100)
    y[:, shift:] = symbols[:, :-shift]
    return F.one_hot(symbols, V).float(), y


def window_recall_task(num_examples: int, length: int = 36, window: int = 4, num_keys: int | None = None,
                       vocab_size: int = 8, *, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Associative recall inside a window (chapter 3): a task whose answer needs weights
    computed from query-key *pairs*.

    The sequence is cut into blocks of ``2 * window + 1`` positions. The centre of each
    block is a query: it carries a query key. Its ``2 * window`` neighbours carry distinct
    keys (a random draw of ``2 * window`` of the ``num_keys`` keys, default ``2 * window``)
    and random symbols; exactly one neighbour carries the query's key, at a random offset.
    The query's target is that neighbour's symbol; other positions have target ``-100``
    (ignored). Features per position: neighbour key (one-hot), symbol (one-hot; the query
    carries a random distractor symbol) and query key (one-hot, zero except at queries).
    Where to look depends on the query *and* on every neighbour's key: a kernel computed
    from one position (dynamic convolution) or fixed per offset (CNN) cannot point there.

    Returns ``x (num_examples, length, 2 * num_keys + vocab_size)`` and targets
    ``(num_examples, length)``.

    Example:
        >>> import torch
        >>> from attn_course.variants import window_recall_task
        >>> x, y = window_recall_task(1, length=10, window=2, generator=torch.Generator().manual_seed(0))
        >>> tuple(x.shape), (y[0] != -100).nonzero().flatten().tolist()   # queries at 2 and 7
        ((1, 10, 16), [2, 7])
        >>> keys, symbols, query_keys = x[0, :, :4], x[0, :, 4:12], x[0, :, 12:]
        >>> match = (keys[:5] @ query_keys[2]).nonzero().item()          # the neighbour with the key
        >>> y[0, 2].item() == symbols[match].argmax().item()
        True
    """
    n = _checks.positive_number("num_examples", num_examples, integer=True)
    L = _checks.positive_number("length", length, integer=True)
    w = _checks.positive_number("window", window, integer=True)
    V = _checks.positive_number("vocab_size", vocab_size, integer=True)
    num_keys = 2 * w if num_keys is None else _checks.positive_number("num_keys", num_keys, integer=True)
    if num_keys < 2 * w:
        raise ValueError(f"num_keys={num_keys} must be at least 2 * window = {2 * w}")
    block = 2 * w + 1
    if L < block:
        raise ValueError(f"length={L} must hold at least one block of 2 * window + 1 = {block}")
    nb = L // block
    keys = torch.rand(n, nb, num_keys, generator=generator).argsort(-1)[..., :2 * w]      # distinct
    pick = torch.randint(0, 2 * w, (n, nb), generator=generator)                          # which neighbour
    query_key = keys.gather(-1, pick[..., None])[..., 0]
    symbols = torch.randint(0, V, (n, L), generator=generator)
    key_feat = torch.zeros(n, L, num_keys)
    query_feat = torch.zeros(n, L, num_keys)
    neighbours = torch.tensor([o for o in range(block) if o != w])                         # offsets in a block
    starts = torch.arange(nb) * block
    pos = starts[:, None] + neighbours[None, :]                                            # (nb, 2w)
    key_feat[:, pos.flatten()] = F.one_hot(keys, num_keys).float().view(n, -1, num_keys)
    centre = starts + w
    query_feat[:, centre] = F.one_hot(query_key, num_keys).float()
    y = torch.full((n, L), -100)
    y[:, centre] = symbols.gather(1, pos.flatten()[None].expand(n, -1)).view(n, nb, 2 * w).gather(
        -1, pick[..., None])[..., 0]
    return torch.cat([key_feat, F.one_hot(symbols, V).float(), query_feat], dim=-1), y


def fit_seeds(make_model: Callable[[], nn.Module], seeds: Sequence[int],
              next_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]], *,
              loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steps: int = 300,
              lr: float = 1e-2, desc: str = "training") -> list[nn.Module]:
    """Train one model per seed, all at once; return the trained models.

    Model ``m`` is ``make_model()`` after ``torch.manual_seed(seeds[m])``. Their weights are
    stacked along a leading axis (``torch.func.stack_module_state``) and the forward pass is
    ``vmap``-ed over it; ``next_batch(step) -> (x (M, B, ...), y (M, B, ...))`` gives each
    model its own batch. Summing the ``M`` losses gives each model exactly its own gradient
    and Adam works element by element, so this equals ``M`` separate trainings with Adam,
    at a fraction of the time. ``model(x)`` may return a tensor or a tuple whose first item
    is the prediction. The trained weights are written back into the returned models.

    Example:
        Three seeds of a linear model, three steps:

        >>> import torch
        >>> from torch import nn
        >>> from attn_course.variants import fit_seeds
        >>> def next_batch(step):
        ...     x = torch.randn(3, 8, 2)                   # (M, B, features): a batch per seed
        ...     return x, x.sum(-1, keepdim=True)
        >>> models = fit_seeds(lambda: nn.Linear(2, 1), [0, 1, 2], next_batch,
        ...                    loss_fn=nn.functional.mse_loss, steps=3)
        >>> len(models), torch.equal(models[0].weight, models[1].weight)
        (3, False)
    """
    from .train import fit_stacked

    models = []
    for seed in seeds:
        torch.manual_seed(seed)
        models.append(make_model())
    if not models:
        raise ValueError("seeds must hold at least one seed")
    fit_stacked(models, next_batch, loss_fn=loss_fn, steps=steps, lr=lr, desc=desc)
    return models


def receptive_field(fn, length: int, channels: int, position: int, *, seed: int = 0) -> torch.Tensor:
    """Which input positions can change output ``position`` of ``fn``: ``(length,)`` bool.

    Measured by the gradient of ``fn(x)[:, position]`` with respect to a random input
    ``x (1, length, channels)`` (float64).

    Example:
        >>> from attn_course.variants import receptive_field
        >>> receptive_field(lambda x: x.cumsum(1), length=5, channels=2, position=2).tolist()
        [True, True, True, False, False]
    """
    length = _checks.positive_number("length", length, integer=True)
    if not 0 <= position < length:
        raise ValueError(f"position must be in [0, {length}), got {position}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, length, channels, generator=g, dtype=torch.float64, requires_grad=True)
    out = fn(x)
    out = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(out[:, position].sum(), x)
    return grad[0].abs().sum(-1) > 0


def conv_receptive_field(num_layers: int, kernel_size: int, dilation: int = 1) -> int:
    """Closed form: ``1 + num_layers * (kernel_size - 1) * dilation`` positions.

    Example:
        >>> from attn_course.variants import conv_receptive_field
        >>> conv_receptive_field(2, 3), conv_receptive_field(3, 3, dilation=2)
        (5, 13)
    """
    for name, v in (("num_layers", num_layers), ("kernel_size", kernel_size), ("dilation", dilation)):
        _checks.positive_number(name, v, integer=True)
    return 1 + num_layers * (kernel_size - 1) * dilation
