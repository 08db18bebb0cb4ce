"""JVP attention: ``jvp_attention`` (forward + tangent in one fused pass, primal backward), its
autograd / forward-AD wiring, the ``torch.library`` custom ops for ``torch.compile``, dispatch.

Three ways in, one kernel pass each (docs/jvp_attention.md):
- explicit pairs ``jvp_attention(q, k, v, tq, tk, tv)`` -> ``(o, to)`` (rCM-style code);
- forward-AD: inside ``torch.func.jvp`` or with ``torch.autograd.forward_ad`` dual tensors, the
  tangents of q, k, v are read off the inputs and the output carries Ȯ as its tangent;
- plain autograd without tangents: a normal flash attention forward / backward.
The tangent outputs (Ȯ and d lse) are stop-gradient by contract.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD

from fastdistill import _backend
from fastdistill.ops._common import (  # noqa: F401  (TransformLimitError: re-exported, its home was here)
    TransformLimitError,
    autocast_cast,
    autocast_off,
    check_bool,
    check_choice,
    eager_only,
    first_order,
    functorch_levels,
    is_finite,
    reached,
    real_option,
    reject_dtensor,
    select_backend,
)
from fastdistill.reference import jvp_attention as _ref

OP = "jvp_attention"
LAYOUTS = {"bshd": 0, "bhsd": 1}
MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_DTYPES = (*_KERNEL_DTYPES, torch.float64)
_TANGENT_DTYPES = {None: 0, torch.float32: 1}


# ----------------------------------------------------------------------------- backends
_MAX_GRID_YZ = 65535  # CUDA: a launch grid's y and z dims (kernels/jvp_attention.py puts batch and heads there)


def _why_not_triton(x: torch.Tensor, head_dims: tuple = (), batch_heads: tuple = (), grid_too_big: bool = False,
                    **_) -> list[str]:
    """``batch_heads`` (B, Hq), or ``grid_too_big``: the same test done by the caller (a bool: under torch.compile B
    may be symbolic, and the choice of backend must be a constant of the graph). ``head_dims`` (Dqk, Dv); without
    it, a 4-D ``x`` (a q from ``fastdistill.available_backends``) gives its own head dim."""
    if not head_dims and x.dim() == 4:
        head_dims = (x.shape[-1],)
    r = _backend.triton_why_not(x.device)
    if grid_too_big or (batch_heads and max(batch_heads) > _MAX_GRID_YZ):
        r.append(f"batch / heads > {_MAX_GRID_YZ}: the Triton kernels' launch grid holds at most {_MAX_GRID_YZ} "
                 "of each (fold fewer windows into the batch)")
    if x.dtype not in _KERNEL_DTYPES:
        r.append(f"dtype {str(x.dtype).removeprefix('torch.')} is not supported by the Triton kernels "
                 "(float16, bfloat16, float32)")
    big = [d for d in head_dims if d > MAX_HEAD_DIM]
    if big:
        r.append(f"head dim {big[0]} > {MAX_HEAD_DIM} is not supported by the Triton kernels")
    if not r and x.dtype == torch.float32:
        from fastdistill.kernels import jvp_attention as kern

        arch = kern.device_arch(x)
        if not kern.fp32_supported(arch):  # consumer Ampere / Ada / Blackwell: no FP64 tensor cores
            r.append(f"float32 on sm_{arch}: the Triton kernels' float64 logits need FP64 tensor cores (sm_80, "
                     "sm_90; kernels/jvp_attention.py, fp32_supported)")
    return r


def _grid_too_big(B, H) -> bool:
    return bool(B > _MAX_GRID_YZ or H > _MAX_GRID_YZ)


def _why_not_reference(x: torch.Tensor, **_) -> list[str]:
    return []


_backend.register(OP, "reference", _why_not_reference)
_backend.register(OP, "triton", _why_not_triton)


def _impl(backend: str):
    if backend == "triton":
        from fastdistill.kernels import jvp_attention as kern

        return kern
    if backend == "reference":
        return _ref
    raise ValueError(f"jvp_attention: backend {backend!r} has no implementation")


# ----------------------------------------------------------------------------- the shared compute
def _bhsd(x: torch.Tensor | None, layout: int) -> torch.Tensor | None:
    """A [B, H, S, D] view of a tensor in the caller's layout (no copy)."""
    return x if x is None or layout == 1 else x.transpose(1, 2)


def _out_shape(q: torch.Tensor, v: torch.Tensor, layout: int) -> tuple[int, ...]:
    # BSHD: [B, Sq, Hq, Dv]; BHSD: [B, Hq, Sq, Dv]
    return (*q.shape[:3], v.shape[-1])


def _stat_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _needs_lo(q: torch.Tensor, masked: bool) -> bool:
    """Whether lse carries a low word (``lse_lo``, a residual for the backward): fp32 inputs, and any dtype with a
    key mask (see ``_outputs``)."""
    return q.dtype == torch.float32 or masked


def _outputs(q, v, layout: int, want_t: bool, t_dtype: int, masked: bool = False):
    """Uninitialised (o, to, lse, mu, lse_lo); ``to``/``mu`` are empty without tangents, ``lse_lo`` (the low word
    of lse, a residual for the backward) is empty unless q is float32 or (``masked``) a key mask is given: a float
    mask's large bias (finfo.min, −1e4) puts lse where its ulp exceeds ln of the row's weight, and
    P = exp(S − lse) needs the low word there (float64 too: ulp(finfo(float32).min) in float64 is 3.8e22, and
    without it a row of finfo.min keys got P = 1, gradients n times too large). Also the fake impl."""
    shape = _out_shape(q, v, layout)
    # o (and its tangent) in q's order of the sequence and head dims: a model's q is often the transposed view of
    # [B, S, H, D] memory (diffusers, transformers), and its o.transpose(1, 2).reshape(B, S, H·D) is then a view
    # (a contiguous o would be copied there, and the copy kept for the next layer's backward)
    swap = q.dim() == 4 and not q.is_contiguous() and q.transpose(1, 2).is_contiguous()
    alloc = (lambda dt: q.new_empty((shape[0], shape[2], shape[1], shape[3]), dtype=dt).transpose(1, 2)) if swap \
        else (lambda dt: q.new_empty(shape, dtype=dt))
    o = alloc(q.dtype)
    to = alloc(torch.float32 if t_dtype == 1 else q.dtype) if want_t else o.new_empty(0)
    B, H, S = (q.shape[0], q.shape[2], q.shape[1]) if layout == 0 else q.shape[:3]
    lse = q.new_empty((B, H, S), dtype=_stat_dtype(q))
    lo = torch.empty_like(lse) if _needs_lo(q, masked) else lse.new_empty(0)
    return o, to, lse, torch.empty_like(lse) if want_t else lse.new_empty(0), lo


def _lo(lo: torch.Tensor) -> torch.Tensor | None:
    return lo if lo.numel() else None


def _fwd(q, k, v, tq, tk, tv, causal: bool, scale: float, layout: int, want_t: bool, t_dtype: int, backend: str,
         kb: torch.Tensor | None = None):
    o, to, lse, mu, lo = _outputs(q, v, layout, want_t, t_dtype, kb is not None)
    _impl(backend).attn_fwd(_bhsd(q, layout), _bhsd(k, layout), _bhsd(v, layout), _bhsd(tq, layout),
                            _bhsd(tk, layout), _bhsd(tv, layout), _bhsd(o, layout),
                            _bhsd(to, layout) if want_t else None, lse, mu if want_t else None,
                            causal=causal, scale=scale, lse_lo=_lo(lo), **_kb_kw(kb))
    return o, to, lse, mu, lo


def _kb_kw(kb: torch.Tensor | None) -> dict:
    # (the keyword only with a key mask: backends / wrappers without it keep working on unmasked calls)
    return {} if kb is None else {"key_bias": kb}


def _bwd(do, q, k, v, o, lse, lo, dlse, causal: bool, scale: float, layout: int, backend: str,
         kb: torch.Tensor | None = None):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _impl(backend).attn_bwd(_bhsd(do, layout), _bhsd(q, layout), _bhsd(k, layout), _bhsd(v, layout),
                            _bhsd(o, layout), lse, dlse, _bhsd(dq, layout), _bhsd(dk, layout), _bhsd(dv, layout),
                            causal=causal, scale=scale, lse_lo=_lo(lo), **_kb_kw(kb))
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom ops (torch.compile)
@torch.library.custom_op("fastdistill::jvp_attn_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None, tk: torch.Tensor | None,
            tv: torch.Tensor | None, causal: bool, scale: float, layout: int, want_t: bool, t_dtype: int,
            backend: str, key_bias: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``key_bias``: a key mask as a [B, Hq, Sk] view (``_key_bias``), no gradient."""
    return _fwd(q, k, v, tq, tk, tv, causal, scale, layout, want_t, t_dtype, backend, key_bias)


@_fwd_op.register_fake
def _(q, k, v, tq, tk, tv, causal, scale, layout, want_t, t_dtype, backend, key_bias=None):
    return _outputs(q, v, layout, want_t, t_dtype, key_bias is not None)


@torch.library.custom_op("fastdistill::jvp_attn_bwd", mutates_args=())
def _bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            lse_lo: torch.Tensor, dlse: torch.Tensor | None, causal: bool, scale: float, layout: int,
            backend: str, key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd(do, q, k, v, o, lse, lse_lo, dlse, causal, scale, layout, backend, key_bias)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, lse_lo, dlse, causal, scale, layout, backend, key_bias=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, _tq, _tk, _tv, causal, scale, layout, _want_t, _t_dtype, backend, kb = inputs
    o, _to, lse, _mu, lo = output
    ctx.save_for_backward(q, k, v, o, lse, lo, kb)
    ctx.cfg = (causal, scale, layout, backend)
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs the loss does not use (to, mu, lo: the
    # size of o and three [B, H, S] fp32 a call)


@first_order(OP)
def _backward(ctx, do, _dto, dlse, _dmu, _dlo):
    # the tangent outputs are stop-gradient: eager calls guard them (_NoGrad), compiled calls detach them
    q, k, v, o, lse, lo, kb = ctx.saved_tensors
    causal, scale, layout, backend = ctx.cfg
    if do is None and dlse is None:
        return (None,) * 13
    if do is None:  # only lse reached the loss
        do = torch.zeros_like(o)
    dq, dk, dv = _bwd_op(do.contiguous() if do.stride(-1) != 1 else do, q, k, v, o, lse, lo, dlse, causal, scale,
                         layout, backend, kb)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastdistill::jvp_attn_fwd", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- forward-AD path
_STOP_GRAD = ("jvp_attention: the tangent outputs (Ȯ, d lse) are stop-gradient by contract (sCM, rCM and "
              "MeanFlow detach them) and have no backward; a loss reached them. Detach the tangent "
              "(`to.detach()`) or compute the second-order term another way.")


class _NoGrad(torch.autograd.Function):
    """Identity whose backward raises: marks a tangent output as stop-gradient, loudly."""

    @staticmethod
    def forward(t, anchor):
        return t.view_as(t)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # an op that reads the tangent but gives it no gradient passes None

    @staticmethod
    def backward(ctx, g):
        # None: the tangent fed only ops that give it no gradient (the next attention layer's tangent input, with
        # dual tensors or explicit pairs); zeros: the same through an autograd.Function that materialises them
        if not reached(g):
            return None, None
        raise RuntimeError(_STOP_GRAD)


def _anchor(*inputs: torch.Tensor | None) -> torch.Tensor | None:
    """The first input that requires grad (q, k, v, then the tangents: a forward-AD tangent of a model's activation
    depends on its weights), its primal if it is a dual tensor; None if none does."""
    x = next((x for x in inputs if x is not None and x.requires_grad), None)
    return x if x is None else fwAD.unpack_dual(x).primal


def _guard(t: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    anchor = _anchor(*inputs)
    if anchor is None or not torch.is_grad_enabled():
        return t
    if torch.compiler.is_compiling():
        return t.detach()
    return _NoGrad.apply(t, anchor)


class _Box:
    """Shared by the contexts of one ``_DualFunction`` call. With dual tensors there is one context (plain
    autograd and forward-AD at once): the tangent outputs are non-differentiable there, and ``jvp`` guards
    the tangents it hands back with ``_NoGrad`` (anchored on an input that requires grad). Under torch.func
    transforms functorch makes one context for plain autograd and one per level (innermost first), the
    Jvp level's last (``jvp`` gets it). There every context but the last keeps Ȯ and μ differentiable, with
    a backward that raises, and the last marks them non-differentiable for its level: so a loss that
    reaches the tangent fails loudly in every case (as a constant it would silently lose the term)."""

    __slots__ = ("levels", "contexts")

    def __init__(self, levels: int):
        self.levels = levels  # functorch grad/jvp levels (0: forward_ad dual tensors)
        self.contexts = 0


class _DualFunction(torch.autograd.Function):
    """Forward-AD entry: q, k, v carry tangents (dual tensors or torch.func.jvp); their tangent
    tensors come in explicitly as tq, tk, tv, so the forward runs the fused pass once and
    ``jvp`` hands back the Ȯ and μ it computed (no second primal forward)."""

    @staticmethod
    def forward(q, k, v, tq, tk, tv, causal, scale, layout, t_dtype, backend, box, kb):
        return _fwd(q, k, v, tq, tk, tv, causal, scale, layout, True, t_dtype, backend, kb)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _tq, _tk, _tv, causal, scale, layout, _t_dtype, backend, box, kb = inputs
        o, to, lse, mu, lo = output
        ctx.save_for_backward(q, k, v, o, lse, lo, kb)
        ctx.cfg = (causal, scale, layout, backend)
        box.contexts += 1
        guard = box.levels and box.contexts <= box.levels and not torch.compiler.is_compiling()
        # only the context whose jvp runs keeps the tangents: in a guard context they are differentiable outputs
        # of this very node (node -> ctx -> tangent -> node: a cycle the garbage collector cannot break)
        ctx.tangents = None if guard else (to, mu)
        ctx.anchor = None if box.levels else _anchor(q, k, v, _tq, _tk, _tv)
        ctx.mark_non_differentiable(*((lo,) if guard else (to, mu, lo)))
        ctx.set_materialize_grads(False)

    @staticmethod
    def jvp(ctx, *_input_tangents):
        to, mu = ctx.tangents
        if ctx.anchor is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            to, mu = _NoGrad.apply(to, ctx.anchor), _NoGrad.apply(mu, ctx.anchor)
        return to, None, mu, None, None

    @staticmethod
    @first_order(OP)
    def backward(ctx, do, dto, dlse, dmu, _dlo):
        if reached(dto, dmu):
            raise RuntimeError(_STOP_GRAD)
        q, k, v, o, lse, lo, kb = ctx.saved_tensors
        causal, scale, layout, backend = ctx.cfg
        if do is None:  # only lse reached the loss
            do = torch.zeros_like(o)
        # the kernel backends through the custom op: a backward that runs inside a compiled region (a compiled step
        # calling .backward()) is then one opaque op for dynamo, not a traced kernel launch; the reference backend
        # directly (torch.func.grad around a forward-AD call reaches this with functorch-wrapped tensors)
        bwd = _bwd if backend == "reference" else _bwd_op
        dq, dk, dv = bwd(do.contiguous() if do.stride(-1) != 1 else do, q, k, v, o, lse, lo, dlse, causal, scale,
                         layout, backend, kb)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


def autograd_levels() -> int:
    """The number of torch.func grad / jvp levels active (0 with forward_ad dual tensors and plain autograd)."""
    if torch.compiler.is_compiling():  # dynamo runs the transforms itself (the tangents come back detached)
        return 0
    from torch._C._functorch import TransformType

    return sum(k in (TransformType.Grad, TransformType.Jvp) for k in functorch_levels())


def transform_limit(backend: str | None = None, dual: bool = True) -> str | None:
    """Why jvp_attention cannot serve the functorch transforms active now, or None.

    It computes one tangent of one forward-mode level exactly: nested forward-mode levels (``jvp`` of
    ``jvp``, ``jacfwd``, ``hessian``) would see the inner tangent where the outer one belongs, and ``vmap``
    together with a forward-mode level has no batching rule. ``torch.func.grad`` / ``vjp`` levels compose
    only with a forward-AD call (``dual``: tangents read off q, k, v) on the reference backend: the kernels
    take plain tensors, and the plain / explicit-pair path is a custom op without functorch rules (``backend``
    given: checked too). ``torch.autograd`` (``.backward()``) is not a functorch level and always composes.
    Not checked while compiling (dynamo runs the transforms itself)."""
    if torch.compiler.is_compiling():
        return None
    from torch._C._functorch import TransformType

    keys = functorch_levels()
    n_jvp = keys.count(TransformType.Jvp)
    if n_jvp > 1:
        return f"{n_jvp} nested forward-mode transforms (jvp of jvp, jacfwd, hessian): one tangent level only"
    if n_jvp and TransformType.Vmap in keys:
        return "vmap together with a forward-mode transform (jvp/jacfwd): no batching rule"
    if backend not in (None, "reference") and TransformType.Grad in keys:
        return (f"torch.func.grad / vjp / jacrev around the {backend} kernels (they take plain tensors): "
                "use torch.autograd (.backward(), torch.autograd.grad) or the reference backend")
    if backend is not None and not dual and TransformType.Grad in keys:
        return ("torch.func.grad / vjp / jacrev around a call without forward-AD tangents (a custom op without "
                "functorch rules): use torch.autograd (.backward(), torch.autograd.grad)")
    return None


def check_dual_tangent_dtype(q: torch.Tensor, tangent_dtype) -> None:
    """Under forward-AD the tangent of o has o's dtype: another ``tangent_dtype`` (an explicit-pairs option) raises."""
    if tangent_dtype is not None and tangent_dtype != q.dtype:
        raise ValueError(f"tangent_dtype: under torch.func.jvp / forward-AD dual tensors the tangent of o has o's "
                         f"dtype ({q.dtype}; the next layer would get a {tangent_dtype} tangent); pass explicit "
                         f"(tq, tk, tv) pairs for a {tangent_dtype} tangent output")


def _in_dual_level() -> bool:
    """Inside ``forward_ad.dual_level()`` at run time. Read while dynamo traces a frame that it compiles on its own
    (after a graph break in the caller): there a dual input looks like a plain tensor (its tangent is not traced),
    so the call's duality cannot be read off q, k, v; dynamo guards on this global."""
    return getattr(fwAD, "_current_level", -1) >= 0


def _dual_tangent(x: torch.Tensor) -> torch.Tensor | None:
    # (traced by dynamo too; under torch.compile a dual call takes _math_in_graph)
    return fwAD.unpack_dual(x).tangent


# ----------------------------------------------------------------------------- checks
def _name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def softmax_scale(scale, Dqk: int, dtype: torch.dtype):
    """The ``scale`` argument: ``1/√Dqk`` for None, else a finite real number, 0 or normal in the compute dtype
    (float32; float64 for ``dtype`` float64). A float, an int or a SymFloat is taken as is (``float``); anything
    else goes through ``real_option``, which refuses a string (``float("0.5")`` parsed it), a bool, a tensor that
    requires grad (its value is read as a number: a learnable temperature silently got no gradient) and a tensor
    other than a one-element CPU one (reading a GPU tensor would synchronise). A subnormal scale keeps a few bits
    or none there (1.4e-45 is float32's smallest), and s·Ṡ underflows: μ and Ȯ came out 0 (100% off)."""
    if scale is None:
        return 1.0 / math.sqrt(Dqk)
    plain = isinstance(scale, (float, int, torch.SymFloat, torch.SymInt)) and not isinstance(scale, bool)
    scale = float(scale) if plain else real_option("scale", scale)
    if not is_finite(scale):
        raise ValueError(f"scale: expected a finite float, got {scale}")
    why = subnormal_scale(scale, dtype)
    if why is not None:
        raise ValueError(f"scale: {why}: it would keep a few bits or none. Use 0 (uniform attention) or a larger "
                         "scale")
    return scale


def subnormal_scale(scale, dtype: torch.dtype) -> str | None:
    """Why a (finite) softmax scale is refused for inputs of ``dtype``: nonzero and subnormal in the compute dtype
    (float32; float64 for float64 inputs). None if it is not."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    tiny = torch.finfo(cdt).tiny
    if scale != 0 and -tiny < scale < tiny:
        return f"{scale} is subnormal in {_name(cdt)}, the dtype the softmax is computed in (its smallest normal is " \
               f"{tiny:.3e})"
    return None


def _check(q, k, v, tq, tk, tv, layout: int, tangent_dtype):
    reject_dtensor("jvp_attention", {"q": q, "k": k, "v": v, "tq": tq, "tk": tk, "tv": tv},
                   hint=" (sequence-sharded q / k / v: fastdistill.distributed.context_parallel_jvp_attention on the "
                        "local shards)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor ({'[B, S, H, D]' if layout == 0 else '[B, H, S, D]'}),"
                             f" got shape {tuple(x.shape)}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name}: expected float16, bfloat16, float32 or float64, got {_name(x.dtype)}")
        if x.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {_name(x.dtype)} differs from q's {_name(q.dtype)}")
        if x.device != q.device:
            raise ValueError(f"{name}: device {x.device} differs from q's {q.device}")
        if x.numel() and x.stride(-1) != 1:
            raise ValueError(f"{name}: the head dim must be contiguous (stride 1), got strides {tuple(x.stride())}")
    sh = (lambda x: (x.shape[0], x.shape[1], x.shape[2], x.shape[3])) if layout == 1 else \
        (lambda x: (x.shape[0], x.shape[2], x.shape[1], x.shape[3]))
    (B, Hq, _, Dqk), (Bk, Hk, Sk, Dk), (Bv, Hv, Sv, Dv) = sh(q), sh(k), sh(v)
    if Bk != B or Bv != B:
        raise ValueError(f"k, v: batch sizes {Bk}, {Bv} differ from q's {B}")
    if Dk != Dqk:
        raise ValueError(f"k: head dim {Dk} differs from q's {Dqk}")
    if (Hv, Sv) != (Hk, Sk):
        raise ValueError(f"v: (heads, keys) = {(Hv, Sv)} differs from k's {(Hk, Sk)}")
    if Dqk < 1 or Dv < 1:
        raise ValueError(f"q, v: head dims must be >= 1, got Dqk={Dqk}, Dv={Dv}")
    if Hk == 0 or Hq % Hk:
        raise ValueError(f"k: the number of query heads ({Hq}) must be a multiple of the key/value heads ({Hk}) "
                         "(GQA/MQA)")
    for name, t, p in (("tq", tq, q), ("tk", tk, k), ("tv", tv, v)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
        if t.shape != p.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from its primal's {tuple(p.shape)}")
        if t.dtype != p.dtype:
            raise TypeError(f"{name}: dtype {_name(t.dtype)} differs from its primal's {_name(p.dtype)}")
        if t.device != p.device:
            raise ValueError(f"{name}: device {t.device} differs from its primal's {p.device}")
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name}: the head dim must be contiguous (stride 1), got strides {tuple(t.stride())}")
    if tangent_dtype not in _TANGENT_DTYPES and tangent_dtype != q.dtype:
        raise ValueError(f"tangent_dtype: expected None, torch.float32 or q's dtype, got {tangent_dtype}")
    return Dqk, Dv


def _key_bias(key_mask, q: torch.Tensor, k: torch.Tensor, lay: int) -> torch.Tensor | None:
    """``key_mask`` checked and viewed as ``[B, Hq, Sk]`` (``expand``: no copy of a broadcast mask). Accepted: bool
    (True keeps the key) or a float dtype (an additive bias, SDPA's attn_mask semantics), shaped ``[Sk]``,
    ``[B | 1, Hq | 1, Sk]`` or ``[B | 1, Hq | 1, 1, Sk]`` (a query dim of size Sq and stride 0, an expanded key mask,
    too), on q's device, without a gradient or a tangent. Under autocast a float mask is cast as stock SDPA
    casts it."""
    if key_mask is None:
        return None
    reject_dtensor("jvp_attention", {"key_mask": key_mask})
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask: expected a torch.Tensor or None, got {type(key_mask).__name__}")
    qb, kb = _bhsd(q, lay), _bhsd(k, lay)
    B, Hq, Sq, Sk = qb.shape[0], qb.shape[1], qb.shape[2], kb.shape[2]
    m = key_mask
    if m.dtype != torch.bool and not m.dtype.is_floating_point:
        raise TypeError(f"key_mask: expected bool (True keeps the key) or a float dtype (an additive bias), got "
                        f"{_name(m.dtype)}")
    if m.device != q.device:
        raise ValueError(f"key_mask: device {m.device} differs from q's {q.device}")
    if m.dtype != torch.bool and m.requires_grad:
        raise ValueError("key_mask: a float mask that requires grad (jvp_attention gives the mask no gradient: it is "
                         "a constant bias); pass key_mask.detach()")
    if m.dtype != torch.bool and _dual_tangent(m) is not None:
        raise ValueError("key_mask: carries a forward-AD tangent (torch.func.jvp or a dual tensor); the mask is a "
                         "constant of the attention and gets no tangent: compute it outside the differentiated "
                         "function, or detach it")
    want = f"[Sk], [B, Hq, Sk] or [B, Hq, 1, Sk] (each of B, Hq may be 1) with B={B}, Hq={Hq}, Sk={Sk}"
    if m.dim() == 4:
        if m.shape[2] != 1 and m.stride(2) != 0:
            raise ValueError(f"key_mask: varies along the query dimension (shape {tuple(m.shape)}, strides "
                             f"{tuple(m.stride())}): only key masks are supported, {want} (a query dim of size Sq is "
                             "accepted with stride 0)")
        if m.shape[2] not in (1, Sq):
            raise ValueError(f"key_mask: shape {tuple(m.shape)}: expected {want}")
        m = m.select(2, 0)
    elif m.dim() == 1:
        m = m.view(1, 1, -1)
    elif m.dim() != 3:
        raise ValueError(f"key_mask: expected {want}, got shape {tuple(m.shape)}"
                         + (" (2-D is ambiguous: a [B, Sk] padding mask is key_mask[:, None, :])" if m.dim() == 2
                            else ""))
    if m.shape[0] not in (1, B) or m.shape[1] not in (1, Hq) or m.shape[2] != Sk:
        raise ValueError(f"key_mask: shape {tuple(key_mask.shape)}: expected {want}")
    if m.dtype != torch.bool:
        m, = autocast_cast(m)  # (after the query dim is gone: a cast of a broadcast view copies it)
        if m.dtype not in (torch.float32, q.dtype):  # SDPA's rule; the kernels add the bias in float32: a float64
            # one would be rounded there (−1e300 to −inf: a key SDPA biases would be masked, a row of them see none)
            raise TypeError(f"key_mask: a float mask must be float32 or q's dtype ({_name(q.dtype)}), as SDPA's "
                            f"attn_mask, got {_name(m.dtype)}")
    return m.expand(B, Hq, Sk)


# ----------------------------------------------------------------------------- public
_DUAL_EAGER = ("fastdistill.jvp_attention's fused forward-AD pass (an autograd.Function with a custom jvp, which "
               "dynamo does not run) is not traced: under torch.compile forward-AD calls take the math path in the "
               "graph")


@eager_only(_DUAL_EAGER)  # also when dynamo runs a transform's frames one by one (no tracing below)
def _dual_outside_graph(q, k, v, tq, tk, tv, causal, scale, lay, t_dtype, backend, kb=None):
    o, to, lse, mu, _lo = _DualFunction.apply(q, k, v, tq, tk, tv, causal, scale, lay, t_dtype, backend,
                                                 _Box(autograd_levels()), kb)
    return o, to, lse, mu


def jvp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor | None = None,
                  tk: torch.Tensor | None = None, tv: torch.Tensor | None = None, *, causal: bool = False,
                  scale: float | None = None, layout: str = "bshd", return_lse: bool = False,
                  tangent_dtype: torch.dtype | None = None, key_mask: torch.Tensor | None = None):
    """Softmax attention and its forward-mode derivative (JVP) in one fused pass.

    Shapes (``layout="bshd"``): q ``[B, Sq, Hq, Dqk]``, k ``[B, Sk, Hkv, Dqk]``, v ``[B, Sk, Hkv, Dv]``;
    ``layout="bhsd"``: ``[B, H, S, D]``. Any strides with a contiguous head dim (no copies).
    ``Hq`` must be a multiple of ``Hkv`` (GQA/MQA). fp16/bf16/fp32 (fp64: reference backend).

    Math (per query row): ``O = softmax(s·q kᵀ) v``; with tangents ``Ṡ = s·(q̇ kᵀ + q k̇ᵀ)``,
    ``μ = Σ_j P_ij Ṡ_ij`` and ``Ȯ = (P⊙Ṡ) v + P v̇ − μ O``. ``s = scale`` (default ``1/√Dqk``).

    Args:
        tq, tk, tv: tangents of q, k, v, same shape/dtype/device as their primal; ``None`` means zero
            and skips that tangent's matmuls (frozen text context: ``tk = tv = None``). Instead of
            passing them, q/k/v may carry them (``torch.func.jvp``, ``forward_ad`` dual tensors);
            passing both is an error.
        causal: bottom-right aligned as in flash-attn: query i sees key j iff ``j <= i + Sk − Sq``.
            A query row that sees no key gets ``o = 0``, ``to = 0``, ``lse = −inf``, ``dlse = 0``.
        key_mask: a mask over the keys (the same for every query row: a key-padding mask), indexed (batch, query
            head, key) whatever the layout: ``[Sk]``, ``[B, Hq, Sk]`` or ``[B, Hq, 1, Sk]``, B and Hq may be 1
            (broadcast, never copied). Bool: True keeps the key (SDPA's boolean attn_mask); float: added to the
            scaled scores, ``S = s·q kᵀ + key_mask`` (SDPA's float attn_mask; −inf masks a key). It gets no
            gradient and no tangent (a float mask that requires grad or carries a tangent raises). Combines with
            ``causal``; a row whose keys are all masked (False / −inf) sees no key (as stock math SDPA: 0).
        return_lse: also return ``lse`` ``[B, Hq, Sq]`` (float32, float64 for float64 inputs; natural log) and its
            tangent ``dlse = μ``.
        tangent_dtype: ``torch.float32`` for an fp32 ``to`` from bf16/fp16 inputs (default: q's dtype); explicit
            pairs only (under ``torch.func.jvp`` / dual tensors the tangent has o's dtype: another one raises).

    Returns:
        ``(o, to)`` or ``(o, to, lse, dlse)``; ``o`` in q's layout and dtype. ``to`` and ``dlse`` are
        ``None`` when there is no tangent at all (plain attention), and under ``torch.compile`` when q, k, v are
        dual tensors made outside the compiled function (dynamo does not see their tangents: read o's with
        ``forward_ad.unpack_dual``; inductor drops such tangents for every op, a PyTorch limitation).
        Backward through ``o`` (and ``lse``) gives dq, dk, dv (no gradient reaches the tangents). ``to`` and
        ``dlse`` are stop-gradient: a backward that reaches them raises (under ``torch.compile`` they are returned
        detached).

    Example::

        o, to = fastdistill.jvp_attention(q, k, v, tq, tk, tv)              # rCM-style pairs
        o, do_dt = torch.func.jvp(lambda q: fastdistill.jvp_attention(q, k, v)[0], (q,), (tq,))
    """
    kw = dict(causal=causal, scale=scale, layout=layout, return_lse=return_lse, tangent_dtype=tangent_dtype,
              key_mask=key_mask)
    if torch.compiler.is_compiling() and (any(
            isinstance(x, torch.Tensor) and _dual_tangent(x) is not None for x in (q, k, v)) or (
            _in_dual_level() and all(t is None for t in (tq, tk, tv)))):
        # forward-AD traced by dynamo (torch.func.jvp or dual tensors inside the compiled function): math attention
        # in the graph, differentiated by PyTorch as stock SDPA's is. The fused pass is an autograd.Function whose
        # custom jvp dynamo does not run, and a graph break here split the dual region into frames whose dual
        # inputs dynamo sees as plain tensors (inductor then dropped their tangents: None, silently). Inside a dual
        # level a call whose q, k, v show no tangent may still get dual tensors at run time (passed into the
        # compiled function: dynamo does not see their tangents), so it takes the math path too; explicit pairs
        # there are the custom op's (with dual q, k, v passed in from outside, which eagerly raise, the compiled
        # call cannot tell: their tangents are dropped, the documented limitation of such inputs)
        return _math_in_graph(q, k, v, tq, tk, tv, **kw)
    return _jvp_attention(q, k, v, tq, tk, tv, **kw)


def _math_in_graph(q, k, v, tq, tk, tv, *, causal, scale, layout, return_lse, tangent_dtype, key_mask):
    """jvp_attention's contract on forward-AD dual tensors by differentiable math (traced under torch.compile):
    O = softmax(s·q kᵀ) v with GQA, bottom-right causal alignment, rows that see no key 0 (lse −inf)."""
    check_choice("layout", layout, LAYOUTS)
    lay = LAYOUTS[layout]
    q, k, v, tq, tk, tv = autocast_cast(q, k, v, tq, tk, tv)
    if any(t is not None for t in (tq, tk, tv)):
        raise ValueError("tq, tk, tv: q/k/v already carry forward-AD tangents (torch.func.jvp or dual tensors); "
                         "pass the tangents one way, not both")
    causal, return_lse = check_bool("causal", causal), check_bool("return_lse", return_lse)
    Dqk, Dv = _check(q, k, v, None, None, None, lay, tangent_dtype)
    check_dual_tangent_dtype(q, tangent_dtype)
    bias = _key_bias(key_mask, q, k, lay)
    scale = softmax_scale(scale, Dqk, q.dtype)
    qb, kb, vb = (_bhsd(x, lay) for x in (q, k, v))
    G = qb.shape[1] // max(kb.shape[1], 1)
    if G > 1:
        kb, vb = kb.repeat_interleave(G, 1), vb.repeat_interleave(G, 1)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    with autocast_off(q.device.type):  # the scores and P·V in acc (autocast would round them to its dtype)
        return _math_attention(q, qb, kb, vb, acc, causal, scale, lay, return_lse, bias)


def _math_attention(q, qb, kb, vb, acc, causal, scale, lay, return_lse, bias=None):
    sc = torch.matmul(qb.to(acc), kb.to(acc).transpose(-1, -2)) * scale
    if bias is not None:  # [B, Hq, Sk]: the same for every query row
        bias = torch.where(bias, 0.0, float("-inf")) if bias.dtype == torch.bool else bias
        sc = sc + bias.to(acc).unsqueeze(-2)
    Sq, Sk = sc.shape[-2], sc.shape[-1]
    if causal:
        i = torch.arange(Sq, device=q.device)[:, None]
        j = torch.arange(Sk, device=q.device)[None, :]
        sc = sc.masked_fill(j > i + (Sk - Sq), float("-inf"))
    # a row that sees no key: o = 0, lse = -inf, tangents 0 (its scores replaced by zeros before the logsumexp, whose
    # derivative at an all -inf row would be NaN)
    seen = (sc > float("-inf")).any(-1)
    sc = torch.where(seen[..., None], sc, 0.0)
    lse_s = torch.logsumexp(sc, -1)
    p = torch.where(seen[..., None], torch.exp(sc - lse_s[..., None]), 0.0)
    lse = torch.where(seen, lse_s, float("-inf"))
    ob = torch.matmul(p, vb.to(acc)).to(q.dtype)
    o = ob if lay == 1 else ob.transpose(1, 2)
    # o and lse stay dual, as the fused path's; the tangents come back detached (stop-gradient, as every compiled
    # call's: docs)
    to, mu = (None if t is None else t.detach() for t in (fwAD.unpack_dual(o).tangent, fwAD.unpack_dual(lse).tangent))
    return (o, to, lse, mu) if return_lse else (o, to)


def _jvp_attention(q, k, v, tq, tk, tv, *, causal, scale, layout, return_lse, tangent_dtype, key_mask):
    check_choice("layout", layout, LAYOUTS)
    lay = LAYOUTS[layout]
    q, k, v, tq, tk, tv = autocast_cast(q, k, v, tq, tk, tv)  # as stock SDPA: in autocast's dtype
    limit = transform_limit()
    if limit is not None:
        raise TransformLimitError(f"jvp_attention: {limit}")
    duals = [_dual_tangent(x) if isinstance(x, torch.Tensor) else None for x in (q, k, v)]
    dual = any(t is not None for t in duals)
    if dual and any(t is not None for t in (tq, tk, tv)):
        raise ValueError("tq, tk, tv: q/k/v already carry forward-AD tangents (torch.func.jvp or dual tensors); "
                         "pass the tangents one way, not both")
    if dual:  # forward-AD tangents are whatever the model produced: give them a contiguous head dim if needed
        tq, tk, tv = (t if t is None or t.numel() == 0 or t.stride(-1) == 1 else t.contiguous() for t in duals)
    causal, return_lse = check_bool("causal", causal), check_bool("return_lse", return_lse)
    Dqk, Dv = _check(q, k, v, tq, tk, tv, lay, tangent_dtype)
    if dual:
        check_dual_tangent_dtype(q, tangent_dtype)
    kb = _key_bias(key_mask, q, k, lay)
    scale = softmax_scale(scale, Dqk, q.dtype)
    t_dtype = 1 if tangent_dtype == torch.float32 and q.dtype != torch.float32 else 0
    want_t = any(t is not None for t in (tq, tk, tv))
    backend = select_backend(OP, q, head_dims=(Dqk, Dv), grid_too_big=_grid_too_big(*_bhsd(q, lay).shape[:2]))
    limit = transform_limit(backend, dual)
    if limit is not None:
        raise TransformLimitError(f"jvp_attention: {limit}")
    if dual:
        o, to, lse, mu = _dual_outside_graph(q, k, v, tq, tk, tv, causal, scale, lay, t_dtype, backend, kb)
        if not autograd_levels():  # dual tensors: the returned to / dlse (non-differentiable outputs) guarded as o's
            # tangent is (under torch.func the function's contexts guard them)
            to, mu = _guard(to, q, k, v, tq, tk, tv), _guard(mu, q, k, v, tq, tk, tv)
    else:
        o, to, lse, mu, _lo = _fwd_op(q, k, v, tq, tk, tv, bool(causal), scale, lay, want_t, t_dtype, backend, kb)
        if want_t:
            to, mu = _guard(to, q, k, v, tq, tk, tv), _guard(mu, q, k, v, tq, tk, tv)
    if not want_t:
        to = mu = None
    return (o, to, lse, mu) if return_lse else (o, to)
