"""Fused linear KD: the losses of ``kd_loss`` taken through the lm_head, ``logits = h @ W.T + b``, without
materialising ``[N, V]`` (docs/kd_ops.md, "Fused linear KD").

Rows are processed in chunks. Per chunk: the student (and teacher) logits in fp32 (a GEMM with fp32 output
on CUDA for bf16/fp16 operands, an upcast elsewhere; never rounded to bf16 before the softmax), the kd_loss
forward of the selected backend on the chunk, and, when a gradient is wanted, the kd_loss backward written in
place into the fp32 logits chunk, then ``dh = g @ W`` (cast to the hidden dtype) and ``dW += gᵀ @ h`` into an
fp32 buffer cast once at the end (``db`` likewise).

Scalar reductions compute the gradients in the forward (one student GEMM there plus two per chunk for the
gradient, no recompute) and scale them by the upstream gradient in backward. ``reduction="none"`` saves the
inputs and recomputes the chunks in backward, where the per-row upstream gradient is known.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from fastdistill.ops._common import (
    autocast_off,
    check_choice,
    count_option,
    eager_only,
    first_order,
    graph_anchor,
    is_dtensor,
    real_option,
    refuse_transforms,
    reject_dtensor,
    resolve_accum,
    row_chunk,
    row_view,
    save_constants,
    saved_constants,
    select_backend,
)
from fastdistill.ops.kd_softmax import (
    _FLOAT_DTYPES,
    REDUCTIONS,
    TOPK_SEMANTICS,
    KDPlan,
    _bwd,
    _fwd,
    check_row_args,
    make_plan,
)

DEFAULT_MEMORY_BUDGET_MB = 2048  # chunk_size="auto": bytes of per-chunk [rows, V] temporaries
RED_BATCHMEAN, RED_SUM, RED_MEAN, RED_NONE = 0, 1, 2, 3
_LOWP = (torch.bfloat16, torch.float16)
_LOWP_GEMM_OK: dict = {}


# ----------------------------------------------------------------------------- GEMMs
def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output for bf16/fp16 operands (fp32 accumulation; cuBLAS on CUDA)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def _addmm32_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """c += a @ b for an fp32 ``c`` and bf16/fp16 operands."""
    torch.addmm(c, a, b, out_dtype=torch.float32, out=c)


def _lowp_gemm(device: torch.device, dtype: torch.dtype) -> tuple[bool, bool]:
    """(mm, addmm): whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` operands on ``device``
    (CUDA, torch >= 2.8), and whether ``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`` accepts an fp32
    ``c`` (later torch versions; earlier ones want ``c`` in the operands' dtype). Probed once per (device, dtype)
    on tiny tensors: dispatch errors only, no host synchronisation."""
    if device.type != "cuda" or dtype not in _LOWP:
        return False, False
    key = (device, dtype)
    if key not in _LOWP_GEMM_OK:
        a = torch.zeros(8, 8, device=device, dtype=dtype)
        try:
            c = _mm32(a, a)
        except (TypeError, RuntimeError, NotImplementedError):
            _LOWP_GEMM_OK[key] = (False, False)
            return _LOWP_GEMM_OK[key]
        try:
            _addmm32_(c, a, a)
            _LOWP_GEMM_OK[key] = (True, True)
        except (TypeError, RuntimeError, NotImplementedError):
            _LOWP_GEMM_OK[key] = (True, False)
    return _LOWP_GEMM_OK[key]


class _Head:
    """One model's lm_head: logits in ``ldt`` and the two backward GEMMs.

    ``lowp``: bf16/fp16 operands (those of the inputs, or autocast's dtype on CUDA) on CUDA, GEMMs with fp32
    output; the gradient chunk is cast to the operand dtype for the backward GEMMs, as the operands of any
    tensor-core GEMM. Otherwise the weight is converted to ``ldt`` once (a ``[V, H]`` copy when its dtype
    differs: the CPU path, or torch without ``mm(out_dtype=)``).
    """

    def __init__(self, W: torch.Tensor, b: torch.Tensor | None, x_dtype: torch.dtype, ldt: torch.dtype,
                 op_dtype: torch.dtype | None = None):
        op = op_dtype or (W.dtype if x_dtype == W.dtype else None)
        mm_ok, self.addmm_ok = _lowp_gemm(W.device, op) if op in _LOWP else (False, False)
        self.lowp = ldt == torch.float32 and mm_ok
        self.op = op if self.lowp else ldt
        self.Wc = W.to(self.op)  # no copy when the dtypes agree
        self.b = None if b is None else b.to(ldt)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.lowp:
            z = _mm32(x.to(self.op), self.Wc.t())
        else:
            z = torch.mm(x.to(self.op), self.Wc.t())
        if self.b is not None:
            z += self.b
        return z

    def backward(self, g: torch.Tensor, x: torch.Tensor, dx_dtype: torch.dtype | None, scale, dW_acc):
        """``g @ W`` (times ``scale``, in ``dx_dtype``; None: skipped) and ``dW_acc += gᵀ @ x``."""
        dx = None
        if self.lowp:
            gl = g.to(self.op)
            x = x.to(self.op)
            if dx_dtype is not None:
                dx = _mm32(gl, self.Wc)
            if dW_acc is not None and self.addmm_ok:
                _addmm32_(dW_acc, gl.t(), x)
            elif dW_acc is not None:  # fp32 products of vocabulary slices no larger than the logits chunk, added
                step = max(1, g.numel() // max(x.shape[1], 1))
                for v0 in range(0, dW_acc.shape[0], step):
                    dW_acc[v0 : v0 + step] += _mm32(gl[:, v0 : v0 + step].t(), x)
        else:
            if dx_dtype is not None:
                dx = torch.mm(g, self.Wc)
            if dW_acc is not None:
                dW_acc.addmm_(g.t(), x.to(g.dtype))
        if dx is not None:
            if scale is not None:
                dx = dx.mul_(scale)
            dx = dx.to(dx_dtype)
        return dx


# ----------------------------------------------------------------------------- the row sweep
@dataclasses.dataclass(frozen=True)
class _Cfg:
    p: KDPlan  # the per-chunk plan: reduction "sum", no num_items (the reduction is applied here)
    red: int
    backend: str
    rows: int
    ldt: torch.dtype
    V: int
    num_items: float  # > 0: the batchmean / mean denominator
    need: tuple  # (dh, dW, db)
    op_dtype: torch.dtype | None = None  # autocast's GEMM dtype (CUDA), else None: the inputs' dtype
    lead: tuple = ()  # the leading dims of student_hidden: the shape of the per-row loss


def _n_upfront(cfg: _Cfg, N: int, labels, mask, device) -> torch.Tensor:
    """The denominator as far as it is known before the sweep: num_items, else the rows that labels and mask
    keep (the all −inf validity rule is applied after the sweep, by a correction factor)."""
    acc = cfg.p.accum_dtype
    if cfg.num_items > 0:
        return torch.full((), cfg.num_items, dtype=acc, device=device)
    ok = None
    if labels is not None:
        ok = labels != cfg.p.ignore_index
    if mask is not None:
        ok = mask.bool() if ok is None else ok & mask.bool()
    return torch.full((), N, dtype=acc, device=device) if ok is None else ok.sum().to(acc)


def _factor(red: int, n: torch.Tensor, V: int) -> torch.Tensor:
    if red == RED_BATCHMEAN:
        return torch.where(n > 0, 1.0 / n.clamp_min(1e-30), torch.zeros_like(n))
    if red == RED_MEAN:  # V = 0 (an empty vocabulary: every row invalid): 0, as kd_loss (not 1/0 = inf, a NaN dh)
        return torch.where(n > 0, 1.0 / (n.clamp_min(1e-30) * V), torch.zeros_like(n)) if V else torch.zeros_like(n)
    return torch.ones_like(n)


def _sweep(cfg: _Cfg, hs, W, b, th, tW, tb, tlog, ids, lps, labels, mask, weights, *, grad: bool, go=None,
           scale=None, dh_dtype=None):
    """One pass over the row chunks. Returns (contrib [lead], valid [N], dh, dW_acc, db_acc); the gradients are
    those of Σ_valid ℓ_i (times ``go`` per row when given), ``dh`` further times ``scale``, in ``dh_dtype``
    (default: the hidden dtype)."""
    p, acc, dev = cfg.p, cfg.p.accum_dtype, hs.device
    N = hs.shape[0]
    per_row = torch.zeros(cfg.lead, dtype=acc, device=dev)  # returned as is for "none" (not a view: FSDP2)
    contrib = per_row.view(N)
    valid = torch.zeros(N, dtype=acc, device=dev)
    head = _Head(W, b, hs.dtype, cfg.ldt, cfg.op_dtype)
    thead = _Head(tW, tb, th.dtype, cfg.ldt, cfg.op_dtype) if th is not None else None
    need_dh, need_dW, need_db = (x and grad for x in cfg.need)
    gdt = torch.float32 if head.lowp else cfg.ldt
    dh_dtype = dh_dtype or hs.dtype
    dh = torch.empty(hs.shape, dtype=dh_dtype, device=dev) if need_dh else None
    dW_acc = torch.zeros(W.shape, dtype=gdt, device=dev) if need_dW else None
    db_acc = torch.zeros(W.shape[0], dtype=gdt, device=dev) if need_db else None
    one = torch.ones(1, dtype=acc, device=dev)
    cast_teacher = cfg.backend == "cuda"  # the CUDA kernels need the teacher in the student logits' dtype
    for r0 in range(0, N, cfg.rows):
        r = slice(r0, min(N, r0 + cfg.rows))
        x = hs[r]
        s = head.logits(x)
        if thead is not None:
            t = thead.logits(th[r])
        elif ids is not None:
            t = (ids[r], lps[r])
        else:
            t = row_chunk(tlog, r)
            t = t.to(cfg.ldt) if cast_teacher else t
        lab = labels[r] if labels is not None else None
        wt = weights[r] if weights is not None else None
        _, c, st, _ = _fwd(p, cfg.backend, s, t, lab, mask[r] if mask is not None else None, wt)
        contrib[r] = c
        valid[r] = st[:, 7]
        if not grad:
            del s, t  # before the next chunk's GEMMs (else two chunks' logits live at once: 1.5-2x the budget)
            continue
        # the gradient overwrites the logits chunk (a top-k teacher's too: the Triton backward stashes the logits at
        # the k ids before it writes the row, kernels/kd_softmax.py STASH)
        g = _bwd(p, cfg.backend, s, t, lab, wt, st, one, go[r] if go is not None else one, s)
        del s, t  # the teacher chunk is not needed for the GEMMs
        d = head.backward(g, x, dh_dtype if need_dh else None, scale, dW_acc)
        if d is not None:
            dh[r] = d
        if db_acc is not None:
            db_acc += g.sum(0, dtype=gdt)
        del g
    return per_row, valid, dh, dW_acc, db_acc


def _held(dtype: torch.dtype) -> torch.dtype:
    """The dtype a gradient of ``dtype`` is held in between forward and backward: fp32 for fp16, whose range would
    flush small gradients to zero before backward applies the upstream gradient (a GradScaler's loss scale)."""
    return torch.float32 if dtype == torch.float16 else dtype


def _times_go(x: torch.Tensor | None, go: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``x * go`` in ``dtype``, rounded once; an fp32 ``x`` held for fp16 is converted in slices of rows (no
    second full-size fp32 temporary)."""
    if x is None:
        return None
    if x.dtype == dtype:
        return x * go
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    step = max(1, (1 << 24) // max(1, math.prod(x.shape[1:])))  # (x may have no rows: an empty batch)
    for r0 in range(0, x.shape[0], step):
        out[r0 : r0 + step] = x[r0 : r0 + step] * go
    return out


def _scalar(cfg: _Cfg, tensors, grad: bool):
    """Loss of a scalar reduction, and (grad) its gradients dh, dW, db for a unit upstream gradient, held in
    ``_held`` of their parameters' dtypes."""
    hs, W, b, *_, labels, mask, _w = tensors
    n0 = _n_upfront(cfg, hs.shape[0], labels, mask, hs.device)
    f0 = _factor(cfg.red, n0, cfg.V)
    contrib, valid, dh, dW_acc, db_acc = _sweep(cfg, *tensors, grad=grad, scale=f0 if cfg.red != RED_SUM else None,
                                                dh_dtype=_held(hs.dtype))
    n = n0 if cfg.num_items > 0 else valid.sum()
    f = _factor(cfg.red, n, cfg.V)
    loss = contrib.view(-1).sum() * f
    if not grad:
        return loss, None, None, None
    if dh is not None and cfg.num_items <= 0 and cfg.red != RED_SUM:
        # rows invalid only by the all −inf rule leave n < n0: dh was scaled by 1/n0 (exactly 1 when n = n0)
        dh.mul_(torch.where(n > 0, n0 / n.clamp_min(1), torch.ones_like(n)))
    # scaled in place: (dW_acc * f) was a second fp32 [V, H] (2.1 GB at 128256 x 4096), the op's peak
    dW = dW_acc.mul_(f).to(_held(W.dtype)) if dW_acc is not None else None
    db = db_acc.mul_(f).to(_held(b.dtype)) if db_acc is not None else None
    return loss, dh, dW, db


class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cfg, anchors, *tensors):
        ctx.cfg = cfg
        ctx.fd_anchors = anchors  # stand-ins for h, W, b (first_order; the scalar path saves gradients only)
        if cfg.red == RED_NONE:
            contrib, *_ = _sweep(cfg, *tensors, grad=False)
            save_constants(ctx, *tensors)
            return contrib
        loss, dh, dW, db = _scalar(cfg, tensors, grad=True)
        ctx.save_for_backward(dh, dW, db)
        ctx.dtypes = tuple(None if x is None else x.dtype for x in tensors[:3])  # h, W, b
        return loss

    @staticmethod
    @first_order("fused_linear_kd_loss")
    def backward(ctx, go):
        cfg = ctx.cfg
        rest = (None,) * 9  # teacher (never differentiated), labels, mask, weights
        if cfg.red == RED_NONE:
            tensors = saved_constants(ctx)
            go = go.reshape(-1).to(cfg.p.accum_dtype).contiguous()
            with autocast_off(go.device.type):
                _, _, dh, dW_acc, db_acc = _sweep(cfg, *tensors, grad=True, go=go)
            W, b = tensors[1], tensors[2]
            dW = dW_acc.to(W.dtype) if dW_acc is not None else None
            db = db_acc.to(b.dtype) if db_acc is not None else None
            return None, None, dh, dW, db, *rest
        grads = (_times_go(x, go, dt) for x, dt in zip(ctx.saved_tensors, ctx.dtypes))
        return (None, None, *grads, *rest)


def _run(cfg: _Cfg, tensors: tuple, grad: bool):
    """Eager, also under torch.compile (``fused_linear_kd_loss`` is a graph break): the row loop is Python and
    its GEMMs are cuBLAS'."""
    with autocast_off(tensors[0].device.type):  # autocast would round the logits GEMM
        return _run_eager(cfg, tensors, grad)


def _run_eager(cfg: _Cfg, tensors: tuple, grad: bool):
    if grad:
        anchors = tuple(a for a in map(graph_anchor, tensors[:3]) if a is not None)
        return _FusedLinearKD.apply(cfg, anchors, *tensors)
    with torch.no_grad():
        if cfg.red == RED_NONE:
            return _sweep(cfg, *tensors, grad=False)[0]
        return _scalar(cfg, tensors, grad=False)[0]


# ----------------------------------------------------------------------------- argument checks
def _tensor(name: str, v, *, dim: int | None = None, dtypes=_FLOAT_DTYPES, kind="a floating dtype"):
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(v).__name__}")
    if is_dtensor(v) and name.endswith(("weight", "bias")):
        raise TypeError(f"{name}: got a DTensor {tuple(v.placements)}: an FSDP2-sharded parameter is a plain tensor "
                        "inside the FSDP2 module's forward (call fused_linear_kd_loss there, or unshard() the module "
                        "first); a tensor-parallel (vocab-sharded) lm_head goes to "
                        "fastdistill.distributed.vocab_parallel_fused_linear_kd_loss(h, W.to_local(), ..., "
                        "group=<the tensor-parallel group>) (docs/kd_ops.md, 'Fused linear KD')")
    reject_dtensor("fused_linear_kd_loss", {name: v}, vocab_hint="use fastdistill.distributed."
                   "vocab_parallel_fused_linear_kd_loss on each rank's vocabulary shard")
    if dtypes is not None and v.dtype not in dtypes:
        raise TypeError(f"{name}: expected {kind}, got {v.dtype}")
    if dim is not None and v.dim() != dim:
        raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(v.shape)}")
    return v


def _same_device(name: str, v: torch.Tensor | None, device) -> None:
    if v is not None and v.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of student_hidden), got {v.device}")


def _rows(name: str, v, lead, N: int, device, *, dtypes, kind: str):
    if v is None:
        return None
    _tensor(name, v, dtypes=dtypes, kind=kind)
    _same_device(name, v, device)
    if v.shape != lead and v.shape != (N,):
        raise ValueError(f"{name}: expected shape {tuple(lead)} (the leading dims of student_hidden), "
                         f"got {tuple(v.shape)}")
    return v.reshape(N).contiguous()


def _eager_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _student_row_bytes(V: int, ldt: torch.dtype, k: int, cuda: bool, w_dtype: torch.dtype,
                       op: torch.dtype | None, gemm_ok: tuple[bool, bool]) -> int:
    """Per-row bytes of the student's chunk temporaries: its logits in ``ldt`` (which take the gradient in place;
    with a top-k teacher, ``k`` > 0, the logits at the ids are stashed first: k more), on CUDA the gradient's copy
    in the GEMM operands' dtype (bf16/fp16 weights, or fp32 ones under autocast: ``op``), and where torch's addmm
    has no fp32 accumulator for them (``gemm_ok`` = (mm, addmm) is (True, False)) the fp32 products of dW over
    vocabulary slices as large as the logits chunk."""
    per_row = ldt.itemsize * (V + k)
    if cuda and (w_dtype in _LOWP or op in _LOWP):
        per_row += 2 * V
    if cuda and op in _LOWP and ldt == torch.float32 and gemm_ok == (True, False):
        per_row += 4 * V
    return per_row


def _chunk_rows(chunk_size, memory_budget_mb, N: int, bytes_per_row: int) -> int:
    if chunk_size == "auto":
        budget = (DEFAULT_MEMORY_BUDGET_MB if memory_budget_mb is None else float(memory_budget_mb)) * 2**20
        rows = max(1, int(budget // max(bytes_per_row, 1)))
    else:
        rows = int(chunk_size)
    if N > rows:  # equal chunks: ceil(N / rows) of them
        rows = -(-N // -(-N // rows))
    return max(1, min(rows, N))


# ----------------------------------------------------------------------------- public API
# The whole call is the graph break (not only the chunk loop): dynamo then never sees the float options, so a
# schedule of temperatures / alphas does not recompile the calling frame once per value (it did: the options,
# traced as graph inputs up to the loop, were specialised where they crossed into it)
@eager_only("fused_linear_kd_loss runs eagerly: a Python loop over row chunks (cuBLAS GEMMs, the KD kernel per chunk)")
def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk=None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | str = "auto",
    memory_budget_mb: float | None = None,
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
    """``kd_loss(student_hidden @ student_weight.T + student_bias, teacher_logits, ...)`` without the
    ``[N, V]`` logits: rows in chunks, fp32 logits per chunk, the gradient written in place, ``dW`` in fp32.

    ``student_hidden``: ``[N, Hs]`` or ``[B, T, Hs]``; ``student_weight``: ``[V, Hs]`` (``nn.Linear`` layout),
    ``student_bias``: ``[V]``. The teacher comes one way: ``teacher_hidden`` ``[..., Ht]`` with
    ``teacher_weight`` ``[Vt, Ht]`` (and ``teacher_bias``), or ``teacher_logits`` ``[..., Vt]``, or
    ``teacher_topk=(ids, logprobs)``. ``Hs != Ht`` and ``Vt != V`` are allowed. The teacher gets no gradient.
    Every other option has the meaning it has in ``kd_loss`` (docs/kd_ops.md). ``chunk_size``: rows per chunk,
    or ``"auto"``: as many as fit ``memory_budget_mb`` (default 2048) of fp32 logits (student + teacher).
    Returns an fp32 scalar (``[lead]`` for ``reduction="none"``; fp64 for fp64 student inputs: ``accum_dtype``).

    Example::

        h_s = student.model(x).last_hidden_state            # [B, T, Hs]
        with torch.no_grad():
            h_t = teacher.model(x).last_hidden_state        # [B, T, Ht]
        # position t predicts token t + 1: drop the last position, shift the labels (transformers' convention)
        loss = fused_linear_kd_loss(h_s[:, :-1], student.lm_head.weight, h_t[:, :-1], teacher.lm_head.weight,
                                    divergence="jsd", temperature=2.0, labels=labels[:, 1:])
    """
    refuse_transforms("fused_linear_kd_loss")
    hs = _tensor("student_hidden", student_hidden)
    if hs.dim() < 2:
        raise ValueError(f"student_hidden: expected shape [N, Hs] or [B, T, Hs], got {tuple(hs.shape)}")
    dev = hs.device
    W = _tensor("student_weight", student_weight, dim=2)
    _same_device("student_weight", W, dev)
    lead, Hs = hs.shape[:-1], hs.shape[-1]
    N = int(torch.Size(lead).numel())
    V = W.shape[0]
    if W.shape[1] != Hs:
        raise ValueError(f"student_weight: expected shape [V, {Hs}] (the hidden size of student_hidden), "
                         f"got {tuple(W.shape)}")
    b = None
    if student_bias is not None:
        b = _tensor("student_bias", student_bias, dim=1)
        _same_device("student_bias", b, dev)
        if b.shape[0] != V:
            raise ValueError(f"student_bias: expected shape [{V}] (the rows of student_weight), got {tuple(b.shape)}")

    # the teacher, given exactly one way
    ways = [teacher_hidden is not None or teacher_weight is not None, teacher_logits is not None,
            teacher_topk is not None]
    if sum(ways) != 1:
        raise ValueError("teacher_hidden + teacher_weight / teacher_logits / teacher_topk: give the teacher exactly "
                         f"one way, got {sum(ways)}")
    if teacher_bias is not None and not ways[0]:
        raise ValueError("teacher_bias: only with teacher_hidden + teacher_weight")
    check_choice("topk_semantics", topk_semantics, tuple(TOPK_SEMANTICS))
    th = tW = tb = tlog = ids = lps = None
    topk = 0
    if ways[0]:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden / teacher_weight: give both (or teacher_logits / teacher_topk instead)")
        th = _tensor("teacher_hidden", teacher_hidden).detach()
        tW = _tensor("teacher_weight", teacher_weight, dim=2).detach()
        for nm, v in (("teacher_hidden", th), ("teacher_weight", tW)):
            _same_device(nm, v, dev)
        if th.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden: expected leading dims {tuple(lead)} (those of student_hidden), "
                             f"got {tuple(th.shape[:-1])}")
        if tW.shape[1] != th.shape[-1]:
            raise ValueError(f"teacher_weight: expected shape [Vt, {th.shape[-1]}] (the hidden size of "
                             f"teacher_hidden), got {tuple(tW.shape)}")
        Vt = tW.shape[0]
        if teacher_bias is not None:
            tb = _tensor("teacher_bias", teacher_bias, dim=1).detach()
            _same_device("teacher_bias", tb, dev)
            if tb.shape[0] != Vt:
                raise ValueError(f"teacher_bias: expected shape [{Vt}] (the rows of teacher_weight), "
                                 f"got {tuple(tb.shape)}")
        th = th.reshape(N, th.shape[-1])
    elif ways[1]:
        tlog = _tensor("teacher_logits", teacher_logits).detach()
        _same_device("teacher_logits", tlog, dev)
        if tlog.dim() < 1 or tlog.shape[:-1] != lead:
            raise ValueError(f"teacher_logits: expected leading dims {tuple(lead)} (those of student_hidden), "
                             f"got shape {tuple(tlog.shape)}")
        Vt = tlog.shape[-1]
        flat = row_view(tlog, N)  # the shifted logits[:, :-1] of a batch: kept [B, T, Vt], read a chunk at a time
        if flat is not None or tlog.dim() != 3 or (Vt > 1 and tlog.stride(-1) != 1):
            tlog = flat if flat is not None else tlog.reshape(N, Vt).contiguous()
    else:
        if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
            raise TypeError("teacher_topk: expected a pair (ids, logprobs)")
        ids = _tensor("teacher_topk ids", teacher_topk[0], dtypes=(torch.int64, torch.int32),
                      kind="an int64/int32 tensor").detach()
        lps = _tensor("teacher_topk logprobs", teacher_topk[1]).detach()
        for nm, v in (("teacher_topk ids", ids), ("teacher_topk logprobs", lps)):
            _same_device(nm, v, dev)
            if v.dim() < 1 or v.shape[:-1] != lead:
                raise ValueError(f"{nm}: expected leading dims {tuple(lead)} (those of student_hidden), "
                                 f"got shape {tuple(v.shape)}")
        if ids.shape != lps.shape:
            raise ValueError(f"teacher_topk: ids {tuple(ids.shape)} and logprobs {tuple(lps.shape)} differ in shape")
        k = ids.shape[-1]
        if k > V:
            raise ValueError(f"teacher_topk: k = {k} exceeds the student vocabulary {V}")
        if k < 1:
            raise ValueError("teacher_topk: k = 0 (no teacher ids); give at least one id per row")
        topk = TOPK_SEMANTICS[topk_semantics]  # (its teacher_temperature / divergence rules: make_plan)
        if _eager_cpu(ids) and bool(((ids < 0) | (ids >= V)).any()):
            raise ValueError(f"teacher_topk ids: values must be in [0, {V})")
        ids, lps = ids.reshape(N, k).contiguous(), lps.reshape(N, k).contiguous()
        Vt = 0

    # options (as kd_loss)
    auto = isinstance(chunk_size, str) and chunk_size == "auto"
    if not auto:
        chunk_size = count_option("chunk_size", chunk_size, "'auto' or an int >= 1")
    if memory_budget_mb is not None:
        if not auto:
            raise ValueError(f"memory_budget_mb: only used with chunk_size='auto', got chunk_size={chunk_size!r}")
        try:
            mb = real_option("memory_budget_mb", memory_budget_mb)
        except (TypeError, ValueError):
            mb = 0.0
        if not mb > 0:
            raise ValueError(f"memory_budget_mb: expected a positive finite number, got {memory_budget_mb!r}")
        memory_budget_mb = mb
    labels2 = _rows("labels", labels, lead, N, dev, dtypes=(torch.int64, torch.int32), kind="int64 / int32 labels")
    p = make_plan(divergence=divergence, beta=beta, skew=skew, temperature=temperature,
                  teacher_temperature=teacher_temperature, t2_scale=t2_scale, ignore_index=ignore_index,
                  reduction=reduction, num_items=num_items, hard_label_alpha=hard_label_alpha, softcap=softcap,
                  logit_scale=logit_scale, topk=topk,
                  accum_dtype=resolve_accum(accum_dtype, student_hidden, student_weight),
                  has_labels=labels2 is not None)
    if p.div == 1 and not topk and Vt < V:
        raise ValueError(f"{'teacher_weight' if th is not None else 'teacher_logits'}: vocabulary {Vt} < the "
                         f"student's {V}: reverse KL is infinite where the student has mass and the teacher none; "
                         "slice student_weight or use 'jsd'/'srkl'")
    if labels2 is not None and _eager_cpu(labels2):
        bad = (labels2 != ignore_index) & ((labels2 < 0) | (labels2 >= V))
        if bool(bad.any()):
            raise ValueError(f"labels: values must be in [0, {V}) or ignore_index={ignore_index}, "
                             f"got {labels2[bad][:4].tolist()}")
    mask2 = _rows("mask", mask, lead, N, dev, dtypes=(torch.bool,), kind="a bool mask")
    w2 = _rows("weights", weights, lead, N, dev, dtypes=_FLOAT_DTYPES, kind="a floating dtype")
    check_row_args(p, ids if topk else None, labels2, mask2, w2)
    num_items = p.num_items if p.num_items > 0 else None
    fp64 = p.fp64
    p = dataclasses.replace(p, red=RED_SUM, num_items=0.0)  # the kernels sum; this op applies the reduction
    # the student's logits dtype follows the student (and accum_dtype): an fp64 teacher head or teacher logits do
    # not turn the student's GEMMs and its dW accumulator into fp64 (the teacher's logits are cast per chunk)
    ldt = torch.float64 if fp64 or any(x.dtype == torch.float64 for x in (hs, W)) else torch.float32
    tdt = ldt if tlog is None else tlog.dtype
    backend = select_backend("kd_loss", torch.empty(0, device=dev, dtype=ldt), fp64=fp64, teacher_dtype=tdt,
                             topk=bool(topk))
    if backend == "cuda" and tlog is not None:
        tdt = ldt  # the teacher chunk is cast to the logits' dtype for the CUDA kernels
    # per-row bytes of the chunk temporaries: student logits (+ the low-precision gradient copy on CUDA, and
    # a top-k teacher's stash of the logits at its ids), teacher logits when computed or cast here
    # under autocast on CUDA the GEMM operands take autocast's dtype (as F.linear's would), the output stays fp32
    op_dtype = torch.get_autocast_dtype("cuda") if dev.type == "cuda" and torch.is_autocast_enabled("cuda") else None
    op = op_dtype or (W.dtype if hs.dtype == W.dtype else None)  # the student head's GEMM operands (_Head)
    per_row = _student_row_bytes(V, ldt, ids.shape[-1] if topk else 0, dev.type == "cuda", W.dtype, op,
                                 _lowp_gemm(dev, op) if op in _LOWP else (False, False))
    isz = ldt.itemsize
    if th is not None or (tlog is not None and tdt != tlog.dtype):
        per_row += isz * Vt
    elif tlog is not None and tlog.dim() == 3:  # a chunk that crosses a sequence boundary is copied (row_chunk)
        per_row += tlog.itemsize * Vt
    rows = _chunk_rows(chunk_size, memory_budget_mb, N, per_row)

    need = (hs.requires_grad, W.requires_grad, b is not None and b.requires_grad)
    grad = torch.is_grad_enabled() and any(need)
    cfg = _Cfg(p=p, red=REDUCTIONS[reduction], backend=backend, rows=rows, ldt=ldt, V=V,
               num_items=float(num_items) if num_items is not None else 0.0, need=need, op_dtype=op_dtype,
               lead=tuple(lead))
    mask_u8 = mask2.view(torch.uint8) if mask2 is not None else None
    tensors = (hs.reshape(N, Hs), W, b, th, tW, tb, tlog, ids, lps, labels2, mask_u8, w2)
    return _run(cfg, tensors, grad)
