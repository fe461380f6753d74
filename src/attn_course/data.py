"""Synthetic data for the chapters' experiments: generated, never downloaded."""

from __future__ import annotations

import torch

from . import _checks

__all__ = ["marker_task", "noisy_sine", "two_relation_task", "reverse_task", "marked_item_task",
           "copy_after_marker_task", "sort_task", "copy_back_task"]


def marker_task(num_examples: int, length: int, *, moving: bool = True,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The "find the marked token" task of chapter 1.

    Each example is a sequence of ``length`` tokens with two features:
    channel 0 holds a random value, channel 1 is 1 at one marked position and
    0 elsewhere. The target is the value at the marked position. With
    ``moving=True`` the marked position is random per example; with
    ``moving=False`` it is always the middle position.

    Returns:
        ``x (num_examples, length, 2)``, ``y (num_examples,)`` and the marked
        positions ``(num_examples,)`` (int64).

    Example:
        >>> import torch
        >>> from attn_course.data import marker_task
        >>> x, y, pos = marker_task(4, 6, generator=torch.Generator().manual_seed(0))
        >>> tuple(x.shape), tuple(y.shape), pos.dtype
        ((4, 6, 2), (4,), torch.int64)
        >>> x[..., 1].sum(1).tolist()   # one marked position per example
        [1.0, 1.0, 1.0, 1.0]
        >>> torch.equal(y, x[torch.arange(4), pos, 0])   # the target is the marked value
        True
        >>> marker_task(3, 6, moving=False)[2].tolist()   # fixed: always the middle
        [3, 3, 3]
    """
    num_examples = _checks.positive_number("num_examples", num_examples, integer=True)
    length = _checks.positive_number("length", length, integer=True)
    values = torch.randn(num_examples, length, generator=generator)
    if moving:
        pos = torch.randint(0, length, (num_examples,), generator=generator)
    else:
        pos = torch.full((num_examples,), length // 2, dtype=torch.long)
    marker = torch.nn.functional.one_hot(pos, length).float()
    x = torch.stack([values, marker], dim=-1)
    y = values.gather(1, pos[:, None]).squeeze(1)
    return x, y, pos


def noisy_sine(num_points: int, *, noise: float = 0.3, low: float = 0.0, high: float = 5.0,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted inputs ``x`` uniform in ``[low, high]`` and ``y = 2 sin(x) + x**0.8 + noise``.

    A smooth 1-D regression problem for Nadaraya-Watson attention pooling.

    Example:
        >>> import torch
        >>> from attn_course.data import noisy_sine
        >>> x, y = noisy_sine(50, generator=torch.Generator().manual_seed(0))
        >>> tuple(x.shape), bool((x[1:] >= x[:-1]).all()), 0 <= x.min().item() <= x.max().item() <= 5
        ((50,), True, True)
        >>> x, y = noisy_sine(3, noise=0.0, low=0.0, high=0.0)   # no noise: the curve itself
        >>> y.tolist()
        [0.0, 0.0, 0.0]
    """
    num_points = _checks.positive_number("num_points", num_points, integer=True)
    x, _ = torch.sort(low + (high - low) * torch.rand(num_points, generator=generator))
    y = target_function(x) + noise * torch.randn(num_points, generator=generator)
    return x, y


def target_function(x: torch.Tensor) -> torch.Tensor:
    """The noise-free curve behind :func:`noisy_sine`."""
    return 2 * torch.sin(x) + x**0.8


def two_relation_task(num_examples: int, vocab_size: int = 10, length: int = 16, *,
                      generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence task that needs two relations at once (chapter 4).

    Each sequence holds ``length`` symbols from ``0 .. vocab_size - 1``; one of them,
    in the first half, is *marked* (its token id is ``symbol + vocab_size``). At every
    position after the marked token (and after its successor) the target is the pair
    (previous symbol, marked symbol), encoded as ``previous * vocab_size + marked``:
    one relation is positional (the previous token), the other is by content (the
    marked token, wherever it is). Other positions have target ``-100`` (ignored).

    Returns token ids ``(num_examples, length)`` in ``0 .. 2 vocab_size - 1`` and
    targets ``(num_examples, length)``.

    Example:
        >>> import torch
        >>> from attn_course.data import two_relation_task
        >>> ids, targets = two_relation_task(2, vocab_size=10, length=8,
        ...                                  generator=torch.Generator().manual_seed(0))
        >>> tuple(ids.shape), (ids >= 10).sum(1).tolist()   # one marked token per sequence
        ((2, 8), [1, 1])
        >>> t = 7                                         # the last position always has a target
        >>> marked = ids[0][ids[0] >= 10].item() - 10
        >>> targets[0, t].item() == (ids[0, t - 1].item() % 10) * 10 + marked
        True
    """
    n = _checks.positive_number("num_examples", num_examples, integer=True)
    V = _checks.positive_number("vocab_size", vocab_size, integer=True)
    L = _checks.positive_number("length", length, integer=True)
    if L < 4:
        raise ValueError(f"length must be at least 4, got {L}")
    symbols = torch.randint(0, V, (n, L), generator=generator)
    marked = torch.randint(0, L // 2, (n,), generator=generator)
    rows = torch.arange(n)
    ids = symbols.clone()
    ids[rows, marked] += V
    previous = torch.roll(symbols, 1, dims=1)
    targets = previous * V + symbols[rows, marked][:, None]
    valid = torch.arange(L)[None, :] > marked[:, None] + 1
    return ids, targets.masked_fill(~valid, -100)


def reverse_task(num_examples: int, length: int, vocab_size: int = 10, *,
                 generator: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence reversal for an encoder-decoder (chapter 2).

    ``source`` holds ``length`` random symbols in ``0 .. vocab_size - 1``; the target is
    the same symbols in reverse order. ``decoder_input`` is the target shifted right by
    one behind a start token ``vocab_size`` (teacher forcing).

    Returns ``source``, ``decoder_input`` and ``target``, each ``(num_examples, length)`` int64.

    Example:
        >>> import torch
        >>> from attn_course.data import reverse_task
        >>> source, decoder_input, target = reverse_task(1, 5, generator=torch.Generator().manual_seed(0))
        >>> torch.equal(target, source.flip(1))
        True
        >>> decoder_input[0, 0].item(), torch.equal(decoder_input[:, 1:], target[:, :-1])   # start token 10
        (10, True)
    """
    n = _checks.positive_number("num_examples", num_examples, integer=True)
    L = _checks.positive_number("length", length, integer=True)
    V = _checks.positive_number("vocab_size", vocab_size, integer=True)
    source = torch.randint(0, V, (n, L), generator=generator)
    target = source.flip(1)
    decoder_input = torch.cat([torch.full((n, 1), V), target[:, :-1]], dim=1)
    return source, decoder_input, target


def marked_item_task(num_examples: int, length: int = 20, vocab_size: int = 8, *,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """"Find the marked item" (chapter 3): ``length`` items, each a one-hot symbol plus a
    marker flag that is 1 for exactly one item; the target is the marked item's symbol.

    Returns ``x (num_examples, length, vocab_size + 1)`` and ``y (num_examples,)``.

    Example:
        >>> import torch
        >>> from attn_course.data import marked_item_task
        >>> x, y = marked_item_task(3, length=5, vocab_size=4, generator=torch.Generator().manual_seed(0))
        >>> tuple(x.shape), x[..., -1].sum(1).tolist()   # one flag per example
        ((3, 5, 5), [1.0, 1.0, 1.0])
        >>> marked = x[..., -1].argmax(1)
        >>> torch.equal(y, x[torch.arange(3), marked, :4].argmax(-1))   # the marked item's symbol
        True
    """
    n = _checks.positive_number("num_examples", num_examples, integer=True)
    L = _checks.positive_number("length", length, integer=True)
    V = _checks.positive_number("vocab_size", vocab_size, integer=True)
    symbols = torch.randint(0, V, (n, L), generator=generator)
    marked = torch.randint(0, L, (n,), generator=generator)
    flag = torch.nn.functional.one_hot(marked, L).float()[..., None]
    x = torch.cat([torch.nn.functional.one_hot(symbols, V).float(), flag], dim=-1)
    return x, symbols[torch.arange(n), marked]


def copy_after_marker_task(num_examples: int, length: int = 36, window: int = 4, vocab_size: int = 8, *,
                           generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the symbol that follows a marker, wherever the marker is (chapter 3).

    Each position has a one-hot symbol, a marker flag and a "follows the marker" flag;
    one marker per sequence, at a random position. Every position within ``window`` of
    the symbol after the marker must output that symbol; other positions have target
    ``-100`` (ignored). A local layer with this window sees the symbol it needs; what
    differs between models is whether they can *find* it.

    Returns ``x (num_examples, length, vocab_size + 2)`` and targets ``(num_examples, length)``.

    Example:
        >>> import torch
        >>> from attn_course.data import copy_after_marker_task
        >>> x, y = copy_after_marker_task(1, length=12, window=2, vocab_size=4,
        ...                               generator=torch.Generator().manual_seed(0))
        >>> tuple(x.shape), tuple(y.shape)
        ((1, 12, 6), (1, 12))
        >>> after = x[0, :, -1].argmax().item()          # the "follows the marker" flag
        >>> symbol = x[0, after, :4].argmax().item()
        >>> with_target = (y[0] != -100).nonzero().flatten().tolist()
        >>> with_target == [t for t in range(12) if abs(t - after) <= 2]   # within the window
        True
        >>> set(y[0, with_target].tolist()) == {symbol}                     # all copy that symbol
        True
    """
    n = _checks.positive_number("num_examples", num_examples, integer=True)
    L = _checks.positive_number("length", length, integer=True)
    V = _checks.positive_number("vocab_size", vocab_size, integer=True)
    if L < 2:
        raise ValueError(f"length must be at least 2, got {L}")
    one_hot = torch.nn.functional.one_hot
    symbols = torch.randint(0, V, (n, L), generator=generator)
    marker = torch.randint(0, L - 1, (n,), generator=generator)
    x = torch.cat([one_hot(symbols, V).float(), one_hot(marker, L).float()[..., None],
                   one_hot(marker + 1, L).float()[..., None]], dim=-1)
    value = symbols[torch.arange(n), marker + 1]
    near = (torch.arange(L)[None, :] - marker[:, None] - 1).abs() <= window
    return x, torch.where(near, value[:, None], torch.full((n, L), -100))


def sort_task(num_examples: int, length: int = 8, vocab_size: int = 10, *,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorting as language modelling (chapter 12, the capstone): ``digits, SEP, sorted digits``.

    Token ids ``(num_examples, 2 * length + 1)`` with ``SEP = vocab_size``; targets of the
    same shape hold the next token at the positions that predict the sorted part
    (from ``SEP`` on) and ``-100`` elsewhere.

    Example:
        >>> import torch
        >>> from attn_course.data import sort_task
        >>> ids, targets = sort_task(1, length=4, vocab_size=10, generator=torch.Generator().manual_seed(0))
        >>> digits, sep, ordered = ids[0, :4], ids[0, 4].item(), ids[0, 5:]
        >>> sep, torch.equal(ordered, digits.sort().values)
        (10, True)
        >>> targets[0].tolist()[:4], torch.equal(targets[0, 4:8], ordered)
        ([-100, -100, -100, -100], True)
    """
    n = _checks.positive_number("num_examples", num_examples, integer=True)
    L = _checks.positive_number("length", length, integer=True)
    V = _checks.positive_number("vocab_size", vocab_size, integer=True)
    digits = torch.randint(0, V, (n, L), generator=generator)
    ids = torch.cat([digits, torch.full((n, 1), V), digits.sort(dim=1).values], dim=1)
    targets = torch.full_like(ids, -100)
    targets[:, L:-1] = ids[:, L + 1:]
    return ids, targets


def copy_back_task(num_examples: int, length: int, offset: int = 3, vocab_size: int = 8, *,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """"Output the token ``offset`` places back" (chapter 5): a task that needs order.

    Returns random token ids ``(num_examples, length)`` and targets of the same shape: the
    id ``offset`` positions earlier, ``-100`` (ignored) for the first ``offset`` positions.

    Example:
        >>> import torch
        >>> from attn_course.data import copy_back_task
        >>> ids, targets = copy_back_task(2, 8, offset=3, generator=torch.Generator().manual_seed(0))
        >>> targets[:, :3].tolist(), torch.equal(targets[:, 3:], ids[:, :-3])
        ([[-100, -100, -100], [-100, -100, -100]], True)
    """
    n = _checks.positive_number("num_examples", num_examples, integer=True)
    L = _checks.positive_number("length", length, integer=True)
    K = _checks.positive_number("offset", offset, integer=True)
    V = _checks.positive_number("vocab_size", vocab_size, integer=True)
    ids = torch.randint(0, V, (n, L), generator=generator)
    targets = torch.roll(ids, K, dims=1)
    targets[:, :K] = -100
    return ids, targets
