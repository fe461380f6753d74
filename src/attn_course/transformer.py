"""Chapter 9 (capstone), a small transformer built from the course's own parts.

Token embeddings; rotary positions (chapter 5, :func:`attn_course.positional.apply_rope`);
pre-norm blocks of causal multi-head self-attention (chapter 4's head split and merge)
and an MLP, with residual connections and layer normalisation; a language-model head.
The attention can be global, a sliding window or a dilated window (chapter 6's
kernels), and decoding uses a key/value cache (chapter 4's :class:`~attn_course.multihead.KVCache`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, sparse
from .basics import masked_softmax
from .multihead import KVCache, merge_heads, split_heads
from .positional import apply_rope

__all__ = ["CausalSelfAttention", "Block", "TinyTransformer", "ATTENTION_KINDS", "pattern_mask"]

ATTENTION_KINDS = ("global", "window", "dilated")


def pattern_mask(kind: str, length: int, window: int, dilation: int = 2, device=None) -> torch.Tensor:
    """The ``(L, L)`` causal mask of an attention ``kind`` (``True`` = may attend)."""
    if kind == "global":
        return torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if kind == "window":
        return sparse.sliding_window_mask(length, window, is_causal=True).to(device)
    if kind == "dilated":
        near = sparse.sliding_window_mask(length, window, is_causal=True)
        return (near | sparse.dilated_window_mask(length, window, dilation, is_causal=True)).to(device)
    raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")


class CausalSelfAttention(nn.Module):
    """Causal multi-head self-attention with rotary positions and a choice of pattern.

    ``kind="global"`` uses torch's fused kernel; ``"window"`` (keys ``i - window .. i``)
    and ``"dilated"`` (that window plus every ``dilation``-th key back to
    ``window * dilation``) use chapter 6's blocked kernels. ``forward(x (B, L, E), *,
    cache=None, need_weights=False) -> (output (B, L, E), weights (B, H, L, T) or None)``;
    with a :class:`~attn_course.multihead.KVCache`, ``x`` holds only the new tokens.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kind: str = "global", window: int = 4,
                 dilation: int = 2):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        if embed_dim % num_heads or (embed_dim // num_heads) % 2:
            raise ValueError(f"embed_dim={embed_dim} / num_heads={num_heads} must be an even head width")
        self.num_heads, self.kind, self.window, self.dilation = num_heads, kind, window, dilation
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, *, cache: KVCache | None = None, need_weights: bool = False):
        B, L, _ = x.shape
        past = 0 if cache is None else cache.length
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, L, d)
        positions = torch.arange(past, past + L, device=x.device)
        q, k = apply_rope(q, positions), apply_rope(k, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        T = past + L
        if need_weights or cache is not None:
            mask = pattern_mask(self.kind, T, self.window, self.dilation, x.device)[past:]   # (L, T)
            weights = masked_softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), mask)
            out = weights @ v
        else:
            weights = None
            if self.kind == "global":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif self.kind == "window":
                out = sparse.sliding_window_attention(q, k, v, self.window, is_causal=True)
            else:
                mask = pattern_mask("dilated", L, self.window, self.dilation, x.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(merge_heads(out)), (weights if need_weights else None)


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    ``residual=False`` or ``norm=False`` remove those parts, for ablations.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, mlp_ratio: int = 4, residual: bool = True,
                 norm: bool = True, **attention):
        super().__init__()
        self.residual = residual
        self.norm1 = nn.LayerNorm(embed_dim) if norm else nn.Identity()
        self.norm2 = nn.LayerNorm(embed_dim) if norm else nn.Identity()
        self.attn = CausalSelfAttention(embed_dim, num_heads, **attention)
        self.mlp = nn.Sequential(nn.Linear(embed_dim, mlp_ratio * embed_dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * embed_dim, embed_dim))

    def forward(self, x, *, cache=None, need_weights=False):
        a, weights = self.attn(self.norm1(x), cache=cache, need_weights=need_weights)
        x = x + a if self.residual else a
        m = self.mlp(self.norm2(x))
        return (x + m if self.residual else m), weights


class TinyTransformer(nn.Module):
    """A decoder-only transformer: embeddings, ``num_layers`` blocks, a final norm, an LM head.

    ``forward(ids (B, L), *, need_weights=False) -> (logits (B, L, vocab), [weights per layer])``;
    ``generate(prompt, steps, use_cache=True)`` decodes greedily.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, num_heads: int = 4, num_layers: int = 2, *,
                 mlp_ratio: int = 4, residual: bool = True, norm: bool = True, kind: str = "global",
                 window: int = 4, dilation: int = 2):
        super().__init__()
        vocab_size = _checks.positive_number("vocab_size", vocab_size, integer=True)
        num_layers = _checks.positive_number("num_layers", num_layers, integer=True)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, residual=residual, norm=norm, kind=kind,
                  window=window, dilation=dilation) for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()
        self.head = nn.Linear(embed_dim, vocab_size)

    def forward(self, ids, *, need_weights: bool = False, caches: list | None = None, embeddings=None):
        if embeddings is None:
            x = self.embed(_checks.token_ids("ids", ids, self.embed.num_embeddings))
        else:
            x = embeddings  # lets attribution methods differentiate with respect to the embeddings
        all_weights = []
        for i, block in enumerate(self.blocks):
            x, w = block(x, cache=None if caches is None else caches[i], need_weights=need_weights)
            all_weights.append(w)
        return self.head(self.norm(x)), (all_weights if need_weights else None)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, steps: int, *, use_cache: bool = True) -> torch.Tensor:
        """Append ``steps`` greedy tokens to ``prompt (B, L)``; with ``use_cache`` each step
        feeds only the newest token and reuses the cached keys and values."""
        steps = _checks.positive_number("steps", steps, integer=True)
        ids = prompt
        if use_cache:
            caches = [KVCache() for _ in self.blocks]
            logits, _ = self(prompt, caches=caches)
            for _ in range(steps):
                nxt = logits[:, -1:].argmax(-1)
                ids = torch.cat([ids, nxt], dim=1)
                logits, _ = self(nxt, caches=caches)
            return ids
        for _ in range(steps):
            logits, _ = self(ids)
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
        return ids
