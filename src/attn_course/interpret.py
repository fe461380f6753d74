"""Interpretability helpers for the capstone: attention rollout, gradient attribution, and the
edits of attention weights that test them (a permutation, uniform weights)."""

from __future__ import annotations

import torch

from . import _checks

__all__ = ["attention_rollout", "gradient_attribution", "permute_weights", "uniform_weights"]


def attention_rollout(weights: list[torch.Tensor], *, residual: bool = True) -> torch.Tensor:
    r"""Attention rollout (Abnar & Zuidema, 2020): how much each input token flows into each output.

    Per layer the heads are averaged, :math:`\bar A_l`; with ``residual`` the skip
    connection is accounted for as :math:`\hat A_l = \tfrac12 \bar A_l + \tfrac12 I`
    (rows renormalised); then :math:`R = \hat A_L \cdots \hat A_1`.

    ``weights``: one ``(B, H, L, L)`` (or head-averaged ``(B, L, L)``) tensor per layer,
    first layer first. Returns ``(B, L, L)``: row ``i`` is output ``i``'s mix of inputs.
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


def gradient_attribution(model, ids: torch.Tensor, position: int, token: torch.Tensor | None = None) -> torch.Tensor:
    r"""Gradient x input on the token embeddings (Simonyan et al., 2014; Shrikumar et al., 2017).

    For the logit of ``token`` (default: the predicted one) at ``position``, the
    attribution of input ``j`` is :math:`\sum_d e_{jd}\, \partial \mathrm{logit} / \partial e_{jd}`:
    a first-order estimate of how much that token's embedding contributes. ``model`` must
    accept ``embeddings=`` (as :class:`~attn_course.transformer.TinyTransformer`).
    Returns ``(B, L)``.
    """
    emb = model.embed(ids).detach().requires_grad_(True)
    logits, _ = model(ids, embeddings=emb)
    row = logits[:, position]
    chosen = row.argmax(-1) if token is None else token
    row.gather(-1, chosen[:, None]).sum().backward()
    return (emb.grad * emb).sum(-1).detach()


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
    ``weights (..., L_q, L_k)`` gives the shape, dtype and (without ``mask``) the allowed keys."""
    allowed = _allowed(weights, mask).to(weights.dtype)
    return allowed / allowed.sum(-1, keepdim=True).clamp_min(1)
