"""Chapter 5, positional encoding: telling attention where each token is.

Self-attention without positions is permutation-equivariant. Five ways to add
order: sinusoidal and learned absolute encodings (added to the inputs),
relative position representations (Shaw et al., 2018: learned vectors for
clipped distances, added to keys and values), rotary embeddings (RoPE, Su et
al., 2021: queries and keys rotated by their position) and ALiBi (Press et
al., 2021: a per-head linear penalty on distance, added to the scores); ``"none"`` is
NoPE (Kazemnejad et al., 2023: no position information but the causal mask).
:func:`fit_parallel` trains several seeds of a model at once (``torch.func.vmap``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import _checks
from .basics import masked_softmax
from .multihead import merge_heads, split_heads
from .train import fit_stacked

__all__ = [
    "sinusoidal_encoding",
    "apply_rope",
    "rope_scaled_base",
    "alibi_slopes",
    "alibi_bias",
    "LearnedPositionalEmbedding",
    "RelativePositionEmbedding",
    "relative_position_index",
    "PositionalSelfAttention",
    "PositionalModel",
    "fit_parallel",
    "ENCODINGS",
]

ENCODINGS = ("none", "sinusoidal", "learned", "relative", "rope", "alibi")


def _frequencies(dim: int, base: float, device=None, dtype=torch.float64) -> torch.Tensor:
    """``base^(-2i/dim)`` for ``i = 0 .. ceil(dim/2) - 1``."""
    return base ** (-torch.arange(0, dim, 2, device=device, dtype=dtype) / dim)


def sinusoidal_encoding(length: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    r"""The sinusoidal position table of Vaswani et al. (2017).

    .. math:: PE_{p, 2i} = \sin(p / \mathrm{base}^{2i/d}),\qquad PE_{p, 2i+1} = \cos(p / \mathrm{base}^{2i/d})

    Returns ``(length, dim)`` in float32 (an odd ``dim`` ends with a sine column).

    Example:
        >>> from attn_course.positional import sinusoidal_encoding
        >>> pe = sinusoidal_encoding(length=6, dim=8)
        >>> tuple(pe.shape), pe[0].tolist()                  # position 0: sin 0 = 0, cos 0 = 1
        ((6, 8), [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
        >>> round(pe[1, 0].item(), 4)                        # sin(1)
        0.8415
        >>> abs((pe[1] @ pe[3]) - (pe[2] @ pe[4])).item() < 1e-5   # similarity depends on the offset
        True
    """
    length = _checks.positive_number("length", length, integer=True)
    dim = _checks.positive_number("dim", dim, integer=True)
    base = _checks.positive_number("base", base)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * _frequencies(dim, base)[None, :]
    pe = torch.empty(length, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : dim // 2])
    return pe.float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor | None = None, base: float = 10000.0) -> torch.Tensor:
    r"""Rotary position embedding (RoFormer, Su et al., 2021).

    Each interleaved pair ``(x[..., 2i], x[..., 2i+1])`` of the token at position ``p``
    is rotated by the angle :math:`\theta = p \cdot \mathrm{base}^{-2i/d}`:

    .. math:: (x_{2i}, x_{2i+1}) \mapsto (x_{2i}\cos\theta - x_{2i+1}\sin\theta,\;
              x_{2i}\sin\theta + x_{2i+1}\cos\theta)

    so that the dot product of a rotated query at ``m`` and key at ``n`` depends on
    ``m - n`` only. ``x (..., L, d)`` with ``d`` even; ``positions`` (int or float)
    broadcasts to ``(..., L)`` and defaults to ``0 .. L-1``. Keeps dtype and device.

    Example:
        >>> import torch
        >>> from attn_course.positional import apply_rope
        >>> _ = torch.manual_seed(0)
        >>> q, k = torch.randn(1, 8), torch.randn(1, 8)
        >>> def score(m, n):
        ...     return (apply_rope(q, torch.tensor([m])) @ apply_rope(k, torch.tensor([n])).T).item()
        >>> abs(score(5, 3) - score(12, 10)) < 1e-5          # only the offset m - n matters
        True
        >>> x = torch.randn(2, 6, 8)
        >>> torch.allclose(apply_rope(x).norm(dim=-1), x.norm(dim=-1))   # a rotation keeps lengths
        True
        >>> torch.equal(apply_rope(x)[:, 0], x[:, 0])       # position 0 is not rotated
        True
    """
    _checks.float_tensor("x", x, min_ndim=2)
    base = _checks.positive_number("base", base)
    L, d = x.shape[-2], x.shape[-1]
    if d % 2:
        raise ValueError(f"the last dimension of x must be even to form pairs, got shape {tuple(x.shape)}")
    if positions is None:
        positions = torch.arange(L, device=x.device)
    elif not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a tensor or None, got {type(positions).__name__}")
    else:
        if positions.is_complex() or positions.dtype == torch.bool:
            raise TypeError(f"positions must hold integers or reals, got dtype {positions.dtype}")
        if positions.device != x.device:
            raise ValueError(f"positions is on {positions.device} but x is on {x.device}")
        try:
            torch.broadcast_shapes(positions.shape, x.shape[:-1])
        except RuntimeError:
            raise ValueError(f"positions of shape {tuple(positions.shape)} does not broadcast to "
                             f"x's (..., L) = {tuple(x.shape[:-1])}") from None
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    theta = positions.to(work)[..., None] * _frequencies(d, base, x.device, work)  # (..., L, d/2)
    cos, sin = torch.cos(theta), torch.sin(theta)
    x1, x2 = x[..., 0::2].to(work), x[..., 1::2].to(work)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (..., L, d/2, 2)
    return out.flatten(-2).to(x.dtype)


def rope_scaled_base(base: float, scale: float, dim: int) -> float:
    r"""NTK-aware RoPE scaling (bloc97, 2023): the base that stretches RoPE's slowest
    frequency by ``scale`` while leaving the fastest one unchanged.

    .. math:: b' = b \cdot s^{d / (d - 2)}

    With frequencies :math:`b^{-2i/d}`, ``i = 0 .. d/2 - 1``, the fastest (``i = 0``) stays 1 and
    the slowest (``i = d/2 - 1``) becomes :math:`b^{-(d-2)/d} / s`: interpolation for the slow
    pairs, which would otherwise meet angles never seen in training, and none for the fast
    ones, which tell near positions apart. Position interpolation (Chen et al., 2023) instead
    divides every position by ``s``. YaRN (Peng et al., 2023) blends the two per frequency.

    Example:
        >>> from attn_course.positional import _frequencies, rope_scaled_base
        >>> new = rope_scaled_base(10000.0, 4.0, 8)
        >>> old_f, new_f = _frequencies(8, 10000.0), _frequencies(8, new)
        >>> round(float(new_f[0]), 6), round(float(old_f[-1] / new_f[-1]), 6)   # fastest kept, slowest / 4
        (1.0, 4.0)
    """
    base = _checks.positive_number("base", base)
    scale = _checks.positive_number("scale", scale)
    dim = _checks.positive_number("dim", dim, integer=True)
    if dim < 4 or dim % 2:
        raise ValueError(f"dim must be even and at least 4, got {dim}")
    return base * scale ** (dim / (dim - 2))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    r"""The head slopes of ALiBi (Press et al., 2021).

    For ``n`` a power of two: :math:`m_k = 2^{-8k/n}`, ``k = 1 .. n``. Otherwise the rule
    of the authors' reference code (the paper trains only power-of-two head counts): the
    slopes for the largest power of two ``m < n``, followed by every other slope of ``2m``
    heads until there are ``n``.

    Example:
        >>> from attn_course.positional import alibi_slopes
        >>> alibi_slopes(8).tolist()                         # 2^-1 .. 2^-8
        [0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625]
        >>> alibi_slopes(6).tolist()                         # the 4-head slopes, then 2^-1, 2^-3
        [0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]
    """
    n = _checks.positive_number("num_heads", num_heads, integer=True)

    def power_of_two(k: int) -> list[float]:
        return [2 ** (-8 * (i + 1) / k) for i in range(k)]

    if n & (n - 1) == 0:
        slopes = power_of_two(n)
    else:
        m = 2 ** math.floor(math.log2(n))
        slopes = power_of_two(m) + power_of_two(2 * m)[0::2][: n - m]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(num_heads: int, length: int, *, is_causal: bool = True) -> torch.Tensor:
    """ALiBi's additive score bias, ``(num_heads, length, length)``.

    ``-slope[h] * (i - j)`` for keys ``j <= i`` and ``-inf`` above the diagonal when
    causal; ``-slope[h] * |i - j|`` everywhere when not.

    Example:
        >>> import torch
        >>> from attn_course.positional import alibi_bias
        >>> bias = alibi_bias(num_heads=2, length=4)             # slopes 2^-4 and 2^-8
        >>> tuple(bias.shape), bias[0, 3, :3].tolist()           # a linear penalty on distance
        ((2, 4, 4), [-0.1875, -0.125, -0.0625])
        >>> bool(torch.isinf(bias[:, 0, 1:]).all())              # causal: the future is hidden
        True
        >>> torch.equal(alibi_bias(2, 4, is_causal=False)[:, 3, :3], bias[:, 3, :3])
        True
    """
    slopes = alibi_slopes(num_heads)
    length = _checks.positive_number("length", length, integer=True)
    pos = torch.arange(length)
    distance = (pos[:, None] - pos[None, :]).float()  # i - j
    if is_causal:
        bias = -slopes[:, None, None] * distance.clamp(min=0)
        return bias.masked_fill((distance < 0)[None], float("-inf"))
    return -slopes[:, None, None] * distance.abs()


class LearnedPositionalEmbedding(nn.Module):
    r"""A trained vector per absolute position, added to the inputs (as in BERT and GPT).

    .. math:: \mathbf x'_p = \mathbf x_p + P_p,\qquad P \in \mathbb R^{\mathrm{max\_length} \times E}
              \text{ learned}

    Learned absolute positions as in Gehring et al. (2017), BERT (Devlin et al., 2019) and
    GPT (Radford et al., 2018). ``forward(x (B, L, E)) -> x + P[:L]``; positions past
    ``max_length`` do not exist.

    Example:
        >>> import torch
        >>> from attn_course.positional import LearnedPositionalEmbedding
        >>> embedding = LearnedPositionalEmbedding(max_length=16, embed_dim=8)
        >>> out = embedding(torch.zeros(2, 5, 8))
        >>> tuple(out.shape), torch.equal(out[1], embedding.table.weight[:5])
        ((2, 5, 8), True)
        >>> embedding(torch.zeros(1, 20, 8))
        Traceback (most recent call last):
            ...
        ValueError: x has 20 positions but the table has only 16 (max_length)
    """

    def __init__(self, max_length: int, embed_dim: int):
        super().__init__()
        _checks.positive_number("max_length", max_length, integer=True)
        self.table = nn.Embedding(max_length, embed_dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.float_tensor("x", x, ndim=3)
        if x.shape[1] > self.table.num_embeddings:
            raise ValueError(f"x has {x.shape[1]} positions but the table has only "
                             f"{self.table.num_embeddings} (max_length)")
        return x + self.table.weight[: x.shape[1]]


def relative_position_index(length_q: int, length_k: int, max_distance: int, device=None) -> torch.Tensor:
    """``(L_q, L_k)`` int64 table of ``clip(j - i, -k, k) + k``: which of the ``2k + 1`` relative
    embeddings query ``i`` uses for key ``j`` (Shaw et al., 2018).

    Example:
        >>> from attn_course.positional import relative_position_index
        >>> relative_position_index(3, 5, max_distance=2)    # offsets beyond +-2 share an index
        tensor([[2, 3, 4, 4, 4],
                [1, 2, 3, 4, 4],
                [0, 1, 2, 3, 4]])
    """
    for name, v in (("length_q", length_q), ("length_k", length_k), ("max_distance", max_distance)):
        _checks.positive_number(name, v, integer=True)
    rel = torch.arange(length_k, device=device)[None, :] - torch.arange(length_q, device=device)[:, None]
    return rel.clamp(-max_distance, max_distance) + max_distance


class RelativePositionEmbedding(nn.Module):
    r"""Relative position representations (Shaw et al., 2018), one table for keys or values.

    ``forward(L_q, L_k) -> (L_q, L_k, head_dim)``: the vector :math:`a_{ij} = w_{\mathrm{clip}(j - i, -k, k)}`,
    with distances clipped to ``max_distance = k``: beyond ``k`` every distance looks alike,
    which is what lets it work on sequences longer than those seen in training.

    Example:
        >>> import torch
        >>> from attn_course.positional import RelativePositionEmbedding
        >>> table = RelativePositionEmbedding(max_distance=2, head_dim=4)
        >>> a = table(3, 6)
        >>> tuple(a.shape)
        (3, 6, 4)
        >>> torch.equal(a[0, 1], a[1, 2]), torch.equal(a[0, 3], a[0, 5])   # same offset; clipped
        (True, True)
    """

    def __init__(self, max_distance: int, head_dim: int):
        super().__init__()
        self.max_distance = _checks.positive_number("max_distance", max_distance, integer=True)
        self.table = nn.Embedding(2 * self.max_distance + 1, head_dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, length_q: int, length_k: int) -> torch.Tensor:
        return self.table(relative_position_index(length_q, length_k, self.max_distance,
                                                  device=self.table.weight.device))


class PositionalSelfAttention(nn.Module):
    r"""Multi-head self-attention with a choice of where positions enter.

    .. math:: s_{ij} = \frac{\mathbf q_i \cdot \mathbf k_j}{\sqrt{d}}\ \text{(none)},\quad
              \frac{\mathbf q_i \cdot (\mathbf k_j + \mathbf a^K_{ij})}{\sqrt{d}}\ \text{(relative)},\quad
              \frac{R_i \mathbf q_i \cdot R_j \mathbf k_j}{\sqrt{d}}\ \text{(rope)},\quad
              \frac{\mathbf q_i \cdot \mathbf k_j}{\sqrt{d}} - m_h |i - j|\ \text{(alibi)}

    from Shaw et al. (2018), Su et al. (2021) and Press et al. (2021); the absolute
    encodings (Vaswani et al., 2017; learned) are added to the inputs before the layer.

    ``encoding`` is one of ``"none"``, ``"sinusoidal"``, ``"learned"`` (these three act on
    the inputs, so the layer itself ignores positions), ``"relative"`` (Shaw et al.:
    clipped-distance vectors added to keys and values), ``"rope"`` (queries and keys
    rotated) or ``"alibi"`` (a per-head distance penalty added to the scores).
    ``forward(x (B, L, E), *, is_causal=True) -> (output (B, L, E), weights (B, H, L, L))``.

    Example:
        Without positions the layer is permutation-equivariant; with rope it is not:

        >>> import torch
        >>> from attn_course.positional import PositionalSelfAttention
        >>> _ = torch.manual_seed(0)
        >>> x, perm = torch.randn(1, 6, 8), torch.tensor([5, 3, 1, 0, 2, 4])
        >>> for encoding in ("none", "rope"):
        ...     layer = PositionalSelfAttention(embed_dim=8, num_heads=2, encoding=encoding)
        ...     out, weights = layer(x, is_causal=False)
        ...     print(encoding, tuple(weights.shape),
        ...           torch.allclose(layer(x[:, perm], is_causal=False)[0], out[:, perm], atol=1e-5))
        none (1, 2, 6, 6) True
        rope (1, 2, 6, 6) False
    """

    def __init__(self, embed_dim: int, num_heads: int, encoding: str = "none", *,
                 max_distance: int = 8):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        embed_dim = _checks.positive_number("embed_dim", embed_dim, integer=True)
        num_heads = _checks.positive_number("num_heads", num_heads, integer=True)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        self.encoding, self.num_heads, self.head_dim = encoding, num_heads, embed_dim // num_heads
        if encoding == "rope" and self.head_dim % 2:
            raise ValueError(f"rope needs an even head width, got embed_dim/num_heads = {self.head_dim}")
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out = nn.Linear(embed_dim, embed_dim)
        # RoPE at inference past the trained length (no effect on other encodings): positions are
        # divided by rope_scale (position interpolation, Chen et al., 2023) and the frequencies
        # use rope_base (raised for NTK-aware scaling, bloc97, 2023). See :func:`rope_scaled_base`.
        self.rope_scale, self.rope_base = 1.0, 10000.0
        # An optional window, for any encoding, set at inference: each query sees only the keys
        # fewer than `window` positions back (itself included). None: every earlier key.
        self.window: int | None = None
        if encoding == "relative":
            self.rel_k = RelativePositionEmbedding(max_distance, self.head_dim)
            self.rel_v = RelativePositionEmbedding(max_distance, self.head_dim)

    def forward(self, x: torch.Tensor, *, is_causal: bool = True):
        _checks.float_tensor("x", x, ndim=3)
        B, L, _ = x.shape
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, L, d)
        if self.encoding == "rope":
            pos = torch.arange(L, device=x.device, dtype=torch.float32) / self.rope_scale
            q, k = apply_rope(q, pos, self.rope_base), apply_rope(k, pos, self.rope_base)
        scores = q @ k.transpose(-2, -1)                                # (B, H, L, L)
        if self.encoding == "relative":
            a_k = self.rel_k(L, L)                                      # (L, L, d)
            scores = scores + torch.einsum("bhid,ijd->bhij", q, a_k)
        scores = scores / math.sqrt(self.head_dim)
        if self.encoding == "alibi":  # the symmetric bias; the causal mask below hides the future
            scores = scores + alibi_bias(self.num_heads, L, is_causal=False).to(x.device, scores.dtype)
        mask = torch.ones(L, L, dtype=torch.bool, device=x.device).tril() if is_causal else None
        if self.window is not None:
            w = _checks.positive_number("window", self.window, integer=True)
            near = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(-(w - 1)).tril(w - 1)   # |i - j| < w
            mask = near if mask is None else mask & near
        weights = masked_softmax(scores, mask)
        heads = weights @ v
        if self.encoding == "relative":
            heads = heads + torch.einsum("bhij,ijd->bhid", weights, self.rel_v(L, L))
        return self.out(merge_heads(heads)), weights


def _under_vmap(t) -> bool:
    """Whether ``t`` is a tensor batched by ``torch.func.vmap`` (whose values Python cannot test)."""
    is_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
    return bool(is_batched and isinstance(t, torch.Tensor) and is_batched(t))


class PositionalModel(nn.Module):
    r"""Embeddings, an optional input-side encoding, positional self-attention layers, a readout.

    .. math:: \mathbf x^{(0)}_i = E[\mathrm{id}_i]\, [+\, PE_i],\qquad
              \mathbf x^{(l)} = \mathbf x^{(l-1)} + \mathrm{Attention}^{(l)}(\mathbf x^{(l-1)}),\qquad
              \mathrm{logits}_i = W_\text{out} \mathbf x^{(n_\text{layers})}_i

    an attention-only causal model (no MLP, no normalisation), the positions entering as in
    :class:`PositionalSelfAttention` (Shaw et al., 2018; Su et al., 2021; Press et al., 2021;
    Kazemnejad et al., 2023 for ``"none"``).

    ``forward(ids (B, L)) -> (logits (B, L, vocab_size), weights (B, H, L, L))``. A residual
    connection carries each token's representation past every attention layer; ``weights``
    are those of the last layer. ``num_layers`` (default 1) causal attention layers, each
    with the same kind of position information (``encoding``), and no MLP.

    Example:
        >>> import torch
        >>> from attn_course.positional import PositionalModel
        >>> _ = torch.manual_seed(0)
        >>> model = PositionalModel(vocab_size=8, embed_dim=16, num_heads=2, encoding="alibi", num_layers=2)
        >>> logits, weights = model(torch.randint(0, 8, (3, 10)))
        >>> tuple(logits.shape), tuple(weights.shape)
        ((3, 10, 8), (3, 2, 10, 10))
        >>> weights[..., 0, 1:].abs().max().item()        # causal: position 0 sees only itself
        0.0
    """

    def __init__(self, vocab_size: int, embed_dim: int, num_heads: int, encoding: str, *,
                 max_length: int = 256, max_distance: int = 8, num_layers: int = 1):
        super().__init__()
        _checks.positive_number("vocab_size", vocab_size, integer=True)
        num_layers = _checks.positive_number("num_layers", num_layers, integer=True)
        self.encoding = encoding
        self.tokens = nn.Embedding(vocab_size, embed_dim)
        self.learned = LearnedPositionalEmbedding(max_length, embed_dim) if encoding == "learned" else None
        self.attention = PositionalSelfAttention(embed_dim, num_heads, encoding, max_distance=max_distance)
        self.more_layers = nn.ModuleList(
            PositionalSelfAttention(embed_dim, num_heads, encoding, max_distance=max_distance)
            for _ in range(num_layers - 1))
        self.readout = nn.Linear(embed_dim, vocab_size)

    def forward(self, ids: torch.Tensor):
        # Under torch.func.vmap (fit_parallel) the ids' values cannot steer Python's control flow:
        # check their shape and dtype only (the embedding lookup still rejects a bad id).
        _checks.token_ids("ids", ids, None if _under_vmap(ids) else self.tokens.num_embeddings)
        x = self.tokens(ids)
        if self.encoding == "sinusoidal":
            x = x + sinusoidal_encoding(ids.shape[1], x.shape[-1]).to(x.device, x.dtype)
        elif self.learned is not None:
            x = self.learned(x)
        for layer in (self.attention, *self.more_layers):
            out, weights = layer(x)
            x = x + out
        return self.readout(x), weights


def fit_parallel(models, inputs, targets, *, loss_fn=None, steps: int = 300,
                 lr: float = 1e-2, batch_size: int = 64, seeds=None, desc: str = "training") -> torch.Tensor:
    """Train ``M`` models of one architecture at once, each exactly as :func:`attn_course.train.fit` would.

    The weights are stacked along a leading model axis (``torch.func.stack_module_state``)
    and the forward pass is ``vmap``-ped over it. The loss is the sum of the ``M`` losses,
    so each copy gets exactly its own gradient, and Adam works element by element: copy
    ``m`` follows the same trajectory as ``fit(models[m], inputs[m], targets[m],
    seed=seeds[m])`` (the same mini-batches, drawn from a generator seeded with
    ``seeds[m]``), up to floating-point rounding. What is shared is the Python overhead of
    a step, which dominates for small models: several seeds (or several data sets, e.g.
    tasks) cost little more than one.

    ``inputs``, ``targets``: tensors ``(n, ...)`` shared by all models, or lists of ``M``
    tensors of one shape (a data set per model, e.g. one task each). ``seeds`` defaults
    to ``0 .. M-1``, ``loss_fn`` to mean squared error. The trained weights are written back into ``models``, which are left in eval mode.
    Returns the losses, ``(steps, M)``.

    Example:
        Copy 0 trains exactly as :func:`attn_course.train.fit` with ``seed=0`` would:

        >>> import copy
        >>> import torch
        >>> from torch import nn
        >>> from attn_course.positional import fit_parallel
        >>> from attn_course.train import fit
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(32, 2)
        >>> y = x.sum(-1, keepdim=True)
        >>> models = [nn.Linear(2, 1), nn.Linear(2, 1)]
        >>> alone = copy.deepcopy(models[0])
        >>> losses = fit_parallel(models, x, y, steps=3, batch_size=8)
        >>> history = fit(alone, x, y, steps=3, batch_size=8, seed=0)
        >>> tuple(losses.shape), torch.allclose(losses[:, 0], torch.tensor(history.losses), atol=1e-6)
        ((3, 2), True)
        >>> torch.allclose(models[0].weight, alone.weight, atol=1e-6)
        True
    """
    models = list(models)
    if not models or not all(isinstance(m, nn.Module) for m in models):
        raise TypeError("models must be a non-empty sequence of nn.Module")
    names = [tuple((k, v.shape) for k, v in m.state_dict().items()) for m in models]
    if any(n != names[0] for n in names[1:]):
        raise ValueError("every model must have the same parameter names and shapes")
    M = len(models)
    steps = _checks.positive_number("steps", steps, integer=True)
    lr = _checks.positive_number("lr", lr)
    batch_size = _checks.positive_number("batch_size", batch_size, integer=True)
    seeds = list(range(M)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != M:
        raise ValueError(f"seeds must hold one seed per model ({M}), got {len(seeds)}")

    def per_model(name, t):
        if isinstance(t, torch.Tensor):
            return t.expand(M, *t.shape)                      # one data set, shared by all
        t = list(t) if isinstance(t, (list, tuple)) else None
        if t is None or len(t) != M or not all(isinstance(x, torch.Tensor) for x in t):
            raise TypeError(f"{name} must be a tensor (shared) or a list of {M} tensors (one per model)")
        if any(x.shape != t[0].shape for x in t):
            raise ValueError(f"the {M} tensors of {name} must have one shape, got {[tuple(x.shape) for x in t]}")
        return torch.stack(t)

    inputs_m, targets_m = per_model("inputs", inputs), per_model("targets", targets)
    if inputs_m.shape[1] != targets_m.shape[1]:
        raise ValueError(f"inputs and targets must have the same number of examples, got "
                         f"{inputs_m.shape[1]} and {targets_m.shape[1]}")
    n = inputs_m.shape[1]
    loss_fn = loss_fn or nn.functional.mse_loss

    gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    rows = torch.arange(M, device=targets_m.device)[:, None]

    def next_batch(step):                                   # each model's own mini-batch, as fit draws it
        idx = torch.stack([torch.randint(0, n, (min(batch_size, n),), generator=g) for g in gens])
        idx = idx.to(targets_m.device)
        return inputs_m[rows, idx], targets_m[rows, idx]

    return fit_stacked(models, next_batch, loss_fn=loss_fn, steps=steps, lr=lr, desc=desc)
