"""CUDA backend of ``kd_loss``: launchers over the compiled extension ``fastdistill._C``
(csrc/kd_softmax.cu, csrc/bindings.cpp).

Same contract as ``fastdistill.kernels.kd_softmax.kd_fwd / kd_bwd`` and the reference
(docs/kd_ops.md): student ``[N, V]`` and teacher ``[N, Vt]`` logits with unit column stride (any row
stride; or ``[G, R, V]`` / ``[G, R, Vt]``: rows R a group, group-major, any group stride), of one dtype
(float32 / float16 / bfloat16); labels int32 / int64 ``[N]``, mask uint8
``[N]``, weights ``[N]`` (any float dtype, read as float32); state, loss and factor float32; the
gradient written in the student dtype into ``out`` (which may be the student logits). The
extension is torch-free: this module allocates every output with torch and passes raw device
pointers and the current stream.
"""

from __future__ import annotations

import torch

from fastdistill.ops._common import n_rows, row_groups, row_strides
from fastdistill.ops._cuda_common import DTYPE_CODE, ext, ptr, require_cuda

NSTATE = 11  # the layout of fastdistill.reference.kd_softmax / csrc/kd_softmax.cu
DIV_RKL = 1


def _check(p, s: torch.Tensor, t: torch.Tensor) -> int:
    """Preconditions the dispatcher (``_why_not_cuda``) already guarantees; checked again because a
    violation here would be a wrong kernel read, not a Python error."""
    if p.fp64:
        raise ValueError("accum_dtype=float64 is not supported by the CUDA kernels")
    if p.topk or not isinstance(t, torch.Tensor):
        raise ValueError("teacher_topk: top-k teachers are not implemented by the CUDA kernels")
    require_cuda("student_logits", s)
    if s.dtype not in DTYPE_CODE:
        raise TypeError(f"student_logits: the CUDA kernels take float32/float16/bfloat16, got {s.dtype}")
    if t.dtype != s.dtype:
        raise TypeError(f"teacher_logits: the CUDA kernels need the student's dtype ({s.dtype}), got {t.dtype}")
    if t.device != s.device:
        raise ValueError(f"teacher_logits: expected device {s.device}, got {t.device}")
    for name, x in (("student_logits", s), ("teacher_logits", t)):
        if x.dim() not in (2, 3) or (x.shape[-1] > 1 and x.stride(-1) != 1):
            raise ValueError(f"{name}: expected a [rows, vocab] or [groups, rows, vocab] view with unit column "
                             f"stride, got shape {tuple(x.shape)} strides {x.stride()}")
    if t.shape[:-1] != s.shape[:-1]:
        raise ValueError(f"teacher_logits: expected leading dims {tuple(s.shape[:-1])}, got {tuple(t.shape[:-1])}")
    return DTYPE_CODE[s.dtype]


def params(p, device) -> torch.Tensor:
    """The plan's kernel_params() as a float32 device tensor (KDPlan.param_vector)."""
    return p.param_vector(device, torch.float32)


def _labels(labels: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    if labels is None:
        return None, False
    if labels.dtype not in (torch.int32, torch.int64):
        labels = labels.to(torch.int64)
    return labels.reshape(-1).contiguous(), labels.dtype == torch.int64


def _vec(v: torch.Tensor | None) -> torch.Tensor | None:
    return None if v is None else v.reshape(-1).to(torch.float32).contiguous()


def _stream(dev: torch.device) -> int:
    return torch.cuda.current_stream(dev).cuda_stream


def kd_fwd(p, s, t, labels, mask, weights):
    """(loss [1], contrib [N], state [N, 11], factor [1]), float32 — see fastdistill.reference.kd_softmax."""
    dtype = _check(p, s, t)
    mod = ext()
    N, V, R = n_rows(s), s.shape[-1], row_groups(s)
    Vt = t.shape[-1]
    (s_gs, s_rs), (t_gs, t_rs) = row_strides(s, R), row_strides(t, R)
    dev = s.device
    f32 = torch.float32
    st = torch.empty((N, NSTATE), dtype=f32, device=dev)
    loss = torch.empty((1,), dtype=f32, device=dev)
    factor = torch.empty((1,), dtype=f32, device=dev)
    lab, lab64 = _labels(labels)
    w = _vec(weights)
    if mask is not None:
        mask = mask.reshape(-1).contiguous().view(torch.uint8)
    ce = labels is not None and p.mixes_ce
    prm = params(p, dev)
    # Temporaries (w, converted labels) may be freed on return: the caching allocator reuses them
    # only for work queued later on this same stream, i.e. after these kernels.
    with torch.cuda.device(dev):
        mod.kd_fwd(
            dtype=dtype, s=s.data_ptr(), t=t.data_ptr(), labels=ptr(lab), labels_i64=lab64, mask=ptr(mask),
            weights=ptr(w), prm=prm.data_ptr(), st=st.data_ptr(), loss=loss.data_ptr(), factor=factor.data_ptr(),
            N=N, V=V, Vt=Vt, s_stride=s_rs, t_stride=t_rs, rows_per_group=R, s_gstride=s_gs, t_gstride=t_gs,
            ignore_index=p.ignore_index, div=p.div,
            red=p.red, ce=ce, ce_sep=ce and p.ce_sep, softcap=p.capped,
            num_items=float(p.num_items), stream=_stream(dev),
        )
    return loss, st[:, 5], st, factor


def kd_bwd(p, s, t, labels, weights, st, factor, grad_out, out):
    """Gradient w.r.t. the raw student logits, written into ``out`` (may alias ``s``); returns ``out``."""
    dtype = _check(p, s, t)
    mod = ext()
    N, V, R = n_rows(s), s.shape[-1], row_groups(s)
    if out.shape != s.shape or out.dtype != s.dtype or out.device != s.device or (V > 1 and out.stride(-1) != 1):
        raise ValueError(f"out: expected a {tuple(s.shape)} {s.dtype} tensor on {s.device} with unit column "
                         f"stride, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    go = grad_out.reshape(-1).to(torch.float32).contiguous()
    if go.numel() not in (1, N):
        raise ValueError(f"grad_out: expected 1 or {N} values, got {go.numel()}")
    st = st.to(torch.float32).contiguous()
    factor = factor.reshape(-1).to(torch.float32).contiguous()
    lab, lab64 = _labels(labels)
    w = _vec(weights)
    ce = labels is not None and p.mixes_ce
    (s_gs, s_rs), (t_gs, t_rs), (o_gs, o_rs) = (row_strides(x, R) for x in (s, t, out))
    dev = s.device
    with torch.cuda.device(dev):
        mod.kd_bwd(
            dtype=dtype, s=s.data_ptr(), t=t.data_ptr(), labels=ptr(lab), labels_i64=lab64, weights=ptr(w),
            prm=params(p, dev).data_ptr(), st=st.data_ptr(), factor=factor.data_ptr(), grad_out=go.data_ptr(),
            go_stride=1 if go.numel() > 1 else 0, out=out.data_ptr(), N=N, V=V, Vt=t.shape[-1],
            s_stride=s_rs, t_stride=t_rs, o_stride=o_rs, rows_per_group=R, s_gstride=s_gs, t_gstride=t_gs,
            o_gstride=o_gs, div=p.div, ce=ce,
            softcap=p.capped, stream=_stream(dev),
        )
    return out
