"""Exercises of serving attention: the bytes of a KV cache.

Expected answers come from the package functions bound here at import time, so a
learner who reassigns ``attn_course.flash.merge_attention`` cannot move the target.
"""

from __future__ import annotations

import torch

from ..multihead import kv_cache_bytes as _kv_cache_bytes
from ._core import Case, Exercise


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731


# --- serving.kv_bytes --------------------------------------------------------------------------------
# Mistakes: forgetting the factor 2 (keys and values); using the query heads instead of the KV heads
# (GQA), or num_heads // num_kv_heads; forgetting the batch or the bytes per value. The cases are
# chosen so that these give different numbers, and a hint is given only when one mistake fits.

def _kv_solution(num_layers, num_heads, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value):
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch_size * bytes_per_value


def _kv_expected(num_layers, num_heads, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value):
    return _kv_cache_bytes(num_layers, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value)


def _kv_cases():
    return [Case(f"layers {a}, heads {b}, kv heads {c}, head_dim {d}, L {e}, batch {f}, {g} bytes",
                 (a, b, c, d, e, f, g))
            for a, b, c, d, e, f, g in ((32, 32, 4, 128, 8192, 3, 1),     # GQA with 4 KV heads, an 8-bit cache: each mistake differs
                                        (12, 12, 12, 64, 1024, 3, 4),     # GPT-2-small-like, MHA, float32
                                        (24, 16, 1, 128, 32768, 2, 2),    # MQA
                                        (2, 4, 2, 16, 10, 3, 1))]


def _kv_hint(case, got, expected):
    L_, H, G, d, T, B, nb = case.args
    if not isinstance(got, (int, float)) or isinstance(got, bool):
        return None
    mistakes = {   # what each usual mistake gives on this case: hint only when one of them matches
        "a cache stores keys AND values: twice the bytes of the keys.": expected / 2,
        "with grouped-query attention only num_kv_heads heads of keys and values are cached.": expected * H / G,
        "the number of KV heads is num_kv_heads itself, not num_heads // num_kv_heads.": expected * (H // G) / G,
        "every sequence in the batch has its own cache: multiply by batch_size.": expected / B,
        "count bytes, not values: multiply by bytes_per_value.": expected / nb,
    }
    matches = [hint for hint, value in mistakes.items() if value != expected and got == value]
    if len(matches) == 1:
        return matches[0]
    if matches:
        return "this value fits several mistakes: " + " Or: ".join(matches)
    return None


EXERCISES = [
    Exercise("serving.kv_bytes",
             "kv_bytes(num_layers, num_heads, num_kv_heads, head_dim, seq_len, batch_size, bytes_per_value) -> int",
             _kv_cases, _kv_expected, _kv_solution, _kv_hint, atol=0, rtol=0),
]
