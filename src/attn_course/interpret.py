"""Interpretability helpers for the capstone: attention rollout and gradient attribution."""

from __future__ import annotations

import torch

from . import _checks

__all__ = ["attention_rollout", "gradient_attribution"]


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
