"""fastdistill on torch.distributed process groups: context-parallel JVP attention (ring and
Ulysses) and vocab-parallel KD. Communication is torch.distributed collectives only.

Imported lazily (``fastdistill.distributed.<name>``) so that ``import fastdistill`` never
touches torch.distributed.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "context_parallel_jvp_attention": "fastdistill.distributed.context_parallel",
    "zigzag_shard": "fastdistill.distributed.context_parallel",
    "zigzag_unshard": "fastdistill.distributed.context_parallel",
    "vocab_parallel_kd_loss": "fastdistill.distributed.vocab_parallel",
    "vocab_parallel_fused_linear_kd_loss": "fastdistill.distributed.vocab_parallel",
    "vocab_parallel_topk": "fastdistill.distributed.vocab_parallel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'fastdistill.distributed' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
