"""Integrations with other libraries: the SDPA drop-in for unmodified models
(``jvp_sdpa`` / ``patch_sdpa`` / ``unpatch_sdpa``) and TRL-compatible KD losses
(``fastdistill.integrations.trl``). Nothing is patched at import time."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "jvp_sdpa": "fastdistill.integrations.sdpa",
    "patch_sdpa": "fastdistill.integrations.sdpa",
    "unpatch_sdpa": "fastdistill.integrations.sdpa",
    "sdpa_stats": "fastdistill.integrations.sdpa",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastdistill.integrations' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
