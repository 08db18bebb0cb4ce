"""Test tiers. CPU tier: the reference backend, and the Triton kernels through Triton's
interpreter when TRITON_INTERPRET=1 (the README's test command sets it). GPU tier: marker
``gpu``, skipped with a reason where no CUDA device is visible; adds the cuda backend.

Known interpreter defect (Triton 3.6–3.9): ``tl.dot`` on bf16 operands multiplies raw bits.
Kernels that use ``tl.dot`` are tested with the interpreter's ``create_dot`` patched below to
upcast bf16 operands (the kernels themselves are never changed for the interpreter's sake).
"""

from __future__ import annotations

import os

import pytest
import torch

import fastdistill
from fastdistill import _backend

INTERPRET = _backend.interpreting()


def cpu_backends() -> list:
    out = [pytest.param("reference", id="reference")]
    if INTERPRET:
        out.append(pytest.param("triton", id="triton"))
    else:
        out.append(pytest.param("triton", id="triton", marks=pytest.mark.skip(
            reason="Triton on the CPU needs TRITON_INTERPRET=1 (the README test command sets it)")))
    return out


def device_backends() -> list:
    if not torch.cuda.is_available():
        return cpu_backends()
    return [pytest.param(b, id=b) for b in ("reference", "triton", "cuda")]


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
    """Upcast bf16 operands of tl.dot in Triton's interpreter (see module docstring)."""
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

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, up(a), up(b), d, *args, **kwargs)

    builder.create_dot = create_dot
    builder._fd_patched = True


if INTERPRET and os.environ.get("FASTDISTILL_NO_DOT_PATCH", "0") != "1":
    _patch_interpreter_bf16_dot()
