"""Benchmarks (``make bench``): side-by-side timings on this machine, reported as ratios.

Timings from shared machines are noisy; what counts is the ratio of two
implementations measured in the same run. Nothing here is asserted in tests.

Chapter 1: the course's materialised scaled dot-product attention (it returns
the ``L x L`` weights, for teaching) against PyTorch's fused
``scaled_dot_product_attention`` (which never stores them).
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from . import basics, get_device


def machine() -> str:
    dev = get_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return (f"{platform.platform()} | {name} | device {dev.type} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} CPU threads")


def _time(stmt: str, env: dict, min_run_time: float) -> float:
    return benchmark.Timer(stmt=stmt, globals=env).blocked_autorange(min_run_time=min_run_time).median


def sdpa(lengths=(128, 256, 512, 1024, 2048), batch=2, heads=4, dim=64, min_run_time=0.3):
    dev = get_device()
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    rows = []
    for L in lengths:
        q, k, v = (torch.randn(batch, heads, L, dim, device=dev, dtype=dtype) for _ in range(3))
        env = {"basics": basics, "F": F, "q": q, "k": k, "v": v}
        with torch.no_grad():
            ours = _time("basics.scaled_dot_product_attention(q, k, v, is_causal=True)", env, min_run_time)
            fused = _time("F.scaled_dot_product_attention(q, k, v, is_causal=True)", env, min_run_time)
        weights_mb = batch * heads * L * L * q.element_size() / 2**20
        rows.append((L, ours * 1e3, fused * 1e3, ours / fused, weights_mb))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn_course.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer sizes, shorter runs")
    args = parser.parse_args(argv)
    print("machine:", machine())
    print("\nChapter 1: materialised attention (returns weights) vs torch's fused SDPA, causal,"
          " B=2, H=4, d=64")
    print(f"{'L':>6} {'ours ms':>10} {'fused ms':>10} {'ours/fused':>11} {'weights MiB':>12}")
    lengths = (128, 512) if args.quick else (128, 256, 512, 1024, 2048)
    for L, ours, fused, ratio, mb in sdpa(lengths, min_run_time=0.1 if args.quick else 0.3):
        print(f"{L:>6} {ours:>10.3f} {fused:>10.3f} {ratio:>10.2f}x {mb:>12.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
