r"""Chapter 9, serving attention: the KV cache, paging, shared prefixes, split-K decoding, sinks.

A server decoding many sequences at once is limited by the keys and values it keeps:
every generated token reads all of its sequence's cache. This module holds the caches
and the attention functions that read them, each equal to dense attention:

* :class:`KVCache` (grown by copying), :class:`ContiguousKVCache` (reserved, or grown by
  doubling), :class:`PagedKVCache` (fixed-size blocks from a shared pool, vLLM, Kwon et al.
  2023), :class:`PrefixSharingKVCache` (blocks shared between sequences with reference
  counts, copied before a write: copy-on-write), :class:`SinkKVCache` (StreamingLLM's sinks
  plus a window, Xiao et al. 2023) and :class:`QuantizedKVCache` (int8 with scales);
* :func:`paged_attention` reads a paged cache block by block through a block table and
  merges the per-block results with their log-sum-exp (never gathering a contiguous copy);
* :func:`split_kv_attention` is FlashDecoding's split-K: one query's keys cut into chunks,
  each attended independently, merged the same way;
* ``sinks=`` (both functions) adds gpt-oss's learned sinks: one more merge part per head with
  the log-sum-exp ``sink_h`` and a zero value;
* :func:`quantize_kv` / :func:`dequantize_kv` (symmetric absmax, per token or per channel),
  :func:`kv_cache_bytes`, :func:`decode_intensity` and :func:`streaming_mask`.

The merge is chapter 8's: for attention over disjoint sets of keys with outputs :math:`o_i`
and log-sum-exps :math:`\ell_i`, :math:`\ell = \log\sum_i e^{\ell_i}` and
:math:`o = \sum_i e^{\ell_i - \ell} o_i` (:func:`attn_course.flash.merge_attention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import _checks
from .flash import attention_with_lse, merge_attention

__all__ = [
    "KVCache",
    "ContiguousKVCache",
    "PagedKVCache",
    "PrefixSharingKVCache",
    "SinkKVCache",
    "QuantizedKVCache",
    "kv_cache_bytes",
    "decode_intensity",
    "split_kv_attention",
    "paged_attention",
    "streaming_mask",
    "quantize_kv",
    "dequantize_kv",
]


# --- bytes and arithmetic intensity ----------------------------------------------------------------

def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int,
                   batch_size: int = 1, bytes_per_value: int = 2) -> int:
    r"""Memory of a decoding key/value cache: ``2 (K and V) x layers x kv heads x head_dim x L x B x bytes``.

    .. math:: M = 2\, N_\text{layers}\, G\, d\, L\, B\, b

    Example:
        A model shaped like Llama 2 7B (32 layers, 32 KV heads of 128), 4096 tokens in 16-bit
        numbers; with 8 KV heads (grouped-query attention) a quarter of it:

        >>> from attn_course.serving import kv_cache_bytes
        >>> kv_cache_bytes(num_layers=32, num_kv_heads=32, head_dim=128, seq_len=4096) / 2**30   # GiB
        2.0
        >>> kv_cache_bytes(32, 8, 128, 4096) / 2**30, kv_cache_bytes(32, 8, 128, 4096, batch_size=8) / 2**30
        (0.5, 4.0)
    """
    args = dict(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                seq_len=seq_len, batch_size=batch_size, bytes_per_value=bytes_per_value)
    for name, v in args.items():
        _checks.positive_number(name, v, integer=True)
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch_size * bytes_per_value


def decode_intensity(num_heads: int, num_kv_heads: int, *, bytes_per_value: float = 2,
                     num_queries: int = 1) -> float:
    r"""FLOPs per byte of cache read by attention in one decoding step (the roofline's x-axis).

    Each of the ``T`` cached tokens holds a key and a value of ``d`` numbers per KV head,
    ``2 G d b`` bytes (``b`` bytes per value), and is used by the ``H / G`` query heads of
    its group and by each of the ``n`` queries (``n = 1`` for a decode step, ``k + 1`` when
    verifying ``k`` drafted tokens): ``2 d`` FLOPs for the score and ``2 d`` for the weighted
    sum, per query head and query. So

    .. math:: I = \frac{4 H d n}{2 G d b} = \frac{2 n H}{G b}\ \text{FLOP/byte},

    independent of ``d`` and ``T`` (queries and outputs, ``O(1)`` in ``T``, are left out).
    Batching sequences does not raise it: each sequence reads its own cache.

    Example:
        >>> from attn_course.serving import decode_intensity
        >>> decode_intensity(num_heads=32, num_kv_heads=32)     # multi-head, 16-bit: 1 FLOP per byte read
        1.0
        >>> decode_intensity(32, 8), decode_intensity(32, 8, num_queries=5)   # GQA; verifying 4 drafted tokens
        (4.0, 20.0)
        >>> decode_intensity(32, 8, bytes_per_value=1)          # an 8-bit cache doubles it
        8.0
    """
    H = _checks.positive_number("num_heads", num_heads, integer=True)
    G = _checks.positive_number("num_kv_heads", num_kv_heads, integer=True)
    if H % G:
        raise ValueError(f"num_kv_heads={G} must divide num_heads={H}")
    b = _checks.positive_number("bytes_per_value", bytes_per_value)
    n = _checks.positive_number("num_queries", num_queries, integer=True)
    return 2 * n * H / (G * b)


# --- contiguous caches -----------------------------------------------------------------------------

@dataclass
class KVCache:
    r"""Keys and values of the tokens decoded so far, ``(B, G, T, d)`` each (``G`` KV heads).

    Decoding token ``T`` needs the keys and values of every earlier token,

    .. math:: o_T = \mathrm{softmax}\Big(\frac{q_T K_{1:T}^\top}{\sqrt d}\Big) V_{1:T},
              \qquad K_{1:T} = [K_{1:T-1};\, k_T],

    so they are kept rather than recomputed: the incremental decoding of the Transformer
    (Vaswani et al., 2017), whose memory cost Pope et al. (2023) analyse. Grown by copying:
    every :meth:`append` concatenates, which writes the old cache again; ``copied_bytes``
    counts those bytes (the price of holding no spare room).

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.serving import KVCache
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 1, 2, 5, 4).unbind(0)     # B=1, G=2 heads, T=5 tokens, d=4
        >>> cache, steps = KVCache(), []
        >>> for t in range(5):                                  # decode: one token per step
        ...     keys, values = cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        ...     steps.append(F.scaled_dot_product_attention(q[:, :, t:t + 1], keys, values))
        >>> torch.allclose(torch.cat(steps, 2), F.scaled_dot_product_attention(q, k, v, is_causal=True),
        ...                atol=1e-6)
        True
        >>> cache.length, cache.nbytes           # 5 tokens x 2 heads x 4 numbers x 4 bytes x (K, V)
        (5, 320)
        >>> cache.copied_bytes                   # 1 + 2 + 3 + 4 old tokens rewritten, 64 bytes each
        640
    """

    key: torch.Tensor | None = None
    value: torch.Tensor | None = None
    copied_bytes: int = 0

    @property
    def length(self) -> int:
        return 0 if self.key is None else self.key.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache (keys and values)."""
        return 0 if self.key is None else self.key.nbytes + self.value.nbytes

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new tokens' keys and values; return all of them."""
        if self.key is None:
            self.key, self.value = key, value
        else:
            self.copied_bytes += self.nbytes
            self.key = torch.cat([self.key, key], dim=2)
            self.value = torch.cat([self.value, value], dim=2)
        return self.key, self.value


class ContiguousKVCache:
    r"""One sequence's keys and values in one contiguous buffer ``(G, capacity, d)``, with spare room.

    ``growth="reserve"``: the buffer is allocated once for ``capacity`` tokens (the longest
    answer allowed) and never moves; appending past it raises. ``growth="double"``: it starts
    at ``capacity`` and doubles when full, copying what it holds (``copied_bytes``), as a
    growable array does. ``nbytes`` is what the buffer reserves, ``used_bytes`` what the
    tokens fill: with capacity ``C``, ``T`` tokens and ``b`` bytes per number,

    .. math:: \text{nbytes} = 2\, G\, C\, d\, b, \qquad \text{used\_bytes} = 2\, G\, T\, d\, b .

    Reserving the longest length for every request is how serving systems held the cache
    before paging; vLLM (Kwon et al., 2023) measures the memory it wastes
    (:class:`PagedKVCache`).

    Example:
        >>> import torch
        >>> from attn_course.serving import ContiguousKVCache
        >>> cache = ContiguousKVCache(num_kv_heads=2, head_dim=4, capacity=2, growth="double")
        >>> for t in range(5):
        ...     cache.append(torch.randn(2, 1, 4), torch.randn(2, 1, 4))
        >>> cache.length, cache.capacity, tuple(cache.key.shape)   # grown 2 -> 4 -> 8 slots
        (5, 8, (2, 5, 4))
        >>> cache.used_bytes, cache.nbytes, cache.copied_bytes    # 64 bytes a token; 2 then 4 copied
        (320, 512, 384)
        >>> reserved = ContiguousKVCache(2, 4, capacity=1)        # growth="reserve": never moves
        >>> reserved.append(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
        >>> reserved.append(torch.zeros(2, 1, 4), torch.zeros(2, 1, 4))
        Traceback (most recent call last):
            ...
        ValueError: the cache reserved capacity=1 tokens but needs 2
    """

    GROWTH = ("reserve", "double")

    def __init__(self, num_kv_heads: int, head_dim: int, capacity: int, *, growth: str = "reserve",
                 dtype: torch.dtype = torch.float32, device=None):
        G = _checks.positive_number("num_kv_heads", num_kv_heads, integer=True)
        d = _checks.positive_number("head_dim", head_dim, integer=True)
        capacity = _checks.positive_number("capacity", capacity, integer=True)
        if growth not in self.GROWTH:
            raise ValueError(f"growth must be one of {self.GROWTH}, got {growth!r}")
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        self.growth = growth
        self._key = torch.zeros(G, capacity, d, dtype=dtype, device=device)
        self._value = torch.zeros(G, capacity, d, dtype=dtype, device=device)
        self.length = 0
        self.copied_bytes = 0

    @property
    def capacity(self) -> int:
        return self._key.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes reserved by the buffer (keys and values), used or not."""
        return self._key.nbytes + self._value.nbytes

    @property
    def used_bytes(self) -> int:
        return self.nbytes * self.length // self.capacity

    @property
    def key(self) -> torch.Tensor:
        return self._key[:, :self.length]

    @property
    def value(self) -> torch.Tensor:
        return self._value[:, :self.length]

    def append(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write the new tokens' ``key``, ``value`` ``(G, T_new, d)``."""
        _check_new_tokens(key, value, self._key.shape[0], self._key.shape[2])
        end = self.length + key.shape[1]
        if end > self.capacity:
            if self.growth == "reserve":
                raise ValueError(f"the cache reserved capacity={self.capacity} tokens but needs {end}")
            new = max(2 * self.capacity, end)
            self.copied_bytes += self.used_bytes
            for name in ("_key", "_value"):
                old = getattr(self, name)
                grown = old.new_zeros(old.shape[0], new, old.shape[2])
                grown[:, :self.length] = old[:, :self.length]
                setattr(self, name, grown)
        self._key[:, self.length:end] = key.to(self._key)
        self._value[:, self.length:end] = value.to(self._value)
        self.length = end


def _check_new_tokens(key, value, G, d):
    for name, x in (("key", key), ("value", value)):
        _checks.float_tensor(name, x, ndim=3)
        if x.shape[0] != G or x.shape[2] != d:
            raise ValueError(f"{name} must be (num_kv_heads={G}, T_new, head_dim={d}), got {tuple(x.shape)}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have one shape, got {tuple(key.shape)} and {tuple(value.shape)}")


# --- paged caches ----------------------------------------------------------------------------------

class PagedKVCache:
    r"""A paged key/value cache (vLLM, Kwon et al., 2023): fixed-size blocks from one shared pool.

    Instead of one contiguous ``(G, T, d)`` buffer per sequence, grown by copying or
    reserved for the longest possible length, the cache owns a pool of
    ``num_blocks`` blocks of ``block_size`` token slots each. Every sequence has a
    *block table*: the list of pool blocks that hold its tokens, in order. Token
    ``t`` of a sequence lives in block ``table[t // block_size]``, slot
    ``t % block_size``. Only a sequence's last block can be partly empty, so at most
    ``block_size - 1`` slots per sequence are wasted (internal fragmentation), and a
    finished sequence returns its blocks to the pool at once.

    :meth:`tables` gives the block tables and lengths that :func:`~attn_course.serving.paged_attention` reads,
    with ``key_pool``, ``value_pool`` ``(N_blocks, G, block_size, d)``. ``ref_counts[i]`` is
    the number of sequences whose table holds block ``i`` (1 or 0 here;
    :class:`~attn_course.serving.PrefixSharingKVCache` shares blocks).

    .. math:: \text{token } t \text{ of a sequence} \mapsto
              (\text{table}[\lfloor t / b \rfloor],\ t \bmod b), \qquad
              \text{slots allocated} = b \lceil T / b \rceil < T + b

    for a sequence of ``T`` tokens and blocks of ``b`` slots.

    Args:
        num_blocks: blocks in the pool.
        block_size: token slots per block.
        num_kv_heads: ``G``, the key/value heads of a token.
        head_dim: ``d``, the width of one head's key (and value).
        dtype: the pool's floating-point dtype.
        device: the pool's device.

    Example:
        >>> import torch
        >>> from attn_course.serving import PagedKVCache
        >>> _ = torch.manual_seed(0)
        >>> cache = PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=2, head_dim=4)
        >>> k, v = torch.randn(2, 2, 6, 4).unbind(0)                # 6 tokens, (G, T, d) each
        >>> cache.append("a", k, v)
        >>> cache.append("b", k[:, :3], v[:, :3])
        >>> cache.block_tables
        {'a': [0, 1], 'b': [2]}
        >>> torch.equal(cache.key_pool[1, :, 5 % 4], k[:, 5])       # token 5 of "a": block table[5 // 4], slot 5 % 4
        True
        >>> cache.usage()                                           # 9 tokens in 3 blocks of 4
        {'used_slots': 9, 'allocated_slots': 12, 'fragmentation': 0.25, 'free_blocks': 5}
        >>> cache.free("a")
        >>> cache.free_blocks                                       # its blocks are back in the pool
        [3, 4, 5, 6, 7, 0, 1]
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        self.num_blocks = _checks.positive_number("num_blocks", num_blocks, integer=True)
        self.block_size = _checks.positive_number("block_size", block_size, integer=True)
        G = _checks.positive_number("num_kv_heads", num_kv_heads, integer=True)
        d = _checks.positive_number("head_dim", head_dim, integer=True)
        if dtype not in _checks.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        shape = (self.num_blocks, G, self.block_size, d)
        self.key_pool = torch.zeros(shape, dtype=dtype, device=device)     # (N_blocks, G, b, d)
        self.value_pool = torch.zeros(shape, dtype=dtype, device=device)
        self.free_blocks = list(range(self.num_blocks))
        self.ref_counts = [0] * self.num_blocks
        self.block_tables: dict = {}
        self.lengths: dict = {}

    @property
    def slot_bytes(self) -> int:
        """Bytes of one token slot (its keys and values for every KV head)."""
        return 2 * self.key_pool[0, :, 0].nbytes

    def _allocate(self) -> int:
        block = self.free_blocks.pop(0)
        self.ref_counts[block] = 1
        return block

    def _blocks_needed(self, seq_id, new: int) -> int:
        """Free blocks an append of ``new`` tokens takes (new blocks; a subclass adds copies)."""
        table, length = self.block_tables.get(seq_id, []), self.lengths.get(seq_id, 0)
        return -(-(length + new) // self.block_size) - len(table)

    def _before_write(self, seq_id) -> None:
        """Hook run before tokens are written into sequence ``seq_id``'s blocks."""

    def append(self, seq_id, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write the new tokens' ``key``, ``value`` ``(G, T_new, d)`` of sequence ``seq_id``."""
        G, b, d = self.key_pool.shape[1], self.block_size, self.key_pool.shape[3]
        _check_new_tokens(key, value, G, d)
        new = key.shape[1]
        needed = self._blocks_needed(seq_id, new)
        if needed > len(self.free_blocks):
            raise ValueError(f"the pool has {len(self.free_blocks)} free blocks but sequence {seq_id!r} needs "
                             f"{needed} more for {new} new tokens: free a finished sequence or make num_blocks larger")
        table = self.block_tables.setdefault(seq_id, [])
        length = self.lengths.setdefault(seq_id, 0)
        self._before_write(seq_id)
        table.extend(self._allocate() for _ in range(-(-(length + new) // b) - len(table)))
        pos = torch.arange(length, length + new)
        blocks = torch.tensor(table, dtype=torch.long)[pos // b].to(self.key_pool.device)
        slots = (pos % b).to(self.key_pool.device)
        self.key_pool[blocks, :, slots] = key.transpose(0, 1).to(self.key_pool)    # (T_new, G, d) rows
        self.value_pool[blocks, :, slots] = value.transpose(0, 1).to(self.value_pool)
        self.lengths[seq_id] = length + new

    def _known(self, seq_id) -> None:
        if seq_id not in self.block_tables:
            raise KeyError(f"unknown seq_id {seq_id!r}; cached sequences: {list(self.block_tables)}")

    def gather(self, seq_id) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``seq_id``'s keys and values, ``(G, T, d)`` each, copied out through its block table.

        For checking only: :func:`~attn_course.serving.paged_attention` reads the blocks in place.
        """
        self._known(seq_id)
        table = torch.tensor(self.block_tables[seq_id], dtype=torch.long, device=self.key_pool.device)
        T = self.lengths[seq_id]
        G, d = self.key_pool.shape[1], self.key_pool.shape[3]

        def read(pool):   # (n, G, b, d) -> (G, n * b, d) -> the first T tokens
            return pool[table].transpose(0, 1).reshape(G, -1, d)[:, :T]

        return read(self.key_pool), read(self.value_pool)

    def tables(self, seq_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """``(block_table (B, max_blocks) int64, lengths (B,) int64)`` of ``seq_ids``, for
        :func:`~attn_course.serving.paged_attention`; rows shorter than the longest are padded with ``-1``.

        Example:
            >>> import torch
            >>> from attn_course.serving import PagedKVCache
            >>> cache = PagedKVCache(num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2)
            >>> cache.append(0, torch.zeros(1, 10, 2), torch.zeros(1, 10, 2))
            >>> cache.append(1, torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))
            >>> cache.tables([0, 1])
            (tensor([[ 0,  1,  2],
                    [ 3, -1, -1]]), tensor([10,  3]))
        """
        seq_ids = list(seq_ids)
        for s in seq_ids:
            self._known(s)
        width = max((len(self.block_tables[s]) for s in seq_ids), default=0)
        table = torch.full((len(seq_ids), width), -1, dtype=torch.long)
        for row, s in enumerate(seq_ids):
            table[row, :len(self.block_tables[s])] = torch.tensor(self.block_tables[s], dtype=torch.long)
        lengths = torch.tensor([self.lengths[s] for s in seq_ids], dtype=torch.long)
        return table.to(self.key_pool.device), lengths.to(self.key_pool.device)

    def free(self, seq_id) -> None:
        """Drop sequence ``seq_id``; blocks no other sequence holds return to the pool."""
        self._known(seq_id)
        for block in self.block_tables.pop(seq_id):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks.append(block)
        del self.lengths[seq_id]

    def usage(self) -> dict[str, int | float]:
        """Token slots used and allocated, and the share of allocated slots left empty.

        ``used_slots`` counts every sequence's tokens (a shared token once per sequence);
        ``allocated_slots`` counts the blocks taken from the pool, each once.
        """
        used = sum(self.lengths.values())
        allocated = (self.num_blocks - len(self.free_blocks)) * self.block_size
        return {"used_slots": used, "allocated_slots": allocated,
                "fragmentation": 0.0 if allocated == 0 else max(0.0, 1 - used / allocated),
                "free_blocks": len(self.free_blocks)}


class PrefixSharingKVCache(PagedKVCache):
    r"""A paged cache whose sequences can share blocks: a common prompt is stored once.

    :meth:`fork` starts sequence ``child`` as a copy of ``parent`` without copying anything:
    the child's block table lists the parent's blocks, whose reference counts go up by one.
    Blocks are read-only while shared. Before a sequence writes into a block that another
    sequence also holds (``ref_counts > 1``: in practice the partly filled last block of a
    shared prompt), the block is copied into a free one, the copy replaces it in the writer's
    table, and the old block's count goes down by one: copy-on-write, as vLLM does for
    parallel sampling and shared prefixes (Kwon et al., 2023). :meth:`~PagedKVCache.free` decrements the
    counts; a block returns to the pool when its count reaches 0. ``copied_blocks`` counts
    the copies made. With ``\text{ref}(i)`` the number of sequences whose table holds block ``i``:

    .. math:: \text{ref}(i) = |\{s : i \in \text{table}_s\}|, \qquad
              i \text{ is free} \iff \text{ref}(i) = 0, \qquad
              \text{a write into } i \text{ copies it first} \iff \text{ref}(i) > 1 .

    Example:
        >>> import torch
        >>> from attn_course.serving import PrefixSharingKVCache
        >>> _ = torch.manual_seed(0)
        >>> cache = PrefixSharingKVCache(num_blocks=8, block_size=4, num_kv_heads=1, head_dim=2)
        >>> prompt = torch.randn(1, 6, 2)                      # 6 tokens: a full block and half of one
        >>> cache.append("prompt", prompt, prompt)
        >>> cache.fork("prompt", "answer 1")
        >>> cache.fork("prompt", "answer 2")
        >>> cache.block_tables["answer 1"], cache.ref_counts[:2]   # three sequences, one copy of the prompt
        ([0, 1], [3, 3])
        >>> token = torch.randn(1, 1, 2)
        >>> cache.append("answer 1", token, token)              # block 1 is shared and partly filled: copied
        >>> cache.block_tables["answer 1"], cache.ref_counts[:3], cache.copied_blocks
        ([0, 2], [3, 2, 1], 1)
        >>> torch.equal(cache.gather("answer 1")[0][:, :6], prompt), torch.equal(cache.gather("prompt")[0], prompt)
        (True, True)
    """

    def __init__(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.copied_blocks = 0

    def fork(self, parent, child) -> None:
        """Start sequence ``child`` holding ``parent``'s tokens, sharing its blocks."""
        self._known(parent)
        if child in self.block_tables:
            raise ValueError(f"child {child!r} is already a cached sequence")
        self.block_tables[child] = list(self.block_tables[parent])
        self.lengths[child] = self.lengths[parent]
        for block in self.block_tables[child]:
            self.ref_counts[block] += 1

    def _writes_shared_block(self, seq_id) -> bool:
        table, length = self.block_tables.get(seq_id, []), self.lengths.get(seq_id, 0)
        return length % self.block_size != 0 and self.ref_counts[table[-1]] > 1

    def _blocks_needed(self, seq_id, new: int) -> int:
        return super()._blocks_needed(seq_id, new) + int(self._writes_shared_block(seq_id))

    def _before_write(self, seq_id) -> None:
        table = self.block_tables[seq_id]
        if self.lengths[seq_id] % self.block_size:  # the partly filled last block is the one written into
            copied = _copy_on_write(table, len(table) - 1, self.ref_counts, self._take_free)
            if copied is not None:
                old, new = copied
                self.key_pool[new] = self.key_pool[old]
                self.value_pool[new] = self.value_pool[old]
                self.copied_blocks += 1

    def _take_free(self) -> int:
        return self.free_blocks.pop(0)


def _copy_on_write(table: list, index: int, ref_counts, take_free) -> tuple[int, int] | None:
    """The copy-on-write rule for a write into ``table[index]``: if that block is shared
    (``ref_counts > 1``), take a free block, put it in the table in its place, move one
    reference from the old block to the new one and return ``(old, new)`` (the caller copies
    the data); else return None and the block is written in place."""
    old = table[index]
    if ref_counts[old] <= 1:
        return None
    new = take_free()
    ref_counts[old] -= 1
    ref_counts[new] = 1
    table[index] = new
    return old, new


# --- sinks and windows -----------------------------------------------------------------------------

class SinkKVCache(KVCache):
    r"""A decoding cache of fixed size: the first ``num_sinks`` tokens and the last ``window`` ones.

    StreamingLLM (Xiao et al., 2023): a pure sliding window evicts the first tokens, on
    which trained language models put much of their attention ("attention sinks"), and
    the output drifts; keeping those few tokens keeps it close to full attention while
    memory stays flat at ``num_sinks + window`` tokens. A :class:`KVCache` (keys and values
    ``(B, G, T, d)``, ``length``, ``nbytes``) that evicts from the middle; ``seen`` counts
    every token appended. At step ``i`` the newest query reads what :func:`~attn_course.serving.streaming_mask`
    allows in row ``i``: with ``S = num_sinks`` and ``W = window``, the keys

    .. math:: \{\, j : j < S \,\} \cup \{\, j : i - W < j \le i \,\}, \qquad
              \text{at most } S + W \text{ tokens.}

    Example:
        >>> import torch
        >>> from attn_course.serving import SinkKVCache, streaming_mask
        >>> cache = SinkKVCache(num_sinks=2, window=3)
        >>> for t in range(8):
        ...     position = torch.full((1, 1, 1, 1), float(t))    # a key that holds its own position
        ...     keys, _ = cache.append(position, position)
        >>> keys.flatten().tolist(), cache.length, cache.seen
        ([0.0, 1.0, 5.0, 6.0, 7.0], 5, 8)
        >>> streaming_mask(8, num_sinks=2, window=3)[7].nonzero().flatten().tolist()   # what query 7 may read
        [0, 1, 5, 6, 7]
    """

    def __init__(self, num_sinks: int = 4, window: int = 64):
        super().__init__()
        if isinstance(num_sinks, bool) or not isinstance(num_sinks, int) or num_sinks < 0:
            raise ValueError(f"num_sinks must be an int >= 0, got {num_sinks!r}")
        self.num_sinks = num_sinks
        self.window = _checks.positive_number("window", window, integer=True)
        self.seen = 0

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new tokens, evict from the middle, and return what the next query may attend to."""
        super().append(key, value)
        self.seen += key.shape[2]
        if self.length > self.num_sinks + self.window:
            s, w = self.num_sinks, self.window
            self.key = torch.cat([self.key[:, :, :s], self.key[:, :, -w:]], dim=2)
            self.value = torch.cat([self.value[:, :, :s], self.value[:, :, -w:]], dim=2)
        return self.key, self.value


def streaming_mask(length: int, num_sinks: int, window: int, *, device=None) -> torch.Tensor:
    """``(L, L)`` bool: query ``i`` may read key ``j <= i`` when ``j < num_sinks`` or ``i - j < window``.

    Row ``i`` is what a :class:`SinkKVCache` ``(num_sinks, window)`` holds when token ``i`` is
    decoded (``num_sinks=0``: a plain sliding window of the last ``window`` tokens), so one
    masked pass over a sequence equals decoding it token by token with that cache, every key
    kept at its true position.

    Example:
        >>> from attn_course.serving import streaming_mask
        >>> streaming_mask(6, num_sinks=1, window=2).int()       # token 0 is the sink
        tensor([[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [1, 0, 1, 1, 0, 0],
                [1, 0, 0, 1, 1, 0],
                [1, 0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    length = _checks.positive_number("length", length, integer=True)
    window = _checks.positive_number("window", window, integer=True)
    if isinstance(num_sinks, bool) or not isinstance(num_sinks, int) or num_sinks < 0:
        raise ValueError(f"num_sinks must be an int >= 0, got {num_sinks!r}")
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & ((j < num_sinks) | (i - j < window))


# --- quantised caches ------------------------------------------------------------------------------

QUANT_AXES = ("token", "channel")


def quantize_kv(x: torch.Tensor, *, axis: str = "token", bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Symmetric absmax quantisation of keys or values ``x (..., T, d)`` to ``bits``-bit integers.

    .. math:: s = \frac{\max |x|}{2^{b-1} - 1}, \qquad q = \mathrm{round}(x / s) \in [-(2^{b-1} - 1),\ 2^{b-1} - 1]

    with one scale per token (``axis="token"``: the max over the ``d`` channels, ``scale
    (..., T, 1)``) or per channel (``axis="channel"``: the max over the ``T`` tokens, ``scale
    (..., 1, d)``). KIVI (Liu et al., 2024) quantises keys per channel, because a few
    channels of trained models' keys hold much larger values than the rest, and values per
    token. A group of zeros gets the scale 0 and ``q = 0``. Returns ``(q int8, scale)``,
    ``scale`` in ``x``'s dtype; :func:`dequantize_kv` inverts it up to ``s / 2`` per entry.

    Example:
        >>> import torch
        >>> from attn_course.serving import quantize_kv
        >>> x = torch.tensor([[0.3, -1.0, 0.1], [2.0, 0.0, -4.0]])   # 2 tokens, 3 channels
        >>> q, scale = quantize_kv(x)                                 # per token: s = max |x| / 127
        >>> q
        tensor([[  38, -127,   13],
                [  64,    0, -127]], dtype=torch.int8)
        >>> (scale * 127).flatten().tolist()
        [1.0, 4.0]
        >>> q, scale = quantize_kv(x, axis="channel", bits=4)         # per channel: s = max |x| / 7
        >>> q.tolist(), (scale * 7).flatten().tolist()
        ([[1, -7, 0], [7, 0, -7]], [2.0, 1.0, 4.0])
    """
    _checks.float_tensor("x", x, min_ndim=2)
    if axis not in QUANT_AXES:
        raise ValueError(f"axis must be one of {QUANT_AXES}, got {axis!r}")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8 (stored in int8), got {bits!r}")
    qmax = 2 ** (bits - 1) - 1
    dim = -1 if axis == "token" else -2
    scale = x.abs().amax(dim=dim, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / safe).clamp(-qmax, qmax).to(torch.int8)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale``: the inverse of :func:`quantize_kv`, in the dtype of ``scale``.

    Example:
        >>> import torch
        >>> from attn_course.serving import dequantize_kv, quantize_kv
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(2, 16, 64)                                # (G, T, d)
        >>> q, scale = quantize_kv(x)
        >>> error = (dequantize_kv(q, scale) - x).abs()
        >>> bool((error <= scale / 2 + 1e-7).all())                  # at most half a step per entry
        True
        >>> dequantize_kv(q, scale.half()).dtype
        torch.float16
    """
    if not isinstance(q, torch.Tensor) or q.dtype != torch.int8:
        raise TypeError(f"q must be an int8 tensor, got {getattr(q, 'dtype', type(q).__name__)}")
    _checks.float_tensor("scale", scale)
    return q.to(scale.dtype) * scale


class QuantizedKVCache:
    r"""A contiguous decoding cache that stores keys and values as ``bits``-bit integers with
    one scale per token (:func:`quantize_kv` with ``axis="token"``), so each token is quantised
    once, when it arrives:

    .. math:: s_t = \frac{\max_c |x_{t,c}|}{2^{b-1} - 1}, \qquad
              q_{t,c} = \mathrm{round}(x_{t,c} / s_t), \qquad \hat x_{t,c} = s_t\, q_{t,c} .

    Per-token scales are what KIVI (Liu et al., 2024) uses for values; it quantises keys per
    channel, which needs a group of tokens before a scale is known (see :func:`quantize_kv`).

    ``append(key, value)`` takes ``(B, G, T_new, d)`` and returns the whole cache dequantised,
    ``(B, G, T, d)`` each, as the next attention reads it. ``nbytes`` counts the integers and
    the scales.

    Example:
        >>> import torch
        >>> from attn_course.serving import QuantizedKVCache
        >>> _ = torch.manual_seed(0)
        >>> cache = QuantizedKVCache(bits=8)
        >>> k = torch.randn(1, 2, 16, 64)                  # B=1, G=2, T=16, d=64
        >>> keys, values = cache.append(k, k)
        >>> tuple(keys.shape), cache.length
        ((1, 2, 16, 64), 16)
        >>> cache.nbytes, 2 * k.nbytes                     # int8 and a float32 scale per token, against float32
        (4352, 16384)
        >>> bool(((keys - k).abs() <= k.abs().amax(-1, keepdim=True) / 254 + 1e-7).all())   # half a step
        True
    """

    def __init__(self, bits: int = 8):
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits must be an int in 2..8 (stored in int8), got {bits!r}")
        self.bits = bits
        self.parts: dict[str, list] = {"key": [], "value": []}

    @property
    def length(self) -> int:
        return sum(q.shape[2] for q, _ in self.parts["key"])

    @property
    def nbytes(self) -> int:
        """Bytes held by the integers (one byte each; a real kernel packs ``bits < 8`` tighter) and the scales."""
        return sum(q.nbytes + s.nbytes for parts in self.parts.values() for q, s in parts)

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantise and store the new tokens ``(B, G, T_new, d)``; return the whole cache dequantised."""
        for name, x in (("key", key), ("value", value)):
            _checks.float_tensor(name, x, ndim=4)
            self.parts[name].append(quantize_kv(x, axis="token", bits=self.bits))
        return tuple(torch.cat([dequantize_kv(q, s) for q, s in self.parts[n]], dim=2) for n in ("key", "value"))


# --- attention over caches -------------------------------------------------------------------------

def _check_sinks(sinks, num_heads: int, ref: torch.Tensor) -> torch.Tensor | None:
    if sinks is None:
        return None
    _checks.float_tensor("sinks", sinks, ndim=1)
    if sinks.shape[0] != num_heads:
        raise ValueError(f"sinks must hold one logit per query head ({num_heads}), got shape {tuple(sinks.shape)}")
    if sinks.device != ref.device:
        raise ValueError(f"sinks is on {sinks.device} but the query is on {ref.device}")
    return sinks


def _merge_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor):
    """Merge learned sinks as one more part: log-sum-exp ``sinks`` (broadcast to ``lse``), a zero output."""
    sink_lse = sinks.to(lse.dtype).expand_as(lse)
    return merge_attention([out, torch.zeros_like(out)], [lse, sink_lse])


def split_kv_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_splits: int, *,
                       scale: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    r"""FlashDecoding's split-K: attention with the keys cut into ``num_splits`` chunks, merged.

    The ``L_k`` keys and values are split into ``num_splits`` contiguous chunks (sizes differ by
    at most one, as ``torch.tensor_split``); attention over each chunk gives :math:`o_s` and
    :math:`\ell_s` independently (on a GPU, in parallel: this is what fills the machine when
    ``B x H`` is small, Dao et al. 2023, "Flash-Decoding"), and

    .. math:: \ell = \log \sum_s e^{\ell_s}, \qquad o = \sum_s e^{\ell_s - \ell}\, o_s

    equals dense (non-causal) attention. ``sinks (H,)``, if given (inputs ``(..., H, L, d)``),
    adds gpt-oss's learned sink to every head: one more part with :math:`\ell = \text{sink}_h` and
    a zero output, i.e. softmax over the scores and one extra logit whose value is zero.

    Args:
        query: ``(..., L_q, d_k)``.
        key: ``(..., L_k, d_k)``.
        value: ``(..., L_k, d_v)``.
        num_splits: an int in ``1 .. L_k``.
        scale: the score scale, ``1 / sqrt(d_k)`` by default.
        sinks: ``(H,)`` learned sink logits, or None.

    Returns:
        ``(..., L_q, d_v)``.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.serving import split_kv_attention
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 4, 100, 16), torch.randn(1, 4, 100, 16)
        >>> out = split_kv_attention(q, k, v, num_splits=7)      # one decoding query, 7 chunks of 14 or 15 keys
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-6)
        True
        >>> scores = q @ k.transpose(-2, -1) / 4                 # a sink: one more logit (here 0), value zero
        >>> with_sink = torch.softmax(torch.cat([scores, torch.zeros(1, 4, 1, 1)], -1), -1)[..., :-1] @ v
        >>> torch.allclose(split_kv_attention(q, k, v, 7, sinks=torch.zeros(4)), with_sink, atol=1e-6)
        True
    """
    _checks.float_tensor("key", key, min_ndim=2)
    L_k = key.shape[-2]
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"num_splits must be an int, got {type(num_splits).__name__}")
    if not 1 <= num_splits <= L_k:
        raise ValueError(f"num_splits must be in 1..L_k={L_k} (key {tuple(key.shape)}), got {num_splits}")
    _checks.float_tensor("query", query, min_ndim=2)
    bounds = [(L_k * s) // num_splits for s in range(num_splits + 1)]
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        o, s = attention_with_lse(query, key[..., a:b, :], value[..., a:b, :], scale=scale)
        outs.append(o)
        lses.append(s)
    out, lse = merge_attention(outs, lses)
    if sinks is not None:
        if query.ndim < 3:
            raise ValueError(f"sinks needs inputs with a head axis (..., H, L, d); query is {tuple(query.shape)}")
        _check_sinks(sinks, query.shape[-3], query)
        out, _ = _merge_sinks(out, lse, sinks[:, None])
    return out


def _integer_tensor(name: str, x, ndim: int, device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be an integer tensor, got {type(x).__name__}") from None
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.long)


def paged_attention(query: torch.Tensor, key_blocks: torch.Tensor, value_blocks: torch.Tensor,
                    block_table: torch.Tensor, lengths: torch.Tensor, *, scale: float | None = None,
                    sinks: torch.Tensor | None = None) -> torch.Tensor:
    r"""Attention over a paged KV cache, computed block by block and merged: PagedAttention.

    Sequence ``b``'s keys are the first ``lengths[b]`` slots of the pool blocks
    ``block_table[b, 0], block_table[b, 1], ...`` in that order (token ``t`` in block
    ``block_table[b, t // block_size]``, slot ``t % block_size``); its ``L_q`` queries are its
    last ``L_q`` positions, ``lengths[b] - L_q .. lengths[b] - 1``, and attend causally
    (aligned to the end: query ``i`` reads keys ``t <= lengths[b] - L_q + i``; ``L_q = 1`` is a
    decode step, ``L_q = k + 1`` the verification of ``k`` drafted tokens). Block column ``j``
    is read for the whole batch at once, one block per sequence, and attended with its
    log-sum-exp; the results merge as in :func:`attn_course.flash.merge_attention`. No
    sequence's keys are ever copied into a contiguous tensor. Grouped-query attention: the
    pool holds ``H_kv`` heads, query head ``h`` reads KV head ``h // (H / H_kv)``. ``sinks
    (H,)`` adds learned sinks (see :func:`split_kv_attention`).

    Args:
        query: ``(B, H, L_q, d)``.
        key_blocks, value_blocks: the pool, ``(N_blocks, H_kv, block_size, d)`` and
            ``(N_blocks, H_kv, block_size, d_v)``; ``H_kv`` divides ``H``.
        block_table: integer ``(B, max_blocks)``; entries past a sequence's last block are
            ignored (pad them with ``-1``), the others must be in ``0 .. N_blocks - 1``.
        lengths: integer ``(B,)``, each in ``L_q .. max_blocks * block_size``.
        scale: the score scale, ``1 / sqrt(d)`` by default.
        sinks: ``(H,)`` learned sink logits, or None.

    Returns:
        ``(B, H, L_q, d_v)``, equal to dense causal attention over each sequence's keys.

    Example:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.serving import PagedKVCache, paged_attention
        >>> _ = torch.manual_seed(0)
        >>> cache = PagedKVCache(num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8)
        >>> for seq, length in enumerate([10, 3]):
        ...     cache.append(seq, torch.randn(2, length, 8), torch.randn(2, length, 8))
        >>> table, lengths = cache.tables([0, 1])
        >>> q = torch.randn(2, 4, 1, 8)                 # a decode step, H=4 query heads on G=2 KV heads
        >>> out = paged_attention(q, cache.key_pool, cache.value_pool, table, lengths)
        >>> tuple(out.shape)
        (2, 4, 1, 8)
        >>> dense = []
        >>> for seq in range(2):
        ...     k, v = (x.repeat_interleave(2, dim=0) for x in cache.gather(seq))   # (H, T, d)
        ...     dense.append(F.scaled_dot_product_attention(q[seq], k, v))
        >>> torch.allclose(out, torch.stack(dense), atol=1e-6)
        True
    """
    _checks.float_tensor("query", query, ndim=4)
    _checks.float_tensor("key_blocks", key_blocks, ndim=4)
    _checks.float_tensor("value_blocks", value_blocks, ndim=4)
    _checks.same_dtype_device(query=query, key_blocks=key_blocks, value_blocks=value_blocks)
    B, H, L_q, d = query.shape
    N, G, bs, d_k = key_blocks.shape
    if d_k != d or value_blocks.shape[:3] != key_blocks.shape[:3]:
        raise ValueError(f"key_blocks must be (N_blocks, H_kv, block_size, d={d}) and value_blocks "
                         f"(N_blocks, H_kv, block_size, d_v); got query {tuple(query.shape)}, key_blocks "
                         f"{tuple(key_blocks.shape)}, value_blocks {tuple(value_blocks.shape)}")
    if H % G:
        raise ValueError(f"the pool's H_kv={G} heads must divide the query's H={H} (key_blocks "
                         f"{tuple(key_blocks.shape)}, query {tuple(query.shape)})")
    table = _integer_tensor("block_table", block_table, 2, query.device)
    lengths = _integer_tensor("lengths", lengths, 1, query.device)
    if table.shape[0] != B or lengths.shape[0] != B:
        raise ValueError(f"block_table (B, max_blocks) and lengths (B,) need B={B} rows (query "
                         f"{tuple(query.shape)}); got block_table {tuple(table.shape)}, lengths {tuple(lengths.shape)}")
    held = table.shape[1] * bs
    if B and (lengths.max() > held or lengths.min() < L_q):
        raise ValueError(f"lengths must be in L_q={L_q} .. max_blocks * block_size={held} (a sequence "
                         f"holds its L_q queries' positions and no more tokens than its table's blocks); "
                         f"got lengths {lengths.tolist()}")
    used = -(-lengths // bs)                                                     # (B,) blocks in use
    in_use = torch.arange(table.shape[1], device=query.device)[None, :] < used[:, None]
    bad = in_use & ((table < 0) | (table >= N))
    if bad.any():
        b, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_table[{b}, {j}] = {int(table[b, j])} is not a block of the pool "
                         f"(0 .. {N - 1}); sequence {b} uses its first {int(used[b])} entries")
    if sinks is not None:
        _check_sinks(sinks, H, query)
    if scale is None:
        scale = 1.0 / math.sqrt(d)

    g = H // G
    q = query.view(B, G, g, L_q, d)                                              # head h = group h // g
    q_pos = lengths[:, None] - L_q + torch.arange(L_q, device=query.device)      # (B, L_q)
    slots = torch.arange(bs, device=query.device)
    out = lse = None
    for j in range(int(used.max()) if B else 0):
        ids = table[:, j].clamp(0, N - 1)                                        # one block per sequence
        k, v = key_blocks[ids][:, :, None], value_blocks[ids][:, :, None]        # (B, G, 1, bs, d)
        k_pos = j * bs + slots                                                   # (bs,)
        allowed = (k_pos[None, None, :] < lengths[:, None, None]) & (k_pos[None, None, :] <= q_pos[:, :, None])
        o, s = attention_with_lse(q, k, v, allowed[:, None, None], scale=scale)  # (B, G, g, L_q, d_v)
        out, lse = (o, s) if out is None else merge_attention([out, o], [lse, s])
    if out is None:                                                              # an empty batch
        return query.new_zeros(B, H, L_q, value_blocks.shape[-1])
    if sinks is not None:
        out, lse = _merge_sinks(out, lse, sinks.view(1, G, g, 1))
    return out.reshape(B, H, L_q, value_blocks.shape[-1])
