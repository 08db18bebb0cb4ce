"""Glue shared by the CUDA backends: the extension module, raw pointers, dtype codes."""

from __future__ import annotations

import torch

from fastdistill import _backend

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # the codes csrc/bindings.cpp expects


def ext():
    """The compiled extension, or a RuntimeError with the reason it is unavailable."""
    mod = _backend.extension()
    if mod is None:
        raise RuntimeError(f"fastdistill CUDA backend: {_backend.extension_error()}")
    return mod


def require_cuda(name: str, x: torch.Tensor) -> None:
    if x.device.type != "cuda":
        raise ValueError(f"{name}: expected a CUDA tensor, got device {x.device}")


def ptr(t: torch.Tensor | None) -> int:
    """The device address of ``t`` (0 for None)."""
    return 0 if t is None else t.data_ptr()
