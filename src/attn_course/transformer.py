"""Chapter 6 (the transformer): a small decoder-only transformer built from the course's own parts.

Token embeddings; rotary positions (chapter 5, :func:`attn_course.positional.apply_rope`);
pre-norm blocks of causal multi-head self-attention (chapter 4's head split and merge)
and an MLP, with residual connections and layer normalisation; a language-model head
(Vaswani et al., 2017, as a decoder only, in the pre-norm arrangement of GPT-2 and of
Xiong et al., 2020). Chapter 6 writes the same model line by line and proves it equal to
this one; chapters 9, 11 and 12 train it.

The attention can be global, a sliding window or a dilated window (chapter 7's
kernels), and decoding uses a key/value cache (chapter 4's ``KVCache``, one per layer).
For the capstone's ablations the rotary positions can be left out (``rope=False``, "NoPE"),
the attention replaced by a uniform average over the earlier tokens (``kind="uniform"``),
and :class:`SeedStack` trains several copies of one configuration (seeds, or attention patterns
given per copy and layer) as one model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, sparse
from .basics import masked_softmax
from .multihead import KVCache, merge_heads, split_heads
from .positional import apply_rope
from .train import StackedModels

__all__ = ["CausalSelfAttention", "Block", "TinyTransformer", "SeedStack", "ATTENTION_KINDS", "pattern_mask"]

ATTENTION_KINDS = ("global", "window", "dilated", "uniform")


def pattern_mask(kind: str, length: int, window: int, dilation: int = 2, device=None) -> torch.Tensor:
    """The ``(L, L)`` causal mask of an attention ``kind`` (``True`` = may attend).

    ``"uniform"`` reads the same keys as ``"global"`` (every earlier token), with equal weights.

    Example:
        >>> from attn_course.transformer import pattern_mask
        >>> pattern_mask("window", 5, window=1).int()      # each query: itself and 1 key back
        tensor([[1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 1, 1, 0, 0],
                [0, 0, 1, 1, 0],
                [0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    if kind in ("global", "uniform"):
        return torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if kind == "window":
        return sparse.sliding_window_mask(length, window, is_causal=True).to(device)
    if kind == "dilated":
        near = sparse.sliding_window_mask(length, window, is_causal=True)
        return (near | sparse.dilated_window_mask(length, window, dilation, is_causal=True)).to(device)
    raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")


class CausalSelfAttention(nn.Module):
    r"""Causal multi-head self-attention with rotary positions and a choice of pattern.

    Scaled dot-product attention in ``H`` heads (Vaswani et al., 2017) with rotary
    positions (RoPE, Su et al., 2021). For ``x (B, L, E)`` and heads of width
    :math:`d = E / H`, the fused projection ``qkv`` gives every head its slice of
    :math:`Q, K, V`, and

    .. math::
        \mathrm{head}_h = \mathrm{softmax}\Big(\frac{R(Q_h)\, R(K_h)^\top}{\sqrt d} + M\Big) V_h,
        \qquad \mathrm{out} = [\mathrm{head}_1, \dots, \mathrm{head}_H]\, W_O^\top + b_O

    where :math:`R` rotates each interleaved pair of a query or key by its position
    (:func:`~attn_course.positional.apply_rope`) and :math:`M_{ij}` is 0 where query ``i`` may
    read key ``j`` (``j <= i`` for ``"global"``) and :math:`-\infty` elsewhere. Shapes:
    ``q, k, v (B, H, L, d)``, scores and weights ``(B, H, L, T)`` with ``T`` the keys (the
    cached ones included), output ``(B, L, E)``.

    ``kind="global"`` uses torch's fused kernel; ``"window"`` (keys ``i - window .. i``)
    and ``"dilated"`` (that window plus every ``dilation``-th key back to
    ``window * dilation``) use chapter 7's blocked kernels; ``"uniform"`` gives every
    earlier token the weight :math:`1 / (i + 1)` whatever the queries and keys (the
    uniform baseline of Wiegreffe & Pinter, 2019). ``rope=False`` leaves out the rotary
    positions (no positional encoding at all, "NoPE").

    ``forward(x (B, L, E), *, cache=None, need_weights=False, key_mask=None, edit_weights=None,
    attn_mask=None) -> (output (B, L, E), weights (B, H, L, T) or None)``; with a
    ``KVCache`` holding ``T - L`` earlier tokens, ``x`` holds only the ``L`` new ones: they are
    rotated as positions ``T - L .. T - 1``, their keys and values (rotated keys) are appended
    to the cache, and query ``i`` reads keys ``j <= T - L + i`` (the causal mask aligned to the
    last key). ``attn_mask (L, L)``
    bool (``True`` = may attend, e.g. :func:`pattern_mask`) replaces the pattern of ``kind``
    for one call, without a cache: that is how :class:`SeedStack` gives each copy its own
    pattern. Two hooks for
    interpretability experiments: ``key_mask (B, T)`` bool, ``False`` for tokens that no query
    may read (erasure), and ``edit_weights(weights (B, H, L, T), mask) -> weights``, which
    replaces the attention weights before they mix the values (e.g. a permutation of them,
    Jain & Wallace, 2019); ``mask`` broadcasts to the weights and is ``True`` where a key may
    be read. Both use the explicit (unfused) path.

    Example:
        >>> import torch
        >>> from attn_course.transformer import CausalSelfAttention
        >>> _ = torch.manual_seed(0)
        >>> layer = CausalSelfAttention(16, num_heads=2)
        >>> out, weights = layer(torch.randn(3, 5, 16), need_weights=True)
        >>> tuple(out.shape), tuple(weights.shape)
        ((3, 5, 16), (3, 2, 5, 5))
        >>> bool((weights.triu(1) == 0).all())              # causal: no weight on a later token
        True
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kind: str = "global", window: int = 4,
                 dilation: int = 2, rope: bool = True):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        if embed_dim % num_heads or (embed_dim // num_heads) % 2:
            raise ValueError(f"embed_dim={embed_dim} / num_heads={num_heads} must be an even head width")
        self.num_heads, self.kind, self.window, self.dilation = num_heads, kind, window, dilation
        self.rope = bool(rope)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x, *, cache: KVCache | None = None, need_weights: bool = False,
                key_mask: torch.Tensor | None = None, edit_weights: Callable | None = None,
                attn_mask: torch.Tensor | None = None):
        B, L, _ = x.shape
        past = 0 if cache is None else cache.length
        if attn_mask is not None:
            if cache is not None:
                raise ValueError("attn_mask replaces the pattern of a whole sequence; it cannot be used with a cache")
            if not isinstance(attn_mask, torch.Tensor) or attn_mask.dtype != torch.bool or attn_mask.shape != (L, L):
                raise ValueError(f"attn_mask must be a bool tensor (L, L) = {(L, L)} (True = may attend), got "
                                 f"{getattr(attn_mask, 'dtype', type(attn_mask).__name__)} "
                                 f"{tuple(getattr(attn_mask, 'shape', ()))}")
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, L, d)
        if self.rope:
            positions = torch.arange(past, past + L, device=x.device)
            q, k = apply_rope(q, positions), apply_rope(k, positions)
        if cache is not None:
            k, v = cache.append(k, v)
        T = past + L
        if need_weights or cache is not None or key_mask is not None or edit_weights is not None:
            mask = (pattern_mask(self.kind, T, self.window, self.dilation, x.device)[past:]   # (L, T)
                    if attn_mask is None else attn_mask)
            if key_mask is not None:
                key_mask = _checks.bool_mask("key_mask", key_mask, (B, T), x.device)
                mask = mask & key_mask.reshape(-1, 1, 1, T)                                   # (B, 1, L, T)
            if self.kind == "uniform":
                weights = mask.to(q.dtype).expand(B, self.num_heads, L, T)
                weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
            else:
                weights = masked_softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), mask)
            if edit_weights is not None:
                weights = edit_weights(weights, mask)
            out = weights @ v
        else:
            weights = None
            if attn_mask is not None and self.kind == "uniform":
                out = (attn_mask.to(v.dtype) / attn_mask.sum(-1, keepdim=True).clamp_min(1)) @ v
            elif attn_mask is not None:      # written out: vmap (SeedStack) batches it, unlike the fused kernel
                scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~attn_mask, float("-inf"))
                out = scores.softmax(-1) @ v
            elif self.kind == "global":
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif self.kind == "uniform":                        # the running mean of the values
                out = v.cumsum(-2) / torch.arange(1, L + 1, device=x.device, dtype=v.dtype)[:, None]
            elif self.kind == "window":
                out = sparse.sliding_window_attention(q, k, v, self.window, is_causal=True)
            else:
                mask = pattern_mask("dilated", L, self.window, self.dilation, x.device)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(merge_heads(out)), (weights if need_weights else None)


class Block(nn.Module):
    r"""A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    .. math::
        h = x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad
        y = h + \mathrm{MLP}(\mathrm{LN}_2(h)), \qquad
        \mathrm{MLP}(u) = \mathrm{GELU}(u W_1^\top + b_1)\, W_2^\top + b_2

    with :math:`W_1` of shape ``(mlp_ratio * E, E)``, the exact (erf) GELU and LayerNorms over
    the ``E`` features (eps ``1e-5``). ``x (B, L, E) -> (B, L, E)``. The original transformer
    (Vaswani et al., 2017) normalised after the residual sum, :math:`y = \mathrm{LN}(x +
    \mathrm{Attn}(x))` ("post-norm"); GPT-2 (Radford et al., 2019) moved the norm to each
    sub-layer's input, and Xiong et al. (2020) show that this pre-norm arrangement keeps the
    gradients well scaled at initialisation and trains without a learning-rate warm-up.
    ``forward(x, **attention_options) -> (y, weights or None)``, the options passed to
    :class:`CausalSelfAttention`.

    ``residual=False`` or ``norm=False`` remove those parts, for ablations.

    Example:
        >>> import torch
        >>> from attn_course.transformer import Block
        >>> _ = torch.manual_seed(0)
        >>> block = Block(16, num_heads=2)
        >>> x = torch.randn(2, 7, 16)
        >>> y, _ = block(x)
        >>> h = x + block.attn(block.norm1(x))[0]           # the two residual steps, written out
        >>> torch.allclose(y, h + block.mlp(block.norm2(h)), atol=1e-6)
        True
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

    def forward(self, x, *, cache=None, need_weights=False, key_mask=None, edit_weights=None, attn_mask=None):
        a, weights = self.attn(self.norm1(x), cache=cache, need_weights=need_weights, key_mask=key_mask,
                               edit_weights=edit_weights, attn_mask=attn_mask)
        x = x + a if self.residual else a
        m = self.mlp(self.norm2(x))
        return (x + m if self.residual else m), weights


class TinyTransformer(nn.Module):
    r"""A decoder-only transformer: embeddings, ``num_layers`` blocks, a final norm, an LM head.

    .. math::
        h_0 = \mathrm{Emb}[\mathrm{ids}], \qquad h_\ell = \mathrm{Block}_\ell(h_{\ell - 1}), \qquad
        \mathrm{logits} = \mathrm{LN}(h_n)\, W_{\mathrm{head}}^\top + b_{\mathrm{head}}

    ``ids (B, L)`` int64 to ``logits (B, L, vocab)``; the logits at position ``t`` score the
    token at ``t + 1`` (causal language modelling, as in GPT; Radford et al., 2019). No
    positional embedding is added: positions enter through the rotary queries and keys of every
    layer. The head has its own weights and bias (GPT-2 ties its weights to the embedding,
    Press and Wolf, 2017; this model does not).

    ``forward(ids (B, L), *, need_weights=False) -> (logits (B, L, vocab), [weights per layer])``;
    ``generate(prompt, steps, use_cache=True)`` decodes greedily.

    Ablations: ``residual=False``, ``norm=False``, ``rope=False`` (no positional encoding),
    ``kind="uniform"`` (no learned attention weights). Interpretability hooks, passed to every
    layer (see :class:`CausalSelfAttention`): ``key_mask (B, L)`` hides tokens from every
    query; ``edit_weights(layer, weights, mask) -> weights`` replaces layer ``layer``'s weights.
    ``attn_masks (num_layers, L, L)`` bool gives each layer its own causal pattern for the call
    (``True`` = may attend, e.g. :func:`pattern_mask`), in place of ``kind``'s.

    Example:
        >>> import torch
        >>> from attn_course.transformer import TinyTransformer
        >>> _ = torch.manual_seed(0)
        >>> model = TinyTransformer(vocab_size=11, embed_dim=16, num_heads=2, num_layers=2).eval()
        >>> ids = torch.randint(0, 11, (2, 6))
        >>> logits, _ = model(ids)
        >>> tuple(logits.shape)                             # a score for every token, at every position
        (2, 6, 11)
        >>> out = model.generate(ids, steps=3)              # greedy, with a key/value cache
        >>> tuple(out.shape), torch.equal(out, model.generate(ids, steps=3, use_cache=False))
        ((2, 9), True)
    """

    def __init__(self, vocab_size: int, embed_dim: int = 64, num_heads: int = 4, num_layers: int = 2, *,
                 mlp_ratio: int = 4, residual: bool = True, norm: bool = True, kind: str = "global",
                 window: int = 4, dilation: int = 2, rope: bool = True):
        super().__init__()
        vocab_size = _checks.positive_number("vocab_size", vocab_size, integer=True)
        num_layers = _checks.positive_number("num_layers", num_layers, integer=True)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, residual=residual, norm=norm, kind=kind,
                  window=window, dilation=dilation, rope=rope) for _ in range(num_layers))
        self.norm = nn.LayerNorm(embed_dim) if norm else nn.Identity()
        self.head = nn.Linear(embed_dim, vocab_size)

    def forward(self, ids, *, need_weights: bool = False, caches: list | None = None, embeddings=None,
                key_mask: torch.Tensor | None = None, edit_weights: Callable | None = None,
                attn_masks: torch.Tensor | None = None):
        if embeddings is None:
            x = self.embed(_checks.token_ids("ids", ids, self.embed.num_embeddings))
        else:
            x = embeddings  # lets attribution methods differentiate with respect to the embeddings
        n, L = len(self.blocks), x.shape[-2]
        if attn_masks is not None and (not isinstance(attn_masks, torch.Tensor) or attn_masks.dtype != torch.bool
                                       or attn_masks.shape != (n, L, L)):
            raise ValueError(f"attn_masks must be a bool tensor (num_layers, L, L) = {(n, L, L)}, got "
                             f"{getattr(attn_masks, 'dtype', type(attn_masks).__name__)} "
                             f"{tuple(getattr(attn_masks, 'shape', ()))}")
        all_weights = []
        for i, block in enumerate(self.blocks):
            edit = None if edit_weights is None else (lambda w, m, i=i: edit_weights(i, w, m))
            x, w = block(x, cache=None if caches is None else caches[i], need_weights=need_weights,
                         key_mask=key_mask, edit_weights=edit, attn_mask=None if attn_masks is None else attn_masks[i])
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


def _configuration(model: TinyTransformer) -> tuple:
    """What, besides the weights' shapes, makes two TinyTransformers compute the same function."""
    blocks = tuple((b.residual, type(b.norm1).__name__, b.attn.num_heads, b.attn.kind, b.attn.window,
                    b.attn.dilation, b.attn.rope) for b in model.blocks)
    return (type(model.norm).__name__, blocks,
            tuple((n, tuple(p.shape), p.dtype) for n, p in model.named_parameters()))


class SeedStack(StackedModels):
    r"""``M`` copies of one :class:`TinyTransformer` configuration, each with its own weights
    (e.g. its own seed), evaluated and trained as one model (a
    :class:`~attn_course.train.StackedModels`: weights stacked along a leading model axis,
    the forward pass ``vmap``-ped over it). Summing the ``M`` losses gives each copy exactly
    the gradient it would get alone,

    .. math:: \nabla_{\theta_m} \sum_{m'} \mathcal L_{m'}(\theta_{m'}) = \nabla_{\theta_m} \mathcal L_m(\theta_m),

    and Adam (Kingma and Ba, 2015) acts element by element, so training the stack
    trains ``M`` independent models. Any configuration works (no residuals, no norm, no
    positions, uniform attention).

    ``forward(ids (M, B, L), masks=None) -> logits (M, B, L, vocab)``: copy ``m`` reads
    ``ids[m]``; ``masks (M, num_layers, L, L)`` bool, if given, gives each copy and layer its own
    causal pattern (``masks[m, l]``, ``True`` = may attend, e.g. :func:`pattern_mask` of
    ``"window"``), so that copies of one model with different attention patterns train together.
    :meth:`write_back` copies the trained weights into the models.

    Example:
        >>> import torch
        >>> from attn_course.transformer import SeedStack, TinyTransformer
        >>> _ = torch.manual_seed(0)
        >>> models = [TinyTransformer(11, 16, 2, 1) for _ in range(3)]   # three seeds
        >>> stack = SeedStack(models)
        >>> ids = torch.randint(0, 11, (3, 4, 6))           # copy m reads ids[m]
        >>> logits = stack(ids)
        >>> tuple(logits.shape)
        (3, 4, 6, 11)
        >>> torch.allclose(logits[1], models[1](ids[1])[0], atol=1e-5)
        True
    """

    def __init__(self, models: Sequence[TinyTransformer]):
        models = list(models)
        if not models or not all(isinstance(m, TinyTransformer) for m in models):
            raise TypeError(f"models must be a non-empty list of TinyTransformer, got "
                            f"{[type(m).__name__ for m in models]}")
        first = _configuration(models[0])
        if any(_configuration(m) != first for m in models[1:]):
            raise ValueError("models must share one TinyTransformer configuration (sizes, kind, window, "
                             "rope, residual, norm); only their weights may differ")
        super().__init__(models)
        self._vocab, self._layers = models[0].embed.num_embeddings, len(models[0].blocks)
        attn = models[0].blocks[0].attn
        self._pattern = (attn.kind, attn.window, attn.dilation)

    def _call(self, params, buffers, ids, masks):                   # one copy: ids (B, L), masks (layers, L, L)
        emb = params["embed.weight"][ids]        # the embedding lookup outside the model: its id checks cannot vmap
        return torch.func.functional_call(self._template[0], (params, buffers), (ids,),
                                          {"embeddings": emb, "attn_masks": masks})[0]

    def forward(self, ids: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        M = self.num_models
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 3 or ids.shape[0] != M:
            raise TypeError(f"ids must be an int64 tensor (M={M}, B, L), got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {tuple(getattr(ids, 'shape', ()))}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self._vocab):
            raise ValueError(f"ids holds ids outside [0, {self._vocab}): min {int(ids.min())}, max {int(ids.max())}")
        L = ids.shape[2]
        if masks is not None and (not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool
                                  or masks.shape != (M, self._layers, L, L)):
            raise ValueError(f"masks must be a bool tensor (M, num_layers, L, L) = {(M, self._layers, L, L)}, got "
                             f"{getattr(masks, 'dtype', type(masks).__name__)} {tuple(getattr(masks, 'shape', ()))}")
        if masks is None:   # the configuration's own pattern, written out: vmap batches it (the fused kernel it loops)
            kind, window, dilation = self._pattern
            shared = pattern_mask(kind, L, window, dilation, ids.device).expand(self._layers, L, L)
            return self._map((ids, shared), (0, None))
        return self._map((ids, masks), (0, 0))

    def write_back(self, models: Sequence[TinyTransformer]) -> None:
        """Copy the (trained) weights of copy ``m`` into ``models[m]``."""
        models = list(models)
        if len(models) != self.num_models or not all(isinstance(m, TinyTransformer) for m in models):
            raise TypeError(f"models must be {self.num_models} TinyTransformer(s), got "
                            f"{[type(m).__name__ for m in models]}")
        super().write_back(models)
