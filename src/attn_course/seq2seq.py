"""Chapter 2, self-attention vs cross-attention: one function, different inputs.

Self-attention takes queries, keys and values from the same sequence; cross-attention
takes queries from one sequence (a decoder) and keys and values from another (the
encoder's output). The module also holds the masks that make batches and decoders
work, and the GRU encoder-decoder of Bahdanau et al. (2014) with and without
attention.
"""

from __future__ import annotations

import torch
from torch import nn

from . import _checks
from .basics import AdditiveAttention
from .basics import causal_mask as _causal
from .multihead import MultiHeadAttention

__all__ = ["SelfAttention", "CrossAttention", "padding_mask", "causal_mask", "Seq2Seq"]


def padding_mask(lengths: torch.Tensor, max_length: int | None = None) -> torch.Tensor:
    """``(B, L)`` bool, ``True`` at the real tokens of sequences of the given lengths
    (padded at the end to ``max_length``, default the longest).

    Example:
        >>> import torch
        >>> from attn_course.seq2seq import padding_mask
        >>> padding_mask(torch.tensor([3, 1]), max_length=4).int()
        tensor([[1, 1, 1, 0],
                [1, 0, 0, 0]], dtype=torch.int32)
    """
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in (torch.int32, torch.int64) or lengths.ndim != 1:
        raise TypeError(f"lengths must be a 1-D integer tensor, got {getattr(lengths, 'dtype', type(lengths))} "
                        f"of shape {tuple(getattr(lengths, 'shape', ()))}")
    if lengths.numel() and lengths.min() < 0:
        raise ValueError(f"lengths must be >= 0, got {lengths.tolist()}")
    longest = int(lengths.max()) if lengths.numel() else 0
    L = longest if max_length is None else _checks.positive_number("max_length", max_length, integer=True)
    if longest > L:
        raise ValueError(f"max_length={L} is shorter than the longest sequence ({longest})")
    return torch.arange(L, device=lengths.device)[None, :] < lengths[:, None]


def causal_mask(length: int, device=None) -> torch.Tensor:
    """``(L, L)`` bool, ``True`` where ``j <= i``: a decoder position sees only the past.

    Example:
        >>> from attn_course.seq2seq import causal_mask
        >>> causal_mask(3).int()
        tensor([[1, 0, 0],
                [1, 1, 0],
                [1, 1, 1]], dtype=torch.int32)
    """
    length = _checks.positive_number("length", length, integer=True)
    return _causal(length, length, device=device)


class SelfAttention(nn.Module):
    r"""Attention of a sequence over itself: queries, keys and values all from ``x``.

    .. math:: \mathrm{SelfAttention}(X) = \mathrm{softmax}\Big(\frac{(X W_Q)(X W_K)^\top}{\sqrt{d_k}}\Big)\, X W_V

    per head, the heads concatenated and projected (:class:`attn_course.multihead.MultiHeadAttention`;
    Vaswani et al., 2017).
    ``forward(x (B, L, E), key_padding=None, *, is_causal=False, need_weights=True) ->
    (output (B, L, E), weights (B, H, L, L) or None)``; ``key_padding (B, L)`` is ``True`` at
    real tokens. ``need_weights=False`` never builds the ``(B, H, L, L)`` weights and runs
    torch's fused ``scaled_dot_product_attention`` (the same output, faster at long ``L``).

    Example:
        >>> import torch
        >>> from attn_course.seq2seq import SelfAttention, padding_mask
        >>> _ = torch.manual_seed(0)
        >>> attention = SelfAttention(embed_dim=8, num_heads=2)
        >>> x = torch.randn(2, 5, 8)
        >>> out, weights = attention(x, padding_mask(torch.tensor([5, 3])), is_causal=True)
        >>> tuple(out.shape), tuple(weights.shape)
        ((2, 5, 8), (2, 2, 5, 5))
        >>> weights[0, :, 0, 1:].abs().max().item()   # causal: the first token sees only itself
        0.0
        >>> weights[1, :, :, 3:].abs().max().item()   # padding: nobody attends to it
        0.0
        >>> fast, none = attention(x, is_causal=True, need_weights=False)
        >>> none is None, torch.allclose(fast, attention(x, is_causal=True)[0], atol=1e-6)
        (True, True)
    """

    def __init__(self, embed_dim: int, num_heads: int = 1, *, dropout: float = 0.0):
        super().__init__()
        self.attention = MultiHeadAttention(embed_dim, num_heads, dropout=dropout)

    def forward(self, x, key_padding: torch.Tensor | None = None, *, is_causal: bool = False,
                need_weights: bool = True):
        mask = None if key_padding is None else _key_mask("key_padding", key_padding, x)
        return self.attention(x, x, x, mask, is_causal=is_causal, need_weights=need_weights)


class CrossAttention(nn.Module):
    r"""Attention of one sequence over another: queries from ``x``, keys and values from ``context``.

    .. math:: \mathrm{CrossAttention}(X, Y) = \mathrm{softmax}\Big(\frac{(X W_Q)(Y W_K)^\top}{\sqrt{d_k}}\Big)\, Y W_V

    per head, with queries from :math:`X` and keys and values from the context :math:`Y`: the
    encoder-decoder attention of Vaswani et al. (2017), the multi-head form of the attention
    of Bahdanau et al. (2014).
    ``forward(x (B, L_x, E), context (B, L_c, context_dim), context_padding=None) ->
    (output (B, L_x, E), weights (B, H, L_x, L_c) or None)``; ``context_padding (B, L_c)`` is
    ``True`` at the context's real tokens; ``need_weights=False`` as in :class:`SelfAttention`.

    Example:
        >>> import torch
        >>> from attn_course.seq2seq import CrossAttention, padding_mask
        >>> _ = torch.manual_seed(0)
        >>> attention = CrossAttention(embed_dim=8, context_dim=6, num_heads=2)
        >>> x, context = torch.randn(2, 3, 8), torch.randn(2, 7, 6)   # decoder, encoder output
        >>> out, weights = attention(x, context, padding_mask(torch.tensor([7, 4])))
        >>> tuple(out.shape), tuple(weights.shape)     # one row per query, one column per context token
        ((2, 3, 8), (2, 2, 3, 7))
        >>> weights[1, ..., 4:].abs().max().item(), torch.allclose(weights.sum(-1), torch.ones(2, 2, 3))
        (0.0, True)
    """

    def __init__(self, embed_dim: int, context_dim: int, num_heads: int = 1, *, dropout: float = 0.0):
        super().__init__()
        self.attention = MultiHeadAttention(embed_dim, num_heads, kdim=context_dim, vdim=context_dim,
                                            dropout=dropout)

    def forward(self, x, context, context_padding: torch.Tensor | None = None, *, need_weights: bool = True):
        mask = None if context_padding is None else _key_mask("context_padding", context_padding, context)
        return self.attention(x, context, context, mask, need_weights=need_weights)


def _key_mask(name, padding, keys) -> torch.Tensor:
    if not isinstance(padding, torch.Tensor) or padding.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (B, L), True at real tokens; got "
                        f"{getattr(padding, 'dtype', type(padding).__name__)}")
    _checks.float_tensor("keys", keys, ndim=3)
    if padding.shape != keys.shape[:2]:
        raise ValueError(f"{name} must have shape (B, L) = {tuple(keys.shape[:2])}, got {tuple(padding.shape)}")
    return padding[:, None, None, :]


class Seq2Seq(nn.Module):
    r"""A GRU encoder-decoder, with or without additive cross-attention (Bahdanau et al., 2014).

    The encoder is a bidirectional GRU. Without attention the decoder sees the source
    only through the encoder's final state, one vector of ``hidden_dim`` numbers
    whatever the length. With attention, each decoder state also queries every encoder
    state (additive scores) and the readout sees the resulting context vector:

    .. math::

        s_t = \mathrm{GRU}(s_{t-1}, y_{t-1}),\quad
        e_{tj} = w_v^\top \tanh(W_q s_t + W_k h_j),\quad
        c_t = \textstyle\sum_j \mathrm{softmax}_j(e_{tj})\, h_j,\quad
        \mathrm{logits}_t = W_o [s_t; c_t] + b_o.

    The scores are Bahdanau's additive ones (Luong et al.'s "concat"); the wiring is Luong
    et al.'s (2015) global attention without input feeding: the new state ``s_t`` queries,
    and ``c_t`` goes to the readout only, through one linear layer (Luong et al. use
    ``tanh(W_c [c_t; s_t])`` and then a softmax layer, and with input feeding pass that
    attentional state into the next step's input). Bahdanau et al. query with
    ``s_{t-1}``, feed ``c_t`` into the GRU update as well, use a maxout output layer and start
    the decoder from the backward encoder's first state; the decoder here starts from both
    directions' last states.

    ``forward(source (B, S), decoder_input (B, T)) -> (logits (B, T, vocab_size), weights
    (B, T, S) or None)`` (teacher forcing, all steps at once); ``greedy(source, steps)``
    decodes one token at a time from its own predictions.

    ``attention="uniform"`` is the baseline with the same readout but no lookup: every step
    reads the plain mean of the encoder states, :math:`c_t = \frac1S \sum_j h_j` (weights
    ``1/S``, whatever the query), so it tells what the query-dependent weights add beyond a
    second view of the source.

    Example:
        >>> import torch
        >>> from attn_course.data import reverse_task
        >>> from attn_course.seq2seq import Seq2Seq
        >>> _ = torch.manual_seed(0)
        >>> source, decoder_input, target = reverse_task(2, 6, vocab_size=10)
        >>> model = Seq2Seq(vocab_size=10, embed_dim=8, hidden_dim=16)
        >>> logits, weights = model(source, decoder_input)        # teacher forcing
        >>> tuple(logits.shape), tuple(weights.shape)
        ((2, 6, 10), (2, 6, 6))
        >>> torch.allclose(weights.sum(-1), torch.ones(2, 6))     # each step's weights over the source
        True
        >>> tokens, _ = model.greedy(source, steps=4)             # its own predictions fed back
        >>> tuple(tokens.shape)
        (2, 4)
        >>> Seq2Seq(10, 8, 16, attention=False)(source, decoder_input)[1] is None
        True
    """

    def __init__(self, vocab_size: int, embed_dim: int = 32, hidden_dim: int = 64, *,
                 attention: bool | str = True):
        super().__init__()
        if attention not in (True, False, "uniform"):
            raise ValueError(f"attention must be True, False or 'uniform', got {attention!r}")
        vocab_size = _checks.positive_number("vocab_size", vocab_size, integer=True)
        hidden_dim = _checks.positive_number("hidden_dim", hidden_dim, integer=True)
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even (two encoder directions), got {hidden_dim}")
        self.vocab_size, self.start = vocab_size, vocab_size
        self.embed = nn.Embedding(vocab_size + 1, embed_dim)               # + the start token
        self.encoder = nn.GRU(embed_dim, hidden_dim // 2, batch_first=True, bidirectional=True)
        self.decoder = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.uniform = attention == "uniform"
        self.attention = AdditiveAttention(hidden_dim, hidden_dim, hidden_dim) if attention is True else None
        self.readout = nn.Linear(2 * hidden_dim if attention else hidden_dim, vocab_size)

    def encode(self, source):
        """Encoder states ``(B, S, H)`` of ``source (B, S)`` ids, and the summary ``(1, B, H)``
        (both directions' last states) that starts the decoder."""
        states, last = self.encoder(self.embed(source))                    # (B, S, H), (2, B, H/2)
        return states, torch.cat([last[0], last[1]], dim=-1)[None]          # summary: (1, B, H)

    def _read(self, dec_states, enc_states):
        if self.uniform:                                                    # the mean, whatever the query
            B, T, S = dec_states.shape[0], dec_states.shape[1], enc_states.shape[1]
            weights = enc_states.new_full((B, T, S), 1.0 / S)
            return self.readout(torch.cat([dec_states, weights @ enc_states], dim=-1)), weights
        if self.attention is None:
            return self.readout(dec_states), None
        context, weights = self.attention(dec_states, enc_states, enc_states)  # cross-attention
        return self.readout(torch.cat([dec_states, context], dim=-1)), weights

    def forward(self, source, decoder_input):
        _checks.token_ids("source", source, self.vocab_size)
        _checks.token_ids("decoder_input", decoder_input, self.vocab_size + 1)
        enc_states, summary = self.encode(source)
        dec_states, _ = self.decoder(self.embed(decoder_input), summary)
        return self._read(dec_states, enc_states)

    @torch.no_grad()
    def greedy(self, source, steps: int | None = None):
        """Decode ``steps`` tokens (default: the source length), feeding back each prediction.

        Returns tokens ``(B, steps)`` and the attention weights ``(B, steps, S)`` (or ``None``).
        """
        _checks.token_ids("source", source, self.vocab_size)
        steps = source.shape[1] if steps is None else _checks.positive_number("steps", steps, integer=True)
        enc_states, state = self.encode(source)
        token = torch.full((source.shape[0], 1), self.start, dtype=torch.long, device=source.device)
        tokens, weights = [], []
        for _ in range(steps):
            dec, state = self.decoder(self.embed(token), state)
            logits, w = self._read(dec, enc_states)
            token = logits.argmax(-1)
            tokens.append(token)
            if w is not None:
                weights.append(w)
        return torch.cat(tokens, 1), (torch.cat(weights, 1) if weights else None)

