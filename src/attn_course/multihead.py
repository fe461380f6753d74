"""Chapter 4, multi-head attention: several attention heads side by side.

Shapes: inputs are batch-first ``(B, L, E)``; inside, heads live in their own
axis, ``(B, H, L, E / H)``. Masks are boolean, ``True`` = may attend, and
broadcast to ``(B, H, L_q, L_k)`` (``torch.nn.MultiheadAttention`` uses the
opposite convention; :func:`masks_from_torch` converts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks
from .basics import causal_mask, masked_softmax

# the KV caches live in serving (chapter 9); chapter 4 and transformer.py import them from here
from .serving import KVCache, PagedKVCache, SinkKVCache, kv_cache_bytes

__all__ = [
    "MultiHeadAttention",
    "GroupedQueryAttention",
    "KVCache",
    "PagedKVCache",
    "SinkKVCache",
    "AttentionClassifier",
    "ParallelAttentionClassifiers",
    "split_heads",
    "merge_heads",
    "masks_from_torch",
    "kv_cache_bytes",
    "attention_flops",
    "count_parameters",
]


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``(B, L, H * d) -> (B, H, L, d)``: give every head its own slice of the features.

    Head ``h`` gets features ``h d .. (h + 1) d - 1`` of every token (a view, no copy).

    Example:
        >>> import torch
        >>> from attn_course.multihead import split_heads
        >>> x = torch.arange(12.0).view(1, 2, 6)        # B=1, L=2 tokens, E=6 features
        >>> heads = split_heads(x, num_heads=3)         # 3 heads of d=2 features
        >>> tuple(heads.shape)
        (1, 3, 2, 2)
        >>> heads[0, 1]                                 # head 1: features 2 and 3 of each token
        tensor([[2., 3.],
                [8., 9.]])
    """
    _checks.float_tensor("x", x, ndim=3)
    num_heads = _checks.positive_number("num_heads", num_heads, integer=True)
    B, L, E = x.shape
    if E % num_heads:
        raise ValueError(f"the feature size {E} of x {tuple(x.shape)} is not divisible by "
                         f"num_heads={num_heads}")
    return x.view(B, L, num_heads, E // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, L, d) -> (B, L, H * d)``: the inverse of :func:`split_heads`.

    Example:
        >>> import torch
        >>> from attn_course.multihead import merge_heads, split_heads
        >>> _ = torch.manual_seed(0)
        >>> heads = torch.randn(2, 4, 5, 3)             # B=2, H=4 heads, L=5, d=3
        >>> tuple(merge_heads(heads).shape)             # the heads side by side: E = H d = 12
        (2, 5, 12)
        >>> torch.equal(split_heads(merge_heads(heads), num_heads=4), heads)
        True
    """
    _checks.float_tensor("x", x, ndim=4)
    B, H, L, d = x.shape
    return x.transpose(1, 2).reshape(B, L, H * d)


def masks_from_torch(attn_mask: torch.Tensor | None = None,
                     key_padding_mask: torch.Tensor | None = None) -> torch.Tensor | None:
    """Convert ``torch.nn.MultiheadAttention``'s boolean masks to this course's convention.

    torch marks what is *hidden* (``True`` = masked out): ``attn_mask (L_q, L_k)`` and
    ``key_padding_mask (B, L_k)``. Returns one mask with ``True`` = may attend, of shape
    ``(B, 1, L_q, L_k)`` (or ``(L_q, L_k)`` / ``(B, 1, 1, L_k)`` when only one is given).

    Example:
        >>> import torch
        >>> from attn_course.multihead import masks_from_torch
        >>> hidden = torch.ones(3, 3, dtype=torch.bool).triu(1)      # torch: True = masked out (causal)
        >>> padding = torch.tensor([[False, False, True]])            # torch: the last key is padding
        >>> mask = masks_from_torch(hidden, padding)
        >>> tuple(mask.shape)
        (1, 1, 3, 3)
        >>> mask[0, 0].int()                                          # the course: True = may attend
        tensor([[1, 0, 0],
                [1, 1, 0],
                [1, 1, 0]], dtype=torch.int32)
    """
    out = None
    if attn_mask is not None:
        _check_bool("attn_mask", attn_mask, 2)
        out = ~attn_mask
    if key_padding_mask is not None:
        _check_bool("key_padding_mask", key_padding_mask, 2)
        keep = ~key_padding_mask[:, None, None, :]
        out = keep if out is None else keep & out
    return out


def _check_bool(name, m, ndim):
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (torch's convention: True = masked out), "
                        f"got {getattr(m, 'dtype', type(m).__name__)}")
    if m.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(m.shape)}")


class MultiHeadAttention(nn.Module):
    r"""Multi-head attention (Vaswani et al., 2017), batch-first.

    .. math:: \mathrm{MHA}(Q, K, V) = [\mathrm{head}_1; \dots; \mathrm{head}_H] W_O,\quad
              \mathrm{head}_h = \mathrm{softmax}\Big(\frac{Q W_Q^h (K W_K^h)^\top}{\sqrt{E/H}}\Big) V W_V^h

    Args:
        embed_dim: ``E``, the width of queries and of the output.
        num_heads: ``H``; ``E`` must be divisible by it (each head has width ``E / H``).
        kdim: the feature size of ``key`` (default ``E``).
        vdim: the feature size of ``value`` (default ``E``).
        bias: biases in the four projections.
        dropout: dropout on the attention weights, in training mode.

    ``forward(query (B, L_q, E), key (B, L_k, kdim), value (B, L_k, vdim), mask=None, *,
    is_causal=False, need_weights=True, head_mask=None)`` returns
    ``output (B, L_q, E)`` and ``weights (B, H, L_q, L_k)`` (``None`` without
    ``need_weights``, which then uses torch's fused kernel). ``head_mask (H,)`` scales
    each head's output (``0`` removes a head: ablations).

    Example:
        >>> import torch
        >>> from attn_course.multihead import MultiHeadAttention
        >>> _ = torch.manual_seed(0)
        >>> mha = MultiHeadAttention(embed_dim=8, num_heads=2)
        >>> x = torch.randn(2, 5, 8)                              # self-attention: B=2, L=5, E=8
        >>> out, weights = mha(x, x, x, is_causal=True)
        >>> tuple(out.shape), tuple(weights.shape)
        ((2, 5, 8), (2, 2, 5, 5))
        >>> torch.allclose(weights.sum(-1), torch.ones(2, 2, 5)), weights[0, 0, 0].tolist()
        (True, [1.0, 0.0, 0.0, 0.0, 0.0])
        >>> fused, none = mha(x, x, x, is_causal=True, need_weights=False)   # torch's fused kernel
        >>> torch.allclose(fused, out, atol=1e-6), none
        (True, None)
        >>> removed, _ = mha(x, x, x, head_mask=torch.zeros(2))  # every head removed: only W_O's bias is left
        >>> torch.allclose(removed, mha.out_proj.bias.expand(2, 5, 8))
        True
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        embed_dim = _checks.positive_number("embed_dim", embed_dim, integer=True)
        num_heads = _checks.positive_number("num_heads", num_heads, integer=True)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        kdim = embed_dim if kdim is None else _checks.positive_number("kdim", kdim, integer=True)
        vdim = embed_dim if vdim is None else _checks.positive_number("vdim", vdim, integer=True)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim, self.vdim, self.dropout = kdim, vdim, float(dropout)
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def project(self, query, key, value):
        """The three input projections, split into heads: each ``(B, H, L, E / H)``.

        For self-attention (one tensor as query, key and value) this is a single
        fused matmul with the stacked weights ``[W_Q; W_K; W_V]``.
        """
        if query is key is value and self.kdim == self.vdim == self.embed_dim:
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            b = None if self.q_proj.bias is None else torch.cat(
                [self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
        else:
            q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        H = self.num_heads
        return split_heads(q, H), split_heads(k, H), split_heads(v, H)

    def forward(self, query, key, value, mask=None, *, is_causal: bool = False,
                need_weights: bool = True, head_mask: torch.Tensor | None = None):
        for name, x, dim, arg in (("query", query, self.embed_dim, "embed_dim"),
                                  ("key", key, self.kdim, "kdim"), ("value", value, self.vdim, "vdim")):
            _checks.float_tensor(name, x, ndim=3)
            if x.shape[-1] != dim:
                raise ValueError(f"{name} has {x.shape[-1]} features (shape {tuple(x.shape)}) but "
                                 f"the module has {arg}={dim}")
        _checks.same_dtype_device(query=query, key=key, value=value)
        if not (query.shape[0] == key.shape[0] == value.shape[0]) or key.shape[1] != value.shape[1]:
            raise ValueError(f"query (B, L_q, E), key (B, L_k, kdim) and value (B, L_k, vdim) must "
                             f"agree on B and L_k; got query {tuple(query.shape)}, key "
                             f"{tuple(key.shape)}, value {tuple(value.shape)}")
        B, L_q, L_k, H = query.shape[0], query.shape[1], key.shape[1], self.num_heads
        if mask is not None:
            _checks.bool_mask("mask", mask, (B, H, L_q, L_k), query.device)
        if is_causal:
            causal = causal_mask(L_q, L_k, device=query.device)
            mask = causal if mask is None else mask & causal
        if head_mask is not None:
            _checks.float_tensor("head_mask", head_mask, ndim=1)
            if head_mask.shape[0] != H:
                raise ValueError(f"head_mask must have one entry per head ({H}), got shape "
                                 f"{tuple(head_mask.shape)}")

        q, k, v = self.project(query, key, value)  # (B, H, L, d) each
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5  # (B, H, L_q, L_k)
            weights = masked_softmax(scores, mask)
            if p > 0:
                weights = F.dropout(weights, p=p)
            heads = weights @ v                                     # (B, H, L_q, d)
        else:
            weights = None
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            if mask is not None:  # queries with no key: zeros, as everywhere in the course
                heads = heads.masked_fill(~mask.expand(B, H, L_q, L_k).any(-1, keepdim=True), 0.0)
        if head_mask is not None:
            heads = heads * head_mask.to(heads.dtype)[None, :, None, None]
        return self.out_proj(merge_heads(heads)), weights

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention) -> MultiHeadAttention:
        """A copy of ``torch.nn.MultiheadAttention`` ``module`` with the same weights.

        The copy is batch-first whatever ``module.batch_first`` is, and gives the same
        outputs as ``module`` on batch-first inputs (masks converted with
        :func:`masks_from_torch`).

        Example:
            >>> import torch
            >>> from attn_course.multihead import MultiHeadAttention, masks_from_torch
            >>> _ = torch.manual_seed(0)
            >>> reference = torch.nn.MultiheadAttention(8, 2, batch_first=True)
            >>> mha = MultiHeadAttention.from_torch(reference)
            >>> x = torch.randn(2, 4, 8)
            >>> padding = torch.tensor([[False] * 4, [False, False, True, True]])   # torch: True = padding
            >>> expected, _ = reference(x, x, x, key_padding_mask=padding)
            >>> out, _ = mha(x, x, x, masks_from_torch(key_padding_mask=padding))
            >>> torch.allclose(out, expected, atol=1e-6)
            True
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("module uses add_bias_kv or add_zero_attn, which this class does not have")
        E = module.embed_dim
        bias = module.in_proj_bias is not None
        new = cls(E, module.num_heads, kdim=module.kdim, vdim=module.vdim, bias=bias,
                  dropout=module.dropout)
        ref = module.in_proj_weight if module.in_proj_weight is not None else module.q_proj_weight
        new = new.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            if module._qkv_same_embed_dim:
                wq, wk, wv = module.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
            for lin, w, i in ((new.q_proj, wq, 0), (new.k_proj, wk, 1), (new.v_proj, wv, 2)):
                lin.weight.copy_(w)
                if bias:
                    lin.bias.copy_(module.in_proj_bias[i * E:(i + 1) * E])
            new.out_proj.weight.copy_(module.out_proj.weight)
            if module.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(module.out_proj.bias)
        new.train(module.training)
        return new


class GroupedQueryAttention(nn.Module):
    r"""Grouped-query attention (Ainslie et al., 2023): ``H`` query heads share ``G`` key/value heads.

    .. math:: \mathrm{head}_h = \mathrm{softmax}\Big(\frac{X W_Q^h (X W_K^{g(h)})^\top}{\sqrt{E/H}}\Big)
              X W_V^{g(h)},\quad g(h) = \lfloor h G / H \rfloor\ (h = 0, \dots, H - 1),\quad
              \mathrm{GQA}(X) = [\mathrm{head}_0; \dots; \mathrm{head}_{H-1}] W_O

    ``num_kv_heads = num_heads`` is multi-head attention, ``num_kv_heads = 1`` is
    multi-query attention (Shazeer, 2019). Each group of ``H / G`` query heads reads the
    same keys and values, so a decoding cache holds ``G`` heads instead of ``H``.
    ``forward(x (B, L, E), mask=None, *, is_causal=False, cache=None) -> (output, weights)``.
    With a :class:`~attn_course.serving.KVCache`, ``x`` holds only the new tokens: their keys and values are
    appended to the cache and they attend to every cached token (causally, if
    ``is_causal``); ``weights`` is then ``(B, H, L, T)`` for ``T`` tokens in all.

    Example:
        >>> import torch
        >>> from attn_course.multihead import GroupedQueryAttention, KVCache
        >>> _ = torch.manual_seed(0)
        >>> gqa = GroupedQueryAttention(embed_dim=8, num_heads=4, num_kv_heads=2)   # 2 query heads per KV head
        >>> tuple(gqa.q_proj.weight.shape), tuple(gqa.k_proj.weight.shape)          # keys: G d = 2 x 2 features
        ((8, 8), (4, 8))
        >>> x = torch.randn(1, 6, 8)
        >>> full, _ = gqa(x, is_causal=True)
        >>> cache = KVCache()
        >>> steps = [gqa(x[:, t:t + 1], is_causal=True, cache=cache)[0] for t in range(6)]   # one token at a time
        >>> torch.allclose(torch.cat(steps, dim=1), full, atol=1e-6), tuple(cache.key.shape)   # G=2 heads cached
        (True, (1, 2, 6, 2))
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, *, bias: bool = True):
        super().__init__()
        embed_dim = _checks.positive_number("embed_dim", embed_dim, integer=True)
        num_heads = _checks.positive_number("num_heads", num_heads, integer=True)
        num_kv_heads = _checks.positive_number("num_kv_heads", num_kv_heads, integer=True)
        if embed_dim % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"need embed_dim % num_heads == 0 and num_heads % num_kv_heads == 0; got "
                             f"embed_dim={embed_dim}, num_heads={num_heads}, num_kv_heads={num_kv_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(embed_dim, num_kv_heads * self.head_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x, mask=None, *, is_causal: bool = False, cache: KVCache | None = None):
        _checks.float_tensor("x", x, ndim=3)
        if x.shape[-1] != self.embed_dim:
            raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}) but embed_dim="
                             f"{self.embed_dim}")
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        B, L, _ = x.shape
        past = 0 if cache is None else cache.length
        T = past + L
        if mask is not None:
            _checks.bool_mask("mask", mask, (B, self.num_heads, L, T), x.device)
        if is_causal:  # new token t sits at position past + t and sees keys up to there
            causal = torch.ones(L, T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            mask = causal if mask is None else mask & causal
        q = split_heads(self.q_proj(x), self.num_heads)           # (B, H, L, d)
        k = split_heads(self.k_proj(x), self.num_kv_heads)        # (B, G, L, d)
        v = split_heads(self.v_proj(x), self.num_kv_heads)
        if cache is not None:
            k, v = cache.append(k, v)                             # (B, G, T, d)
        group = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, L, d)
        weights = masked_softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, mask)
        return self.out_proj(merge_heads(weights @ v)), weights


class AttentionClassifier(nn.Module):
    r"""Token and learned position embeddings, one causal multi-head attention layer, a linear readout.

    .. math:: X = E_\text{tok}[\text{ids}] + P_{1:L},\qquad
              \text{logits} = \mathrm{MHA}_\text{causal}(X, X, X)\, W_r + b_r

    with :class:`MultiHeadAttention` (Vaswani et al., 2017) and no MLP, normalisation or
    residual: a one-layer attention-only transformer (Elhage et al., 2021), the smallest
    model in which heads can specialise (chapter 4).
    ``forward(ids (B, L), head_mask=None) -> (logits (B, L, num_classes), weights (B, H, L, L))``.

    Example:
        >>> import torch
        >>> from attn_course.multihead import AttentionClassifier
        >>> _ = torch.manual_seed(0)
        >>> model = AttentionClassifier(vocab_size=10, length=6, embed_dim=8, num_heads=2, num_classes=3)
        >>> ids = torch.randint(0, 10, (4, 6))
        >>> logits, weights = model(ids)
        >>> tuple(logits.shape), tuple(weights.shape)
        ((4, 6, 3), (4, 2, 6, 6))
        >>> changed = ids.clone()
        >>> changed[:, -1] = (ids[:, -1] + 1) % 10          # another last token ...
        >>> torch.allclose(model(changed)[0][:, :-1], logits[:, :-1])   # ... changes no earlier prediction
        True
    """

    def __init__(self, vocab_size: int, length: int, embed_dim: int, num_heads: int, num_classes: int):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("length", length), ("num_classes", num_classes)):
            _checks.positive_number(name, v, integer=True)
        self.tokens = nn.Embedding(vocab_size, embed_dim)
        self.positions = nn.Embedding(length, embed_dim)
        self.attention = MultiHeadAttention(embed_dim, num_heads)
        self.readout = nn.Linear(embed_dim, num_classes)

    def forward(self, ids: torch.Tensor, head_mask: torch.Tensor | None = None):
        _checks.token_ids("ids", ids, self.tokens.num_embeddings)
        if ids.shape[1] > self.positions.num_embeddings:
            raise ValueError(f"ids has length {ids.shape[1]} but the model knows "
                             f"{self.positions.num_embeddings} positions")
        x = self.tokens(ids) + self.positions.weight[: ids.shape[1]]
        out, weights = self.attention(x, x, x, is_causal=True, head_mask=head_mask)
        return self.readout(out), weights


class ParallelAttentionClassifiers(nn.Module):
    r"""``M`` copies of :class:`AttentionClassifier`, each with its own weights, run as one model.

    Every parameter gets a leading model axis ``M``; summing the ``M`` losses gives each
    copy exactly its own gradient (and Adam works element by element), so ``M`` seeds
    train in one loop, as fast as one model on a CPU. Build it with :meth:`from_models`
    (the constructor alone leaves every parameter at zero)
    and take copy ``m`` out as an ordinary :class:`AttentionClassifier` with :meth:`model`.

    ``forward(ids (M, B, L) or (B, L), head_mask=None, need_weights=True) -> (logits (M, B, L, C),
    weights (M, B, H, L, L))``: copy ``m`` reads ``ids[m]`` (or all copies read the same ``(B, L)``);
    ``head_mask`` ``(H,)`` or ``(M, H)`` scales each head's output (``0`` removes it). Without
    ``need_weights`` the weights are ``None`` and torch's fused kernel computes the heads
    (several times faster to train on a CPU).

    Each copy is the model of :class:`AttentionClassifier` (Vaswani et al., 2017) with its own
    parameters :math:`\theta_m`; training minimises

    .. math:: \mathcal{L}(\theta_1, \dots, \theta_M) = \sum_{m=1}^{M} \mathcal{L}_m(\theta_m),
              \qquad \nabla_{\theta_m} \mathcal{L} = \nabla_{\theta_m} \mathcal{L}_m .

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.multihead import AttentionClassifier, ParallelAttentionClassifiers
        >>> models = []
        >>> for seed in range(3):
        ...     _ = torch.manual_seed(seed)
        ...     models.append(AttentionClassifier(vocab_size=10, length=6, embed_dim=8, num_heads=2,
        ...                                       num_classes=3))
        >>> parallel = ParallelAttentionClassifiers.from_models(models)
        >>> ids, targets = torch.randint(0, 10, (4, 6)), torch.randint(0, 3, (4, 6))
        >>> logits, weights = parallel(ids)                  # every copy reads the same batch
        >>> tuple(logits.shape), tuple(weights.shape)
        ((3, 4, 6, 3), (3, 4, 2, 6, 6))
        >>> all(torch.allclose(logits[m], models[m](ids)[0], atol=1e-5) for m in range(3))
        True
        >>> sum(F.cross_entropy(logits[m].flatten(0, 1), targets.flatten()) for m in range(3)).backward()
        >>> F.cross_entropy(models[1](ids)[0].flatten(0, 1), targets.flatten()).backward()
        >>> torch.allclose(parallel.params["readout_weight"].grad[1], models[1].readout.weight.grad, atol=1e-6)
        True
    """

    _NAMES = ("tokens.weight", "positions.weight", "attention.q_proj.weight", "attention.q_proj.bias",
              "attention.k_proj.weight", "attention.k_proj.bias", "attention.v_proj.weight",
              "attention.v_proj.bias", "attention.out_proj.weight", "attention.out_proj.bias",
              "readout.weight", "readout.bias")

    def __init__(self, num_models: int, vocab_size: int, length: int, embed_dim: int, num_heads: int,
                 num_classes: int):
        super().__init__()
        M = _checks.positive_number("num_models", num_models, integer=True)
        template = AttentionClassifier(vocab_size, length, embed_dim, num_heads, num_classes)
        self.num_models, self.num_heads = M, num_heads
        self.embed_dim, self.head_dim = embed_dim, embed_dim // num_heads
        self.params = nn.ParameterDict({
            name.replace(".", "_"): nn.Parameter(torch.zeros(M, *template.get_parameter(name).shape))
            for name in self._NAMES})

    @classmethod
    def from_models(cls, models) -> ParallelAttentionClassifiers:
        """Stack the weights of several :class:`AttentionClassifier` models of one shape."""
        models = list(models)
        if not models or not all(isinstance(m, AttentionClassifier) for m in models):
            raise TypeError(f"models must be AttentionClassifier(s), got {[type(m).__name__ for m in models]}")
        first = models[0]
        shape = lambda m: (m.tokens.num_embeddings, m.positions.num_embeddings,  # noqa: E731
                           m.tokens.embedding_dim, m.attention.num_heads, m.readout.out_features)
        if any(shape(m) != shape(first) for m in models):
            raise ValueError(f"every model must have one shape (vocab, length, width, heads, classes); "
                             f"got {[shape(m) for m in models]}")
        new = cls(len(models), *shape(first)).to(first.tokens.weight)
        with torch.no_grad():
            for name in cls._NAMES:
                new.params[name.replace(".", "_")].copy_(torch.stack([m.get_parameter(name) for m in models]))
        return new

    @torch.no_grad()
    def model(self, m: int) -> AttentionClassifier:
        """Copy ``m`` as an :class:`AttentionClassifier` (a new module with copy ``m``'s weights).

        Example:
            >>> import torch
            >>> from attn_course.multihead import ParallelAttentionClassifiers
            >>> _ = torch.manual_seed(0)
            >>> parallel = ParallelAttentionClassifiers(2, vocab_size=10, length=6, embed_dim=8, num_heads=2,
            ...                                         num_classes=3)
            >>> for weight in parallel.parameters():         # built here, not from models: fill the zeros
            ...     _ = torch.nn.init.normal_(weight)
            >>> ids = torch.randint(0, 10, (4, 6))
            >>> copy = parallel.model(1)
            >>> type(copy).__name__, torch.allclose(copy(ids)[0], parallel(ids)[0][1], atol=1e-5)
            ('AttentionClassifier', True)
        """
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m < self.num_models:
            raise ValueError(f"m must be an int in [0, {self.num_models}), got {m!r}")
        p = self.params
        out = AttentionClassifier(p["tokens_weight"].shape[1], p["positions_weight"].shape[1], self.embed_dim,
                                  self.num_heads, p["readout_weight"].shape[1]).to(p["tokens_weight"])
        for name in self._NAMES:
            out.get_parameter(name).copy_(p[name.replace(".", "_")][m])
        return out

    def forward(self, ids: torch.Tensor, head_mask: torch.Tensor | None = None, need_weights: bool = True):
        """Logits ``(M, B, L, C)`` and weights ``(M, B, H, L, L)`` (or ``None``) of every copy."""
        p, M, H, d = self.params, self.num_models, self.num_heads, self.head_dim
        if isinstance(ids, torch.Tensor) and ids.ndim == 2:
            ids = ids.expand(M, *ids.shape)
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.long or ids.ndim != 3 or ids.shape[0] != M:
            raise TypeError(f"ids must be an int64 tensor (B, L) or (M={M}, B, L), got "
                            f"{getattr(ids, 'dtype', type(ids).__name__)} of shape {tuple(getattr(ids, 'shape', ()))}")
        _checks.token_ids("ids", ids.flatten(0, 1), p["tokens_weight"].shape[1])
        L = ids.shape[2]
        if L > p["positions_weight"].shape[1]:
            raise ValueError(f"ids has length {L} but the models know {p['positions_weight'].shape[1]} positions")
        if head_mask is not None:
            _checks.float_tensor("head_mask", head_mask)
            if head_mask.shape not in ((H,), (M, H)):
                raise ValueError(f"head_mask must be (H={H},) or (M={M}, H={H}), got {tuple(head_mask.shape)}")
            head_mask = head_mask.expand(M, H)

        def linear(x, name):  # x (M, B, L, in) -> (M, B, L, out), copy m with its own weights
            return torch.einsum("mbli,moi->mblo", x, p[name + "_weight"]) + p[name + "_bias"][:, None, None]

        def split(x):         # (M, B, L, E) -> (M, B, H, L, d)
            return x.unflatten(-1, (H, d)).transpose(2, 3)

        models = torch.arange(M, device=ids.device)[:, None, None]
        x = p["tokens_weight"][models, ids] + p["positions_weight"][:, None, :L]                # (M, B, L, E)
        q, k, v = (split(linear(x, f"attention_{n}_proj")) for n in "qkv")                    # (M, B, H, L, d)
        if need_weights:
            causal = causal_mask(L, L, device=ids.device)
            weights = masked_softmax(q @ k.transpose(-2, -1) / d**0.5, causal)                # (M, B, H, L, L)
            heads = weights @ v                                                               # (M, B, H, L, d)
        else:
            weights = None
            heads = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
                                                   is_causal=True).unflatten(0, (M, -1))
        if head_mask is not None:
            heads = heads * head_mask.to(heads.dtype)[:, None, :, None, None]
        out = linear(heads.transpose(2, 3).flatten(-2), "attention_out_proj")                 # (M, B, L, E)
        return linear(out, "readout"), weights


def attention_flops(length_q: int, length_k: int, embed_dim: int, num_heads: int) -> dict[str, int]:
    """Multiply-adds x 2 of one multi-head attention layer, by part.

    Projections: ``2 L E^2`` each for Q and the output, ``2 L_k E^2`` each for K and V.
    Scores ``Q K^T`` and the weighted sum ``A V``: ``2 L_q L_k (E / H)`` per head each,
    so ``2 L_q L_k E`` in all: the number of heads cancels.

    Example:
        >>> from attn_course.multihead import attention_flops
        >>> flops = attention_flops(length_q=1024, length_k=1024, embed_dim=512, num_heads=8)
        >>> flops
        {'projections': 2147483648, 'scores': 1073741824, 'weighted sum': 1073741824}
        >>> flops["scores"] + flops["weighted sum"] == flops["projections"]   # at L = 2E, the two are equal
        True
        >>> attention_flops(1024, 1024, 512, num_heads=1) == attention_flops(1024, 1024, 512, num_heads=64)
        True
    """
    for name, v in (("length_q", length_q), ("length_k", length_k), ("embed_dim", embed_dim),
                    ("num_heads", num_heads)):
        _checks.positive_number(name, v, integer=True)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    d = embed_dim // num_heads
    return {
        "projections": 2 * embed_dim * embed_dim * (2 * length_q + 2 * length_k),
        "scores": num_heads * 2 * length_q * length_k * d,
        "weighted sum": num_heads * 2 * length_q * length_k * d,
    }


def count_parameters(module: nn.Module) -> int:
    """The number of trainable parameters of ``module``.

    Example:
        >>> from attn_course.multihead import MultiHeadAttention, count_parameters
        >>> count_parameters(MultiHeadAttention(64, num_heads=8))   # 4 E^2 weights and 4 E biases
        16640
        >>> count_parameters(MultiHeadAttention(64, num_heads=1))   # whatever the number of heads
        16640
        >>> count_parameters(MultiHeadAttention(64, num_heads=8).requires_grad_(False))   # frozen: not counted
        0
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
