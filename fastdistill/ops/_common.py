"""Helpers shared by the op families: argument checks and trace-safe backend selection."""

from __future__ import annotations

import contextlib
import functools

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
    # sorted by key only: a value may be symbolic under torch.compile (a batch size, a float option that changes
    # between calls), which dynamo cannot order
    return _select(name, x.device, x.dtype, _backend.forced_backend(), tuple((k, extra[k]) for k in sorted(extra)))


class _SecondOrder(torch.autograd.Function):
    """Identity on a gradient, differentiable with respect to the op's inputs (``anchors``) so that a
    second backward toward them reaches it; its backward raises."""

    @staticmethod
    def forward(msg, g, *anchors):
        return g.view_as(g)

    @staticmethod
    def setup_context(ctx, inputs, output):  # the functorch-compatible form: torch.func.grad runs create_graph
        ctx.msg, ctx.n = inputs[0], len(inputs)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g):
        if not reached(g):  # nothing reached the gradient (or only zeros): no second derivative
            return (None,) * ctx.n
        raise RuntimeError(ctx.msg)


def reached(*grads: torch.Tensor | None) -> bool:
    """Whether a backward reached an output a guard protects (a stop-gradient tangent, a gradient that must not be
    differentiated): a gradient that is not None and not all zeros. Zeros come from autograd.Functions that read the
    output but give it no gradient (FSDP2's pre-backward hook re-applies one to every tangent; a next layer's
    tangent input through a user Function); they carry no term to lose. Reading that flag is one host
    synchronisation, only where such a gradient arrives (None: none)."""
    gs = [g for g in grads if g is not None]
    if not gs:
        return False
    return bool(gs[0].any() if len(gs) == 1 else torch.stack([g.any() for g in gs]).any())


def save_constants(ctx, *tensors) -> None:
    """``ctx.save_for_backward(*tensors)``, except that inference tensors (a frozen teacher run under
    ``torch.inference_mode()``) are held on the context: autograd refuses to save them, and here they are
    constants the op never differentiates. They are released by the backward that reads them (as autograd frees
    saved tensors), so a second backward through the same graph (``retain_graph=True``) raises; and they bypass
    autograd's version check: modifying one in place (possible only inside inference mode) before the backward
    goes unnoticed. Eager only: under ``torch.compile`` AOTAutograd saves its graph inputs itself and refuses
    them (make the teacher under ``no_grad`` there). Read back with ``saved_constants``."""
    held = {i: x for i, x in enumerate(tensors) if isinstance(x, torch.Tensor) and x.is_inference()}
    ctx.save_for_backward(*(None if i in held else x for i, x in enumerate(tensors)))
    ctx.fd_held = held


_RELEASED = object()


def saved_constants(ctx) -> tuple:
    """What ``save_constants`` saved, in order (releasing the held inference tensors)."""
    saved = ctx.saved_tensors
    held = getattr(ctx, "fd_held", None)
    if held is _RELEASED:
        raise RuntimeError("a second backward through this graph (retain_graph=True), whose constants (the teacher, "
                           "the terms) were made under torch.inference_mode() and released after the first: make "
                           "them under torch.no_grad() instead")
    if not held:
        return tuple(saved)
    ctx.fd_held = _RELEASED
    return tuple(held.get(i, x) for i, x in enumerate(saved))


class _ReadOnce:
    """The backward's context with ``saved_tensors`` unpacked once (non-reentrant checkpointing allows one unpack
    per backward); every other attribute is the context's."""

    def __init__(self, ctx):
        object.__setattr__(self, "_ctx", ctx)
        object.__setattr__(self, "_saved", None)

    @property
    def saved_tensors(self):
        if self._saved is None:
            object.__setattr__(self, "_saved", tuple(self._ctx.saved_tensors))
        return self._saved

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def __setattr__(self, name, value):
        setattr(self._ctx, name, value)


def resolve_accum(accum_dtype, *inputs) -> torch.dtype:
    """``accum_dtype=None`` (the default of the kd and score ops): float64 when an input is float64, else
    float32 — float64 in gives float64 statistics and a float64 loss, as in PyTorch. An explicit value is
    returned unchanged (and checked by the op)."""
    if accum_dtype is not None:
        return accum_dtype
    f64 = any(getattr(x, "dtype", None) == torch.float64 for x in inputs)
    return torch.float64 if f64 else torch.float32


def value_vector(values, device, dtype: torch.dtype) -> torch.Tensor:
    """``torch.tensor(values)`` built inside a torch.compile graph so that a float that changes between calls (a
    SymFloat) stays a graph input: ``torch.tensor`` of a SymFloat specialises it (one graph per value), and so does
    AOTAutograd for a float it cannot turn into a tensor; a tensor times it does not (the graph computes the
    vector, in float64 as the host would, then casts it: the same values as ``torch.tensor`` of the host's
    floats)."""
    one = torch.ones((), dtype=torch.float64, device=device)
    return torch.stack([one * v for v in values]).to(dtype)


def is_finite(v) -> bool:
    """``math.isfinite`` for a float or a SymFloat: under ``torch.compile`` a float option that changes between
    calls becomes symbolic, which ``math.isfinite`` cannot take; ``v − v == 0`` (false for ±inf and NaN) is a
    guard there."""
    return bool(v - v == 0)


def real_option(name: str, v) -> float:
    """A float option: a number (int, float, numpy scalar or 0-d array, Decimal, ...) or a one-element CPU tensor
    (no host synchronisation), finite; errors name it. A tensor that requires grad (with grad mode on) raises: its
    value is read on the host, so no gradient could reach it (a learnable scale or temperature would silently get
    none)."""
    if isinstance(v, torch.Tensor):
        if v.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{name}: requires grad, but a float option is read as a number (no gradient reaches "
                             f"it); pass {name}.detach() or a Python float")
        if torch.compiler.is_compiling():  # .item() would break the graph (fullgraph: an error naming nothing)
            raise TypeError(f"{name}: pass a Python float under torch.compile, not a tensor (its value would be "
                            "read on the host inside the graph)")
        if v.numel() != 1 or v.device.type != "cpu":
            raise TypeError(f"{name}: expected a float (or a one-element CPU tensor), got a tensor of shape "
                            f"{tuple(v.shape)} on {v.device}")
        v = v.item()
    if isinstance(v, (str, bytes, bool)):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}") from None
    if not is_finite(f):
        raise ValueError(f"{name}: expected a finite number, got {f}")
    return f


class TransformLimitError(NotImplementedError):
    """The functorch transforms (torch.func) active around a call are beyond what the op computes."""


def functorch_levels() -> list:
    """The keys (``TransformType``) of the torch.func transforms active now, outermost first."""
    try:
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # a torch without functorch's Python interpreters: nothing to detect
        return []
    return [i.key() for i in retrieve_all_functorch_interpreters()]


def refuse_transforms(op: str) -> None:
    """The kd and score ops are autograd Functions and custom ops without torch.func rules: under ``grad`` /
    ``vjp`` / ``vmap`` / ``jvp`` PyTorch raised an internal "must override the setup_context" error. Raise
    naming the op and the way that works instead. (Not checked while compiling: dynamo runs transforms itself.)"""
    if torch.compiler.is_compiling() or not functorch_levels():
        return
    raise TransformLimitError(f"{op}: torch.func transforms (grad, vjp, jacrev, vmap, jvp) are not supported around "
                              "it; use torch.autograd (.backward(), torch.autograd.grad), and a Python loop for "
                              "per-sample work")


def check_bool(name: str, v) -> bool:
    """A flag must be a bool (Python, numpy, a SymBool, a one-element bool tensor) or 0 / 1: a truthy string such
    as ``"no"`` would silently turn it on."""
    if isinstance(v, torch.SymBool):
        return v
    ok_tensor = isinstance(v, torch.Tensor) and v.dtype == torch.bool and v.numel() == 1
    # numpy's bool scalar is ``numpy.bool_`` (numpy 1), ``numpy.bool`` (numpy 2); numpy is not imported for it
    np_bool = type(v).__module__ == "numpy" and type(v).__name__ in ("bool", "bool_")
    if isinstance(v, bool) or np_bool or (isinstance(v, int) and v in (0, 1)) or ok_tensor:
        return bool(v)
    raise TypeError(f"{name}: expected a bool, got {type(v).__name__} {v!r}")


def int_option(name: str, v) -> int:
    """An int option (int, numpy integer, one-element integer CPU tensor; not a bool, a float or a string):
    errors name it (``int(1.5)`` would silently truncate). A SymInt (torch.compile) passes as is."""
    if isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool):
        return v
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.device.type != "cpu" or v.is_floating_point() or v.dtype == torch.bool:
            raise TypeError(f"{name}: expected an int, got a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}")
        return int(v.item())
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__} {v!r}")
    return int(v.__index__())


def count_option(name: str, v, expected: str, minimum: int = 1) -> int:
    """An int option (as ``int_option``: numpy and one-element tensor integers too) that is at least ``minimum``;
    anything else a ValueError ``"{name}: expected {expected}, got {v!r}"``."""
    try:
        n = int_option(name, v)
    except TypeError:
        n = None
    if n is None or n < minimum:
        raise ValueError(f"{name}: expected {expected}, got {v!r}")
    return n


@torch.compiler.assume_constant_result
def _autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available``, a constant to dynamo: torch 2.11's dynamo cannot trace the C function
    behind it (``torch._C._is_autocast_available`` is a skipped builtin; ``fullgraph=True`` raises Unsupported,
    without it a graph break); torch 2.13's can."""
    return torch.amp.is_autocast_available(device_type)


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)`` where autocast exists for the device type; a no-op context
    elsewhere (e.g. ``meta``, where ``torch.autocast`` itself raises)."""
    if _autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_cast(*xs):
    """Cast the tensors as autocast casts the inputs of an op on its lower-precision list (``F.linear``, stock
    SDPA): fp16/bf16/fp32 tensors to the autocast dtype of their device type while autocast is on there; any
    other tensor (fp64, integer) and ``None`` unchanged. A dual tensor's tangent is cast with it."""
    out = []
    for x in xs:
        if isinstance(x, torch.Tensor) and x.dtype in (torch.float16, torch.bfloat16, torch.float32):
            dev = x.device.type
            if _autocast_available(dev) and torch.is_autocast_enabled(dev):
                x = x.to(torch.get_autocast_dtype(dev))
        out.append(x)
    return tuple(out)


# kd row operands: [N, C] or [G, R, C] views (the shifted logits[:, :-1] of [B, T, C] logits, read in place)
def n_rows(s: torch.Tensor) -> int:
    """Rows of a kd row operand: ``[N, C]``, or ``[G, R, C]`` (rows R a group, group-major)."""
    return s.shape[0] * (s.shape[1] if s.dim() == 3 else 1)


def row_groups(s: torch.Tensor) -> int:
    """Rows per group R of the student logits: ``[N, V]`` is one group (R = N), ``[G, R, V]`` (rows group-major,
    e.g. logits[:, :-1] of contiguous [B, T, V] logits, whose rows no single stride reaches) G groups."""
    return max(s.shape[1] if s.dim() == 3 else s.shape[0], 1)


def row_strides(x: torch.Tensor, R: int) -> tuple[int, int]:
    """(group stride, row stride) of ``x`` (``[N, ·]`` or ``[G, R, ·]``) in units of elements, for R rows a group."""
    if x.dim() == 3:
        return x.stride(0), x.stride(1)
    return R * x.stride(0), x.stride(0)


def row_view(x: torch.Tensor, N: int) -> torch.Tensor | None:
    """``x`` ``[..., C]`` as ``[N, C]`` rows with a unit column stride, without a copy; None where no such view
    exists (e.g. ``logits[:, :-1]`` of ``[B, T, V]`` logits: no single row stride reaches its rows)."""
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        return None
    # decided from the strides (a failing view cannot be caught while dynamo traces): the leading dims other
    # than those of size 1 must collapse into one, each stride the next one's times its size
    lead = [(n, st) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    if any(s0 != n1 * s1 for (_, s0), (n1, s1) in zip(lead, lead[1:])):
        return None
    return x.view(N, x.shape[-1])


def as_rows(x: torch.Tensor, N: int, grouped: bool) -> torch.Tensor:
    """A row operand (kd kernels, vocab-parallel chunks): ``[N, C]`` (a view where one exists), ``[G, R, C]``
    (``grouped``: the ``[B, T, C]`` tensor itself, rows R a group, group-major: e.g. a sliced ``logits[:, :-1]``),
    else a contiguous copy."""
    C = x.shape[-1]
    if grouped and x.dim() == 3 and (C <= 1 or x.stride(-1) == 1):
        return x
    flat = row_view(x, N)
    return flat if flat is not None else x.reshape(N, C).contiguous()


def rows_overlap(x: torch.Tensor) -> bool:
    """Whether two rows of a row operand (``[N, C]``, or ``[G, R, C]`` with any order of the group and row strides,
    e.g. seq-first logits transposed) may share memory (an expanded tensor). The two (count, stride) pairs sorted
    by stride: rows are disjoint if the smaller stride is at least C and the larger spans the smaller's rows. A
    sufficient test, not a necessary one: an interleaved disjoint layout (e.g. shape (2, 3, C), strides (3C, 2C, 1))
    counts as overlapping (inplace_grad refuses it: a false alarm, never a race)."""
    C = x.shape[-1]
    dims = sorted(((n, abs(st)) for n, st in zip(x.shape[:-1], x.stride()[:-1]) if n > 1), key=lambda d: d[1])
    span = C  # elements from a row's start to its end, over the dims taken so far
    for n, st in dims:
        if st < span:
            return True
        span = (n - 1) * st + span
    return False


def row_chunk(x: torch.Tensor, r: slice) -> torch.Tensor:
    """Rows ``r`` (a slice of 0..N) of ``x``: ``[N, C]``, or ``[G, R, C]`` (rows R a group, group-major); a view,
    except where the chunk crosses a group boundary (then a copy of the chunk alone)."""
    if x.dim() == 2:
        return x[r]
    R = x.shape[1]
    g0, g1 = r.start // R, (r.stop - 1) // R
    if g0 == g1:
        return x[g0, r.start - g0 * R : r.stop - g0 * R]
    return torch.cat([x[g, max(r.start - g * R, 0) : min(r.stop - g * R, R)] for g in range(g0, g1 + 1)])


try:  # (imported by torch.distributed users anyway; a plain global: traced by dynamo without a graph break)
    from torch.distributed.tensor import DTensor as _DTensor
except Exception:  # torch without distributed
    _DTensor = None


def is_dtensor(x) -> bool:
    return _DTensor is not None and isinstance(x, _DTensor)


def reject_dtensor(op: str, tensors: dict, *, vocab_hint: str | None = None, hint: str = "") -> None:
    """A clear TypeError for a DTensor argument (tensor parallelism, sequence parallelism, FSDP2): the kernels take
    plain tensors (a DTensor's data pointer is 0: a kernel launch on address 0). ``vocab_hint``: what to use for
    logits sharded on their last (vocabulary) dim; ``hint``: for any other placement."""
    if _DTensor is None:
        return
    for name, x in tensors.items():
        if not isinstance(x, _DTensor):
            continue
        pl = tuple(x.placements)
        last = any(p.is_shard() and p.dim in (x.dim() - 1, -1) for p in pl)
        if vocab_hint is not None and last:
            raise TypeError(f"{name}: a DTensor sharded on its last (vocabulary) dim {pl}; {op} takes whole rows: "
                            f"{vocab_hint}")
        raise TypeError(f"{name}: a DTensor {pl}; {op} takes plain tensors: pass {name}.to_local() (this rank's "
                        f"shard) or {name}.full_tensor(){hint}")


def graph_anchor(x: torch.Tensor | None) -> torch.Tensor | None:
    """A one-element tensor that depends on ``x`` in the autograd graph but holds none of its storage: an anchor
    for ``first_order`` (``ctx.fd_anchors``) of an input the op does not save. Call it outside the Function (grad
    mode on); None where x needs no gradient."""
    if x is None or not (x.requires_grad and torch.is_grad_enabled()) or x.numel() == 0:
        return None
    return x.reshape(-1)[:1] * 0.0  # (its graph: mul by a scalar, slice, reshape: none saves x)


def eager_only(reason: str):
    """``torch.compiler.disable`` with the reason dynamo prints at the graph break (fullgraph=True: "Skip calling
    torch.compiler.disable()d function (reason: ...)"); a torch without ``reason=`` gets the plain decorator."""
    try:
        return torch.compiler.disable(reason=reason)
    except TypeError:
        return torch.compiler.disable


def first_order(op: str):
    """Decorator for the backward of an op whose backward kernels have no derivative of their own.

    A plain backward runs as is. With ``create_graph=True`` (grad mode on inside the backward) the gradients
    are computed without a graph and returned as tensors that depend, for autograd, on everything the true
    derivative depends on (the saved tensors, the incoming gradients and ``ctx.fd_anchors``: small tensors
    standing for the inputs the op did not save, see ``graph_anchor``) through a node whose backward raises: a
    double backward that reaches this op (a gradient penalty, a Hessian-vector product) fails loudly instead of
    treating the gradient as a constant, on every backend (the reference backward is plain PyTorch and would
    otherwise build a graph that holds its saved statistics constant: a silently wrong second derivative).
    The saved tensors are unpacked once (``_ReadOnce``)."""
    msg = (f"{op}: double backward is not supported (a gradient computed with create_graph=True through "
           f"this op was differentiated again); its backward kernels have no derivative")

    def deco(fn):
        @functools.wraps(fn)
        def backward(ctx, *grads):
            if not torch.is_grad_enabled() or torch.compiler.is_compiling():
                return fn(ctx, *grads)
            once = _ReadOnce(ctx)
            with torch.no_grad():
                out = fn(once, *grads)
            anchors = tuple(t for t in (*once.saved_tensors, *grads, *getattr(ctx, "fd_anchors", ()))
                            if isinstance(t, torch.Tensor) and t.requires_grad)
            if not anchors:  # nothing the gradient depends on requires grad: it is a constant indeed
                return out
            def wrap(g):
                if isinstance(g, (tuple, list)):
                    return type(g)(wrap(x) for x in g)
                if isinstance(g, torch.Tensor) and (g.is_floating_point() or g.is_complex()):
                    return _SecondOrder.apply(msg, g, *anchors)
                return g

            return wrap(out)

        return backward

    return deco
