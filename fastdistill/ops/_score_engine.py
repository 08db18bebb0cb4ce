"""Shared machinery of the score-difference ops: the static plan, backend dispatch, the
autograd wiring (eager ``autograd.Function`` and ``torch.library`` custom ops for
``torch.compile``), and coefficient packing. The public functions live in ``ops/score.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import torch

from fastdistill import _backend
from fastdistill.ops._common import (
    first_order,
    is_finite,
    real_option,
    reject_dtensor,
    save_constants,
    saved_constants,
    select_backend,
    value_vector,
)
from fastdistill.reference import score as _ref

OP_SCORE, OP_SID, OP_SCM, OP_DENOISE = 0, 1, 2, 3
OP_NAMES = {OP_SCORE: "score_distill", OP_SID: "sid_loss", OP_SCM: "scm_tangent_loss",
            OP_DENOISE: "denoise_regression_loss"}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
NAN_POLICIES = ("zero_sample", "to_num", "raise")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static configuration of one call (everything that selects a kernel specialisation)."""

    op: int
    use1: int = 0  # bitmask of terms read by combination 1
    use2: int = 0  # ... by combination 2
    tneed: int = 0  # SID: bitmask of the terms whose gradients will be asked for (their overflow marks a sample bad)
    phi_huber: bool = False
    norm_on_loss: bool = False
    norm: int = 0  # SCORE: 0 none, 1 per sample, 2 global
    red: int = 0  # 0 mean, 1 sum, 2 batchmean, 3 none
    sample_mean: bool = False
    rms: bool = False
    to_num: bool = False
    raise_: bool = False
    fp64: bool = False
    huber_c: float = 1e-3
    alpha: float = 0.0
    scale: float = 1.0
    clamp: float = 0.0
    eps: float = 0.0
    c: float = 0.0

    @property
    def accum_dtype(self) -> torch.dtype:
        return torch.float64 if self.fp64 else torch.float32

    _INTS = ("op", "use1", "use2", "tneed", "phi_huber", "norm_on_loss", "norm", "red", "sample_mean", "rms",
             "to_num", "raise_", "fp64")
    _FLOATS = ("huber_c", "alpha", "scale", "clamp", "eps", "c")

    def param_vector(self, unit: float, device, dtype: torch.dtype) -> torch.Tensor:
        """The kernels' parameter vector (huber_c, alpha, scale, clamp, eps, c, the gradient range ``unit``) as a
        cached device tensor in ``dtype`` (no host synchronisation): the Triton kernels read it in the accumulation
        dtype, the CUDA kernels in float32 (csrc/score.cu, PRM_*)."""
        return _backend.device_constant((float(self.huber_c), float(self.alpha), float(self.scale),
                                         float(self.clamp), float(self.eps), float(self.c), float(unit)), device, dtype)


def op_args(p: Plan, backend: str, x: torch.Tensor, terms: Sequence[torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """The plan as the custom ops take it under torch.compile: its integers and switches (graph constants) and its
    float values as a tensor built in the graph (graph inputs: one graph serves a whole schedule of scales, alphas
    or float weights, not one graph per value). For the Triton and CUDA kernels that tensor is their parameter
    vector (``param_vector``: on x's device, the accumulation dtype; float32 for CUDA, which takes no other: nothing
    is read on the host, no CPU op in the graph); for the reference the plan's float fields (float64 on the CPU:
    read on the host without a synchronisation). Read back with ``plan_from_op``."""
    ip = [int(getattr(p, f)) for f in Plan._INTS]
    raw = [getattr(p, f) for f in Plan._FLOATS]
    if backend == "triton":
        from fastdistill.kernels import score as k

        unit = k.grad_unit(p, x.dtype, [t.dtype for t in terms])  # (dtypes only: a constant of the graph)
        return ip, value_vector(raw + [unit], x.device, p.accum_dtype)
    if backend == "cuda":
        from fastdistill.ops import _score_cuda

        return ip, value_vector(raw + [_score_cuda.grad_range(x.dtype)], x.device, torch.float32)
    return ip, value_vector(raw, "cpu", torch.float64)


@dataclasses.dataclass(frozen=True)
class _OpPlan(Plan):
    """The Triton and CUDA backends' plan inside the custom op: the float values are only in ``prm`` (the kernels'
    parameter vector, a device tensor built in the graph). Its float fields are NaN."""

    prm: torch.Tensor | None = dataclasses.field(default=None, compare=False)

    def param_vector(self, unit: float, device, dtype: torch.dtype) -> torch.Tensor:
        # ``unit`` is in prm already (the forward's, from the same dtypes; the gradient kernel does not read it)
        if self.prm.device != torch.device(device) or self.prm.dtype != dtype:
            raise ValueError(f"_OpPlan: prm is {self.prm.dtype} on {self.prm.device}, expected {dtype} on {device}")
        return self.prm


def plan_from_op(ip: Sequence[int], vals: torch.Tensor, backend: str) -> Plan:
    """The plan that ``op_args`` packed (inside the custom op, or its fake)."""
    kw = {f: (bool(v) if isinstance(Plan.__dataclass_fields__[f].default, bool) else int(v))
          for f, v in zip(Plan._INTS, ip)}
    if backend == "reference" and not isinstance(vals, torch._subclasses.FakeTensor):
        return Plan(**kw, **dict(zip(Plan._FLOATS, vals.tolist())))  # float64 on the CPU: exactly the host's floats
    nan = float("nan")
    return _OpPlan(**kw, **{f: nan for f in Plan._FLOATS}, prm=vals)


# ----------------------------------------------------------------------------- argument checks
def no_dtensor(name: str, t) -> None:
    """Every tensor argument of a score op (inputs, masks, weights, coefficients) is a plain tensor."""
    reject_dtensor("each score op", {name: t}, hint=" (samples sharded: a loss per rank, as with any data-parallel "
                                                    "shard)")


def check_tensor(name: str, t, like: torch.Tensor | None = None, *, shape_of: str = "x") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    no_dtensor(name, t)
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name}: expected device {like.device} (the device of {shape_of}), got {t.device}")
        if t.shape != like.shape:
            raise ValueError(f"{name}: expected shape {tuple(like.shape)} (the shape of {shape_of}), "
                             f"got {tuple(t.shape)}")
    return t


def per_sample(name: str, v, B: int, device) -> torch.Tensor | None:
    """A per-sample vector argument: None, or a tensor of shape [B] (or [B, 1, ...]) on the device,
    returned dense: the kernels index it as ``v[b]`` with unit stride."""
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of shape [{B}] or None, got {type(v).__name__}")
    no_dtensor(name, v)
    if v.device != device:
        raise ValueError(f"{name}: expected device {device}, got {v.device}")
    if v.numel() != B or (v.dim() > 0 and v.shape[0] != B):
        raise ValueError(f"{name}: expected shape [{B}] (one value per sample), got {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {v.dtype}")
    return v.reshape(B).contiguous()


def mask_2d(mask, x: torch.Tensor, B: int, M: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask: expected a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    no_dtensor("mask", mask)
    if mask.device != x.device:
        raise ValueError(f"mask: expected device {x.device}, got {mask.device}")
    per_sample_hint = f"a per-sample mask is [B, 1, ...]: mask.view({B}{', 1' * (x.dim() - 1)})"
    if mask.dim() == 1 and x.dim() > 1 and mask.shape[0] == B == x.shape[-1] and B > 1:  # (B ≤ 1: one reading)
        # broadcasting puts a 1-D mask on x's last dim: one of length B there is most likely meant per sample
        raise ValueError(f"mask: a 1-D mask of length {B} (the batch size, and x's last dim) is ambiguous: it would "
                         f"broadcast along x's last dim, not per sample; {per_sample_hint}, a last-dim one "
                         f"mask.view({', '.join(['1'] * (x.dim() - 1))}, {B})")
    j = x.dim() - mask.dim()
    if 1 <= j and mask.dim() > 1 and B > 1 and mask.shape[0] == B == x.shape[j]:
        # the same with more dims: a [B, T, H, W] mask on a [B, C, T, H, W] x with C = B lands on (C, T, H, W)
        raise ValueError(f"mask: shape {tuple(mask.shape)} has fewer dims than x {tuple(x.shape)} and its first dim "
                         f"has the batch size {B}, as x's dim {j} does: it would broadcast from x's dim {j}, not per "
                         f"sample; give every dim: mask[{', '.join([':'] + ['None'] * j)}] if it is per sample "
                         f"(dims {list(range(1, j + 1))} broadcast), mask[{', '.join(['None'] * j)}] if it is shared")
    try:
        full = mask.expand(x.shape)
    except RuntimeError:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to x's shape {tuple(x.shape)} (masks "
                         f"broadcast as in PyTorch, from the last dim; {per_sample_hint})") from None
    return full.reshape(B, M).contiguous().view(torch.uint8)


# ----------------------------------------------------------------------------- coefficients
def _coef_block(name: str, c, k: int, B: int, device) -> torch.Tensor | tuple[float, ...]:
    """Validate a coefficient argument for k terms: a tuple of floats, or a [1|B, k] tensor."""
    if isinstance(c, torch.Tensor):
        no_dtensor(name, c)
        if c.device != device:
            raise ValueError(f"{name}: expected device {device}, got {c.device}")
        if not c.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {c.dtype}")
        if c.dim() == 1 and c.shape[0] == k:
            return c.reshape(1, k)
        if c.dim() == 2 and c.shape[1] == k and c.shape[0] in (1, B):
            return c
        raise ValueError(f"{name}: expected shape [{k}] or [{B}, {k}] ({k} terms, {B} samples), got {tuple(c.shape)}")
    if isinstance(c, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in c):
        return _mixed_block(name, c, k, B, device)
    try:
        if isinstance(c, (str, bytes)):
            raise TypeError
        items = list(c)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of {k} floats (or per-sample [{B}] tensors) or a [{B}, {k}] "
                        f"tensor, got {type(c).__name__}") from None
    vals = tuple(real_option(f"{name}[{i}]", v) for i, v in enumerate(items))  # finite numbers (not bools, not str)
    if len(vals) != k:
        raise ValueError(f"{name}: expected {k} coefficients (one per term), got {len(vals)}")
    return vals


def _mixed_block(name: str, c, k: int, B: int, device) -> torch.Tensor:
    """A sequence of k entries, each a float or a tensor of shape [], [1] or [B] (per-sample), as one [1|B, k]
    tensor: e.g. ``coeffs=[C, -C * w, -C * (1 - w)]`` with per-sample ``C`` and ``w``. Stacked on the device (no
    host synchronisation, no recompilation under torch.compile when the values change)."""
    if len(c) != k:
        raise ValueError(f"{name}: expected {k} coefficients (one per term), got {len(c)}")
    rows = 1
    c = list(c)
    for i, v in enumerate(c):
        if isinstance(v, torch.Tensor):
            no_dtensor(f"{name}[{i}]", v)
            if v.device != device:
                raise ValueError(f"{name}[{i}]: expected device {device}, got {v.device}")
            if not v.is_floating_point():
                raise TypeError(f"{name}[{i}]: expected a floating dtype, got {v.dtype}")
            # [B, 1, ...]: a per-sample value shaped to broadcast against x (x0_coeffs of a sigma.view(B, 1, ...))
            if v.numel() not in (1, B) or any(d != 1 for d in v.shape[1:]):
                raise ValueError(f"{name}[{i}]: expected a float or a tensor of shape [] or [{B}] (one value per "
                                 f"sample; or [{B}, 1, ...]), got shape {tuple(v.shape)}")
            if v.dim() >= 1 and v.shape[0] == B and v.numel() == B:
                rows = B  # per-sample (B = 0 included: an empty batch)
        else:
            c[i] = real_option(f"{name}[{i}]", v)  # a finite number
    # at least fp32: a float next to a bf16 tensor keeps its value (and 1e5 fits; fp16 would overflow)
    dtype = functools.reduce(torch.promote_types, [v.dtype for v in c if isinstance(v, torch.Tensor)], torch.float32)
    cols = [v.to(dtype).reshape(-1).expand(rows) if isinstance(v, torch.Tensor) else _full(rows, v, dtype, device)
            for v in c]
    return torch.stack(cols, 1)


def _full(n: int, v: float, dtype: torch.dtype, device) -> torch.Tensor:
    """``torch.full((n,), v)``; under torch.compile a float that changes between calls stays a graph input (``full``
    of a SymFloat specialises it; the product is formed in float64, then cast: the same values)."""
    if torch.compiler.is_compiling():
        return (torch.ones((n,), dtype=torch.float64, device=device) * v).to(dtype)
    return torch.full((n,), v, dtype=dtype, device=device)


Row = list  # of (columns, block): block is a tuple of floats or a [1|B, k] tensor; column 0 is x, k+1 term k


def pack_coef(rows: list[Row], K: int, B: int, device, acc: torch.dtype) -> torch.Tensor:
    """Build the [Bc, 2, K+1] coefficient matrix from the blocks of each row (a row's entries for
    the same column add up). Constant blocks are folded into one matrix cached on the device; each
    tensor block then costs one small in-place add (per column only where its columns are not a
    contiguous run), so a call with per-sample coefficients adds 1 + (#tensor blocks) tiny launches."""
    flat = [0.0] * (2 * (K + 1))
    tensors = []
    for r, row in enumerate(rows):
        for cols, block in row:
            if isinstance(block, torch.Tensor):
                tensors.append((r, cols, block))
            else:
                for c, v in zip(cols, block):
                    flat[r * (K + 1) + c] += v
    if torch.compiler.is_compiling():  # a float coefficient that changes between calls stays a graph input
        const = value_vector(flat, device, acc).view(1, 2, K + 1)
    else:
        const = _backend.device_constant(tuple(flat), device, acc).view(1, 2, K + 1)
    if not tensors:
        return const
    Bc = max(b.shape[0] for _, _, b in tensors)
    coef = const.expand(Bc, 2, K + 1).clone(memory_format=torch.contiguous_format)  # never mutate the cache
    for r, cols, block in tensors:
        block = block.to(acc)
        c0, k = cols[0], len(cols)
        if list(cols) == list(range(c0, c0 + k)):
            coef[:, r, c0 : c0 + k].add_(block)
        else:
            for i, c in enumerate(cols):
                coef[:, r, c].add_(block[:, i])
    return coef


def unify_terms(groups: list[tuple[str, Sequence[torch.Tensor], object]], x: torch.Tensor, B: int):
    """Merge term lists of several combinations by identity (a tensor shared by two
    combinations is read once). Returns (terms, [row per group], [use bitmask per group])."""
    terms: list[torch.Tensor] = []
    rows, uses = [], []
    for name, ts, coeffs in groups:
        if isinstance(ts, torch.Tensor) or not isinstance(ts, (list, tuple)):
            raise TypeError(f"{name}: expected a list of tensors, got {type(ts).__name__}")
        cname = {"terms": "coeffs", "norm_terms": "norm_coeffs"}.get(name, f"{name} coefficients")
        block = _coef_block(cname, coeffs, len(ts), B, x.device)
        cols = []
        use = 0
        for k, t in enumerate(ts):
            check_tensor(f"{name}[{k}]", t, x)
            # identity by `is`, not id(): under torch.compile an id() is a guard on the very object, so fresh
            # tensors every step (any training loop) recompiled every call until the recompile limit
            j = next((i for i, u in enumerate(terms) if u is t), None)
            if j is None:
                j = len(terms)
                terms.append(t)
            cols.append(j + 1)
            use |= 1 << j
        rows.append([(tuple(cols), block)])
        uses.append(use)
    if len(terms) > 8:
        raise ValueError(f"at most 8 distinct term tensors are supported, got {len(terms)}")
    return terms, rows, uses


def x_coef(name: str, v, B: int, device) -> tuple:
    """The coefficient of x itself in a row: a float or a per-sample tensor."""
    if isinstance(v, torch.Tensor):
        no_dtensor(name, v)
        if v.device != device:
            raise ValueError(f"{name}: expected device {device}, got {v.device}")
        if v.dim() == 0:
            return ((0,), v.reshape(1, 1))
        v = per_sample(name, v, B, device)
        return ((0,), v.reshape(B, 1))
    try:
        if isinstance(v, (str, bytes)):
            raise TypeError
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a float or a per-sample tensor, got {type(v).__name__}") from None
    if not is_finite(f):
        raise ValueError(f"{name}: expected a finite number, got {f}")
    return ((0,), (f,))


# ----------------------------------------------------------------------------- backends
# ``term_dtypes``: the dtypes of the (deduplicated) term tensors, when known.
def _why_not_reference(x: torch.Tensor, **_) -> list[str]:
    return []


def _why_not_triton(x: torch.Tensor, **_) -> list[str]:
    return _backend.triton_why_not(x.device)


# below this, c² is subnormal in fp32: the CUDA build's --use_fast_math flushes it to 0 (d = 0 gives 0·rsqrt(0))
_CUDA_MIN_HUBER_C = 1.0842021724855044e-19  # sqrt(FLT_MIN)


def _why_not_cuda(x: torch.Tensor, fp64: bool = False, term_dtypes: Sequence[torch.dtype] = (),
                  huber_c: float = 1.0, huber_tiny: bool = False) -> list[str]:
    """``huber_c``: the pseudo-Huber constant when that φ is used (else 1); ``huber_tiny``: the same test done by
    the caller (a bool: under torch.compile a huber_c that changes between calls is symbolic, and the choice of
    backend must be a constant of the graph)."""
    r = _backend.cuda_why_not(x.device)
    if huber_tiny or huber_c < _CUDA_MIN_HUBER_C:
        value = f" = {huber_c:.3g}" if huber_c < _CUDA_MIN_HUBER_C else ""
        r.append(f"huber_c{value} < {_CUDA_MIN_HUBER_C:.3g}: c² flushes to 0 under the CUDA build's fast "
                 "math (use triton or reference)")
    if fp64:
        r.append("accum_dtype=float64 is not supported by the CUDA kernels (use triton or reference)")
    if x.dtype == torch.float64:
        r.append("float64 inputs are not supported by the CUDA kernels (use triton or reference)")
    other = sorted({str(d).removeprefix("torch.") for d in term_dtypes if d != x.dtype})
    if other:
        r.append(f"the CUDA kernels need every term in x's dtype ({str(x.dtype).removeprefix('torch.')}), "
                 f"got terms in {', '.join(other)} (use triton or reference, or cast the terms)")
    if len(term_dtypes) > 8:
        r.append(f"the CUDA kernels take at most 8 distinct term tensors, got {len(term_dtypes)}")
    return r


for _name in OP_NAMES.values():
    _backend.register(_name, "reference", _why_not_reference)
    _backend.register(_name, "triton", _why_not_triton)
    _backend.register(_name, "cuda", _why_not_cuda)


def _impl(backend: str):
    if backend == "reference":
        return _ref
    if backend == "triton":
        from fastdistill.kernels import score as k

        return k
    from fastdistill.ops import _score_cuda

    return _score_cuda


def _fwd(p: Plan, backend, x2, terms, coef, mask, weight, logvar):
    B, M = x2.shape
    if B == 0 or M == 0:
        z = torch.zeros(B, dtype=p.accum_dtype, device=x2.device)
        return torch.zeros(1, dtype=p.accum_dtype, device=x2.device), z, torch.zeros(B, 4, dtype=p.accum_dtype,
                                                                                       device=x2.device)
    return _impl(backend).score_fwd(p, x2, terms, coef, mask, weight, logvar)


def _bwd(p: Plan, backend, x2, terms, coef, mask, state, grad_out, need_x, need_terms):
    B, M = x2.shape
    if B == 0 or M == 0:
        return (torch.zeros_like(x2) if need_x else None), [torch.zeros_like(t) if n else None
                                                            for t, n in zip(terms, need_terms)]
    go = grad_out.reshape(-1).to(p.accum_dtype).contiguous()
    return _impl(backend).score_bwd(p, x2, terms, coef, mask, state, go, need_x, need_terms)


def _flat(t: torch.Tensor, B: int, M: int) -> torch.Tensor:
    return t.reshape(B, M).contiguous()


class _ScoreFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, backend, x2, coef, mask, weight, logvar, *t2):
        """``x2`` and ``t2``: the ``[B, M]`` contiguous forms of x and the terms, made by the caller (``run``)
        with grad mode on: saved as the Function's inputs they keep their link to the caller's graph, which
        ``first_order`` needs (copies made in here were leaves: a double backward toward the parameters that
        produced x or the terms skipped the guard and treated the gradients as constants)."""
        loss, loss_i, state = _fwd(p, backend, x2, list(t2), coef, mask, weight, logvar)
        ctx.p, ctx.backend = p, backend
        ctx.fd_anchors = (logvar,)  # first_order: a second derivative depends on it too (not saved; [B], small)
        save_constants(ctx, x2, coef, mask, state, *t2)
        ctx.mark_non_differentiable(loss_i, state)
        ctx.set_materialize_grads(False)  # no zero tensors for the grads of loss_i / state
        out = loss_i.clone() if p.red == 3 else loss.reshape(())
        return out, loss_i, state

    @staticmethod
    @first_order("score ops")
    def backward(ctx, g_out, _g_loss_i, _g_state):
        x2, coef, mask, state, *t2 = saved_constants(ctx)
        need_x = ctx.needs_input_grad[2]
        # terms are constants (stop-gradient) except in SiD, whose loss differentiates through them
        need_terms = list(ctx.needs_input_grad[7:]) if ctx.p.op == OP_SID else [False] * len(t2)
        need_lv = ctx.needs_input_grad[6]
        if g_out is None:
            g_out = torch.zeros((), dtype=state.dtype, device=state.device)
        gx, gterms = _bwd(ctx.p, ctx.backend, x2, t2, coef, mask, state, g_out, need_x, need_terms)
        glv = None
        if need_lv:
            glv = state[:, 3] * g_out.to(state.dtype)
        return (None, None, gx, None, None, None, glv, *gterms)


# ----------------------------------------------------------------------------- torch.compile path
@torch.library.custom_op("fastdistill::score_fwd", mutates_args=())
def _score_fwd_op(x: torch.Tensor, terms: list[torch.Tensor], coef: torch.Tensor, mask: torch.Tensor | None,
                  weight: torch.Tensor | None, logvar: torch.Tensor | None, ip: list[int], vals: torch.Tensor,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = plan_from_op(ip, vals, backend)
    B = x.shape[0]
    M = x.numel() // B if B else 0
    loss, loss_i, state = _fwd(p, backend, _flat(x, B, M), [_flat(t, B, M) for t in terms], coef, mask,
                               weight, logvar)
    return (loss_i.clone() if p.red == 3 else loss.reshape(())), loss_i, state


@_score_fwd_op.register_fake
def _(x, terms, coef, mask, weight, logvar, ip, vals, backend):
    p = plan_from_op(ip, vals, backend)
    B = x.shape[0]
    acc = p.accum_dtype
    out = x.new_empty((B,) if p.red == 3 else (), dtype=acc)
    return out, x.new_empty((B,), dtype=acc), x.new_empty((B, 4), dtype=acc)


@torch.library.custom_op("fastdistill::score_bwd", mutates_args=())
def _score_bwd_op(x: torch.Tensor, terms: list[torch.Tensor], coef: torch.Tensor, mask: torch.Tensor | None,
                  state: torch.Tensor, grad_out: torch.Tensor, ip: list[int], vals: torch.Tensor, need_x: bool,
                  need_terms: list[bool], backend: str) -> list[torch.Tensor]:
    p = plan_from_op(ip, vals, backend)
    B = x.shape[0]
    M = x.numel() // B if B else 0
    gx, gterms = _bwd(p, backend, _flat(x, B, M), [_flat(t, B, M) for t in terms], coef, mask, state, grad_out,
                      need_x, need_terms)
    out = [gx.view(x.shape) if gx is not None else x.new_empty(0)]
    out += [g.view(t.shape) if g is not None else t.new_empty(0) for g, t in zip(gterms, terms)]
    return out


@_score_bwd_op.register_fake
def _(x, terms, coef, mask, state, grad_out, ip, vals, need_x, need_terms, backend):
    # contiguous, as the real op's (a channels-last / permuted x: empty_like kept its strides, and inductor's
    # stride assertion failed in the backward)
    out = [x.new_empty(x.shape) if need_x else x.new_empty(0)]
    return out + [t.new_empty(t.shape) if n else t.new_empty(0) for t, n in zip(terms, need_terms)]


def _setup_context(ctx, inputs, output):
    x, terms, coef, mask, weight, logvar, ip, vals, backend = inputs
    _, _, state = output
    save_constants(ctx, x, coef, mask, state, vals, *terms)
    ctx.ip, ctx.backend = ip, backend
    ctx.fd_anchors = (logvar,)
    ctx.need_terms = [t.requires_grad and ip[0] == OP_SID for t in terms]
    ctx.need_x = x.requires_grad
    ctx.need_lv = logvar is not None and logvar.requires_grad


@first_order("score ops")
def _backward(ctx, g_out, _g_loss_i, _g_state):
    x, coef, mask, state, vals, *terms = saved_constants(ctx)
    grads = _score_bwd_op(x, terms, coef, mask, state, g_out, ctx.ip, vals, ctx.need_x, ctx.need_terms,
                          ctx.backend)
    gx = grads[0] if ctx.need_x else None
    gterms = [g if n else None for g, n in zip(grads[1:], ctx.need_terms)]
    glv = state[:, 3] * g_out.to(state.dtype) if ctx.need_lv else None
    return gx, gterms, None, None, None, glv, None, None, None


torch.library.register_autograd("fastdistill::score_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry point
def run(p: Plan, x: torch.Tensor, terms: list[torch.Tensor], coef: torch.Tensor, mask, weight, logvar,
        return_stats: bool):
    name = OP_NAMES[p.op]
    huber_tiny = False
    if p.op == OP_SCORE and p.phi_huber and p.huber_c < _CUDA_MIN_HUBER_C:  # (a guard, not a symbol, under compile)
        huber_tiny = True
    backend = select_backend(name, x, fp64=p.fp64, term_dtypes=tuple(t.dtype for t in terms), huber_tiny=huber_tiny)
    if torch.compiler.is_compiling():
        if p.raise_:
            raise ValueError(f"{name}: nan='raise' needs a host synchronisation and cannot run under torch.compile; "
                             "use 'zero_sample' or 'to_num'")
        ip, vals = op_args(p, backend, x, terms)
        out, loss_i, state = _score_fwd_op(x, list(terms), coef, mask, weight, logvar, ip, vals, backend)
    else:
        B = x.shape[0]
        M = x.numel() // B if B else 0
        out, loss_i, state = _ScoreFunction.apply(p, backend, _flat(x, B, M), coef, mask, weight, logvar,
                                                  *[_flat(t, B, M) for t in terms])
    if p.raise_ and x.device.type != "meta":  # (meta tensors: shapes only, no values to check)
        bad = state[:, 2] > 0
        if bool(bad.any()):  # the documented host synchronisation of nan="raise"
            idx = bad.nonzero().flatten().tolist()
            raise FloatingPointError(f"{name}: non-finite values (or a zero/overflowing normaliser) in samples {idx}")
    if return_stats:
        return out, {"loss_per_sample": loss_i, "normalizer": state[:, 1], "bad": state[:, 2] > 0}
    return out
