"""fastdistill: fused Triton/CUDA kernels for distillation training (sCM/rCM, DMD/VSD/SiD, logit KD)."""

import torch

from fastdistill import coeffs
from fastdistill._backend import BackendUnavailableError, use_backend
from fastdistill.modules import KDLoss
from fastdistill.ops.fused_linear_kd import fused_linear_kd_loss
from fastdistill.ops.jvp_attention import jvp_attention
from fastdistill.ops.kd_softmax import kd_loss
from fastdistill.ops.score import denoise_regression_loss, scm_tangent_loss, score_distill, sid_loss

__version__ = "0.1.0"


def _source_tree_kernels() -> None:
    """``fastdistill.kernels`` is the top-level ``kernels/`` of a checkout (setup.py maps it; installed, it sits in
    the package). A checkout imported from its root, e.g. ``python -m fastdistill`` there after a non-editable
    ``pip install .``, shadows the installed package with ``fastdistill/`` alone: register ``kernels/`` beside it
    (before, every Triton call failed with "No module named 'fastdistill.kernels'")."""
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(os.path.dirname(here), "kernels")
    init = os.path.join(src, "__init__.py")
    if "fastdistill.kernels" in sys.modules or os.path.isdir(os.path.join(here, "kernels")) \
            or not os.path.isfile(init) or not os.path.isfile(os.path.join(src, "kd_softmax.py")):
        return
    try:  # an editable install's finder that maps this very checkout's kernels/: leave it to that
        found = importlib.util.find_spec("fastdistill.kernels")
        origin = os.path.realpath(found.origin) if found is not None and found.origin else ""
        ours = (os.path.realpath(src), os.path.realpath(os.path.join(here, "kernels")))
        if origin and os.path.dirname(origin) in ours:
            return
    except (ImportError, ValueError):
        pass  # (another checkout's mapping, e.g. a venv's editable install of a different clone: this one's wins)
    spec = importlib.util.spec_from_file_location("fastdistill.kernels", init, submodule_search_locations=[src])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fastdistill.kernels"] = mod
    spec.loader.exec_module(mod)
    globals()["kernels"] = mod  # as the import system binds a submodule on its parent


_source_tree_kernels()


def available_backends(op: str, x, **kwargs) -> dict[str, list[str]]:
    """For each backend, the reasons it cannot run ``op`` on tensors like ``x`` (empty: it can). ``x`` is the op's
    main input (``jvp_attention``: q, whose head dim counts); keyword arguments describe the rest of a call where a
    backend's answer depends on it (``jvp_attention``: ``head_dims=(Dqk, Dv)``, ``batch_heads=(B, Hq)``;
    ``kd_loss``: ``teacher_dtype=``, ``topk=True``, ``fp64=True``)."""
    from fastdistill import _backend

    op = _OP_ALIASES.get(op, op)
    if op not in _backend._REGISTRY:
        raise ValueError(f"op: expected one of {sorted({*_backend._REGISTRY, *_OP_ALIASES})}, got {op!r}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor (the op's main input), got {type(x).__name__}")
    return _backend.reasons(op, x, **kwargs)


_OP_ALIASES = {"fused_linear_kd_loss": "kd_loss"}  # (its chunks run kd_loss's kernels)


__all__ = [
    "BackendUnavailableError",
    "KDLoss",
    "available_backends",
    "coeffs",
    "denoise_regression_loss",
    "fused_linear_kd_loss",
    "jvp_attention",
    "kd_loss",
    "scm_tangent_loss",
    "score_distill",
    "sid_loss",
    "use_backend",
]
