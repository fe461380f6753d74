"""What attention explains (chapter 12, the capstone): attributions, the references that test them,
and the baseline a skeptic asks for first.

* Attributions of an output to the input tokens: attention rollout (Abnar & Zuidema, 2020),
  the plain gradient and gradient x input (Simonyan et al., 2014; Shrikumar et al., 2017).
* The reference they are tested against: leave-one-out erasure (hide one token, measure the
  drop), compared by rank correlation and by the drop of each method's top token
  (Serrano & Smith, 2019; DeYoung et al., 2020).
* Counterfactual attention weights: a permutation (Jain & Wallace, 2019), uniform weights
  (Wiegreffe & Pinter, 2019), and the distances that compare them (total variation,
  Jensen-Shannon).
* :class:`GRULanguageModel`, a recurrent language model written out step by step so that
  :class:`~attn_course.train.StackedModels` can train several seeds of it at once: the
  equal-size baseline for "what made transformers succeed?".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from . import _checks
from .train import StackedModels

__all__ = ["attention_rollout", "gradient_attribution", "input_gradient", "gradient_times_input",
           "leave_one_out", "rank_correlation", "top1_drop", "permute_weights", "uniform_weights",
           "total_variation", "jensen_shannon", "GRULanguageModel", "GRUStack", "stacked_parameters"]


def attention_rollout(weights: list[torch.Tensor], *, residual: bool = True) -> torch.Tensor:
    r"""Attention rollout (Abnar & Zuidema, 2020): how much each input token flows into each output.

    Per layer the heads are averaged, :math:`\bar A_l`; with ``residual`` the skip
    connection is accounted for as :math:`\hat A_l = \tfrac12 \bar A_l + \tfrac12 I`
    (rows renormalised); then :math:`R = \hat A_L \cdots \hat A_1`.

    ``weights``: one ``(B, H, L, L)`` (or head-averaged ``(B, L, L)``) tensor per layer,
    first layer first. Returns ``(B, L, L)``: row ``i`` is output ``i``'s mix of inputs.

    Example:
        >>> import torch
        >>> from attn_course.interpret import attention_rollout
        >>> w = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])     # (B=1, L=2, L=2): both queries read token 0
        >>> attention_rollout([w, w])[0]                     # half of each token stays on its residual
        tensor([[1.0000, 0.0000],
                [0.7500, 0.2500]])
    """
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError("weights must be a non-empty list of per-layer attention tensors")
    rollout = None
    for layer, w in enumerate(weights):
        _checks.float_tensor(f"weights[{layer}]", w, min_ndim=3)
        a = w.mean(1) if w.ndim == 4 else w
        if residual:
            a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
            a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def input_gradient(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    r"""The gradient of one score per example with respect to that example's inputs.

    ``fn(inputs (B, L, d)) -> scores (B,)``; returns :math:`\partial s_b / \partial x_{b\,j\,k}`,
    ``(B, L, d)``. The scores are summed before the backward pass, which gives every example
    its own gradient as long as example ``b``'s score depends on example ``b``'s inputs only
    (true of a model applied to a batch). ``inputs`` is not modified.

    Example:
        >>> import torch
        >>> from attn_course.interpret import input_gradient
        >>> x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])     # (B=1, L=2, d=2)
        >>> input_gradient(lambda e: (e ** 2).sum((1, 2)), x)
        tensor([[[2., 4.],
                 [6., 8.]]])
    """
    _checks.float_tensor("inputs", inputs, ndim=3)
    x = inputs.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        scores = fn(x)
        if not isinstance(scores, torch.Tensor) or scores.shape != inputs.shape[:1]:
            raise ValueError(f"fn must return one score per example, a tensor of shape {tuple(inputs.shape[:1])}; "
                             f"got {tuple(getattr(scores, 'shape', ())) or type(scores).__name__}")
        (grad,) = torch.autograd.grad(scores.sum(), x)
    return grad


def gradient_times_input(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
    r"""Gradient x input (Shrikumar et al., 2017): :math:`a_{bj} = \sum_k x_{bjk}\, \partial s_b / \partial x_{bjk}`.

    A signed, first-order estimate of how much token ``j``'s vector pushes example ``b``'s
    score up (exact for a score linear in the inputs). ``fn(inputs (B, L, d)) -> (B,)``;
    returns ``(B, L)``. See :func:`input_gradient`.

    Example:
        >>> import torch
        >>> from attn_course.interpret import gradient_times_input
        >>> x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
        >>> w = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
        >>> gradient_times_input(lambda e: (e * w).sum((1, 2)), x)   # linear: each token's own share
        tensor([[-1.0000,  1.5000]])
    """
    return (input_gradient(fn, inputs) * inputs).sum(-1)


def gradient_attribution(model, ids: torch.Tensor, position: int, token: torch.Tensor | None = None, *,
                         method: str = "times_input") -> torch.Tensor:
    r"""A gradient attribution of the logit of ``token`` (default: the predicted one) at ``position``
    to the input tokens' embeddings, ``(B, L)``.

    ``method="times_input"``: gradient x input, :math:`\sum_d e_{jd}\, \partial \mathrm{logit} / \partial e_{jd}`
    (Shrikumar et al., 2017; signed); ``method="norm"``: the gradient's norm
    :math:`\lVert \partial \mathrm{logit} / \partial e_j \rVert` (the plain gradient, or saliency,
    of Simonyan et al., 2014; unsigned). ``model`` must accept ``embeddings=``
    (as :class:`~attn_course.transformer.TinyTransformer` and :class:`GRULanguageModel` do).

    Example:
        >>> import torch
        >>> from attn_course.interpret import gradient_attribution
        >>> from attn_course.transformer import TinyTransformer
        >>> _ = torch.manual_seed(0)
        >>> model = TinyTransformer(5, 8, 2, 1)
        >>> ids = torch.tensor([[1, 2, 3, 4]])
        >>> gradient_attribution(model, ids, position=1)[0, 2:]     # causal: later tokens get nothing
        tensor([0., 0.])
        >>> gradient_attribution(model, ids, position=3, method="norm").shape
        torch.Size([1, 4])
    """
    if method not in ("times_input", "norm"):
        raise ValueError(f"method must be 'times_input' or 'norm', got {method!r}")
    emb = model.embed(ids).detach()

    def logit(e):
        row = model(ids, embeddings=e)[0][:, position]
        chosen = row.argmax(-1) if token is None else token
        return row.gather(-1, chosen[:, None])[:, 0]

    if method == "norm":
        return input_gradient(logit, emb).norm(dim=-1)
    return gradient_times_input(logit, emb)


def leave_one_out(score: Callable[[torch.Tensor], torch.Tensor], keep: torch.Tensor,
                  positions: Sequence[int] | None = None) -> torch.Tensor:
    r"""Leave-one-out erasure: how much a score drops when one token is hidden.

    ``score(keep (B, L) bool) -> (B, ...)`` evaluates a model with the tokens where ``keep``
    is ``False`` hidden (e.g. masked as keys, as ``TinyTransformer(key_mask=keep)`` does;
    Serrano & Smith, 2019, erase inside the model in this way). Returns
    :math:`\Delta_{b,i} = s_b(\mathrm{keep}) - s_b(\mathrm{keep} \setminus \{p_i\})`, shape
    ``(B, P, ...)`` for the ``P`` positions ``p_i`` (default: all ``L``). A position that ``keep``
    already hides has a drop of exactly 0. ``keep`` is not modified.

    Example:
        >>> import torch
        >>> from attn_course.interpret import leave_one_out
        >>> values = torch.tensor([[1.0, 2.0, 6.0]])
        >>> def mean_kept(keep):                             # a score of the kept tokens: their mean
        ...     return (values * keep).sum(-1) / keep.sum(-1)
        >>> leave_one_out(mean_kept, torch.ones(1, 3, dtype=torch.bool))   # hiding a small value raises it
        tensor([[-1.0000, -0.5000,  1.5000]])
    """
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.ndim != 2:
        raise TypeError(f"keep must be a bool tensor (B, L), got {getattr(keep, 'dtype', type(keep).__name__)} "
                        f"of shape {tuple(getattr(keep, 'shape', ()))}")
    B, L = keep.shape
    positions = range(L) if positions is None else list(positions)
    if any(not 0 <= p < L for p in positions):
        raise ValueError(f"positions must lie in [0, {L}), got {list(positions)}")
    full = score(keep)
    drops = []
    for p in positions:
        erased = keep.clone()
        erased[:, p] = False
        drops.append(full - score(erased))
    return torch.stack(drops, dim=1)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..L along the last axis, ties given the mean of the ranks they share."""
    below = (x[..., None, :] < x[..., :, None]).sum(-1)
    tied = (x[..., None, :] == x[..., :, None]).sum(-1)
    return below + (tied + 1) / 2


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r"""Spearman's rank correlation of ``a`` and ``b`` along the last axis, ``(..., L) -> (...)``.

    The Pearson correlation of the ranks, with tied values given the mean of the ranks they
    share (as ``scipy.stats.spearmanr``); a row in which either input is constant has no ranking
    to compare and gets 0. How well an attribution orders the tokens as a reference (e.g.
    :func:`leave_one_out`) does, whatever the scale of either.

    Example:
        >>> import torch
        >>> from attn_course.interpret import rank_correlation
        >>> rank_correlation(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 400.0, 30.0]))
        tensor(0.8000)
    """
    _checks.float_tensor("a", a)
    _checks.float_tensor("b", b)
    if a.shape != b.shape:
        raise ValueError(f"a and b must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = _ranks(a).double(), _ranks(b).double()
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    norm = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    rho = torch.where(norm > 0, (ra * rb).sum(-1) / norm.clamp_min(1e-300), torch.zeros_like(norm))
    return rho.to(a.dtype)


def top1_drop(attribution: torch.Tensor, drops: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    r"""The erasure test of an attribution's top token: the drop of the token it ranks first.

    ``attribution, drops (..., L)`` (``drops`` e.g. from :func:`leave_one_out`); ``allowed``
    (bool, broadcasting to them) restricts the choice to some positions (e.g. the input
    digits). Returns ``drops`` at the allowed position of largest ``attribution`` (the first of
    ties), ``(...)``. ``top1_drop(drops, drops)`` is the best any attribution can do.

    Example:
        >>> import torch
        >>> from attn_course.interpret import top1_drop
        >>> attribution, drops = torch.tensor([[0.1, 0.7, 0.2]]), torch.tensor([[0.5, 0.1, 0.3]])
        >>> top1_drop(attribution, drops), top1_drop(drops, drops)
        (tensor([0.1000]), tensor([0.5000]))
    """
    _checks.float_tensor("attribution", attribution)
    _checks.float_tensor("drops", drops)
    if attribution.shape != drops.shape:
        raise ValueError(f"attribution and drops must have one shape, got {tuple(attribution.shape)} "
                         f"and {tuple(drops.shape)}")
    if allowed is not None:
        allowed = _checks.bool_mask("allowed", allowed, tuple(drops.shape), drops.device)
        attribution = attribution.masked_fill(~allowed, float("-inf"))
    return drops.gather(-1, attribution.argmax(-1, keepdim=True))[..., 0]


def _allowed(weights: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    _checks.float_tensor("weights", weights, min_ndim=2)
    if mask is None:
        return weights != 0
    return _checks.bool_mask("mask", mask, tuple(weights.shape), weights.device).expand_as(weights)


def permute_weights(weights: torch.Tensor, mask: torch.Tensor | None = None, *,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Each query's attention weights shuffled among the keys it may read (Jain & Wallace, 2019).

    Row by row, the weights on the allowed keys (``mask`` ``True``; by default the nonzero
    weights) are permuted at random; masked keys keep weight 0. Every row keeps its
    values, so it still sums to 1, but which key gets which weight is random: if the
    output barely changes, *which* tokens the model attends to did not matter.
    ``weights (..., L_q, L_k)``; ``mask`` broadcasts to it. Returns the same shape.

    Example:
        >>> import torch
        >>> from attn_course.interpret import permute_weights
        >>> w = torch.tensor([[0.7, 0.2, 0.1, 0.0]])           # the last key is masked (weight 0)
        >>> p = permute_weights(w, generator=torch.Generator().manual_seed(0))
        >>> sorted(p[0, :3].tolist()) == sorted(w[0, :3].tolist()), p[0, 3].item()
        (True, 0.0)
    """
    allowed = _allowed(weights, mask)
    T = weights.shape[-1]
    index = torch.arange(T, device=weights.device).expand_as(weights)
    # allowed keys in order first, then the masked ones: the slots to fill
    slots = torch.argsort(torch.where(allowed, index, index + T), dim=-1)
    # allowed keys in a random order first, then the masked ones: where the weights come from
    noise = torch.rand(weights.shape, generator=generator, dtype=torch.float64).to(weights.device)
    source = torch.argsort(torch.where(allowed, noise, noise + 2), dim=-1)
    return torch.zeros_like(weights).scatter(-1, slots, weights.gather(-1, source))


def uniform_weights(weights: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    r"""Uniform attention over the keys each query may read (Wiegreffe & Pinter, 2019's baseline):
    :math:`a_{ij} = m_{ij} / \sum_{j'} m_{ij'}`; a row with no allowed key stays 0.
    ``weights (..., L_q, L_k)`` gives the shape, dtype and (without ``mask``) the allowed keys.

    Example:
        >>> import torch
        >>> from attn_course.interpret import uniform_weights
        >>> uniform_weights(torch.zeros(3, 3), torch.ones(3, 3, dtype=torch.bool).tril())
        tensor([[1.0000, 0.0000, 0.0000],
                [0.5000, 0.5000, 0.0000],
                [0.3333, 0.3333, 0.3333]])
    """
    allowed = _allowed(weights, mask).to(weights.dtype)
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""Total variation distance of distributions along the last axis,
    :math:`\mathrm{TVD}(p, q) = \tfrac12 \sum_i |p_i - q_i|`, in ``[0, 1]``; ``(..., K) -> (...)``.

    Example:
        >>> import torch
        >>> from attn_course.interpret import total_variation
        >>> total_variation(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1]))
        tensor(0.4000)
    """
    _checks.float_tensor("p", p)
    _checks.float_tensor("q", q)
    return 0.5 * (p - q).abs().sum(-1)


def jensen_shannon(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    r"""Jensen-Shannon divergence along the last axis, in nats (``<= ln 2``); ``(..., K) -> (...)``.

    :math:`\mathrm{JSD}(p, q) = \tfrac12 \mathrm{KL}(p \Vert m) + \tfrac12 \mathrm{KL}(q \Vert m)`,
    :math:`m = \tfrac12 (p + q)`, with :math:`0 \log 0 = 0`: how far apart two attention
    distributions are (Jain & Wallace, 2019; Wiegreffe & Pinter, 2019 compare weights with it).

    Example:
        >>> import torch
        >>> from attn_course.interpret import jensen_shannon
        >>> round(jensen_shannon(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])).item(), 4)   # ln 2
        0.6931
    """
    _checks.float_tensor("p", p)
    _checks.float_tensor("q", q)
    m = 0.5 * (p + q)

    def kl(a):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()), 0.0).sum(-1)

    return 0.5 * kl(p) + 0.5 * kl(q)


def stacked_parameters(stack: StackedModels) -> dict[str, nn.Parameter]:
    """The trained parameters of a :class:`~attn_course.train.StackedModels` (e.g. a
    :class:`~attn_course.transformer.SeedStack`) under the models' own names, each with a leading
    copy axis ``(M, *shape)``: ``stacked_parameters(stack)["blocks.0.attn.qkv.weight"][m]`` is copy
    ``m``'s. For per-copy measurements (the gradient reaching each block) and per-copy edits
    (holding some weights at zero with a gradient hook).

    Example:
        >>> from attn_course.interpret import stacked_parameters
        >>> from attn_course.transformer import SeedStack, TinyTransformer
        >>> stack = SeedStack([TinyTransformer(5, 8, 2, 1) for _ in range(3)])
        >>> stacked_parameters(stack)["blocks.0.attn.qkv.weight"].shape       # (copies, 3E, E)
        torch.Size([3, 24, 8])
    """
    if not isinstance(stack, StackedModels):
        raise TypeError(f"stack must be a StackedModels (e.g. a SeedStack), got {type(stack).__name__}")
    return dict(zip(stack._names, stack.stacked))


class GRULanguageModel(nn.Module):
    r"""A recurrent language model: embeddings, ``num_layers`` GRU layers (Cho et al., 2014), a head.

    Per layer and step, with :math:`x_t` the layer's input and :math:`h_0 = 0`
    (PyTorch's ``nn.GRU`` equations and weights):

    .. math::
        r_t = \sigma(W_{ir} x_t + b_{ir} + W_{hr} h_{t-1} + b_{hr}),\quad
        z_t = \sigma(W_{iz} x_t + b_{iz} + W_{hz} h_{t-1} + b_{hz}),

        n_t = \tanh(W_{in} x_t + b_{in} + r_t \odot (W_{hn} h_{t-1} + b_{hn})),\quad
        h_t = (1 - z_t) \odot n_t + z_t \odot h_{t-1}.

    The recurrence is written out step by step (the weights live in an ``nn.GRU`` and give
    its outputs) so that ``torch.func.vmap`` can map it over stacked copies
    (:class:`~attn_course.train.StackedModels`), which it cannot do with the fused kernel.
    ``forward(ids (B, L), *, embeddings=None) -> (logits (B, L, vocab), None)``, the interface of
    :class:`~attn_course.transformer.TinyTransformer`; each position reads only itself and earlier
    tokens, through the state. ``hidden_dim=34, num_layers=2`` has about as many parameters
    (14,694 for 6 tokens) as the capstone's transformer of 2 blocks of width 24 (14,790).

    Example:
        >>> import torch
        >>> from attn_course.interpret import GRULanguageModel
        >>> model = GRULanguageModel(6, hidden_dim=34)
        >>> sum(p.numel() for p in model.parameters())
        14694
        >>> model(torch.tensor([[0, 1, 2]]))[0].shape        # (B, L, vocab)
        torch.Size([1, 3, 6])
    """

    def __init__(self, vocab_size: int, hidden_dim: int = 34, num_layers: int = 2):
        super().__init__()
        vocab_size = _checks.positive_number("vocab_size", vocab_size, integer=True)
        hidden_dim = _checks.positive_number("hidden_dim", hidden_dim, integer=True)
        self.num_layers = _checks.positive_number("num_layers", num_layers, integer=True)
        self.embed = nn.Embedding(vocab_size, hidden_dim)
        self.gru = nn.GRU(hidden_dim, hidden_dim, self.num_layers, batch_first=True)
        self.head = nn.Linear(hidden_dim, vocab_size)

    def forward(self, ids: torch.Tensor, *, embeddings: torch.Tensor | None = None):
        """``ids (B, L)`` int64 (or their ``embeddings (B, L, hidden_dim)``) to ``(logits (B, L, vocab), None)``."""
        if embeddings is None:
            x = self.embed(_checks.token_ids("ids", ids, self.embed.num_embeddings))
        else:
            x = embeddings                                     # (B, L, H), e.g. for gradient attributions
        for layer in range(self.num_layers):
            w_ih, w_hh = getattr(self.gru, f"weight_ih_l{layer}"), getattr(self.gru, f"weight_hh_l{layer}")
            b_ih, b_hh = getattr(self.gru, f"bias_ih_l{layer}"), getattr(self.gru, f"bias_hh_l{layer}")
            from_input = (x @ w_ih.T + b_ih).chunk(3, dim=-1)  # all steps at once: (B, L, H) x 3
            h = x.new_zeros(x.shape[0], w_hh.shape[1])
            states = []
            for t in range(x.shape[1]):                        # the recurrence: one step after another
                hr, hz, hn = (h @ w_hh.T + b_hh).chunk(3, dim=-1)
                r = torch.sigmoid(from_input[0][:, t] + hr)
                z = torch.sigmoid(from_input[1][:, t] + hz)
                n = torch.tanh(from_input[2][:, t] + r * hn)
                h = (1 - z) * n + z * h
                states.append(h)
            x = torch.stack(states, dim=1)
        return self.head(x), None


class GRUStack(StackedModels):
    r"""``M`` :class:`GRULanguageModel` copies of one size (the GRU of Cho et al., 2014) trained and
    evaluated as one model, as :class:`~attn_course.transformer.SeedStack` does for transformers:
    copy ``m`` computes :math:`\mathrm{logits}_m = f_{\theta_m}(\mathrm{ids}_m)` with its own weights
    :math:`\theta_m`, all copies in one ``vmap``-ped call. ``forward(ids (M, B, L)) -> logits
    (M, B, L, vocab)``; :meth:`~attn_course.train.StackedModels.write_back` copies the weights into the models.

    Example:
        >>> import torch
        >>> from attn_course.interpret import GRULanguageModel, GRUStack
        >>> stack = GRUStack([GRULanguageModel(6, 8) for _ in range(3)])
        >>> stack(torch.zeros(3, 2, 5, dtype=torch.long)).shape    # (M, B, L, vocab)
        torch.Size([3, 2, 5, 6])
    """

    def __init__(self, models: Sequence[GRULanguageModel]):
        models = list(models)
        if not models or not all(isinstance(m, GRULanguageModel) for m in models):
            raise TypeError(f"models must be a non-empty list of GRULanguageModel, got "
                            f"{[type(m).__name__ for m in models]}")
        super().__init__(models)
        self._vocab = models[0].embed.num_embeddings

    def _call(self, params, buffers, ids):                  # one copy: ids (B, L)
        emb = params["embed.weight"][ids]        # the lookup outside the model: its id checks cannot vmap
        return torch.func.functional_call(self._template[0], (params, buffers), (ids,), {"embeddings": emb})[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids (M, B, L)`` int64, copy ``m`` reading ``ids[m]``, to ``logits (M, B, L, vocab)``."""
        M = self.num_models
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 3 or ids.shape[0] != M:
            raise TypeError(f"ids must be an int64 tensor (M={M}, B, L), got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {tuple(getattr(ids, 'shape', ()))}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self._vocab):
            raise ValueError(f"ids holds ids outside [0, {self._vocab}): min {int(ids.min())}, max {int(ids.max())}")
        return self._map((ids,), (0,))
