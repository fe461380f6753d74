"""The Triton kernels (forward and backward), run on the CPU in Triton's interpreter at small sizes.

References: torch's SDPA (float64) and the course's tiled ``flash_attention``. Triton reads
``TRITON_INTERPRET`` once, when it is imported, and torch imports Triton for its own compiler
(``torch._dynamo``), so by the time these tests run Triton is already imported in this process
without the interpreter. The kernel therefore runs where a learner's CPU runs it: in a fresh
process that sets ``TRITON_INTERPRET=1`` before importing anything. One such process runs every
case below and reports the errors as JSON.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from attn_course import kernels

needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="Triton is not installed")

# (name, L_q, L_k, d, d_v, causal, dtype, scale, broadcast)
CASES = [
    ("square causal", 33, 33, 16, 16, True, "float32", None, False),
    ("square full", 33, 33, 16, 16, False, "float32", None, False),
    ("fewer queries, d_v != d", 20, 45, 8, 24, True, "float32", None, False),
    ("more queries than keys, d = 64", 50, 13, 64, 32, True, "float32", None, False),
    ("one query", 1, 17, 4, 4, False, "float32", None, False),
    ("one tile exactly", 16, 16, 32, 8, True, "float32", None, False),
    ("float64, scale, broadcast batch", 21, 30, 8, 5, True, "float64", 0.3, True),
    ("float16", 24, 24, 16, 16, True, "float16", None, False),
    ("bfloat16", 24, 24, 16, 16, True, "bfloat16", None, False),
    ("large scores", 20, 20, 16, 4, True, "float32", 30.0, False),
]

RUNNER = """
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"          # before torch, before triton: as a learner's notebook does
import torch
import torch.nn.functional as F
from attn_course import flash
from attn_course.kernels import triton_flash_attention
torch.set_num_threads(1)
results = {}
for name, L_q, L_k, d, d_v, causal, dtype, scale, broadcast in json.loads(sys.argv[1]):
    g = torch.Generator().manual_seed(L_q * 100 + L_k)
    dt = getattr(torch, dtype)
    qs, ks, vs = ((2, 1), (1, 2), (1, 1)) if broadcast else ((2, 1),) * 3
    q = torch.randn(*qs, L_q, d, generator=g, dtype=torch.float64).to(dt)
    k = torch.randn(*ks, L_k, d, generator=g, dtype=torch.float64).to(dt)
    v = torch.randn(*vs, L_k, d_v, generator=g, dtype=torch.float64).to(dt)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = triton_flash_attention(*leaves, is_causal=causal, scale=scale)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=causal, scale=scale)
    tiled = flash.flash_attention(q, k, v, is_causal=causal, scale=scale, block_q=16, block_k=16)
    dout = torch.randn(*out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, dout.to(dt))
    want = torch.autograd.grad(ref, ref_leaves, dout)
    results[name] = {"shape": list(out.shape), "ref_shape": list(ref.shape), "dtype": str(out.dtype),
                     "finite": bool(out.isfinite().all()),
                     "err_sdpa": (out.double() - ref).abs().max().item(),
                     "err_flash": (out.double() - tiled.double()).abs().max().item(),
                     "grad_shapes_ok": all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(grads, leaves)),
                     "grad_err": max((a.double() - b).abs().max().item() for a, b in zip(grads, want))}
small = [torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True) for n in (5, 6, 6)]
results["gradcheck"] = {c: torch.autograd.gradcheck(
    lambda q, k, v, c=c: triton_flash_attention(q, k, v, is_causal=c, scale=0.7), small) for c in (False, True)}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def interpreted():
    """Every case, run once in a fresh process with the interpreter on."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(CASES)], capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


TOLERANCE = {"float64": 1e-12, "float32": 3e-6, "float16": 2e-2, "bfloat16": 2e-2}


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_equals_sdpa_and_flash_attention(interpreted, case):
    name, *_, dtype, scale, broadcast = case
    r = interpreted[name]
    assert r["shape"] == r["ref_shape"] and r["dtype"] == f"torch.{dtype}" and r["finite"]
    tol = TOLERANCE[dtype] * (30 if scale == 30.0 else 1)        # scores near 30 * 30: sharper softmax
    assert r["err_sdpa"] < tol, r
    assert r["err_flash"] < max(tol, 2e-2 if dtype in ("float16", "bfloat16") else tol), r
    # the backward kernels: gradients of the inputs' shapes and dtypes, equal to SDPA's backward
    assert r["grad_shapes_ok"], r
    assert r["grad_err"] < tol * (10 if dtype in ("float32", "float16") else 3), r


@needs_triton
def test_backward_kernels_pass_gradcheck_in_float64(interpreted):
    assert interpreted["gradcheck"] == {"false": True, "true": True} or interpreted["gradcheck"] == {
        "False": True, "True": True}


@needs_triton
def test_switching_the_interpreter_on_after_triton_was_imported_says_restart():
    code = ("import os, triton\n"
            "os.environ['TRITON_INTERPRET'] = '1'\n"
            "import torch\n"
            "from attn_course.kernels import triton_flash_attention\n"
            "q = torch.randn(1, 4, 8)\n"
            "try:\n    triton_flash_attention(q, q, q)\n"
            "except RuntimeError as e:\n    print('RuntimeError:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RuntimeError" in proc.stdout and "after Triton was imported" in proc.stdout and "Restart" in proc.stdout


def test_cpu_tensors_without_the_interpreter_say_what_to_set(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.triton_flash_attention(q, q, q)


def test_without_triton_the_call_says_what_to_install(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(sys.modules, "triton", None)        # import triton -> ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    q = torch.randn(1, 4, 8)
    with pytest.raises(RuntimeError, match="pip install triton"):
        kernels.triton_flash_attention(q, q, q)


def test_bad_input_is_named(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="d_k"):
        kernels.triton_flash_attention(q, torch.randn(1, 4, 6), q)
    with pytest.raises(TypeError, match="scale"):
        kernels.triton_flash_attention(q, q, q, scale="big")


def test_the_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import attn_course, attn_course.kernels, attn_course.flash\n"
            "print(attn_course.kernels.triton_available())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
