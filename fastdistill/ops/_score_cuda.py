"""CUDA backend of the score-difference ops: launchers over the compiled extension ``fastdistill._C``
(csrc/score.cu, csrc/bindings.cpp).

Same contract as ``fastdistill.kernels.score.score_fwd / score_bwd`` and the reference
(docs/score_ops.md): inputs are ``[B, M]`` contiguous views; x and every term share one dtype
(float32 / float16 / bfloat16); the mask is uint8 ``[B, M]``; statistics, state and losses are
float32; gradients are written in the inputs' dtype. The extension is torch-free: this module
allocates every output with torch and passes raw device pointers and the current stream. The float options reach
the kernels through a float32 device vector, the Triton kernels' layout (``params``): the plan's cached
``param_vector`` in eager mode, the vector built in the graph under torch.compile (``_score_engine.op_args``).
"""

from __future__ import annotations

import torch

from fastdistill.ops._cuda_common import DTYPE_CODE, ext, ptr, require_cuda

OP_SCORE, OP_SID, OP_SCM, OP_DENOISE = 0, 1, 2, 3
NSTAT = 5
NSTATE = 4
MAX_TERMS = 8


def _check(p, x: torch.Tensor, terms) -> int:
    """Preconditions the dispatcher (``_why_not_cuda``) already guarantees; checked again because a
    violation here would be a wrong kernel read, not a Python error."""
    if p.fp64:
        raise ValueError("accum_dtype=float64 is not supported by the CUDA kernels")
    require_cuda("x", x)
    if x.dtype not in DTYPE_CODE:
        raise TypeError(f"x: the CUDA kernels take float32/float16/bfloat16, got {x.dtype}")
    if len(terms) > MAX_TERMS:
        raise ValueError(f"terms: the CUDA kernels take at most {MAX_TERMS} term tensors, got {len(terms)}")
    for k, t in enumerate(terms):
        if t.dtype != x.dtype:
            raise TypeError(f"terms[{k}]: the CUDA kernels need every term in x's dtype ({x.dtype}), got {t.dtype}")
        if t.shape != x.shape or t.device != x.device or not t.is_contiguous():
            raise ValueError(f"terms[{k}]: expected a contiguous {tuple(x.shape)} tensor on {x.device}")
    if not x.is_contiguous():
        raise ValueError("x: expected a contiguous [B, M] view")
    return DTYPE_CODE[x.dtype]


def _coef(coef: torch.Tensor, K: int) -> tuple[torch.Tensor, int]:
    """fp32 contiguous [Bc, 2, K+1] and its sample stride (0 when one row serves every sample)."""
    c = coef.to(torch.float32).contiguous()
    if c.dim() != 3 or c.shape[1:] != (2, K + 1):
        raise ValueError(f"coef: expected shape [Bc, 2, {K + 1}], got {tuple(coef.shape)}")
    return c, (c.stride(0) if c.shape[0] > 1 else 0)


def grad_range(dtype: torch.dtype) -> float:
    """The parameter vector's gradient range: the largest finite value of the inputs' dtype (x and every term share
    it here; within float32, so the Triton kernels' ``grad_unit`` for the same dtypes)."""
    return float(torch.finfo(dtype).max)


def params(p, x: torch.Tensor) -> torch.Tensor:
    """The plan's float parameters as the kernels read them: float32 [7] on x's device (huber_c, alpha, scale, clamp,
    eps, c, the gradient range; ``Plan.param_vector``: cached in eager mode, no copy per call; the vector built in the
    graph under torch.compile)."""
    return p.param_vector(grad_range(x.dtype), x.device, torch.float32)


def _vec(v: torch.Tensor | None) -> torch.Tensor | None:
    return None if v is None else v.reshape(-1).to(torch.float32).contiguous()


def score_fwd(p, x, terms, coef, mask, weight, logvar):
    """Passes 1 and 2. Returns (loss [1], loss_i [B], state [B, 4]), float32."""
    dtype = _check(p, x, terms)
    mod = ext()
    B, M = x.shape
    dev = x.device
    f32 = torch.float32
    _, NB = mod.score_blocking(M)
    part = torch.empty((B, NB, NSTAT), dtype=f32, device=dev)
    sums = torch.empty((B, NSTAT), dtype=f32, device=dev)
    state = torch.empty((B, NSTATE), dtype=f32, device=dev)
    loss_i = torch.empty((B,), dtype=f32, device=dev)
    loss = torch.empty((1,), dtype=f32, device=dev)
    c, coef_sb = _coef(coef, len(terms))
    w, lv = _vec(weight), _vec(logvar)
    if mask is not None:
        mask = mask.contiguous().view(torch.uint8)
    prm = params(p, x)
    # Temporaries (c, w, lv, part, sums) may be freed on return: the caching allocator reuses
    # them only for work queued later on this same stream, i.e. after these kernels.
    with torch.cuda.device(dev):
        mod.score_fwd(
            op=p.op, dtype=dtype, x=x.data_ptr(), terms=[t.data_ptr() for t in terms], coef=c.data_ptr(),
            coef_sb=coef_sb, mask=ptr(mask), weight=ptr(w), logvar=ptr(lv), part=part.data_ptr(),
            sums=sums.data_ptr(), state=state.data_ptr(), loss_i=loss_i.data_ptr(), loss=loss.data_ptr(),
            B=B, M=M, use1=p.use1, use2=p.use2 if p.op <= OP_SID else 0, tneed=p.tneed if p.op == OP_SID else 0,
            phi_huber=p.phi_huber,
            norm_on_loss=p.norm_on_loss, norm=p.norm, red=p.red, sample_mean=p.sample_mean, rms=p.rms,
            to_num=p.to_num, prm=prm.data_ptr(), stream=torch.cuda.current_stream(dev).cuda_stream,
        )
    return loss, loss_i, state


def score_bwd(p, x, terms, coef, mask, state, grad_out, need_x, need_terms):
    """Pass 3: the gradients. ``grad_out`` is [1] (scalar loss) or [B] (reduction "none").
    Returns (grad_x or None, [grad_term_k or None]); the terms of score/scm/denoise are constants,
    so a term gradient asked for there is zero."""
    dtype = _check(p, x, terms)
    mod = ext()
    B, M = x.shape
    gx = torch.empty_like(x) if need_x else None
    sid = p.op == OP_SID
    gterms = [None if not need else (torch.empty_like(t) if sid else torch.zeros_like(t))
              for t, need in zip(terms, need_terms)]
    if gx is None and not (sid and any(g is not None for g in gterms)):
        return gx, gterms
    c, coef_sb = _coef(coef, len(terms))
    go = grad_out.reshape(-1).to(torch.float32).contiguous()
    if go.numel() not in (1, B):
        raise ValueError(f"grad_out: expected 1 or {B} values, got {go.numel()}")
    st = state.to(torch.float32).contiguous()
    if mask is not None:
        mask = mask.contiguous().view(torch.uint8)
    prm = params(p, x)
    with torch.cuda.device(x.device):
        mod.score_bwd(
            op=p.op, dtype=dtype, x=x.data_ptr(), terms=[t.data_ptr() for t in terms], coef=c.data_ptr(),
            coef_sb=coef_sb, mask=ptr(mask), state=st.data_ptr(), grad_out=go.data_ptr(),
            go_sb=1 if go.numel() > 1 else 0, gx=ptr(gx), gterms=[ptr(g) if sid else 0 for g in gterms],
            B=B, M=M, use1=p.use1, use2=p.use2 if sid else 0, phi_huber=p.phi_huber, to_num=p.to_num,
            prm=prm.data_ptr(), stream=torch.cuda.current_stream(x.device).cuda_stream,
        )
    return gx, gterms
