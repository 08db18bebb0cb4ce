"""Fused KD softmax: ``kd_loss`` (semantics: docs/kd_ops.md), its autograd wiring, the
``torch.library`` custom ops for ``torch.compile``, and dispatch."""

from __future__ import annotations

import dataclasses

import torch

from fastdistill import _backend
from fastdistill.ops._common import (
    as_rows,
    check_bool,
    check_choice,
    first_order,
    int_option,
    n_rows,
    real_option,
    refuse_transforms,
    reject_dtensor,
    resolve_accum,
    row_view,
    rows_overlap,
    save_constants,
    saved_constants,
    select_backend,
    value_vector,
)
from fastdistill.reference import kd_softmax as _ref

_FP32_MAX = torch.finfo(torch.float32).max
_FP32_TINY = torch.finfo(torch.float32).tiny
DIVERGENCES = {"fkl": 0, "rkl": 1, "jsd": 2, "skl": 3, "srkl": 4, "tvd": 5}
REDUCTIONS = {"batchmean": 0, "sum": 1, "mean": 2, "none": 3}
TOPK_SEMANTICS = {"tail_bucket": 1, "zero_tail": 2, "renorm": 3}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class KDPlan:
    div: int = 0
    red: int = 0
    fp64: bool = False
    ignore_index: int = -100
    topk: int = 0  # 0 dense teacher; 1 tail bucket, 2 zero tail, 3 renormalised
    beta: float = 0.5
    skew: float = 0.1
    temperature: float = 1.0
    teacher_temperature: float = 1.0
    t2: float = 1.0
    alpha: float = 0.0
    num_items: float = 0.0  # > 0: the batchmean denominator
    softcap: float = 0.0  # 0: none
    logit_scale: float = 1.0

    @property
    def accum_dtype(self) -> torch.dtype:
        return torch.float64 if self.fp64 else torch.float32

    def kernel_params(self) -> tuple[float, ...]:
        """The kernels' float parameters (Triton and CUDA read this layout): inv_T, inv_Tt, alpha, t2,
        logit_scale, softcap (1 when off), beta, skew, 1 − beta, 1 − skew. The last two are formed here
        in float64: within fp32 rounding of 1, beta itself rounds to 1 and 1 − beta in a kernel would be
        0 (a NaN divergence where the reference is finite)."""
        return (1.0 / self.temperature, 1.0 / self.teacher_temperature, self.alpha, self.t2, self.logit_scale,
                self.softcap if self.softcap > 0 else 1.0, self.beta, self.skew, 1.0 - self.beta, 1.0 - self.skew)

    # the switches the kernels are compiled for (constexpr), decided on the host
    @property
    def scaled(self) -> bool:
        return self.logit_scale != 1.0

    @property
    def capped(self) -> bool:
        return self.softcap > 0

    @property
    def mixes_ce(self) -> bool:
        return self.alpha > 0

    @property
    def ce_sep(self) -> bool:  # the CE term takes its own untempered softmax
        return self.temperature != 1.0

    def param_vector(self, device, dtype: torch.dtype) -> torch.Tensor:
        """``kernel_params()`` as the device tensor the kernels read (cached; no host synchronisation)."""
        from fastdistill._backend import device_constant

        return device_constant(self.kernel_params(), device, dtype)

    _NI = 5  # the first five fields are integers


_RAW = tuple(x.name for x in dataclasses.fields(KDPlan)[KDPlan._NI :])  # the float fields


def op_args(p: KDPlan, backend: str, device) -> tuple[list[int], torch.Tensor]:
    """The plan as the custom ops take it under torch.compile: its integers and switches (graph constants; a
    switch changes only where a float crosses 0 or 1) and its float values as a tensor built in the graph (graph
    inputs: one graph serves a whole schedule of temperatures or alphas, not one graph per value). For the
    kernels that tensor is their parameter vector (``kernel_params()``, the accumulation dtype, on the logits'
    device: nothing is read on the host); for the reference backend the plan's float fields (float64 on the CPU:
    read on the host without a synchronisation). Read back with ``plan_from_op``."""
    ip = [int(getattr(p, x.name)) for x in dataclasses.fields(p)[: KDPlan._NI]]
    if p.num_items:  # kd_loss divides by num_items outside the op
        raise ValueError("op_args: expected a plan without num_items")
    ip += [int(p.scaled), int(p.capped), int(p.mixes_ce), int(p.ce_sep)]
    if backend == "reference":
        return ip, value_vector([getattr(p, n) for n in _RAW], "cpu", torch.float64)
    return ip, value_vector(p.kernel_params(), device, p.accum_dtype)


@dataclasses.dataclass(frozen=True)
class _OpPlan(KDPlan):
    """A kernel backend's plan inside the custom op: the float values are only in ``prm`` (the kernels' parameter
    vector, a device tensor), the switches were decided when the graph was traced. Its float fields are NaN."""

    switches: tuple = (False, False, False, False)
    prm: torch.Tensor | None = dataclasses.field(default=None, compare=False)

    scaled = property(lambda self: self.switches[0])
    capped = property(lambda self: self.switches[1])
    mixes_ce = property(lambda self: self.switches[2])
    ce_sep = property(lambda self: self.switches[3])

    def kernel_params(self):
        raise RuntimeError("_OpPlan: the float values are in prm")

    def param_vector(self, device, dtype: torch.dtype) -> torch.Tensor:
        if self.prm.device != torch.device(device) or self.prm.dtype != dtype:
            raise ValueError(f"_OpPlan: prm is {self.prm.dtype} on {self.prm.device}, expected {dtype} on {device}")
        return self.prm


def plan_from_op(ip: list[int], vals: torch.Tensor, backend: str) -> KDPlan:
    """The plan that ``op_args`` packed (inside the custom op, or its fake)."""
    f = dataclasses.fields(KDPlan)
    kw = {x.name: (bool(v) if x.name == "fp64" else int(v)) for x, v in zip(f[: KDPlan._NI], ip)}
    if backend == "reference" and not isinstance(vals, torch._subclasses.FakeTensor):
        return KDPlan(**kw, **dict(zip(_RAW, vals.tolist())))  # float64 on the CPU: exactly the host's floats
    nan = float("nan")
    return _OpPlan(**kw, **{n: nan for n in _RAW if n != "num_items"}, num_items=0.0,
                   switches=tuple(bool(v) for v in ip[KDPlan._NI : KDPlan._NI + 4]), prm=vals)


def check_row_args(p: KDPlan, ids: torch.Tensor | None, labels: torch.Tensor | None, mask: torch.Tensor | None,
                   weights: torch.Tensor | None) -> None:
    """Checks of the per-row arguments ``[N]`` / ``[N, k]`` shared by kd_loss and fused_linear_kd_loss. Per-token
    weights are constants: one that requires grad would get no gradient, silently. Repeated top-k ids in a counted
    row double-count that id (and the backends disagree on it): refused where the check is free (CPU eager)."""
    if weights is not None and weights.requires_grad and torch.is_grad_enabled():
        raise ValueError("weights: requires grad, but the per-token weights are constants here (no gradient reaches "
                         "them); pass weights.detach()")
    if ids is None or ids.shape[-1] < 2 or not _eager_cpu(ids):
        return
    srt = ids.sort(-1).values
    dup = (srt[:, 1:] == srt[:, :-1]).any(1)
    if labels is not None:
        dup &= labels != p.ignore_index
    if mask is not None:
        dup &= mask
    if bool(dup.any()):
        row = int(dup.nonzero()[0, 0])
        raise ValueError(f"teacher_topk ids: row {row} repeats an id ({ids[row].tolist()}): the k ids of a row must "
                         "be distinct")


def positive_option(name: str, v) -> float:
    """A temperature, softcap or logit_scale (``real_option``), positive, and usable in fp32: 1/T finite (the kernels
    scale by 1/T in fp32), a softcap / logit_scale not 0 in fp32 (−inf·0 = NaN, z/0). Errors name it."""
    f = real_option(name, v)
    if not f > 0:
        raise ValueError(f"{name}: expected a positive finite number, got {v}")
    if name.endswith("temperature") and not 1.0 / f < _FP32_MAX:
        raise ValueError(f"{name}: {f:.3g} is too small (1/{name} overflows float32)")
    if name in ("logit_scale", "softcap") and f < _FP32_TINY:
        raise ValueError(f"{name}: {f:.3g} is below float32's smallest normal number")
    return f


def make_plan(*, divergence, beta, skew, temperature, teacher_temperature, t2_scale, ignore_index, reduction, num_items,
          hard_label_alpha, softcap, logit_scale, topk, accum_dtype, has_labels) -> KDPlan:
    """Check kd_loss's options (errors name the argument) and build its plan (docs/kd_ops.md). Shared by
    ``kd_loss``, ``fused_linear_kd_loss`` and the vocab-parallel losses. ``topk``: 0 dense teacher, else the
    ``TOPK_SEMANTICS`` code; ``has_labels``: whether labels were given (CE mixing needs them)."""
    check_choice("divergence", divergence, tuple(DIVERGENCES))
    check_choice("reduction", reduction, tuple(REDUCTIONS))
    if accum_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"accum_dtype: expected torch.float32 or torch.float64, got {accum_dtype}")
    beta, skew, hard_label_alpha = (real_option(n, v) for n, v in (
        ("beta", beta), ("skew", skew), ("hard_label_alpha", hard_label_alpha)))
    for name, v in (("beta", beta), ("skew", skew), ("hard_label_alpha", hard_label_alpha)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name}: expected a value in [0.0, 1.0], got {v}")
    ignore_index = int_option("ignore_index", ignore_index)
    t2_scale = check_bool("t2_scale", t2_scale)  # a truthy string ("no") turned the T² factor on
    opt = {}
    for name, v in (("temperature", temperature), ("teacher_temperature", teacher_temperature),
                    ("softcap", softcap), ("logit_scale", logit_scale)):
        if v is None and name != "temperature":
            opt[name] = None
            continue
        opt[name] = positive_option(name, v)
    temperature, teacher_temperature, softcap, logit_scale = opt.values()
    if topk and topk != TOPK_SEMANTICS["renorm"] and teacher_temperature not in (None, 1.0):
        raise ValueError(f"teacher_temperature: only topk_semantics='renorm' can re-temper stored log-probs "
                         f"(the tail mass is unknown), got {teacher_temperature}")
    if topk == TOPK_SEMANTICS["zero_tail"] and divergence != "fkl":
        raise ValueError(f"divergence: topk_semantics='zero_tail' defines forward KL only, got {divergence!r}")
    if hard_label_alpha > 0 and not has_labels:
        raise ValueError("labels: required when hard_label_alpha > 0 (the cross-entropy term)")
    if num_items is not None:
        num_items = check_num_items(num_items, reduction)
        if isinstance(num_items, torch.Tensor):
            raise TypeError("num_items: expected a number here (a tensor's value would need a host synchronisation)")
    div = DIVERGENCES[divergence]
    if div == 2 and beta in (0.0, 1.0):
        div = 0 if beta == 0.0 else 1
    if div in (3, 4) and skew == 0.0:
        div -= 3
    T = float(temperature)
    Tt = float(teacher_temperature) if teacher_temperature is not None else (1.0 if topk else T)
    return KDPlan(div=div, red=REDUCTIONS[reduction], fp64=accum_dtype == torch.float64, ignore_index=ignore_index,
                  topk=topk, beta=float(beta), skew=float(skew), temperature=T, teacher_temperature=Tt,
                  t2=T * T if t2_scale else 1.0, alpha=float(hard_label_alpha),
                  num_items=float(num_items) if num_items is not None else 0.0,
                  softcap=float(softcap) if softcap is not None else 0.0,
                  logit_scale=float(logit_scale) if logit_scale is not None else 1.0)


def check_num_items(num_items, reduction: str) -> float | torch.Tensor:
    """``num_items`` checked: a float (a number, or a one-element CPU tensor in eager mode), or a one-element
    tensor kept as such (on a GPU, or under torch.compile: its value is not checked, which would need a host
    synchronisation). Errors name it."""
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"num_items: divides the 'batchmean' / 'mean' reductions; with reduction={reduction!r} "
                         "it would be ignored")
    if isinstance(num_items, bool) or (isinstance(num_items, torch.Tensor) and num_items.dtype == torch.bool):
        raise TypeError(f"num_items: expected a number of items, got {num_items!r}")
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise TypeError(f"num_items: expected a number or a one-element tensor, got shape "
                            f"{tuple(num_items.shape)}")
        if num_items.device.type != "cpu" or torch.compiler.is_compiling():
            return num_items.reshape(())
    num_items = real_option("num_items", num_items)
    if not 0 < num_items < _FP32_MAX:
        raise ValueError(f"num_items: expected a number > 0 that float32 holds, got {num_items}")
    return num_items


def _divide(loss: torch.Tensor, num_items, V: int, reduction: str) -> torch.Tensor:
    """A "sum" loss divided by num_items (× V for "mean"); 0 where a tensor num_items is not positive, and where
    "mean"'s denominator is 0 for an empty vocabulary (V = 0: every row invalid, the loss 0, as for n = 0)."""
    if isinstance(num_items, torch.Tensor):
        n = num_items.to(device=loss.device, dtype=loss.dtype) * (V if reduction == "mean" else 1)
        return loss * torch.where(n > 0, 1.0 / n.clamp_min(torch.finfo(loss.dtype).tiny), torch.zeros_like(n))
    n = num_items * (V if reduction == "mean" else 1)
    return loss * (1.0 / n) if n else loss * 0.0


# ----------------------------------------------------------------------------- backends
def _why_not_triton(x: torch.Tensor, **_) -> list[str]:
    return _backend.triton_why_not(x.device)


def _why_not_cuda(x: torch.Tensor, fp64: bool = False, teacher_dtype: torch.dtype | None = None, topk: bool = False,
                  **_) -> list[str]:
    """``teacher_dtype``: the dense teacher's dtype; ``topk``: a top-k teacher (not in the CUDA kernels)."""
    r = _backend.cuda_why_not(x.device)
    ext = _backend.extension()
    if ext is not None and not hasattr(ext, "kd_fwd"):
        r.append("fastdistill._C predates the kd_loss kernels (a stale build): rebuild with "
                 "`pip install --no-build-isolation -e .`")
    if fp64:
        r.append("accum_dtype=float64 is not supported by the CUDA kernels (use triton or reference)")
    if x.dtype == torch.float64:
        r.append("float64 logits are not supported by the CUDA kernels (use triton or reference)")
    if topk:
        r.append("top-k teachers (teacher_topk) are not implemented by the CUDA kernels (use triton or reference)")
    elif teacher_dtype is not None and teacher_dtype != x.dtype:
        r.append(f"the CUDA kernels need teacher_logits in the student's dtype ({str(x.dtype).removeprefix('torch.')}"
                 f"), got {str(teacher_dtype).removeprefix('torch.')} (use triton or reference, or cast the teacher)")
    return r


_backend.register("kd_loss", "reference", lambda x, **_: [])
_backend.register("kd_loss", "triton", _why_not_triton)
_backend.register("kd_loss", "cuda", _why_not_cuda)


def _impl(backend: str):
    if backend == "reference":
        return _ref
    if backend == "cuda":
        from fastdistill.ops import _kd_cuda

        return _kd_cuda
    from fastdistill.kernels import kd_softmax as k

    return k


def _teacher(p, t, ids):
    return (ids, t) if p.topk else t


def _fwd(p, backend, s, t, labels, mask, weights):
    N = n_rows(s)
    if N == 0 or s.shape[-1] == 0:
        z = torch.zeros(1, dtype=p.accum_dtype, device=s.device)
        return z, torch.zeros(N, dtype=p.accum_dtype, device=s.device), \
            torch.zeros(N, _ref.NSTATE, dtype=p.accum_dtype, device=s.device), z.clone()
    return _impl(backend).kd_fwd(p, s, t, labels, mask, weights)


def _bwd(p, backend, s, t, labels, weights, st, factor, grad_out, out):
    if s.numel() == 0:
        return out.zero_()
    go = grad_out.reshape(-1).to(p.accum_dtype).contiguous()
    return _impl(backend).kd_bwd(p, s, t, labels, weights, st, factor, go, out)


class _KDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, backend, inplace, s, t, ids, labels, mask, weights):
        loss, contrib, st, factor = _fwd(p, backend, s, _teacher(p, t, ids), labels, mask, weights)
        ctx.p, ctx.backend, ctx.inplace = p, backend, inplace
        save_constants(ctx, s, t, ids, labels, weights, st, factor)
        ctx.set_materialize_grads(False)
        out = contrib.clone() if p.red == 3 else loss.reshape(())
        return out

    @staticmethod
    @first_order("kd_loss")
    def backward(ctx, g):
        s, t, ids, labels, weights, st, factor = saved_constants(ctx)
        if g is None:
            return (None,) * 9
        out = s if ctx.inplace else torch.empty_like(s)
        gs = _bwd(ctx.p, ctx.backend, s, _teacher(ctx.p, t, ids), labels, weights, st, factor, g, out)
        if ctx.inplace and ctx.backend != "reference":  # a kernel wrote through a pointer: tell autograd, so that
            torch.autograd.graph.increment_version(s)  # another reader of the logits (or a 2nd backward) raises
        return None, None, None, gs, None, None, None, None, None


@torch.library.custom_op("fastdistill::kd_fwd", mutates_args=())
def _kd_fwd_op(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor | None, labels: torch.Tensor | None,
               mask: torch.Tensor | None, weights: torch.Tensor | None, ip: list[int], vals: torch.Tensor,
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = plan_from_op(ip, vals, backend)
    loss, contrib, st, factor = _fwd(p, backend, s, _teacher(p, t, ids), labels, mask, weights)
    return (contrib.clone() if p.red == 3 else loss.reshape(())), st, factor


@_kd_fwd_op.register_fake
def _(s, t, ids, labels, mask, weights, ip, vals, backend):
    p = plan_from_op(ip, vals, backend)
    acc = p.accum_dtype
    N = n_rows(s)
    return s.new_empty((N,) if p.red == 3 else (), dtype=acc), s.new_empty((N, _ref.NSTATE), dtype=acc), \
        s.new_empty((1,), dtype=acc)


@torch.library.custom_op("fastdistill::kd_bwd", mutates_args=())
def _kd_bwd_op(s: torch.Tensor, t: torch.Tensor, ids: torch.Tensor | None, labels: torch.Tensor | None,
               weights: torch.Tensor | None, st: torch.Tensor, factor: torch.Tensor, grad_out: torch.Tensor,
               ip: list[int], vals: torch.Tensor, backend: str) -> torch.Tensor:
    p = plan_from_op(ip, vals, backend)
    return _bwd(p, backend, s, _teacher(p, t, ids), labels, weights, st, factor, grad_out, torch.empty_like(s))


@_kd_bwd_op.register_fake
def _(s, t, ids, labels, weights, st, factor, grad_out, ip, vals, backend):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    s, t, ids, labels, mask, weights, ip, vals, backend = inputs
    _, st, factor = output
    save_constants(ctx, s, t, ids, labels, weights, st, factor, vals)
    ctx.ip, ctx.backend = ip, backend


@first_order("kd_loss")
def _backward(ctx, g, _g_st, _g_factor):
    s, t, ids, labels, weights, st, factor, vals = saved_constants(ctx)
    gs = _kd_bwd_op(s, t, ids, labels, weights, st, factor, g, ctx.ip, vals, ctx.backend)
    return gs, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastdistill::kd_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API
def _overlap_elsewhere(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` shares memory with ``a`` other than as the very same view (same start, shape, strides)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    if a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype:
        return False

    def span(x):
        last = sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()))
        return x.data_ptr(), x.data_ptr() + (last + 1) * x.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _eager_cpu(t: torch.Tensor) -> bool:
    """Value checks are free on CPU tensors in eager mode (no device sync, no graph break)."""
    return t.device.type == "cpu" and t.numel() > 0 and not torch.compiler.is_compiling()


def _rows(name: str, v, lead: torch.Size, N: int, device, *, dtypes=None, kind="") -> torch.Tensor | None:
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of shape {tuple(lead)} or None, got {type(v).__name__}")
    if v.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of student_logits), got {v.device}")
    if v.shape != lead and v.shape != (N,):
        raise ValueError(f"{name}: expected shape {tuple(lead)} (the leading dims of student_logits), "
                         f"got {tuple(v.shape)}")
    if dtypes is not None and v.dtype not in dtypes:
        raise TypeError(f"{name}: expected {kind}, got {v.dtype}")
    return v.reshape(N).contiguous()


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk=None,
    divergence: str = "fkl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    t2_scale: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    reduction: str = "batchmean",
    num_items: int | float | None = None,
    hard_label_alpha: float = 0.0,
    softcap: float | None = None,
    logit_scale: float | None = None,
    inplace_grad: bool = False,
    topk_semantics: str = "tail_bucket",
    accum_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Knowledge-distillation divergence between teacher P and student Q over the vocabulary,
    fused: per-row fp32 statistics only, no ``[N, V]`` temporaries, the gradient written directly.

    ``student_logits``: ``[N, V]`` or ``[B, T, V]`` (fp32/bf16/fp16). ``teacher_logits``: the same
    leading dims, vocabulary ``Vt`` (sliced if larger, ``−inf``-padded if smaller). ``divergence``:
    ``"fkl"`` KL(P‖Q), ``"rkl"`` KL(Q‖P), ``"jsd"`` generalised JSD(β) (β=0 → fkl, β=1 → rkl),
    ``"skl"`` / ``"srkl"`` skew KL / skew reverse KL (λ = ``skew``), ``"tvd"``. ``temperature`` on
    both (``teacher_temperature`` separately), ``t2_scale`` multiplies the KD term by T²,
    ``hard_label_alpha`` mixes ``α·CE(labels) + (1−α)·KD``; ``labels[i]`` is row ``i``'s target (shift
    transformers-style labels as its loss does: ``s[:, :-1]``, ``labels[:, 1:]``). Rows with
    ``labels == ignore_index`` or ``mask`` false are ignored; ``reduction="batchmean"`` divides by the
    valid rows (or ``num_items``: a number or a one-element tensor on any device).
    ``teacher_topk=(ids, logprobs)`` replaces ``teacher_logits`` for offline
    top-k teachers (``topk_semantics``: ``"tail_bucket"`` | ``"zero_tail"`` | ``"renorm"``).
    Returns an fp32 scalar (``[lead]`` for ``"none"``); fp64 statistics and loss for fp64 student logits
    (``accum_dtype=None`` follows the student; pass ``torch.float32`` / ``torch.float64`` to force). Exact
    semantics: docs/kd_ops.md.

    Example::

        loss = kd_loss(student(x).logits[:, :-1], teacher_logits[:, :-1], divergence="jsd", beta=0.5,
                       temperature=2.0, t2_scale=True, labels=labels[:, 1:])
    """
    refuse_transforms("kd_loss")
    inplace_grad = check_bool("inplace_grad", inplace_grad)
    s = student_logits
    topk_pair = teacher_topk if isinstance(teacher_topk, (tuple, list)) else (None, None)
    reject_dtensor("kd_loss", {"student_logits": s, "teacher_logits": teacher_logits, "labels": labels, "mask": mask,
                               "weights": weights, "num_items": num_items,
                               **dict(zip(("teacher_topk ids", "teacher_topk logprobs"), topk_pair))},
                   vocab_hint="use fastdistill.distributed.vocab_parallel_kd_loss(student.to_local(), "
                              "teacher.to_local(), group=...) on each rank's vocabulary shard",
                   hint=" (rows sharded: num_items=<the global count> keeps batchmean global)")
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"student_logits: expected a tensor, got {type(s).__name__}")
    if s.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"student_logits: expected a floating dtype, got {s.dtype}")
    if s.dim() < 2:
        raise ValueError(f"student_logits: expected shape [N, V] or [B, T, V], got {tuple(s.shape)}")
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("teacher_logits / teacher_topk: give exactly one of them")
    check_choice("topk_semantics", topk_semantics, tuple(TOPK_SEMANTICS))
    ids = None
    if teacher_topk is not None:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise TypeError("teacher_topk: expected a pair (ids, logprobs)")
        ids, t = teacher_topk
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"teacher_topk ids: expected an int64/int32 tensor, got {getattr(ids, 'dtype', ids)}")
        name = "teacher_topk logprobs"
    else:
        t = teacher_logits
        name = "teacher_logits"
    if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    for nm, v in ((name, t), ("teacher_topk ids", ids)):
        if v is None:
            continue
        if v.device != s.device:
            raise ValueError(f"{nm}: expected device {s.device} (the device of student_logits), got {v.device}")
        if v.shape[:-1] != s.shape[:-1]:
            raise ValueError(f"{nm}: expected leading dims {tuple(s.shape[:-1])} (those of student_logits), "
                             f"got {tuple(v.shape[:-1])}")
    topk = TOPK_SEMANTICS[topk_semantics] if ids is not None else 0
    if ids is not None:
        if ids.shape != t.shape:
            raise ValueError(f"teacher_topk: ids {tuple(ids.shape)} and logprobs {tuple(t.shape)} differ in shape")
        if ids.shape[-1] > s.shape[-1]:
            raise ValueError(f"teacher_topk: k = {ids.shape[-1]} exceeds the student vocabulary {s.shape[-1]}")
        if ids.shape[-1] < 1:
            raise ValueError("teacher_topk: k = 0 (no teacher ids); give at least one id per row")
        if _eager_cpu(ids) and bool(((ids < 0) | (ids >= s.shape[-1])).any()):
            raise ValueError(f"teacher_topk ids: values must be in [0, {s.shape[-1]})")
    lead, V, Vt = s.shape[:-1], s.shape[-1], t.shape[-1]
    N = s.numel() // V if V else int(torch.Size(lead).numel())
    labels2 = _rows("labels", labels, lead, N, s.device, dtypes=(torch.int64, torch.int32), kind="int64 / int32 labels")
    check_choice("reduction", reduction, tuple(REDUCTIONS))
    # num_items divides the summed loss outside the op: its value (new each step of gradient accumulation) is
    # then no graph constant (one graph under torch.compile, not one per value), and may be a device tensor
    n_items = check_num_items(num_items, reduction) if num_items is not None else None
    p = make_plan(divergence=divergence, beta=beta, skew=skew, temperature=temperature,
                  teacher_temperature=teacher_temperature, t2_scale=t2_scale, ignore_index=ignore_index,
                  reduction="sum" if n_items is not None else reduction, num_items=None,
                  hard_label_alpha=hard_label_alpha, softcap=softcap,
                  logit_scale=logit_scale, topk=topk, accum_dtype=resolve_accum(accum_dtype, s),
                  has_labels=labels2 is not None)
    if p.div == 1 and Vt < V and not topk:
        raise ValueError(f"teacher_logits: vocabulary {Vt} < the student's {V}: reverse KL is infinite where the "
                         "student has mass and the teacher none; slice the student logits or use 'jsd'/'srkl'")
    if labels2 is not None and _eager_cpu(labels2):
        bad = (labels2 != ignore_index) & ((labels2 < 0) | (labels2 >= V))
        if bool(bad.any()):  # free on the CPU; on a GPU an out-of-range label makes its row's CE NaN
            raise ValueError(f"labels: values must be in [0, {V}) or ignore_index={ignore_index}, "
                             f"got {labels2[bad][:4].tolist()}")
    mask2 = _rows("mask", mask, lead, N, s.device, dtypes=(torch.bool,), kind="a bool mask")
    w2 = _rows("weights", weights, lead, N, s.device, dtypes=_FLOAT_DTYPES, kind="a floating dtype")
    backend = select_backend("kd_loss", s, fp64=p.fp64, teacher_dtype=t.dtype, topk=bool(topk))
    # rows the kernels read in place: [N, V] views, or [G, R, V] views where the logits are sliced along a leading
    # dim (the shifted logits[:, :-1] of a batch, which reshape(N, V) would copy whole); the reference copies
    grouped = backend != "reference" and len(lead) >= 2 and N > 0 and (
        row_view(s, N) is None or (not topk and row_view(t, N) is None))
    s2 = as_rows(s, N, grouped)
    t2 = as_rows(t, N, grouped and not topk)
    if s2.dim() != t2.dim() and not topk:  # one grouped, the other not viewable so: both as copies' row views
        s2, t2 = (x if x.dim() == 3 else x.view(-1, lead[-1], x.shape[-1]) for x in (s2, t2))
    ids2 = ids.reshape(N, Vt).contiguous() if ids is not None else None
    check_row_args(p, ids2, labels2, mask2, w2)
    mask_u8 = mask2.view(torch.uint8) if mask2 is not None else None
    if inplace_grad and not torch.compiler.is_compiling():
        base = s if s._base is None else s._base  # a view of a trainable leaf writes into the leaf too
        if base.is_leaf and base.requires_grad:
            raise ValueError("inplace_grad: student_logits is a leaf that requires grad (or a view of one): its "
                             "gradient would overwrite the tensor itself (and alias its .grad); pass "
                             "inplace_grad=False")
        if s2.numel() and rows_overlap(s2):  # (a copy made by as_rows is contiguous: never overlapping)
            raise ValueError(f"inplace_grad: the rows of student_logits overlap in memory (strides {s.stride()}, "
                             f"V = {V}, e.g. an expanded tensor): one gradient row would overwrite another's logits; "
                             "pass inplace_grad=False")
    # the buffers the kernels read and write, and the caller's tensors: the reference backend copies sliced logits
    # (no race there), but a call it accepts must not be one that the in-place kernels refuse
    if inplace_grad and not torch.compiler.is_compiling() and any(
            x is not None and (_overlap_elsewhere(s2, x) or _overlap_elsewhere(s, x0))
            for x, x0 in ((t2, t), (w2, weights))):
        raise ValueError("inplace_grad: teacher_logits (or weights) share memory with student_logits other than as "
                         "the same view: the gradient written over one student row would overwrite values that "
                         "another row still reads; pass inplace_grad=False or a separate teacher tensor")
    if torch.compiler.is_compiling():
        ip, vals = op_args(p, backend, s.device)
        out, _, _ = _kd_fwd_op(s2, t2, ids2, labels2, mask_u8, w2, ip, vals, backend)
    else:
        out = _KDFunction.apply(p, backend, inplace_grad, s2, t2, ids2, labels2, mask_u8, w2)
    if n_items is not None:
        return _divide(out, n_items, V, reduction)
    return out.view(lead) if p.red == 3 else out
