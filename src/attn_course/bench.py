"""Benchmarks (``make bench``): side-by-side timings on this machine, reported as ratios.

Timings on shared machines are noisy; what counts is the ratio of implementations
measured in the same run, and nothing here is asserted by the tests.

* Chapter 1: the course's materialised attention (it returns the weights) against
  PyTorch's fused ``scaled_dot_product_attention``.
* Chapter 6: every method of :mod:`attn_course.sparse` against dense SDPA and against
  SDPA given the pattern as a bool mask, for ``L`` in 1k .. 16k (B=1, H=8, d=64,
  window +-256), each configuration in a fresh process: median time, peak memory,
  ratios, max error against a float64 dense reference (on sampled query rows),
  achieved GFLOP/s as a share of the best dense rate this machine reaches, and the slope of time
  against ``L``. ``local-attention`` and compiled ``flex_attention`` join as baselines
  when installed. Results go to ``--out`` as JSON, a markdown table and a plot.
* Chapter 7: :func:`attn_course.flash.flash_attention` (causal, B=1, H=8, d=64) against
  materialised scores and PyTorch's fused SDPA, each length in a fresh process: time and
  peak memory, as ratios; and ring attention over 4 local processes (gloo) against one
  process: time and bytes each process sent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from . import basics, flash, get_device, sparse

__all__ = ["machine", "seconds", "sdpa", "reference_results", "peak_memory_mib", "peak_tensor_bytes",
           "matmul_peak_gflops", "run_one", "sparse_table", "plot", "run_sparse", "run_flash_one", "run_flash",
           "flash_table", "run_ring", "ring_table", "flash_reference_results", "main"]

B, H, D, WINDOW, BLOCK, GLOBALS = 1, 8, 64, 256, 64, 16
LENGTHS = (1024, 2048, 4096, 8192, 16384)


def machine() -> str:
    """One line naming this machine: platform, processor or GPU, device, torch, CPU threads."""
    dev = get_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return (f"{platform.platform()} | {name} | device {dev.type} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} CPU threads")


def seconds(fn, min_run_time: float = 0.2) -> float:
    """Median seconds of ``fn()`` on this machine, with all CPU threads (``torch.utils.benchmark``
    handles warm-up and CUDA synchronisation). The chapters time their cells with it."""
    return _time("fn()", {"fn": fn}, min_run_time)


def _time(stmt: str, env: dict, min_run_time: float) -> float:
    return benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def sdpa(lengths=(128, 256, 512, 1024, 2048), batch=2, heads=4, dim=64, min_run_time=0.3):
    """Chapter 1: (L, ours ms, fused ms, ours/fused, weights MiB) per length."""
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


# --- chapter 6 --------------------------------------------------------------------------------------

def _band_pairs(L: int, w: int) -> int:
    """Number of (i, j) with |i - j| <= w inside [0, L)."""
    w = min(w, L - 1)
    return L * (2 * w + 1) - w * (w + 1)


def _methods():
    """name -> (setup(L, q, k, v) -> call, row_mask(rows, L) -> bool (R, L) or None for dense, flops(L))."""
    dense_rows = None

    def band_rows(rows, L):
        return (rows[:, None] - torch.arange(L)[None, :]).abs() <= WINDOW

    def layout_rows(layout_fn):
        def f(rows, L):
            lay = layout_fn(L // BLOCK)
            return lay[rows // BLOCK].repeat_interleave(BLOCK, dim=1)
        return f

    bigbird = lambda nb: sparse.bigbird_layout(nb)  # noqa: E731
    band_flops = lambda L: 4 * B * H * D * _band_pairs(L, WINDOW)  # noqa: E731

    def global_rows(rows, L):
        g = torch.linspace(0, L - 1, GLOBALS).long()
        m = band_rows(rows, L)
        m[:, g] = True
        m[torch.isin(rows, g)] = True
        return m

    methods = {
        "dense SDPA": (lambda L, q, k, v: lambda: F.scaled_dot_product_attention(q, k, v),
                       dense_rows, lambda L: 4 * B * H * D * L * L),
        "SDPA + band mask": (lambda L, q, k, v: lambda: F.scaled_dot_product_attention(
                                 q, k, v, attn_mask=sparse.sliding_window_mask(L, WINDOW).to(q.device)),
                             band_rows, band_flops),
        "sliding_window": (lambda L, q, k, v: lambda: sparse.sliding_window_attention(q, k, v, WINDOW),
                           band_rows, band_flops),
        "longformer (+16 global)": (lambda L, q, k, v: (lambda g: lambda: sparse.longformer_attention(
                                        q, k, v, WINDOW, g))(torch.linspace(0, L - 1, GLOBALS).long()),
                                    global_rows, None),
        "bigbird (block 64)": (lambda L, q, k, v: lambda: sparse.bigbird_attention(q, k, v, BLOCK),
                               layout_rows(bigbird), None),
        "block-sparse (strided)": (lambda L, q, k, v: (lambda lay: lambda: sparse.block_sparse_attention(
                                       q, k, v, lay, BLOCK))(sparse.strided_layout(L // BLOCK)),
                                   layout_rows(sparse.strided_layout), None),
        "performer (256 features)": (lambda L, q, k, v: lambda: sparse.performer_attention(q, k, v, 256),
                                     dense_rows, lambda L: 8 * B * H * L * 256 * D),
        "lsh (bucket 64, 4 hashes)": (lambda L, q, k, v: lambda: sparse.lsh_attention(q, k, v, 64, 4),
                                      None, None),
        "top-k (k=64)": (lambda L, q, k, v: lambda: sparse.topk_attention(q, k, v, 64), None,
                         lambda L: 4 * B * H * D * L * L),
    }
    if sparse.flex_available():
        def flex_direct(L, q, k, v):
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            bm = create_block_mask(lambda b, h, i, j: (i - j).abs() <= WINDOW, None, None, L, L,
                                   device=str(q.device))
            compiled = torch.compile(flex_attention, dynamic=False)
            return lambda: compiled(q, k, v, block_mask=bm)

        def flex_backend(L, q, k, v):
            call = lambda: sparse.sliding_window_attention(q, k, v, WINDOW, backend="flex")  # noqa: E731
            call()  # compile and build the block mask once, as the direct baseline does in its setup
            return call

        methods["sliding_window (flex backend)"] = (flex_backend, band_rows, band_flops)
        methods["flex_attention, called directly"] = (flex_direct, band_rows, band_flops)
    try:
        from local_attention import LocalAttention

        def local_attention(L, q, k, v):
            layer = LocalAttention(window_size=WINDOW, look_backward=1, look_forward=1, exact_windowsize=True,
                                   use_rotary_pos_emb=False, autopad=True)
            return lambda: layer(q, k, v)

        methods["local-attention (exact window)"] = (local_attention, band_rows, band_flops)
    except ImportError:
        pass
    return methods


def reference_results() -> dict:
    """The stored chapter-6 benchmark (``results/sparse_cpu.json``, written by ``make bench-reference``)."""
    from importlib.resources import files

    return json.loads(files("attn_course").joinpath("results/sparse_cpu.json").read_text())


class _PeakMemory:
    """Peak resident memory above the level at entry, in MiB, sampled every half millisecond.

    Reads /proc/self/statm (Linux); elsewhere falls back to the process's lifetime peak.
    """

    def __enter__(self):
        import threading

        self._linux = Path("/proc/self/statm").exists()
        self.base = self._now()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _now(self) -> float:
        if self._linux:
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 1024

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now())
        self.mib = self.peak - self.base


def peak_memory_mib(fn) -> tuple[object, float]:
    """Run ``fn()`` once; return its result and the peak memory it added, in MiB.

    On a GPU, PyTorch's allocator statistics; on a CPU, the process's resident memory
    sampled every half millisecond (large tensors are returned to the system when freed,
    so the peak is that of the call). The chapters measure memory with it.
    """
    dev = get_device()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, (torch.cuda.max_memory_allocated() - base) / 2**20
    with _PeakMemory() as memory:
        out = fn()
    return out, memory.mib


def peak_tensor_bytes(fn) -> tuple[object, int]:
    """Run ``fn()``; return its result and the peak bytes of the tensors it created and held at once.

    Every operation's new storage is counted from its creation until it is freed (a weak
    reference to the storage tells when), so the number is exact and the same on every run,
    unlike the process's resident memory. Memory that a fused kernel uses inside C++ without
    making tensors (PyTorch's SDPA tiles) is not seen: measure that with :func:`peak_memory_mib`.
    """
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    state = {"now": 0, "peak": 0}
    live: dict[int, int] = {}

    def release(ptr: int) -> None:
        state["now"] -= live.pop(ptr, 0)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            # an output that shares an argument's storage (a view, an in-place result) is not new
            given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs or {}))
                     if isinstance(t, torch.Tensor) and t.device.type != "meta"}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                    if ptr and ptr not in live and ptr not in given:
                        live[ptr] = storage.nbytes()
                        state["now"] += live[ptr]
                        state["peak"] = max(state["peak"], state["now"])
                        weakref.finalize(storage, release, ptr)
            return out

    with Count():
        result = fn()
    return result, state["peak"]


def matmul_peak_gflops() -> float:
    """The best float32 rate this device reaches on dense math, in GFLOP/s: square and
    attention-shaped matrix products, and PyTorch's fused attention kernel itself (on some
    CPUs the BLAS library is slower than the fused kernel). The ceiling the methods are
    compared to."""
    dev = get_device()
    best = 0.0
    for a_shape, b_shape in (((2048, 2048), (2048, 2048)), ((4096, 4096), (4096, 4096)),
                             ((8, 2048, 64), (8, 64, 2048)), ((8, 2048, 2048), (8, 2048, 64))):
        a, b = torch.randn(*a_shape, device=dev), torch.randn(*b_shape, device=dev)
        flops = 2 * a.numel() * b_shape[-1]
        best = max(best, flops / _time("a @ b", {"a": a, "b": b}, 0.5) / 1e9)
    q, k, v = (torch.randn(1, 8, 4096, 64, device=dev) for _ in range(3))
    t = _time("F.scaled_dot_product_attention(q, k, v)", {"F": F, "q": q, "k": k, "v": v}, 0.5)
    return max(best, 4 * 8 * 4096 * 4096 * 64 / t / 1e9)


def run_one(name: str, L: int) -> dict:
    """Measure one method at one length in this process (call it in a fresh one)."""
    setup, row_mask, flops = _methods()[name]
    dev = get_device()
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=dev) for _ in range(3))
    with torch.no_grad():
        warm = min(L // 4, 1024)  # smaller than L: the measured call allocates afresh
        setup(warm, q[:, :, :warm].contiguous(), k[:, :, :warm].contiguous(), v[:, :, :warm].contiguous())()
        call = setup(L, q, k, v)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated() / 2**20
        with _PeakMemory() as memory:
            start = time.perf_counter()
            out = call()                                   # first call: includes any compilation
            first = time.perf_counter() - start
            times = []
            for _ in range(3 if first < 2 else 1):
                start = time.perf_counter()
                out = call()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**20 - base_cuda if dev.type == "cuda" else memory.mib
        result = {"method": name, "L": L, "seconds": sorted(times)[len(times) // 2], "first_call": first,
                  "peak_mib": peak}
        # max error against float64 dense attention on 64 query rows (with the method's mask)
        rows = torch.unique(torch.cat([torch.linspace(0, L - 1, 62).long(), torch.tensor([1, L - 2])]))
        if name.startswith("lsh"):
            mask = None  # LSH is compared with exact dense attention: its error is the approximation
        else:
            mask = None if row_mask is None else row_mask(rows, L).to(dev)
        if name.startswith("top-k"):
            s = (q[:, :, rows].double() @ k.double().transpose(-2, -1))
            mask = s >= s.topk(64, dim=-1).values[..., -1:]
        s = q[:, :, rows].double() @ k.double().transpose(-2, -1) / math.sqrt(D)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        ref = torch.softmax(s, -1) @ v.double()
        result["max_error"] = (out[:, :, rows].double() - ref).abs().max().item()
        result["flops"] = flops(L) if flops else None
    return result


def _fit_slope(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 2:
        return None
    xs = [math.log(L) for L, _ in points]
    ys = [math.log(t) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def _speedup(baseline: dict | None, result: dict) -> str:
    return f"{baseline['seconds'] / result['seconds']:.2f}x" if baseline else "-"


def sparse_table(results: list[dict], peak: float) -> str:
    """The markdown table of chapter 6's benchmark."""
    by = {(r["method"], r["L"]): r for r in results}
    lengths = sorted({r["L"] for r in results})
    lines = ["| method | L | time (ms) | peak MiB (above the inputs) | vs dense SDPA | vs SDPA + band mask | max error | "
             "GFLOP/s (% of best dense rate) | slope |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in dict.fromkeys(r["method"] for r in results):
        pts = [(L, by[method, L]["seconds"]) for L in lengths if (method, L) in by]
        slope = _fit_slope(pts)
        for L in lengths:
            r = by.get((method, L))
            if r is None:
                continue

            rate = r["flops"] / r["seconds"] / 1e9 if r.get("flops") else None
            cells = [method, str(L), f"{1e3 * r['seconds']:.1f}", f"{r['peak_mib']:.0f}", _speedup(by.get(("dense SDPA", L)), r),
                     _speedup(by.get(("SDPA + band mask", L)), r), f"{r['max_error']:.1e}",
                     f"{rate:.1f} ({100 * rate / peak:.0f}%)" if rate else "-",
                     f"{slope:.2f}" if slope is not None and L == lengths[-1] else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path | None = None, ax=None):
    """Time against L on log-log axes, one line per method."""
    import matplotlib.pyplot as plt

    from .plotting import set_style

    set_style()
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 4.6))
    methods = list(dict.fromkeys(r["method"] for r in results))
    colours = plt.cm.tab20(range(len(methods)))
    for i, method in enumerate(methods):
        pts = sorted((r["L"], r["seconds"]) for r in results if r["method"] == method)
        ax.plot(*zip(*pts), "os^vDP"[i % 6] + ("-" if i < 10 else "--"), ms=3.5, label=method, color=colours[i],
                lw=2.5 if method in ("dense SDPA", "sliding_window") else 1.2)
    ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="seconds (median)",
           title="Attention time against length (B=1, H=8, d=64, window 256)")
    ax.legend(fontsize=7, ncols=2)
    if path is not None:
        ax.figure.savefig(path, dpi=110, bbox_inches="tight")
    return ax


FLASH_LENGTHS = (2048, 4096, 8192, 16384)
FLASH_BLOCK = 256
# Chapter 7 times every method on one thread: a Python loop of small parallel operations
# (our tiles) is slowed many times over by OpenMP threads spinning for a core that another
# process holds, which a fused kernel is not; one thread each keeps the ratio a property of
# the methods, not of the machine's load. (`--flash-threads` changes it.)
FLASH_THREADS = 1


def _flash_methods():
    return {
        "materialised scores": lambda q, k, v: basics.scaled_dot_product_attention(q, k, v, is_causal=True)[0],
        "fused SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        f"flash_attention (tiles {FLASH_BLOCK})": lambda q, k, v: flash.flash_attention(
            q, k, v, is_causal=True, block_q=FLASH_BLOCK, block_k=FLASH_BLOCK),
    }


def run_flash_one(name: str, L: int) -> dict:
    """Time and peak memory of one chapter-7 method at one length (call it in a fresh process)."""
    fn = _flash_methods()[name]
    dev = get_device()
    torch.set_num_threads(int(os.environ.get("ATTN_COURSE_BENCH_THREADS", FLASH_THREADS)))
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=dev) for _ in range(3))
    with torch.no_grad():
        fn(q[:, :, :256].contiguous(), k[:, :, :256].contiguous(), v[:, :, :256].contiguous())
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base_cuda = torch.cuda.memory_allocated() / 2**20
        # Memory first, in a call of its own: the sampling thread would slow a Python loop's timing.
        with _PeakMemory() as memory:
            out = fn(q, k, v)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - base_cuda if dev.type == "cuda" else memory.mib
        del out
        times = []
        for _ in range(3):
            start = time.perf_counter()
            out = fn(q, k, v)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            if times[-1] > 5:
                break
        rows = torch.linspace(0, L - 1, 32).long()
        s = q[:, :, rows].double() @ k.double().transpose(-2, -1) / math.sqrt(D)
        s = s.masked_fill(torch.arange(L, device=dev)[None, :] > rows.to(dev)[:, None], float("-inf"))
        err = (out[:, :, rows].double() - torch.softmax(s, -1) @ v.double()).abs().max().item()
    return {"method": name, "L": L, "seconds": sorted(times)[len(times) // 2], "peak_mib": peak,
            "max_error": err, "scores_mib": B * H * L * L * 4 / 2**20, "threads": torch.get_num_threads()}


def run_flash(lengths=FLASH_LENGTHS, timeout: int = 900, threads: int = FLASH_THREADS) -> list[dict]:
    """Every chapter-7 method at every length, each in a fresh process. Materialised scores are
    skipped where the scores alone would take more than a third of this machine's memory."""
    total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    results = []
    for name in _flash_methods():
        for L in lengths:
            if name == "materialised scores" and 2 * B * H * L * L * 4 / 2**20 > total_mib / 3:
                print(f"  {name:<28} L={L:>5}: skipped, the scores and weights alone need "
                      f"{2 * B * H * L * L * 4 / 2**30:.0f} GiB", flush=True)
                continue
            r = _in_fresh_process("--one-flash", name, L, timeout, {"ATTN_COURSE_BENCH_THREADS": str(threads)})
            if r is None:
                continue
            results.append(r)
            print(f"  {name:<28} L={L:>5}: {1e3 * r['seconds']:9.1f} ms, peak {r['peak_mib']:8.1f} MiB, "
                  f"error {r['max_error']:.1e}", flush=True)
    return results


def _in_fresh_process(flag: str, name: str, L: int, timeout: int, env: dict | None = None) -> dict | None:
    """Run ``python -m attn_course.bench <flag> name L`` in a new process; its JSON result, or None
    (after saying why) when it timed out or failed."""
    cmd = [sys.executable, "-m", "attn_course.bench", flag, name, str(L)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    except subprocess.TimeoutExpired:
        print(f"  {name} at L={L}: timed out after {timeout} s", flush=True)
        return None
    line = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode or not line.startswith("{"):
        print(f"  {name} at L={L}: failed ({proc.stderr.strip().splitlines()[-1:] or '?'})", flush=True)
        return None
    return json.loads(line)


def flash_table(results: list[dict]) -> str:
    """Markdown: per length, time and peak memory of each method, and flash's ratios."""
    by = {(r["method"], r["L"]): r for r in results}
    fl = f"flash_attention (tiles {FLASH_BLOCK})"
    lines = ["| L | method | time (ms) | peak memory (MiB) | max error | time / fused SDPA "
             "| peak / materialised scores |", "|---|---|---:|---:|---:|---:|---:|"]
    for L in sorted({r["L"] for r in results}):
        sdpa_r = by.get(("fused SDPA", L))
        for name in _flash_methods():
            r = by.get((name, L))
            if r is None:
                continue
            ratio = f"{r['seconds'] / sdpa_r['seconds']:.2f}x" if sdpa_r else "-"
            mem = f"1/{r['scores_mib'] / max(r['peak_mib'], 1e-9):.0f}" if name == fl else "-"
            lines.append(f"| {L} | {name} | {1e3 * r['seconds']:.1f} | {r['peak_mib']:.1f} | "
                         f"{r['max_error']:.1e} | {ratio} | {mem} |")
    return "\n".join(lines)


def run_ring(L: int = 4096, world_size: int = 4, threads: int = FLASH_THREADS) -> list[dict]:
    """Ring attention over 1 and ``world_size`` local gloo processes, causal and not, beside the
    one-process baselines a skeptic asks for first: fused SDPA and ``flash_attention``; every
    process (and the baselines) on ``threads`` threads."""
    from .distributed import ring_attention_profile

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_ring(L, world_size, threads, ring_attention_profile)
    finally:
        torch.set_num_threads(before)


def _run_ring(L, world_size, threads, ring_attention_profile):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    rows = []
    for causal in (False, True):
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        for name, fn in (("fused SDPA", lambda c=causal: F.scaled_dot_product_attention(q, k, v, is_causal=c)),
                         (f"flash_attention (tiles {FLASH_BLOCK})", lambda c=causal: flash.flash_attention(
                             q, k, v, is_causal=c, block_q=FLASH_BLOCK, block_k=FLASH_BLOCK))):
            rows.append({"method": name, "W": 1, "causal": causal, "L": L, "seconds": seconds(fn, 0.5),
                         "bytes_sent_per_process": 0, "compute_s": None, "wait_s": None, "comm_only_s": None,
                         "blocks": None, "max_error": (fn() - ref).abs().max().item()})
        for w in (1, world_size):
            out, stats = ring_attention_profile(q, k, v, w, is_causal=causal, threads=threads)
            rows.append({"method": "ring_attention", "W": w, "causal": causal, "L": L,
                         "seconds": max(s["total_s"] for s in stats),
                         "bytes_sent_per_process": stats[0]["bytes_sent"],
                         "compute_s": [s["compute_s"] for s in stats], "wait_s": [s["wait_s"] for s in stats],
                         "comm_only_s": max(s["comm_only_s"] for s in stats),
                         "blocks": [s["blocks_computed"] for s in stats],
                         "max_error": (out - ref).abs().max().item()})
        for r in rows[-4:]:
            print(f"  {r['method']:<28} W={r['W']} causal={causal}: {r['seconds']:.3f} s, sent "
                  f"{r['bytes_sent_per_process'] / 2**20:.1f} MiB per process, error {r['max_error']:.1e}", flush=True)
    return rows


def ring_table(rows: list[dict]) -> str:
    """Markdown: each ring run beside the one-process baselines of the same mask."""
    lines = ["| causal | method | processes | time (s) | time / fused SDPA | MiB sent per process "
             "| key shards per rank | compute s per rank | waiting s per rank | transfers alone (s) |",
             "|---|---|---:|---:|---:|---:|---|---|---|---:|"]
    fmt = lambda xs: "-" if xs is None else ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    for r in rows:
        sdpa_r = next(x for x in rows if x["method"] == "fused SDPA" and x["causal"] == r["causal"])
        comm = "-" if r["comm_only_s"] is None else f"{r['comm_only_s']:.3f}"
        lines.append(f"| {r['causal']} | {r['method']} | {r['W']} | {r['seconds']:.3f} | "
                     f"{r['seconds'] / sdpa_r['seconds']:.2f}x | {r['bytes_sent_per_process'] / 2**20:.1f} | "
                     f"{r['blocks'] if r['blocks'] else '-'} | {fmt(r['compute_s'])} | {fmt(r['wait_s'])} | {comm} |")
    return "\n".join(lines)


def flash_reference_results() -> dict:
    """The stored chapter-7 benchmark (``results/flash_cpu.json``, written by ``make bench-reference``)."""
    from importlib.resources import files

    return json.loads(files("attn_course").joinpath("results/flash_cpu.json").read_text())


def run_sparse(lengths, out_dir: Path, timeout: int = 600, methods=None) -> list[dict]:
    """Every chapter-6 method (or ``methods``) at every length, each in a fresh process."""
    available = list(_methods())
    unknown = set(methods or []) - set(available)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; available: {available}")
    results = []
    for name in methods or available:
        for L in lengths:
            r = _in_fresh_process("--one", name, L, timeout)
            if r is None:
                continue
            results.append(r)
            print(f"  {name:<32} L={L:>5}: {1e3 * r['seconds']:9.1f} ms, peak {r['peak_mib']:7.0f} MiB, "
                  f"error {r['max_error']:.1e}", flush=True)
    return results


def main(argv=None) -> int:
    """``python -m attn_course.bench``: run the benchmarks and write JSON, tables and plots."""
    parser = argparse.ArgumentParser(prog="python -m attn_course.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lengths up to 4k, shorter runs")
    parser.add_argument("--out", type=Path, default=Path("_build/bench"), help="where results are written")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 1k..16k)")
    parser.add_argument("--methods", nargs="+", help="only these methods (default: all available)")
    parser.add_argument("--suites", nargs="+", choices=["sparse", "flash"], default=["sparse", "flash"],
                        help="which benchmarks to run (default: both)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    parser.add_argument("--one-flash", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return 0
    if args.one_flash:
        print(json.dumps(run_flash_one(args.one_flash[0], int(args.one_flash[1]))))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine()
    peak = matmul_peak_gflops()
    print("machine:", info)
    print(f"best float32 dense rate (GEMM or fused attention): {peak:.1f} GFLOP/s")
    print("\nChapter 1: materialised attention (returns weights) vs torch's fused SDPA, causal, B=2, H=4, d=64")
    print(f"{'L':>6} {'ours ms':>10} {'fused ms':>10} {'ours/fused':>11} {'weights MiB':>12}")
    for L, ours, fused, ratio, mb in sdpa((128, 512) if args.quick else (128, 256, 512, 1024, 2048),
                                          min_run_time=0.1 if args.quick else 0.3):
        print(f"{L:>6} {ours:>10.3f} {fused:>10.3f} {ratio:>10.2f}x {mb:>12.1f}")
    if "flash" in args.suites:
        flash_lengths = FLASH_LENGTHS[:2] if args.quick else FLASH_LENGTHS
        print(f"\nChapter 7: exact attention in tiles, causal, B={B}, H={H}, d={D}, each in a fresh process, "
              f"{FLASH_THREADS} thread(s) each")
        flash_results = run_flash(flash_lengths)
        print("\n" + flash_table(flash_results))
        print(f"\nChapter 7: ring attention over local processes (gloo), B={B}, H={H}, d={D}")
        ring_rows = run_ring(2048 if args.quick else 4096)
        print("\n" + ring_table(ring_rows))
        (args.out / "flash.json").write_text(json.dumps({"machine": info, "results": flash_results,
                                                         "ring": ring_rows}, indent=1))
        (args.out / "flash.md").write_text(f"Machine: {info}.\n\n{flash_table(flash_results)}\n\n"
                                           f"{ring_table(ring_rows)}\n")
        print(f"\nwritten: {args.out}/flash.json, flash.md")
    if "sparse" not in args.suites:
        return 0
    lengths = args.lengths or (LENGTHS[:3] if args.quick else LENGTHS)
    print(f"\nChapter 6: sparse attention, B={B}, H={H}, d={D}, window +-{WINDOW}, each in a fresh process")
    results = run_sparse(lengths, args.out, methods=args.methods)
    table = sparse_table(results, peak)
    print("\n" + table)
    (args.out / "sparse.json").write_text(json.dumps({"machine": info, "matmul_peak_gflops": peak,
                                                      "results": results}, indent=1))
    (args.out / "sparse.md").write_text(f"Machine: {info}; best float32 dense rate {peak:.1f} GFLOP/s.\n\n{table}\n")
    plot(results, args.out / "sparse.png")
    print(f"\nwritten: {args.out}/sparse.json, sparse.md, sparse.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
