"""Test tiers. CPU tier: the reference backend, and the Triton kernels through Triton's
interpreter when TRITON_INTERPRET=1 (the README's test command sets it). GPU tier: marker
``gpu``, skipped with a reason where no CUDA device is visible; adds the cuda backend.

Known interpreter defects (Triton 3.6–3.9): ``tl.dot`` on bf16 operands multiplies raw bits,
and fp32 → bf16 casts truncate instead of rounding to nearest even. Both are patched below in
the interpreter (``create_dot`` upcasts bf16 operands, ``cast_impl`` rounds like a GPU); the
kernels themselves are never changed for the interpreter's sake.

One interpreter artefact is patched with them: ``tl.dot`` is ``np.matmul`` on the operands as they
lie in memory, and ``tl.trans`` hands it a transposed view, for which the BLAS picks another
small-matrix kernel with another summation order. So ``dot(k, trans(q))`` is not bitwise the
transpose of ``dot(q, trans(k))`` (≈ 1 ulp apart on ~20% of fp32 entries). On a GPU ``tl.trans`` only
relabels registers and an fp32 dot sums each entry over K in one order whatever the operand
layout, which the flash backward relies on: it recomputes S and expects S − lse to be exactly
−ln l at the row max. ``create_dot`` therefore hands the BLAS contiguous operands.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import fastdistill
from fastdistill import _backend

INTERPRET = _backend.interpreting()

# Property tests (hypothesis). "ci", the default: derandomised (the same examples on every run, so a CI
# failure reproduces), no example database, no deadline (the interpreter is slow and uneven).
# FD_HYPOTHESIS_PROFILE=explore draws fresh random examples, FD_HYPOTHESIS_EXAMPLES=N sets how many.
_EXAMPLES = int(os.environ.get("FD_HYPOTHESIS_EXAMPLES", "0")) or None
_SLOW = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("ci", derandomize=True, database=None, deadline=None, suppress_health_check=_SLOW,
                          print_blob=True, **({"max_examples": _EXAMPLES} if _EXAMPLES else {}))
settings.register_profile("explore", deadline=None, database=None, suppress_health_check=_SLOW, print_blob=True,
                          max_examples=_EXAMPLES or 200)
settings.load_profile(os.environ.get("FD_HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> settings:
    """``@examples(n)`` on a property test: n examples under the "ci" profile (sized for the CPU suite's time),
    the profile's count when FD_HYPOTHESIS_EXAMPLES is set or under "explore"."""
    if _EXAMPLES or settings.default.max_examples != settings.get_profile("ci").max_examples:
        return settings()
    return settings(max_examples=n)


def cpu_backends() -> list:
    out = [pytest.param("reference", id="reference")]
    if INTERPRET:
        out.append(pytest.param("triton", id="triton"))
    else:
        out.append(pytest.param("triton", id="triton", marks=pytest.mark.skip(
            reason="Triton on the CPU needs TRITON_INTERPRET=1 (the README test command sets it)")))
    return out


@pytest.fixture(params=cpu_backends())
def backend(request) -> str:
    return request.param


@pytest.fixture
def use(backend):
    """Run the test body with the parametrised backend forced."""
    with fastdistill.use_backend(backend):
        yield backend


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU tier: no CUDA device visible on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _patch_interpreter_bf16_dot() -> None:
    """Upcast bf16 operands of tl.dot in Triton's interpreter, and make them contiguous (see module
    docstring)."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or getattr(builder, "_fd_patched", False) or not hasattr(builder, "create_dot"):
        return
    original = builder.create_dot

    def up(t):
        if t.dtype == tl.bfloat16:  # bf16 is stored as raw uint16 bits: widen to fp32 exactly
            bits = t.data.astype(np.uint16).astype(np.uint32) << np.uint32(16)
            return interpreter.TensorHandle(bits.view(np.float32), tl.float32)
        return t

    def contiguous(t):  # the summation order must not depend on the operand's layout (module docstring)
        return interpreter.TensorHandle(np.ascontiguousarray(t.data), t.dtype)

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, contiguous(up(a)), contiguous(up(b)), d, *args, **kwargs)

    builder.create_dot = create_dot
    builder._fd_patched = True


def _patch_interpreter_bf16_cast() -> None:
    """Triton's interpreter (3.6–3.9) converts fp32 → bf16 by truncation (``cast_impl`` passes no
    rounding mode) and fp64 → bf16 into garbage; GPUs round to nearest even. Round like the GPU, so that
    bf16 results of the interpreted kernels are held to the same tolerance as on a GPU."""
    try:
        import numpy as np
        import triton.language as tl
        from triton.runtime import interpreter
    except Exception:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or getattr(builder, "_fd_cast_patched", False) or not hasattr(builder, "cast_impl"):
        return
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar in (tl.float32, tl.float64) and dst_type.scalar == tl.bfloat16:  # (fp64: garbage before)
            npt = np.float32 if src.dtype.scalar == tl.float32 else np.float64
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=npt)).to(torch.bfloat16)
            return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl
    builder._fd_cast_patched = True


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter converts a scalar tensor to an index with int(ndarray of shape (1,)), which
    NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); Triton's own fix
    (triton-lang/triton#9172, in 3.9) squeezes first. (Spawned context-parallel ranks import conftest too.)"""
    try:
        from triton.runtime import interpreter
    except Exception:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fd_patched", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._fd_patched = True
    interpreter._patch_lang_tensor = patched


if INTERPRET and os.environ.get("FASTDISTILL_NO_INTERPRETER_PATCH", "0") != "1":
    _patch_interpreter_bf16_dot()
    _patch_interpreter_bf16_cast()
    _patch_interpreter_index()
