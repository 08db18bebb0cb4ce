"""Helpers shared by the op families: argument checks and trace-safe backend selection."""

from __future__ import annotations

import torch

from fastdistill import _backend


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")


@torch.compiler.assume_constant_result
def _select(name: str, device: torch.device, dtype: torch.dtype, forced: str | None, extra: tuple) -> str:
    # Evaluated once per trace under torch.compile (a constant of the graph), every call in eager.
    with _backend.use_backend(forced):
        return _backend.select(name, torch.empty(0, device=device, dtype=dtype), **dict(extra))


def select_backend(name: str, x: torch.Tensor, **extra) -> str:
    """The backend for op ``name`` on tensors like ``x``; ``extra`` goes to each ``why_not``.
    Under torch.compile the choice is fixed when the graph is traced."""
    return _select(name, x.device, x.dtype, _backend.forced_backend(), tuple(sorted(extra.items())))
