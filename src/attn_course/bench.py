"""Benchmarks (``make bench``): side-by-side timings on this machine, reported as ratios.

Timings on shared machines are noisy; what counts is the ratio of implementations
measured in the same run, and nothing here is asserted by the tests.

* Chapter 1: the course's materialised attention (it returns the weights) against
  PyTorch's fused ``scaled_dot_product_attention``.
* Chapter 7: every method of :mod:`attn_course.sparse` against dense SDPA and against
  SDPA given the pattern as a bool mask, for ``L`` in 1k .. 16k (B=1, H=8, d=64,
  window +-256), each configuration in a fresh process: median time, peak memory,
  ratios, max error against a float64 dense reference (on sampled query rows),
  achieved GFLOP/s as a share of the best dense rate this machine reaches, and the slope of time
  against ``L``. ``local-attention`` and compiled ``flex_attention`` join as baselines
  when installed. Results go to ``--out`` as JSON, a markdown table and a plot.
* Chapter 8: :func:`attn_course.flash.flash_attention` (causal, B=1, H=8, d=64) against
  materialised scores and PyTorch's fused SDPA, each length in a fresh process: time and
  peak memory, as ratios. Then a training step (forward + backward, L=16384, one head, float32)
  of the same three, each in a fresh process: peak memory against autograd through materialised
  scores and time against SDPA's forward + backward, side by side, with the gradients' error. On
  a CUDA GPU with Triton, the Triton kernel of :mod:`attn_course.kernels` against SDPA's flash
  backend, interleaved (written to ``flash_gpu.json``).
* Chapter 10: ring attention (contiguous and zigzag shards) and Ulysses over 4 local processes
  (gloo) against one process: time (median and range of interleaved rounds), bytes each process
  sent, the scores each rank computed, and the slowest rank's compute against the fastest's.
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
           "flash_table", "run_flash_train_one", "flash_train_table", "run_ring", "ring_table", "flash_reference_results", "distributed_reference_results",
           "main"]

B, H, D, WINDOW, BLOCK, GLOBALS = 1, 8, 64, 256, 64, 16
LENGTHS = (1024, 2048, 4096, 8192, 16384)
# ``--quick``: the flash suite's lengths and training length, and the ring's length
QUICK = {"flash_lengths": (2048, 4096), "flash_train_length": 4096, "ring_length": 2048}


def machine() -> str:
    """One line naming this machine: platform, processor or GPU, device, torch, CPU threads.

    Example:
        >>> import torch
        >>> from attn_course.bench import machine
        >>> line = machine()
        >>> line.count(" | "), f"torch {torch.__version__}" in line
        (4, True)
    """
    dev = get_device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    return (f"{platform.platform()} | {name} | device {dev.type} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} CPU threads")


def seconds(fn, min_run_time: float = 0.2) -> float:
    """Median seconds of ``fn()`` on this machine, with all CPU threads (``torch.utils.benchmark``
    handles warm-up and CUDA synchronisation). The chapters time their cells with it.

    Example:
        >>> import torch
        >>> from attn_course.bench import seconds
        >>> x = torch.randn(64, 64)
        >>> 0 < seconds(lambda: x @ x, min_run_time=0.01) < 1
        True
    """
    return _time("fn()", {"fn": fn}, min_run_time)


def _time(stmt: str, env: dict, min_run_time: float) -> float:
    return benchmark.Timer(stmt=stmt, globals=env, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time).median


def sdpa(lengths=(128, 256, 512, 1024, 2048), batch=2, heads=4, dim=64, min_run_time=0.3):
    """Chapter 1: (L, ours ms, fused ms, ours/fused, weights MiB) per length.

    Example:
        >>> from attn_course.bench import sdpa
        >>> rows = sdpa(lengths=(32, 64), batch=1, heads=1, dim=8, min_run_time=0.01)
        >>> [row[0] for row in rows], all(len(row) == 5 and row[3] > 0 for row in rows)
        ([32, 64], True)
    """
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


# --- chapter 7 --------------------------------------------------------------------------------------

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
    """The stored chapter-7 benchmark (``results/sparse_cpu.json``, written by ``make bench-reference``).

    Example:
        >>> from attn_course.bench import reference_results
        >>> reference = reference_results()
        >>> {"machine", "matmul_peak_gflops", "results"} <= set(reference)
        True
        >>> {"dense SDPA", "sliding_window"} <= {r["method"] for r in reference["results"]}
        True
    """
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

    Example:
        >>> import torch
        >>> from attn_course.bench import peak_memory_mib
        >>> out, mib = peak_memory_mib(lambda: torch.ones(1000))
        >>> tuple(out.shape), mib >= 0
        ((1000,), True)
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

    Example:
        >>> import torch
        >>> from attn_course.bench import peak_tensor_bytes
        >>> out, peak = peak_tensor_bytes(lambda: (torch.ones(1000) * 2) * 3)
        >>> peak            # two float32 tensors of 1000 at once: the ones are freed after "* 2"
        8000
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
    compared to.

    Example:
        It times large products for several seconds, so this example is not run by the tests:

        >>> from attn_course.bench import matmul_peak_gflops
        >>> matmul_peak_gflops() > 0    # doctest: +SKIP
        True
    """
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
    """Measure one method at one length in this process (call it in a fresh one).

    Returns a dict: ``method``, ``L``, ``seconds`` (median), ``first_call``, ``peak_mib``,
    ``max_error`` (against float64 dense attention on sampled rows, under the method's
    pattern) and ``flops`` (or None).

    Example:
        >>> from attn_course.bench import run_one
        >>> result = run_one("sliding_window", 128)
        >>> result["method"], result["L"], result["max_error"] < 1e-5
        ('sliding_window', 128, True)
    """
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
    """The markdown table of chapter 7's benchmark.

    Example:
        >>> from attn_course.bench import reference_results, sparse_table
        >>> reference = reference_results()
        >>> table = sparse_table(reference["results"], reference["matmul_peak_gflops"])
        >>> table.splitlines()[0].split(" | ")[:4]
        ['| method', 'L', 'time (ms)', 'peak MiB (above the inputs)']
    """
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
    """Time against L on log-log axes, one line per method.

    Example:
        >>> import matplotlib.pyplot as plt
        >>> from attn_course.bench import plot, reference_results
        >>> ax = plot(reference_results()["results"])
        >>> ax.get_xscale(), ax.get_xlabel()
        ('log', 'sequence length L')
        >>> plt.close(ax.figure)
    """
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
    """Time and peak memory of one chapter-8 method at one length (call it in a fresh process).

    It sets torch's thread count (to ``ATTN_COURSE_BENCH_THREADS``, default 1) for the rest of
    the process.

    Example:
        >>> import torch
        >>> from attn_course.bench import run_flash_one
        >>> threads = torch.get_num_threads()
        >>> result = run_flash_one("fused SDPA", 256)
        >>> torch.set_num_threads(threads)                     # what a fresh process would not need
        >>> result["method"], result["scores_mib"], result["max_error"] < 1e-5   # 8 x 256 x 256 floats
        ('fused SDPA', 2.0, True)
    """
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
    """Every chapter-8 method at every length, each in a fresh process. Materialised scores are
    skipped where the scores alone would take more than a third of this machine's memory.

    Example:
        Each method and length starts a Python process, so this example is not run by the tests:

        >>> from attn_course.bench import flash_table, run_flash
        >>> results = run_flash(lengths=(2048,))       # doctest: +SKIP
        >>> print(flash_table(results))                # doctest: +SKIP
    """
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
    """Markdown: per length, time and peak memory of each method, and flash's ratios.

    Example:
        >>> from attn_course.bench import flash_reference_results, flash_table
        >>> table = flash_table(flash_reference_results()["results"])
        >>> table.splitlines()[0].split(" | ")[:3]
        ['| L', 'method', 'time (ms)']
    """
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


# Training (forward + backward), chapter 8: one head, so that autograd through materialised scores
# (which keeps the L x L scores and weights for its backward pass) still fits at L = 16384.
FLASH_TRAIN_LENGTH = 16384
FLASH_TRAIN_HEADS = 1


def _dense_causal(q, k, v):
    """Causal attention written out with torch ops, so that autograd stores the scores and weights."""
    L_q, L_k = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(L_q, L_k, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _flash_train_methods():
    return {
        "autograd through materialised scores": _dense_causal,
        "fused SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        f"flash_attention (tiles {FLASH_BLOCK})": lambda q, k, v: flash.flash_attention(
            q, k, v, is_causal=True, block_q=FLASH_BLOCK, block_k=FLASH_BLOCK),
    }


def run_flash_train_one(name: str, L: int) -> dict:
    """Forward + backward of one chapter-8 method at one length: peak memory, time, gradient error.

    Causal, ``B = 1``, ``FLASH_TRAIN_HEADS`` heads, ``d = 64``, float32; the gradients of a fixed
    random ``dO`` with respect to ``q, k, v``. The error is the largest difference from fused SDPA's
    gradients (itself checked against float64 in the tests). Sets torch's thread count (to
    ``ATTN_COURSE_BENCH_THREADS``, default 1) for the rest of the process: call it in a fresh one.

    Example:
        >>> import torch
        >>> from attn_course.bench import run_flash_train_one
        >>> threads = torch.get_num_threads()
        >>> result = run_flash_train_one("flash_attention (tiles 256)", 512)
        >>> torch.set_num_threads(threads)
        >>> result["method"], result["L"], result["grad_error"] < 1e-4, result["scores_mib"]
        ('flash_attention (tiles 256)', 512, True, 1.0)
    """
    fn = _flash_train_methods()[name]
    dev = get_device()
    torch.set_num_threads(int(os.environ.get("ATTN_COURSE_BENCH_THREADS", FLASH_THREADS)))
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(B, FLASH_TRAIN_HEADS, L, D, device=dev) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        grads = torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return grads

    small = [x[:, :, :256].detach().clone().requires_grad_() for x in (q, k, v)]
    torch.autograd.grad(fn(*small), small, dout[:, :, :256])          # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    with _PeakMemory() as memory:      # memory first, in a call of its own (the sampler slows a loop)
        grads = step()
    peak = torch.cuda.max_memory_allocated() / 2**20 - base if dev.type == "cuda" else memory.mib
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dout)
    err = max((g - r).abs().max().item() for g, r in zip(grads, ref))
    del grads, ref
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        if times[-1] > 30:
            break
    return {"method": name, "L": L, "heads": FLASH_TRAIN_HEADS, "seconds": sorted(times)[len(times) // 2],
            "times": times, "peak_mib": peak, "grad_error": err,
            "scores_mib": B * FLASH_TRAIN_HEADS * L * L * 4 / 2**20, "threads": torch.get_num_threads()}


def _run_flash_train(L: int = FLASH_TRAIN_LENGTH, timeout: int = 1800, threads: int = FLASH_THREADS) -> list[dict]:
    """Every training method at length ``L``, each in a fresh process (skipping autograd through
    materialised scores where four L x L matrices would take more than a third of the memory)."""
    total_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    rows = []
    for name in _flash_train_methods():
        need = 4 * B * FLASH_TRAIN_HEADS * L * L * 4 / 2**20
        if name.startswith("autograd") and need > total_mib / 3:
            print(f"  {name:<38} L={L:>5}: skipped, it needs about {need / 1024:.0f} GiB", flush=True)
            continue
        r = _in_fresh_process("--one-flash-train", name, L, timeout, {"ATTN_COURSE_BENCH_THREADS": str(threads)})
        if r is not None:
            rows.append(r)
            print(f"  {name:<38} L={L:>5}: {r['seconds']:8.2f} s, peak {r['peak_mib']:8.1f} MiB, "
                  f"gradient error {r['grad_error']:.1e}", flush=True)
    return rows


def flash_train_table(rows: list[dict]) -> str:
    """Markdown: forward + backward of each method, with its ratios to fused SDPA's time and to
    the peak memory of autograd through materialised scores, side by side.

    Example:
        >>> from attn_course.bench import flash_train_table
        >>> rows = [{"method": "fused SDPA", "L": 4, "seconds": 1.0, "times": [1.0], "peak_mib": 1.0,
        ...          "grad_error": 0.0},
        ...         {"method": "autograd through materialised scores", "L": 4, "seconds": 2.0, "times": [2.0],
        ...          "peak_mib": 40.0, "grad_error": 1e-7}]
        >>> for line in flash_train_table(rows).splitlines()[2:]:
        ...     print(line)
        | 4 | autograd through materialised scores | 2.00 (2.00 to 2.00) | 40.0 | 1.0e-07 | 2.00x | 1/1 |
        | 4 | fused SDPA | 1.00 (1.00 to 1.00) | 1.0 | 0.0e+00 | 1.00x | 1/40 |
    """
    lines = ["| L | method (forward + backward) | time, s (median; range) | peak memory (MiB) | max gradient "
             "error vs SDPA | time / fused SDPA | peak / autograd through scores |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for L in sorted({r["L"] for r in rows}):
        at = {r["method"]: r for r in rows if r["L"] == L}
        sdpa_r, dense_r = at.get("fused SDPA"), at.get("autograd through materialised scores")
        for name in _flash_train_methods():
            r = at.get(name)
            if r is None:
                continue
            spread = f"{r['seconds']:.2f} ({min(r['times']):.2f} to {max(r['times']):.2f})"
            time_ratio = f"{r['seconds'] / sdpa_r['seconds']:.2f}x" if sdpa_r else "-"
            mem_ratio = f"1/{dense_r['peak_mib'] / max(r['peak_mib'], 1e-9):.0f}" if dense_r else "-"
            lines.append(f"| {L} | {name} | {spread} | {r['peak_mib']:.1f} | {r['grad_error']:.1e} | "
                         f"{time_ratio} | {mem_ratio} |")
    return "\n".join(lines)


def _run_triton_gpu(lengths=(1024, 2048, 4096, 8192, 16384), rounds: int = 20) -> list[dict]:
    """Chapter 8's Triton kernel against SDPA's flash backend on this CUDA GPU (causal, float16,
    B=1, H=8, d=64): forward times from CUDA events, the two methods interleaved round by round."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from .kernels import triton_flash_attention

    rows = []
    for L in lengths:
        torch.manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16) for _ in range(3))

        def sdpa_flash(q=q, k=k, v=v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        fns = {"Triton kernel (attn_course.kernels)": lambda q=q, k=k, v=v: triton_flash_attention(
            q, k, v, is_causal=True), "SDPA flash backend": sdpa_flash}
        err = (fns["Triton kernel (attn_course.kernels)"]().float() - sdpa_flash().float()).abs().max().item()
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
        for name, ts in times.items():
            rows.append({"method": name, "L": L, "times": ts, "seconds": sorted(ts)[len(ts) // 2],
                         "max_diff_vs_sdpa": err})
            print(f"  {name:<38} L={L:>5}: {1e3 * rows[-1]['seconds']:8.3f} ms", flush=True)
    return rows


def _triton_gpu_table(rows: list[dict]) -> str:
    lines = ["| L | method | time, ms (median; range) | time / SDPA flash backend (median of rounds; range) |",
             "|---|---|---:|---:|"]
    for L in sorted({r["L"] for r in rows}):
        at = {r["method"]: r for r in rows if r["L"] == L}
        base = at["SDPA flash backend"]["times"]
        for name, r in at.items():
            ratio = sorted(t / b for t, b in zip(r["times"], base))
            lines.append(f"| {L} | {name} | {1e3 * r['seconds']:.3f} ({1e3 * min(r['times']):.3f} to "
                         f"{1e3 * max(r['times']):.3f}) | {ratio[len(ratio) // 2]:.2f} ({ratio[0]:.2f} to "
                         f"{ratio[-1]:.2f}) |")
    return "\n".join(lines)


DIST_SCHEMES = (("ring (contiguous)", "ring", "contiguous"), ("ring (zigzag)", "ring", "zigzag"),
                ("Ulysses", "ulysses", "contiguous"))


def run_ring(L: int = 4096, world_size: int = 4, threads: int = FLASH_THREADS, repeats: int = 3) -> list[dict]:
    """Chapter 10: ring attention (contiguous and zigzag shards) and Ulysses over ``world_size``
    local gloo processes, causal and not, beside one process: fused SDPA, ``flash_attention``
    (the tiles every rank computes with) and the ring on one process. Every process (and the
    baselines) on ``threads`` threads. ``repeats`` rounds, interleaved: in each, the one-process
    baselines, then one launch that runs every scheme; times are medians with their range.

    Example:
        It starts ``world_size`` processes per round, so this example is not run by the tests:

        >>> from attn_course.bench import ring_table, run_ring
        >>> rows = run_ring(L=1024, world_size=2, repeats=1)   # doctest: +SKIP
        >>> print(ring_table(rows))                            # doctest: +SKIP
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run_ring(L, world_size, threads, repeats)
    finally:
        torch.set_num_threads(before)


def _run_ring(L, world_size, threads, repeats):
    from .distributed import profile_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    refs = {c: F.scaled_dot_product_attention(q, k, v, is_causal=c) for c in (False, True)}
    baselines = {("fused SDPA", c): (lambda c=c: F.scaled_dot_product_attention(q, k, v, is_causal=c))
                 for c in (False, True)}
    baselines.update({(f"flash_attention (tiles {FLASH_BLOCK})", c): (lambda c=c: flash.flash_attention(
        q, k, v, is_causal=c, block_q=FLASH_BLOCK, block_k=FLASH_BLOCK)) for c in (False, True)})
    runs = [(name, w, {"scheme": scheme, "layout": layout, "is_causal": c, "query": q, "key": k, "value": v})
            for c in (False, True) for w, schemes in ((1, DIST_SCHEMES[:1]), (world_size, DIST_SCHEMES))
            for name, scheme, layout in schemes]
    base_times = {key: [] for key in baselines}
    profiles = [[] for _ in runs]
    for _ in range(repeats):   # interleaved: baselines, then every scheme, round after round
        for key, fn in baselines.items():
            base_times[key].append(seconds(fn, 0.3))
        for w in (1, world_size):
            idx = [i for i, (_, ww, _) in enumerate(runs) if ww == w]
            for i, res in zip(idx, profile_attention([runs[i][2] for i in idx], w, repeats=1, threads=threads)):
                profiles[i].append(res)
    rows = []
    for (name, c), times in base_times.items():
        rows.append({"method": name, "W": 1, "causal": c, "L": L, "seconds": sorted(times)[len(times) // 2],
                     "seconds_range": [min(times), max(times)], "bytes_sent_per_process": 0,
                     "scores_per_rank": None, "compute_s": None, "wait_s": None, "comm_only_s": None,
                     "slowest_over_fastest": None,
                     "max_error": (baselines[(name, c)]() - refs[c]).abs().max().item()})
    for (name, w, run), results in zip(runs, profiles):
        def med(xs):
            return sorted(xs)[len(xs) // 2]

        ranks = [[res["ranks"][r] for res in results] for r in range(w)]       # per rank, per round
        totals = [max(rank[i]["total_s"][0] for rank in ranks) for i in range(repeats)]
        compute = [med([x["compute_cpu_s"][0] for x in rank]) for rank in ranks]
        rows.append({"method": name, "W": w, "causal": run["is_causal"], "L": L, "seconds": med(totals),
                     "seconds_range": [min(totals), max(totals)],
                     "bytes_sent_per_process": ranks[0][0]["bytes_sent"],
                     "scores_per_rank": [rank[0]["scores_computed"] for rank in ranks],
                     "compute_s": compute, "compute_wall_s": [med([x["compute_s"][0] for x in rank]) for rank in ranks],
                     "wait_s": [med([x["wait_s"][0] for x in rank]) for rank in ranks],
                     "comm_only_s": med([max(rank[i]["comm_only_s"][0] for rank in ranks) for i in range(repeats)]),
                     "slowest_over_fastest": max(compute) / max(min(compute), 1e-12),
                     "max_error": (results[0]["output"] - refs[run["is_causal"]]).abs().max().item()})
    for r in rows:
        print(f"  {r['method']:<28} W={r['W']} causal={r['causal']}: {r['seconds']:.3f} s "
              f"({r['seconds_range'][0]:.3f} to {r['seconds_range'][1]:.3f}), sent "
              f"{r['bytes_sent_per_process'] / 2**20:.1f} MiB per process, error {r['max_error']:.1e}", flush=True)
    return rows


def ring_table(rows: list[dict]) -> str:
    """Markdown: each distributed run beside the one-process baselines of the same mask.

    Example:
        The stored reference run, as chapter 10 shows it:

        >>> from attn_course.bench import distributed_reference_results, ring_table
        >>> table = ring_table(distributed_reference_results()["results"])
        >>> table.splitlines()[0].split(" | ")[:4]
        ['| causal', 'method', 'processes', 'time (s), median (range)']
    """
    lines = ["| causal | method | processes | time (s), median (range) | time / fused SDPA | MiB sent per process "
             "| scores per rank (M) | compute CPU s per rank | slowest / fastest compute | transfers alone (s) |",
             "|---|---|---:|---|---:|---:|---|---|---:|---:|"]
    fmt = lambda xs, f=".2f": "-" if xs is None else ", ".join(format(x, f) for x in xs)  # noqa: E731
    for r in sorted(rows, key=lambda r: (r["causal"], r["W"] > 1)):
        sdpa_r = next(x for x in rows if x["method"] == "fused SDPA" and x["causal"] == r["causal"])
        comm = "-" if r["comm_only_s"] is None else f"{r['comm_only_s']:.3f}"
        ratio = "-" if r["slowest_over_fastest"] is None else f"{r['slowest_over_fastest']:.2f}"
        scores = None if r["scores_per_rank"] is None else [s / 1e6 for s in r["scores_per_rank"]]
        lines.append(f"| {r['causal']} | {r['method']} | {r['W']} | {r['seconds']:.3f} ({r['seconds_range'][0]:.3f} "
                     f"to {r['seconds_range'][1]:.3f}) | {r['seconds'] / sdpa_r['seconds']:.2f}x | "
                     f"{r['bytes_sent_per_process'] / 2**20:.1f} | {fmt(scores, '.1f')} | {fmt(r['compute_s'])} | "
                     f"{ratio} | {comm} |")
    return "\n".join(lines)


def distributed_reference_results() -> dict:
    """The stored chapter-10 benchmark (``results/distributed_cpu.json``, written by ``make bench-reference``).

    Example:
        >>> from attn_course.bench import distributed_reference_results
        >>> reference = distributed_reference_results()
        >>> {"ring (contiguous)", "ring (zigzag)", "Ulysses", "fused SDPA"} <= {r["method"] for r in reference["results"]}
        True
    """
    from importlib.resources import files

    return json.loads(files("attn_course").joinpath("results/distributed_cpu.json").read_text())


def flash_reference_results() -> dict:
    """The stored chapter-8 benchmark (``results/flash_cpu.json``, written by ``make bench-reference``).

    Example:
        >>> from attn_course.bench import flash_reference_results
        >>> reference = flash_reference_results()
        >>> sorted({r["method"] for r in reference["results"]})
        ['flash_attention (tiles 256)', 'fused SDPA', 'materialised scores']
    """
    from importlib.resources import files

    return json.loads(files("attn_course").joinpath("results/flash_cpu.json").read_text())


def run_sparse(lengths, out_dir: Path, timeout: int = 600, methods=None) -> list[dict]:
    """Every chapter-7 method (or ``methods``) at every length, each in a fresh process.

    Example:
        Each method and length starts a Python process (not run by the tests); an unknown
        method is refused before any starts:

        >>> from pathlib import Path
        >>> from attn_course.bench import run_sparse
        >>> results = run_sparse([1024, 2048], Path("_build/bench"), methods=["sliding_window"])  # doctest: +SKIP
        >>> run_sparse([1024], Path("_build/bench"), methods=["sliding window"])
        Traceback (most recent call last):
            ...
        ValueError: unknown methods ['sliding window']; available: ['dense SDPA', 'SDPA + band mask', 'sliding_window', ...]
    """
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
    """``python -m attn_course.bench``: run the benchmarks and write JSON, tables and plots.

    Example:
        ``--one METHOD L`` measures one sparse method at one length and prints its result as
        JSON (what each fresh process of :func:`run_sparse` does):

        >>> from attn_course.bench import main
        >>> main(["--one", "sliding_window", "128"])
        {"method": "sliding_window", "L": 128, "seconds": ...}
        0
    """
    parser = argparse.ArgumentParser(prog="python -m attn_course.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lengths up to 4k, shorter runs")
    parser.add_argument("--out", type=Path, default=Path("_build/bench"), help="where results are written")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths (default 1k..16k)")
    parser.add_argument("--methods", nargs="+", help="only these methods (default: all available)")
    parser.add_argument("--suites", nargs="+", choices=["sparse", "flash", "distributed"],
                        default=["sparse", "flash", "distributed"],
                        help="which benchmarks to run (default: both)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    parser.add_argument("--one-flash", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    parser.add_argument("--one-flash-train", nargs=2, metavar=("METHOD", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return 0
    if args.one_flash:
        print(json.dumps(run_flash_one(args.one_flash[0], int(args.one_flash[1]))))
        return 0
    if args.one_flash_train:
        print(json.dumps(run_flash_train_one(args.one_flash_train[0], int(args.one_flash_train[1]))))
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
        flash_lengths = QUICK["flash_lengths"] if args.quick else FLASH_LENGTHS
        print(f"\nChapter 8: exact attention in tiles, causal, B={B}, H={H}, d={D}, each in a fresh process, "
              f"{FLASH_THREADS} thread(s) each")
        flash_results = run_flash(flash_lengths)
        print("\n" + flash_table(flash_results))
        train_L = QUICK["flash_train_length"] if args.quick else FLASH_TRAIN_LENGTH
        print(f"\nChapter 8: forward + backward, causal, B={B}, H={FLASH_TRAIN_HEADS}, d={D}, L={train_L}, "
              f"float32, each in a fresh process, {FLASH_THREADS} thread(s) each")
        train_rows = _run_flash_train(train_L)
        print("\n" + flash_train_table(train_rows))
        (args.out / "flash.json").write_text(json.dumps({"machine": info, "results": flash_results,
                                                         "train": train_rows}, indent=1))
        (args.out / "flash.md").write_text(f"Machine: {info}.\n\n{flash_table(flash_results)}\n\n"
                                           f"{flash_train_table(train_rows)}\n")
        from .kernels import triton_available

        if torch.cuda.is_available() and triton_available():
            print(f"\nChapter 8: the Triton kernel vs SDPA's flash backend, causal, float16, B={B}, H={H}, d={D}")
            gpu_rows = _run_triton_gpu((1024, 2048, 4096) if args.quick else (1024, 2048, 4096, 8192, 16384))
            table = _triton_gpu_table(gpu_rows)
            print("\n" + table)
            (args.out / "flash_gpu.json").write_text(json.dumps({"machine": info, "results": gpu_rows,
                                                                 "table": table}, indent=1))
        print(f"\nwritten: {args.out}/flash.json, flash.md")
    if "distributed" in args.suites:
        print(f"\nChapter 10: ring (contiguous, zigzag) and Ulysses over 4 local processes (gloo), B={B}, H={H}, "
              f"d={D}, {FLASH_THREADS} thread(s) each")
        ring_rows = run_ring(QUICK["ring_length"] if args.quick else 4096, repeats=2 if args.quick else 3)
        print("\n" + ring_table(ring_rows))
        (args.out / "distributed.json").write_text(json.dumps({"machine": info, "results": ring_rows}, indent=1))
        (args.out / "distributed.md").write_text(f"Machine: {info}.\n\n{ring_table(ring_rows)}\n")
        print(f"\nwritten: {args.out}/distributed.json, distributed.md")
    if "sparse" not in args.suites:
        return 0
    lengths = args.lengths or (LENGTHS[:3] if args.quick else LENGTHS)
    print(f"\nChapter 7: sparse attention, B={B}, H={H}, d={D}, window +-{WINDOW}, each in a fresh process")
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
