"""What can run where: Triton, the CUDA extension, env switches, and the dispatcher.

Backends, in fixed priority order: ``cuda`` (the compiled extension ``fastdistill._C``),
``triton``, ``reference`` (pure PyTorch, any device). Each answers ``why_not(...)`` with a
list of reasons it cannot run the given inputs; the dispatcher takes the first with none.
``FASTDISTILL_BACKEND=<name>`` (or ``with fastdistill.use_backend(name):``) forces one; if
it cannot run, the error lists every backend's reasons. There is no silent fallback.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import platform
import re
import threading
import warnings
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("cuda", "triton", "reference")

_local = threading.local()


def interpreting() -> bool:
    """True when Triton kernels run through Triton's CPU interpreter (TRITON_INTERPRET=1), read as Triton reads it
    (``true`` / ``yes`` / ``on`` are on, ``false`` / ``off`` off: before, any value but "" and "0" was on, so
    TRITON_INTERPRET=false sent CPU tensors to a Triton that was not interpreting)."""
    v = os.environ.get("TRITON_INTERPRET", "").lower()  # (no strip: Triton reads " 1" as off)
    return v in ("1", "true", "yes", "on", "y")


# ----------------------------------------------------------------------------- Triton
def _probe_triton() -> tuple[object | None, str | None]:
    try:
        import triton  # noqa: F401

        return triton, None
    except Exception as exc:  # ImportError, or a broken install
        if isinstance(exc, ModuleNotFoundError) and exc.name == "numpy":  # imported by the interpreter only
            return None, ("triton is not importable: Triton's interpreter (TRITON_INTERPRET=1) needs numpy, which "
                          "is not installed (pip install numpy)")
        return None, f"triton is not importable ({type(exc).__name__}: {exc})"


_TRITON, _TRITON_ERR = _probe_triton()


def triton_why_not(device: torch.device) -> list[str]:
    if _TRITON is None:
        return [str(_TRITON_ERR)]
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        if major < 8:
            return [f"GPU compute capability {major}.x < 8.0 (Ampere) is not supported"]
        if interpreting():
            return ["TRITON_INTERPRET=1 is set: Triton would run on the CPU interpreter, not the GPU"]
        return []
    if device.type == "cpu":
        if interpreting():
            return []
        return ["tensors are on the CPU: Triton runs there only under TRITON_INTERPRET=1 (a test mode)"]
    return [f"device type {device.type!r} is not supported by the Triton kernels"]


# ----------------------------------------------------------------------------- CUDA extension
_EXT = None
_EXT_ERR: str | None = None
_EXT_PROBED = False
_EXT_WARNED = False
EXT_ABI = 1  # must match setup.py EXT_ABI


def extension():
    """The compiled extension module, or None (reason in ``extension_error()``). Warns once."""
    global _EXT, _EXT_ERR, _EXT_PROBED, _EXT_WARNED
    if not _EXT_PROBED:
        _EXT_PROBED = True
        try:
            from fastdistill import _C  # type: ignore[attr-defined]

            abi = getattr(_C, "EXT_ABI", None)
            if abi != EXT_ABI:
                _EXT_ERR = (
                    f"fastdistill._C has binding ABI {abi} but this fastdistill expects {EXT_ABI} (a stale "
                    "build): rebuild with `pip install --no-build-isolation -e .`"
                )
            else:
                _EXT = _C
        except Exception as exc:
            _EXT_ERR = f"fastdistill._C is not built ({type(exc).__name__}: {exc})"
        if _EXT_ERR is not None and torch.cuda.is_available() and not _EXT_WARNED:
            _EXT_WARNED = True
            warnings.warn(f"fastdistill: CUDA backend unavailable: {_EXT_ERR}", RuntimeWarning, stacklevel=2)
    return _EXT


def extension_error() -> str | None:
    extension()
    return _EXT_ERR


def arch_runs(arch: str, major: int, minor: int) -> bool | None:
    """Whether code built for ``arch`` (``sm_90a``, ``sm_80``, ``compute_90``: machine code or PTX, as in the
    extension's ``CUDA_ARCHS``) runs on a GPU of compute capability ``major.minor``; None if unparsable.
    Machine code runs on its major version at the same or a higher minor (``a``: that exact GPU only); PTX
    is compiled by the driver for any GPU at least as new (``a``: that exact GPU; ``f``: its family)."""
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch.strip())
    if m is None:
        return None
    kind, a_major, a_minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if suffix == "a":
        return (a_major, a_minor) == (major, minor)
    if kind == "sm" or suffix == "f":
        return a_major == major and a_minor <= minor
    return (a_major, a_minor) <= (major, minor)


def cuda_why_not(device: torch.device) -> list[str]:
    reasons = []
    if device.type != "cuda":
        reasons.append(f"tensors are on {device.type}, the CUDA extension needs CUDA tensors")
    ext = extension()
    if ext is None:
        reasons.append(str(_EXT_ERR))
    elif device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        archs = [a for a in str(getattr(ext, "CUDA_ARCHS", "")).split(",") if a.strip()]
        runs = [arch_runs(a, major, minor) for a in archs]
        if major < 8:
            reasons.append(f"GPU compute capability {major}.x < 8.0 is not supported")
        elif runs and None not in runs and not any(runs):
            reasons.append(f"fastdistill._C was built for {','.join(archs)}, which does not run on this GPU (compute "
                           f"capability {major}.{minor}): rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\"")
    return reasons


# ----------------------------------------------------------------------------- launch on the tensors' GPU
def on_tensor_device(fn: Callable) -> Callable:
    """Decorator for a kernel launcher: run it with the current CUDA device set to that of its first tensor
    argument (Triton launches on the current device; tensors on cuda:1 while cuda:0 is current would make it read
    the wrong device's memory). A no-op for CPU tensors and when the device already matches."""

    @functools.wraps(fn)
    def launch(*args, **kwargs):
        x = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if x is None or x.device.type != "cuda" or x.device.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(x.device):
            return fn(*args, **kwargs)

    return launch


# ----------------------------------------------------------------------------- small device constants
_EAGER_MAX = 256
_EAGER_CONSTANTS: collections.OrderedDict = collections.OrderedDict()  # uploaded outside capture (an LRU)
_GRAPH_CONSTANTS: list = []  # constants read by captured CUDA graphs: never freed (the graphs keep reading them)
_CONSTANTS_LOCK = threading.Lock()


class _Constant:
    """A cached device constant: the tensor, the event after its upload, the CUDA streams cleared to read it."""

    __slots__ = ("tensor", "ready", "streams")

    def __init__(self, tensor: torch.Tensor, ready, streams: set):
        self.tensor, self.ready, self.streams = tensor, ready, streams


def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(values)`` on ``device`` for a kernel to read (per-call scalars: temperatures, coefficients),
    cached, and never a host synchronisation: a plain host-to-device copy waits for the stream, so a miss on a
    GPU uploads from pinned memory asynchronously. Another stream that reads a cached tensor first waits for its
    upload (an event, on the device) and is recorded on it, so the memory is not reused under that stream's
    kernels after eviction. During CUDA-graph capture a constant uploaded before is reused (torch.cuda.graph
    synchronises first) and a new one is filled by kernels of the graph itself (one per value: capturable);
    either is kept for good (the graph keeps reading it). A graph-filled constant holds its values only once
    its graph has run, so nothing else reads one: eager calls upload their own, another capture fills its own.
    Under torch.compile: a constant of the graph. Read-only by contract."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    device = torch.device(device)
    key = (values, device, dtype)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        with _CONSTANTS_LOCK:
            c = _EAGER_CONSTANTS.get(key)
            if c is None:  # filled by this graph's own kernels: valid in its replays only, so never shared
                t = torch.empty(len(values), dtype=dtype, device=device)
                for i, v in enumerate(values):
                    t[i].fill_(v)
                c = _Constant(t, None, set())
            _GRAPH_CONSTANTS.append(c)
        return c.tensor
    with _CONSTANTS_LOCK:
        c = _EAGER_CONSTANTS.get(key)
        if c is None:
            c = _EAGER_CONSTANTS[key] = _upload(values, device, dtype)
            if len(_EAGER_CONSTANTS) > _EAGER_MAX:
                _EAGER_CONSTANTS.popitem(last=False)
        else:
            _EAGER_CONSTANTS.move_to_end(key)
    if device.type == "cuda":
        cur = torch.cuda.current_stream(device)
        if cur.cuda_stream not in c.streams:
            if c.ready is not None:
                cur.wait_event(c.ready)
            c.tensor.record_stream(cur)
            c.streams.add(cur.cuda_stream)
    return c.tensor


def _upload(values: tuple, device: torch.device, dtype: torch.dtype) -> _Constant:
    if device.type != "cuda":
        return _Constant(torch.tensor(values, dtype=dtype, device=device), None, set())
    stream = torch.cuda.current_stream(device)
    t = torch.tensor(values, dtype=dtype).pin_memory().to(device, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(stream)
    return _Constant(t, ready, {stream.cuda_stream})


# ----------------------------------------------------------------------------- dispatch
# op name -> {backend: why_not(inputs...) -> list[str]}
_REGISTRY: dict[str, dict[str, Callable[..., list[str]]]] = {}


def register(op: str, backend: str, why_not: Callable[..., list[str]]) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _REGISTRY.setdefault(op, {})[backend] = why_not


def ops() -> list[str]:
    return sorted(_REGISTRY)


def forced_backend() -> str | None:
    name = getattr(_local, "forced", None) or os.environ.get("FASTDISTILL_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"FASTDISTILL_BACKEND / use_backend: unknown backend {name!r}; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend for the ops called in this block (this thread only); ``None`` restores dispatch."""
    if name is not None and name not in BACKENDS:
        raise ValueError(f"use_backend: unknown backend {name!r}; expected one of {BACKENDS}")
    old = getattr(_local, "forced", None)
    _local.forced = name
    try:
        yield
    finally:
        _local.forced = old


class BackendUnavailableError(RuntimeError):
    pass


def reasons(op: str, *args, **kwargs) -> dict[str, list[str]]:
    table = _REGISTRY[op]
    return {b: table[b](*args, **kwargs) if b in table else ["not implemented for this op"] for b in BACKENDS}


def _format(op: str, why: dict[str, list[str]]) -> str:
    return "; ".join(f"{b}: {', '.join(r) if r else 'ok'}" for b, r in why.items())


def select(op: str, *args, **kwargs) -> str:
    """The backend that runs ``op`` on these inputs. Raises if a forced backend cannot."""
    why = reasons(op, *args, **kwargs)
    forced = forced_backend()
    if forced is not None:
        if why[forced]:
            raise BackendUnavailableError(
                f"{op}: forced backend {forced!r} cannot run these inputs. Reasons per backend: {_format(op, why)}"
            )
        return forced
    for b in BACKENDS:
        if not why[b]:
            return b
    raise BackendUnavailableError(f"{op}: no backend can run these inputs. Reasons: {_format(op, why)}")


# ----------------------------------------------------------------------------- info
def print_info() -> None:
    import fastdistill  # noqa: F401  (registers the ops)

    print(f"fastdistill {fastdistill.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"triton {getattr(_TRITON, '__version__', 'not installed')}")
    print(f"torch CUDA runtime: {torch.version.cuda or 'none (CPU build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
        dev = torch.device("cuda")
    else:
        print("GPU: none visible")
        dev = torch.device("cpu")
    ext = extension()
    if ext is not None:
        print(f"CUDA extension: built (with torch {getattr(ext, 'BUILD_TORCH', '?')}, "
              f"CUDA runtime {getattr(ext, 'CUDA_RUNTIME', '?')}, archs {getattr(ext, 'CUDA_ARCHS', '?')})")
    else:
        print(f"CUDA extension: unavailable — {_EXT_ERR}\n  (built by `pip install --no-build-isolation -e .` where "
              "torch has CUDA and nvcc is found; the Triton and reference backends do not need it)")
    print(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s}  "
          f"FASTDISTILL_BACKEND={os.environ.get('FASTDISTILL_BACKEND', '')!s}")
    print(f"\nbackends for float32 tensors on {dev} (priority {' > '.join(BACKENDS)}):")
    x = torch.zeros(2, 8, device=dev)
    for op in ops():
        why = reasons(op, x)
        print(f"  {op}")
        for b in BACKENDS:
            print(f"    {b:10s} {'can run' if not why[b] else 'no: ' + '; '.join(why[b])}")
    print("  fused_linear_kd_loss, vocab_parallel_kd_loss: their chunks run kd_loss's backends (above)")
