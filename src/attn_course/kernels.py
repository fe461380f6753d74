r"""Chapter 8: FlashAttention's forward and backward passes as GPU kernels, written in Triton.

The same algorithm as :func:`attn_course.flash.flash_attention` (FlashAttention-2's loop
order, Dao 2023): in the forward kernel, one *program* per tile of ``BLOCK_M`` queries of one
(batch, head); it loads its query tile once, streams the key and value tiles through on-chip
memory with the online softmax, and writes its output tile and the log-sum-exp once. Causal
programs stop at the diagonal, so the tiles above it cost nothing. The backward pass runs two
kernels that recompute the weights from the saved log-sum-exp: one program per key tile for
``dK`` and ``dV``, one per query tile for ``dQ``.

**Where it runs.** On a CUDA GPU, Triton compiles the kernel to machine code. On a CPU,
Triton's interpreter runs the same code with NumPy, one program after another: slow, but
exact, which is how the tests, the book and a laptop check it at small sizes. The
interpreter is switched on by the environment variable ``TRITON_INTERPRET=1``, which must
be set before Triton is imported (before this module's first kernel call, in a fresh
process, to be safe).

**Triton is not a dependency of the package.** Colab's PyTorch (CUDA builds of torch on
Linux) ships Triton already; the course machines pin it in ``requirements.txt``. It is
imported lazily: ``import attn_course`` works without it, and only calling the kernel
without it raises a ``RuntimeError`` that says what to install.
"""

from __future__ import annotations

import math
import os

import torch

from .basics import _scores_setup

__all__ = ["triton_flash_attention", "triton_available", "interpreter_on"]

tl = None            # triton.language, bound on first use (the kernel below reads it as a global)
_KERNELS: dict = {}  # compiled kernels, by interpreter mode


def triton_available() -> bool:
    """Whether Triton is installed here (found without importing it, so that the interpreter
    can still be switched on afterwards; it is not needed to import the package).

    Returns:
        ``True`` when ``import triton`` would find a package, else ``False``.

    Example:
        >>> from attn_course.kernels import triton_available
        >>> type(triton_available())         # True with Triton installed (Colab's GPU runtime has it)
        <class 'bool'>
    """
    import importlib.util

    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):       # a stub in sys.modules, or a broken install
        return False


def interpreter_on() -> bool:
    """Whether Triton's interpreter is requested (``TRITON_INTERPRET=1``): kernels then run on CPU tensors.

    Only the environment variable is read; Triton itself reads it once, when it is first
    imported, so set it before that (see :func:`triton_flash_attention`).

    Returns:
        ``True`` when ``TRITON_INTERPRET`` is ``1``, ``true``, ``on`` or ``yes`` (any case).

    Example:
        >>> from attn_course.kernels import interpreter_on
        >>> type(interpreter_on())           # True after os.environ["TRITON_INTERPRET"] = "1"
        <class 'bool'>
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _flash_forward_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, L_q, L_k, D_K, D_V, offset, scale,
                          stride_qb, stride_qm, stride_qd, stride_kb, stride_kn, stride_kd,
                          stride_vb, stride_vn, stride_vd, stride_ob, stride_om, stride_od,
                          IS_CAUSAL: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    # One program: queries [start_m, start_m + BLOCK_M) of one (batch x head), index bh.
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    acc_type = tl.float64 if IS_FP64 else tl.float32
    offs_m = start_m + tl.arange(0, BLOCK_M)                      # query rows
    offs_dk = tl.arange(0, BLOCK_DK)                              # feature columns (padded to a power of 2)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + bh * stride_qb + offs_m[:, None] * stride_qm + offs_dk[None, :] * stride_qd,
                mask=(offs_m[:, None] < L_q) & (offs_dk[None, :] < D_K), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_type)       # running max
    z_i = tl.zeros([BLOCK_M], dtype=acc_type)                     # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_type)           # unnormalised output
    end_n = L_k
    if IS_CAUSAL:                                                 # keys after the tile's last query's last key: skipped
        end_n = tl.minimum(L_k, tl.maximum(start_m + BLOCK_M + offset, 0))
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(k_ptr + bh * stride_kb + offs_n[None, :] * stride_kn + offs_dk[:, None] * stride_kd,
                     mask=(offs_n[None, :] < L_k) & (offs_dk[:, None] < D_K), other=0.0)   # K^T tile
        s = tl.dot(q, kt, input_precision=PRECISION, out_dtype=acc_type) * scale       # (BLOCK_M, BLOCK_N)
        allowed = offs_n[None, :] < L_k
        if IS_CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None] + offset)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)    # a row with no key yet: no NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)                              # rescales what came before
        z_i = z_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + bh * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < L_k) & (offs_dv[None, :] < D_V), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=acc_type)
        m_i = m_new
    z_safe = tl.where(z_i > 0, z_i, 1.0)
    out = acc / z_safe[:, None]                                   # a query with no key: 0
    tl.store(o_ptr + bh * stride_ob + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=(offs_m[:, None] < L_q) & (offs_dv[None, :] < D_V))
    lse = tl.where(z_i > 0, m_i + tl.log(z_safe), float("-inf"))
    tl.store(lse_ptr + bh * L_q + offs_m, lse, mask=offs_m < L_q)


def _flash_backward_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                                L_q, L_k, D_K, D_V, scale,
                                stride_qb, stride_qm, stride_qd, stride_kb, stride_kn, stride_kd,
                                stride_vb, stride_vn, stride_vd, stride_ob, stride_om, stride_od,
                                IS_CAUSAL: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    # One program: keys [start_n, start_n + BLOCK_N) of one (batch x head); its dK and dV stay on
    # chip while the query tiles stream past (FlashAttention-2, Algorithm 2). dK, dV have the
    # strides of K, V (dQ, in the other kernel, those of Q); lse and D are (batch x head, L_q).
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    acc_type = tl.float64 if IS_FP64 else tl.float32
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_rows = offs_n[:, None] < L_k
    k = tl.load(k_ptr + bh * stride_kb + offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
                mask=kv_rows & (offs_dk[None, :] < D_K), other=0.0)                   # (BLOCK_N, DK)
    v = tl.load(v_ptr + bh * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=kv_rows & (offs_dv[None, :] < D_V), other=0.0)                   # (BLOCK_N, DV)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=acc_type)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=acc_type)
    start_m = 0
    if IS_CAUSAL:                                   # earlier query tiles see none of these keys
        start_m = (start_n // BLOCK_M) * BLOCK_M
    for m0 in range(start_m, L_q, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q_rows = offs_m[:, None] < L_q
        q = tl.load(q_ptr + bh * stride_qb + offs_m[:, None] * stride_qm + offs_dk[None, :] * stride_qd,
                    mask=q_rows & (offs_dk[None, :] < D_K), other=0.0)
        do = tl.load(do_ptr + bh * stride_ob + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                     mask=q_rows & (offs_dv[None, :] < D_V), other=0.0)
        lse = tl.load(lse_ptr + bh * L_q + offs_m, mask=offs_m < L_q, other=float("inf"))
        delta = tl.load(delta_ptr + bh * L_q + offs_m, mask=offs_m < L_q, other=0.0)
        lse = tl.where(lse == float("-inf"), float("inf"), lse)                  # no key at all: A = 0
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=acc_type) * scale
        allowed = q_rows & (offs_n[None, :] < L_k)
        if IS_CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        a = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)                     # the weights, recomputed
        dv += tl.dot(tl.trans(a.to(do.dtype)), do, input_precision=PRECISION, out_dtype=acc_type)
        da = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=acc_type)
        ds = a * (da - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=acc_type) * scale
    tl.store(dk_ptr + bh * stride_kb + offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
             dk.to(dk_ptr.dtype.element_ty), mask=kv_rows & (offs_dk[None, :] < D_K))
    tl.store(dv_ptr + bh * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
             dv.to(dv_ptr.dtype.element_ty), mask=kv_rows & (offs_dv[None, :] < D_V))


def _flash_backward_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                              L_q, L_k, D_K, D_V, scale,
                              stride_qb, stride_qm, stride_qd, stride_kb, stride_kn, stride_kd,
                              stride_vb, stride_vn, stride_vd, stride_ob, stride_om, stride_od,
                              IS_CAUSAL: tl.constexpr, IS_FP64: tl.constexpr, PRECISION: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    # One program: queries [start_m, start_m + BLOCK_M); its dQ stays on chip while the key tiles
    # stream past. (A second pass instead of atomic adds into dQ: simpler, and deterministic.)
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    acc_type = tl.float64 if IS_FP64 else tl.float32
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = offs_m[:, None] < L_q
    q = tl.load(q_ptr + bh * stride_qb + offs_m[:, None] * stride_qm + offs_dk[None, :] * stride_qd,
                mask=q_rows & (offs_dk[None, :] < D_K), other=0.0)
    do = tl.load(do_ptr + bh * stride_ob + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                 mask=q_rows & (offs_dv[None, :] < D_V), other=0.0)
    lse = tl.load(lse_ptr + bh * L_q + offs_m, mask=offs_m < L_q, other=float("inf"))
    delta = tl.load(delta_ptr + bh * L_q + offs_m, mask=offs_m < L_q, other=0.0)
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    dq = tl.zeros([BLOCK_M, BLOCK_DK], dtype=acc_type)
    end_n = L_k
    if IS_CAUSAL:
        end_n = tl.minimum(L_k, start_m + BLOCK_M)
    for n0 in range(0, end_n, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_rows = offs_n[:, None] < L_k
        k = tl.load(k_ptr + bh * stride_kb + offs_n[:, None] * stride_kn + offs_dk[None, :] * stride_kd,
                    mask=kv_rows & (offs_dk[None, :] < D_K), other=0.0)
        v = tl.load(v_ptr + bh * stride_vb + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=kv_rows & (offs_dv[None, :] < D_V), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=acc_type) * scale
        allowed = q_rows & (offs_n[None, :] < L_k)
        if IS_CAUSAL:
            allowed = allowed & (offs_n[None, :] <= offs_m[:, None])
        a = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        da = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=acc_type)
        ds = a * (da - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION, out_dtype=acc_type) * scale
    tl.store(dq_ptr + bh * stride_qb + offs_m[:, None] * stride_qm + offs_dk[None, :] * stride_qd,
             dq.to(dq_ptr.dtype.element_ty), mask=q_rows & (offs_dk[None, :] < D_K))


def _kernel():
    """The jitted kernels, forward, dK dV and dQ (interpreted or compiled, as ``TRITON_INTERPRET`` says),
    made on first use."""
    global tl
    try:
        import triton
        import triton.language
    except ImportError as exc:
        raise RuntimeError(
            "triton_flash_attention needs Triton, which is not installed here. On Linux with a CUDA "
            "GPU (Colab's GPU runtime already has it) run `pip install triton`; on a CPU also set "
            "os.environ['TRITON_INTERPRET'] = '1' before the first call, to run the kernel in "
            "Triton's interpreter.") from exc
    tl = triton.language
    mode = interpreter_on()
    from triton.runtime.interpreter import InterpretedFunction

    if mode != isinstance(triton.language.zeros, InterpretedFunction):
        # Triton decides at import whether its own library functions are interpreted.
        raise RuntimeError(
            "TRITON_INTERPRET was " + ("set to 1 after Triton was imported" if mode else
                                       "switched off after Triton was imported with it on")
            + ": Triton reads it once, at import (and torch imports Triton for its compiler, so "
            "importing torch's helpers can be enough). Restart the kernel or process and set "
            "os.environ['TRITON_INTERPRET'] (to '1' on a CPU) before importing anything else.")
    if mode not in _KERNELS:
        _KERNELS[mode] = tuple(triton.jit(fn) for fn in (_flash_forward_kernel, _flash_backward_dkdv_kernel,
                                                          _flash_backward_dq_kernel))
    return _KERNELS[mode]


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def triton_flash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                           is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    r"""Exact attention computed by Triton kernels in tiles: FlashAttention-2's forward and backward.

    .. math:: O = \mathrm{softmax}(\text{scale}\; Q K^\top)\, V,

    one program per ``(query tile, batch x head)``, each streaming the key and value tiles
    with the online softmax (Dao et al. 2022; Dao 2023), skipping the tiles above the
    diagonal when causal (top-left aligned, as torch's SDPA: key ``j <= i``). Accumulates in
    float32 (float64 for float64 inputs); the output keeps the input's dtype.

    Differentiable: the forward kernel saves the output and the log-sum-exp of each query, and
    the backward pass (FlashAttention-2, Algorithm 2) computes :math:`D = \mathrm{rowsum}(dO \circ O)`,
    then runs two kernels that recompute the weights tile by tile, :math:`A = e^{S - \ell}`: one
    program per key tile accumulating :math:`dK = \text{scale}\, dS^\top Q` and :math:`dV = A^\top dO`,
    and one per query tile accumulating :math:`dQ = \text{scale}\, dS\, K`, with
    :math:`dS = A \circ (dO\, V^\top - D)`.

    Args:
        query: ``(..., L_q, d_k)``, on a CUDA device, or on the CPU with Triton's interpreter
            on (``TRITON_INTERPRET=1``); ``key`` and ``value`` on the same device.
        key: ``(..., L_k, d_k)``.
        value: ``(..., L_k, d_v)``.
        is_causal: hide the keys ``j > i``.
        scale: multiplies the scores; defaults to ``1 / sqrt(d_k)``.

    Returns:
        ``(..., L_q, d_v)``, equal to ``torch.nn.functional.scaled_dot_product_attention``.
        A ``RuntimeError`` says what to install or set when Triton is missing, or when the
        tensors are on the CPU and the interpreter is off.

    Example:
        On a CPU, set ``TRITON_INTERPRET=1`` first, in a fresh process, before anything imports
        Triton; on a CUDA GPU, leave it unset and put the tensors on ``"cuda"``. The kernel's
        lines are skipped when the docs are tested, which cannot guarantee either.

        >>> import os
        >>> os.environ["TRITON_INTERPRET"] = "1"  # doctest: +SKIP
        >>> import torch
        >>> import torch.nn.functional as F
        >>> from attn_course.kernels import triton_flash_attention
        >>> _ = torch.manual_seed(0)
        >>> q, k, v = torch.randn(3, 2, 4, 40, 16).unbind(0)    # (B, H, L, d) each
        >>> out = triton_flash_attention(q, k, v, is_causal=True)  # doctest: +SKIP
        >>> torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True),
        ...                atol=1e-5)  # doctest: +SKIP
        True
    """
    scale, _ = _scores_setup(query, key, value, None, False, scale)
    if query.device.type == "cpu" and not interpreter_on():
        raise RuntimeError(
            "triton_flash_attention got CPU tensors, but Triton's interpreter is off. Move the "
            "tensors to a CUDA GPU, or set os.environ['TRITON_INTERPRET'] = '1' before Triton is "
            "first imported (at the top of the notebook or script) to run the kernel on the CPU.")
    if query.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"triton_flash_attention runs on CUDA tensors (or CPU ones in Triton's "
                           f"interpreter), not on {query.device.type}")
    _kernel()
    return _TritonFlashAttention.apply(query, key, value, bool(is_causal), scale)


def _launch_options(dtype: torch.dtype, d_k: int, d_v: int) -> dict:
    # Tiles: 64 x 64 on a GPU (tl.dot needs at least 16); 16 x 16 in the interpreter, which runs
    # the programs one by one in NumPy, so that small examples stay quick.
    block = 16 if interpreter_on() else 64
    return dict(IS_FP64=dtype == torch.float64,
                PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
                BLOCK_M=block, BLOCK_N=block, BLOCK_DK=max(16, _next_pow2(d_k)), BLOCK_DV=max(16, _next_pow2(d_v)))


class _TritonFlashAttention(torch.autograd.Function):
    """Forward kernel saving ``(O, lse)``; backward kernels recomputing the weights from them."""

    @staticmethod
    def forward(ctx, query, key, value, is_causal, scale):
        forward_kernel, _, _ = _kernel()
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
        L_q, L_k, d_k, d_v = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
        n = math.prod(batch)
        # NumPy, under the interpreter, has no bfloat16: there the tiles are read in float32 (every
        # bfloat16 number is one exactly) and the results are rounded back to bfloat16.
        work = torch.float32 if query.dtype == torch.bfloat16 and interpreter_on() else query.dtype
        q = query.expand(*batch, L_q, d_k).reshape(n, L_q, d_k).to(work).contiguous()
        k = key.expand(*batch, L_k, d_k).reshape(n, L_k, d_k).to(work).contiguous()
        v = value.expand(*batch, L_k, d_v).reshape(n, L_k, d_v).to(work).contiguous()
        out = torch.empty(n, L_q, d_v, dtype=work, device=value.device)
        lse = torch.empty(n, L_q, dtype=torch.float64 if work == torch.float64 else torch.float32,
                          device=value.device)
        if n and L_q:
            opts = _launch_options(work, d_k, d_v)
            grid = (math.ceil(L_q / opts["BLOCK_M"]), n)
            forward_kernel[grid](q, k, v, out, lse, L_q, L_k, d_k, d_v, 0, scale,
                                 *q.stride(), *k.stride(), *v.stride(), *out.stride(), IS_CAUSAL=is_causal, **opts)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.info = (is_causal, scale, batch, query.shape, key.shape, value.shape, query.dtype)
        return out.reshape(*batch, L_q, d_v).to(value.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        _, dkdv_kernel, dq_kernel = _kernel()
        q, k, v, out, lse = ctx.saved_tensors
        is_causal, scale, batch, q_shape, k_shape, v_shape, dtype = ctx.info
        n, L_q, d_k = q.shape
        L_k, d_v = k.shape[1], v.shape[2]
        do = grad_out.expand(*batch, L_q, d_v).reshape(n, L_q, d_v).to(q.dtype).contiguous()
        acc = lse.dtype
        delta = (do.to(acc) * out.to(acc)).sum(-1).contiguous()                 # D = rowsum(dO * O)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if n and L_q:
            opts = _launch_options(q.dtype, d_k, d_v)
            common = (L_q, L_k, d_k, d_v, scale, *q.stride(), *k.stride(), *v.stride(), *do.stride())
            dkdv_kernel[(math.ceil(L_k / opts["BLOCK_N"]), n)](q, k, v, do, lse, delta, dk, dv, *common,
                                                               IS_CAUSAL=is_causal, **opts)
            dq_kernel[(math.ceil(L_q / opts["BLOCK_M"]), n)](q, k, v, do, lse, delta, dq, *common,
                                                             IS_CAUSAL=is_causal, **opts)
        else:
            dq.zero_(), dk.zero_(), dv.zero_()
        grads = []
        for g, shape in ((dq, q_shape), (dk, k_shape), (dv, v_shape)):
            g = g.reshape(*batch, *g.shape[1:]).sum_to_size(shape)
            grads.append(g.to(dtype))
        return (*grads, None, None)
