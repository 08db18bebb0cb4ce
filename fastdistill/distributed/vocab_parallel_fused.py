"""Vocab-parallel fused linear KD: ``vocab_parallel_kd_loss`` of ``h @ W_shardᵀ (+ b_shard)`` without the
``[N, V_r]`` logits (a Megatron vocab-parallel lm_head). Rows are processed in chunks: the chunk's logits in
fp32, the loss's collectives per chunk (the stages of ``fastdistill.distributed.vocab_parallel``), the
gradient of the chunk at once, ``dW_shard`` / ``db_shard`` accumulated in fp32. Re-exported by
``fastdistill.distributed.vocab_parallel``. Semantics: docs/vocab_parallel_kd.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import fastdistill.distributed.vocab_parallel as _vp
from fastdistill.distributed.vocab_parallel import _CONTRIB, _FLOAT_DTYPES, NSTATE, _common, _reduce, _Shard
from fastdistill.ops._common import (
    autocast_off,
    check_bool,
    count_option,
    eager_only,
    first_order,
    graph_anchor,
    refuse_transforms,
    resolve_accum,
    row_chunk,
    save_constants,
    saved_constants,
)

__all__ = ["vocab_parallel_fused_linear_kd_loss"]

FUSED_CHUNK_ELEMS = 1 << 25  # chunk_size="auto": rows × max(V_r, H) logits per chunk
_LOWP = (torch.bfloat16, torch.float16)
_AUTO_ROWS: dict = {}  # (group ranks, device type, H) -> the rows of chunk_size="auto" agreed on a GPU group
_MM_OUT_FP32: dict = {}  # (device, dtype) -> whether torch.mm(..., out_dtype=torch.float32) runs there


def _mm_out_fp32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands on ``device`` (CUDA,
    bf16/fp16, torch >= 2.8). Probed once per (device, dtype) on tiny tensors, so that an error of a real
    GEMM (out of memory, a bad shape) is never taken for a missing overload."""
    if device.type != "cuda" or dtype not in _LOWP:
        return False
    key = (device, dtype)
    if key not in _MM_OUT_FP32:
        a = torch.zeros(8, 8, device=device, dtype=dtype)
        try:
            torch.mm(a, a, out_dtype=torch.float32)
            _MM_OUT_FP32[key] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_FP32[key] = False
    return _MM_OUT_FP32[key]


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b with an ``acc`` result. Low-precision CUDA operands: fp32 output straight from the GEMM
    (never rounded to bf16/fp16 first) where the overload exists; otherwise both operands are upcast."""
    if acc == torch.float32 and _mm_out_fp32(b.device, b.dtype):
        return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
    return a.to(acc) @ b.to(acc)


class _Linear:
    """Per-chunk logits of one model from its hidden states and weight shard (or a given logits shard)."""

    def __init__(self, h, W, b, acc):
        self.h, self.acc, self.b = h, acc, b
        self.fast = acc == torch.float32 and h.dtype == W.dtype and _mm_out_fp32(W.device, W.dtype)
        self.W = W if self.fast else W.to(acc)  # on the CPU (or fp32/fp64 weights, no overload): upcast once
        self.Wt = self.W.t()

    def logits(self, sl):
        z = _mm(self.h[sl] if self.fast else self.h[sl].to(self.acc), self.Wt, self.acc)
        return z + self.b.to(self.acc) if self.b is not None else z


class _VocabParallelFusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, cfg, h, W, b, th, tW, tb, t, ids, labels, mask, weights):
        with autocast_off(h.device.type):  # the GEMMs choose their own precision
            return _VocabParallelFusedLinear._forward(ctx, run, cfg, h, W, b, th, tW, tb, t, ids, labels, mask,
                                                      weights)

    @staticmethod
    def _forward(ctx, run, cfg, h, W, b, th, tW, tb, t, ids, labels, mask, weights):
        p, sh = run.p, run.sh
        ctx.fd_anchors = cfg["anchors"]  # stand-ins for h, W, b (first_order; the eager path saves gradients only)
        acc = p.accum_dtype
        N, Vr = h.shape[0], W.shape[0]
        stu = _Linear(h, W, b, acc)
        tea = _Linear(th, tW, tb, acc) if th is not None else None
        need = [cfg["grad_on"] and ctx.needs_input_grad[i] for i in (2, 3, 4)]
        eager = any(need) and p.red != 3  # gradient in the forward: no teacher recompute in the backward
        dh = torch.zeros(h.shape, dtype=acc, device=h.device) if eager and need[0] else None
        dW = torch.zeros(W.shape, dtype=acc, device=W.device) if eager and need[1] else None
        db = torch.zeros(Vr, dtype=acc, device=W.device) if eager and need[2] else None
        st = torch.empty((N, NSTATE), dtype=acc, device=h.device)
        uk = torch.empty((N, run.k), dtype=acc, device=h.device) if not run.dense else None
        V = torch.ones((), dtype=acc, device=h.device)
        for sl in _rows_chunks(N, cfg["rows"]):
            zs = stu.logits(sl)
            tb_ = (tea.logits(sl) if tea is not None else row_chunk(t, sl)) if run.dense else (ids[sl], t[sl])
            lab = labels[sl] if labels is not None else None
            mx, sm = run.stage_a(zs, tb_, lab)
            A, G, V = run.collect(mx, sm)
            part = None
            if run.three:
                part = run.stage_b(zs, tb_, A, G)
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=sh.group)
            st[sl], u = run.finish(A, G, part, None if run.dense else t[sl], lab,
                                   mask[sl] if mask is not None else None, weights[sl] if weights is not None else None,
                                   V)
            if uk is not None:
                uk[sl] = u
            if eager:
                g = run.grad(zs, tb_, lab, weights[sl] if weights is not None else None, st[sl],
                             uk[sl] if uk is not None else None, torch.ones((), dtype=acc, device=h.device))
                _accumulate(g, stu, sl, dh, dW, db)
        loss, factor = _reduce(p, st, V)
        ctx.run, ctx.cfg, ctx.eager = run, cfg, eager
        ctx.dtypes = (h.dtype, W.dtype, b.dtype if b is not None else None)
        ctx.set_materialize_grads(False)
        if eager:
            grads = [x * factor if x is not None else None for x in (dh, dW, db)]
            if grads[0] is not None and cfg["reduce_hidden_grad"]:
                dist.all_reduce(grads[0], op=dist.ReduceOp.SUM, group=sh.group)
            ctx.save_for_backward(*grads)
        else:
            save_constants(ctx, h, W, b, th, tW, tb, t, ids, labels, weights, st, uk, factor)
        return st[:, _CONTRIB].clone() if p.red == 3 else loss

    @staticmethod
    @first_order("vocab_parallel_fused_linear_kd_loss")
    def backward(ctx, go):
        if go is None:
            return (None,) * 13
        with autocast_off(go.device.type):
            return _VocabParallelFusedLinear._backward(ctx, go)

    @staticmethod
    def _backward(ctx, go):
        none = (None,) * 8
        run, cfg = ctx.run, ctx.cfg
        acc = run.p.accum_dtype
        hd, Wd, bd = ctx.dtypes
        if ctx.eager:
            dh, dW, db = ctx.saved_tensors
            go = go.to(acc)
            out = [x * go if x is not None else None for x in (dh, dW, db)]
        else:
            h, W, b, th, tW, tb, t, ids, labels, weights, st, uk, factor = saved_constants(ctx)
            need = ctx.needs_input_grad[2:5]
            out = [torch.zeros(x.shape, dtype=acc, device=x.device) if x is not None and n else None
                   for x, n in zip((h, W, b), need)]
            stu = _Linear(h, W, b, acc)
            tea = _Linear(th, tW, tb, acc) if th is not None else None
            gor = go.reshape(-1).to(acc)
            for sl in _rows_chunks(h.shape[0], cfg["rows"]):
                zs = stu.logits(sl)
                tb_ = (tea.logits(sl) if tea is not None else row_chunk(t, sl)) if run.dense else (ids[sl], t[sl])
                rowscale = factor * (gor[sl][:, None] if gor.numel() > 1 else gor)
                g = run.grad(zs, tb_, labels[sl] if labels is not None else None,
                             weights[sl] if weights is not None else None, st[sl],
                             uk[sl] if uk is not None else None, rowscale)
                _accumulate(g, stu, sl, *out)
            if out[0] is not None and cfg["reduce_hidden_grad"]:
                dist.all_reduce(out[0], op=dist.ReduceOp.SUM, group=run.sh.group)
        dh, dW, db = (x.to(d) if x is not None else None for x, d in zip(out, (hd, Wd, bd)))
        return (None, None, dh, dW, db) + none


def _rows_chunks(N: int, rows: int):
    for r0 in range(0, N, rows):
        yield slice(r0, min(N, r0 + rows))


def _accumulate(g, stu: _Linear, sl, dh, dW, db):
    """dh[rows] = g @ W_shard, dW_shard += gᵀ @ h[rows], db_shard += Σ_rows g (all in the accumulation dtype)."""
    if dh is not None:
        dh[sl] = _mm(g, stu.W, stu.acc)
    if dW is not None:
        dW += _mm(g.t(), stu.h[sl] if stu.fast else stu.h[sl].to(stu.acc), stu.acc)
    if db is not None:
        db += g.sum(0)


def _auto_rows(sh: _Shard, N: int, Vr: int, H: int, device) -> int:
    """Rows per chunk for chunk_size="auto": a power of two of about FUSED_CHUNK_ELEMS logits, the smallest
    over the group. The ranks' widths may differ and no rank knows the others' before a collective, so
    the ranks agree with an all_reduce MIN: at every call on CPU tensors (no synchronisation there), on a
    GPU at the group's first call for this hidden size only (one host sync), whose rows later calls reuse.
    The cache key (the group's ranks, device type, H) is the same on every rank, so hit or miss is too."""
    rows = max(1, FUSED_CHUNK_ELEMS // max(Vr, H, 1))
    rows = 1 << (rows.bit_length() - 1)
    if sh.world > 1:
        cache = sh.device.type not in _vp._HOST_CHECK_ALWAYS
        key = sh.key + (H,)
        if cache and key in _AUTO_ROWS:
            rows = _AUTO_ROWS[key]
        else:
            t = torch.full((1,), rows, dtype=torch.int64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=sh.group)
            rows = int(t.item())
            if cache:
                _AUTO_ROWS[key] = rows
    return max(1, min(rows, N))


@eager_only("vocab-parallel KD runs eagerly: collectives and host-side layout checks")
def vocab_parallel_fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight_shard: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight_shard: torch.Tensor | None = None,
    *,
    teacher_logits_shard: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    student_bias_shard: torch.Tensor | None = None,
    teacher_bias_shard: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    chunk_size: int | str = "auto",
    reduce_hidden_grad: bool = True,
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
    topk_semantics: str = "tail_bucket",
    accum_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``vocab_parallel_kd_loss`` of ``student_hidden @ student_weight_shardᵀ (+ bias)`` without the
    ``[N, V_r]`` logits: rows are processed in chunks (logits in fp32, the loss's collectives per chunk,
    the gradient of the chunk at once), ``dW_shard`` / ``db_shard`` accumulated in fp32.

    ``student_hidden``: ``[N, H]`` or ``[B, T, H]``, the same on every rank (the input of a vocab-parallel
    lm_head). ``student_weight_shard``: ``[V_r, H]``, this rank's rows ``[vocab_start, vocab_start + V_r)``
    of the lm_head. The teacher is one of ``teacher_hidden`` + ``teacher_weight_shard`` (``[V_r, H_t]``,
    sliced like the student's), ``teacher_logits_shard`` (``[..., V_r]``) or ``teacher_topk``; it gets no
    gradient. ``reduce_hidden_grad=True`` all-reduces (SUM) the gradient of ``student_hidden`` over the
    group, so that it is the full gradient on every rank; pass False when the caller's own autograd
    region already does it (Megatron's ``copy_to_tensor_model_parallel_region`` before the lm_head).
    ``chunk_size``: rows per chunk, the same on every rank (``"auto"``: a memory budget of
    ``FUSED_CHUNK_ELEMS`` logits, agreed over the group; on a GPU at the group's first call for this H,
    reused after: no host sync in the steady state). Every other option is ``kd_loss``'s.

    Example::

        loss = vocab_parallel_fused_linear_kd_loss(h, lm_head_shard.weight, h_teacher, t_lm_head_shard.weight,
                                                   group=tp_group, divergence="fkl", temperature=2.0)
    """
    refuse_transforms("vocab_parallel_fused_linear_kd_loss")
    group = _vp.local_args(group, student_hidden=student_hidden, student_weight_shard=student_weight_shard,
                           teacher_hidden=teacher_hidden, teacher_weight_shard=teacher_weight_shard,
                           teacher_logits_shard=teacher_logits_shard, teacher_topk=teacher_topk,
                           student_bias_shard=student_bias_shard, teacher_bias_shard=teacher_bias_shard, labels=labels,
                           mask=mask, weights=weights)
    h, W = student_hidden, student_weight_shard
    reduce_hidden_grad = check_bool("reduce_hidden_grad", reduce_hidden_grad)  # (decides a collective)
    for nm, v in (("student_hidden", h), ("student_weight_shard", W)):
        if not isinstance(v, torch.Tensor) or v.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{nm}: expected a floating tensor, got {getattr(v, 'dtype', type(v).__name__)}")
    if h.dim() < 2:
        raise ValueError(f"student_hidden: expected shape [N, H] or [B, T, H], got {tuple(h.shape)}")
    lead, H = h.shape[:-1], h.shape[-1]
    if W.dim() != 2 or W.shape[1] != H:
        raise ValueError(f"student_weight_shard: expected shape [V_r, {H}] (H of student_hidden), got {tuple(W.shape)}")
    if W.device != h.device:
        raise ValueError(f"student_weight_shard: expected device {h.device}, got {W.device}")
    Vr, N = W.shape[0], int(torch.Size(lead).numel())
    n_teachers = (teacher_hidden is not None) + (teacher_logits_shard is not None) + (teacher_topk is not None)
    if n_teachers != 1:
        raise ValueError("teacher_hidden / teacher_logits_shard / teacher_topk: give exactly one of them")
    if (teacher_hidden is None) != (teacher_weight_shard is None):
        raise ValueError("teacher_weight_shard: required with teacher_hidden (and only with it)")
    th2 = tW = None
    if teacher_hidden is not None:
        th, tW = teacher_hidden, teacher_weight_shard
        for nm, v in (("teacher_hidden", th), ("teacher_weight_shard", tW)):
            if not isinstance(v, torch.Tensor) or v.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"{nm}: expected a floating tensor, got {getattr(v, 'dtype', type(v).__name__)}")
            if v.device != h.device:
                raise ValueError(f"{nm}: expected device {h.device}, got {v.device}")
        if th.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden: expected leading dims {tuple(lead)} (the student's), "
                             f"got {tuple(th.shape)}")
        if tW.dim() != 2 or tW.shape != (Vr, th.shape[-1]):
            raise ValueError(f"teacher_weight_shard: expected shape [{Vr}, {th.shape[-1]}] (the student shard's "
                             f"V_r, H of teacher_hidden), got {tuple(tW.shape)}")
        th2 = th.reshape(N, th.shape[-1]).contiguous()
    for nm, bias in (("student_bias_shard", student_bias_shard), ("teacher_bias_shard", teacher_bias_shard)):
        if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (Vr,) or bias.device != h.device):
            raise ValueError(f"{nm}: expected a tensor of shape [{Vr}] on {h.device}, got "
                             f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}")
    if teacher_bias_shard is not None and teacher_hidden is None:
        raise ValueError("teacher_bias_shard: only with teacher_hidden / teacher_weight_shard")
    run, t2, ids, labels2, mask2, w2 = _common(
        "vocab_parallel_fused_linear_kd_loss", h, lead, N, Vr, teacher_logits_shard, teacher_topk, topk_semantics,
        labels, mask, weights, group, vocab_start, "teacher_logits_shard", divergence=divergence, beta=beta, skew=skew,
        temperature=temperature, teacher_temperature=teacher_temperature, t2_scale=t2_scale, ignore_index=ignore_index,
        reduction=reduction, num_items=num_items, hard_label_alpha=hard_label_alpha, softcap=softcap,
        logit_scale=logit_scale, accum_dtype=resolve_accum(accum_dtype, h, W))
    if isinstance(chunk_size, str) and chunk_size == "auto":
        rows = _auto_rows(run.sh, N, Vr, H, h.device)
    else:
        rows = count_option("chunk_size", chunk_size, "'auto' or a positive int (the same on every rank)")
    cfg = {"rows": rows, "reduce_hidden_grad": reduce_hidden_grad,
           "grad_on": torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                                      for x in (h, W, student_bias_shard))}
    # beyond the loss's options, whether the hidden gradient is all-reduced decides a collective
    run.sh.set_options(**run.sh.options, reduce_hidden_grad=cfg["reduce_hidden_grad"],
                       student_hidden_grad=cfg["grad_on"] and h.requires_grad)
    h2 = h.reshape(N, H)
    cfg["anchors"] = tuple(a for a in map(graph_anchor, (h2, W, student_bias_shard)) if a is not None)
    out = _VocabParallelFusedLinear.apply(run, cfg, h2, W, student_bias_shard, th2, tW, teacher_bias_shard, t2, ids,
                                          labels2, mask2, w2)
    return out.view(lead) if run.p.red == 3 else out
