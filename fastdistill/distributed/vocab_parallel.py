"""Vocab-parallel (tensor-parallel) knowledge distillation on torch.distributed process groups.

Every rank of ``group`` holds the same rows (tokens) and a contiguous slice ``[start, start + V_r)``
of the vocabulary, student and teacher sliced the same way (Megatron's vocab-parallel lm_head).
The loss and the student-shard gradients equal ``fastdistill.kd_loss`` on the gathered logits, with
every option of docs/kd_ops.md. Semantics, communication and memory: docs/vocab_parallel_kd.md.

Communication per call (the rows' statistics stacked into one tensor per collective):
1. all_reduce MAX: the per-row maxima of both models (+ the untempered student for the CE term),
   with the shard layout ``(start, end)`` of every rank piggybacked (no extra collective);
2. all_reduce SUM: the sum-exps rescaled to the global maxima, forward/reverse KL's partial sums,
   the label's logit (held by one rank) and, for top-k teachers, the student's logits at the k ids;
3. jsd / skl / srkl / tvd only: all_reduce SUM of the partial divergence and ``Σ q·g``.
The backward needs no communication (the reduced per-row statistics are saved).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from fastdistill.ops._common import check_choice
from fastdistill.ops.kd_softmax import TOPK_SEMANTICS, KDPlan, make_plan
from fastdistill.reference.kd_softmax import bucket_div, transform

__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_fused_linear_kd_loss", "vocab_parallel_topk"]

CHUNK_ELEMS = 1 << 22  # rows per chunk of the unfused loss: at most this many logits of a shard at a time
FUSED_CHUNK_ELEMS = 1 << 25  # chunk_size="auto" of the fused-linear loss: rows × V_r logits per chunk
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NEG_INF = float("-inf")
_FKL, _RKL = 0, 1
_TOPK_TAIL, _TOPK_ZERO, _TOPK_RENORM = 1, 2, 3
# st columns (per row, saved for the backward), as in fastdistill.reference.kd_softmax
_LSE_S, _EXTRA, _LSE1, _D, _S, _CONTRIB, _CE, _VALID = range(8)
_LAYOUTS: dict = {}  # (group, rank, start, V_r, world) -> global V, for layouts already checked on a GPU


# ----------------------------------------------------------------------------- layout of the group
class _Shard:
    """This rank's place in the group: rank, world, first vocab id, shard width."""

    def __init__(self, group, vocab_start, Vr: int, device: torch.device):
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("group: torch.distributed is not initialized (call init_process_group first)")
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("group: this process is not a member of the given process group")
        self.group, self.rank, self.world, self.Vr = group, rank, dist.get_world_size(group), Vr
        self.given = vocab_start is not None
        if self.given:
            if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
                raise TypeError(f"vocab_start: expected an int (this rank's first vocab id) or None, "
                                f"got {type(vocab_start).__name__}")
            if vocab_start < 0:
                raise ValueError(f"vocab_start: expected >= 0, got {vocab_start}")
        self.start = int(vocab_start) if self.given else rank * Vr
        self.device = device
        self.V: int | None = self.world * Vr if not self.given else None  # global vocabulary (host)
        self.key = (id(group), rank, self.start, Vr, self.world, self.given)

    def layout_block(self, dtype) -> torch.Tensor:
        """[world, 2] with this rank's (start, end) in its row and −inf elsewhere (for a MAX all_reduce)."""
        lay = torch.full((self.world, 2), _NEG_INF, dtype=dtype, device=self.device)
        lay[self.rank, 0], lay[self.rank, 1] = float(self.start), float(self.start + self.Vr)
        return lay

    def check(self, lay: torch.Tensor) -> None:
        """Check the gathered layout (free on CPU tensors; once per layout on a GPU: one host sync)."""
        if self.device.type != "cpu" and self.key in _LAYOUTS:
            self.V = _LAYOUTS[self.key]
            return
        rows = [(int(a), int(b)) for a, b in lay.cpu().tolist()]
        widths = [b - a for a, b in rows]
        if not self.given and len(set(widths)) > 1:
            raise ValueError(f"vocab_start: None means equal shards (start = rank * V_r) over the group of size "
                             f"{self.world}, but the ranks hold shard widths {widths}: pass each rank's vocab_start")
        pos = 0
        for a, b in sorted(rows):
            if a != pos:
                raise ValueError(f"vocab_start: the shards [start, end) of the group's ranks {rows} do not tile "
                                 f"[0, V) contiguously (a gap or an overlap at vocab id {min(a, pos)})")
            pos = b
        self.V = pos
        if self.device.type != "cpu":
            _LAYOUTS[self.key] = pos


def _rowmax(x: torch.Tensor) -> torch.Tensor:
    return x.amax(1) if x.shape[1] else x.new_full((x.shape[0],), _NEG_INF)


def _safe(m: torch.Tensor) -> torch.Tensor:
    """A finite shift for exp(x − m): 0 where the row is all −inf."""
    return torch.where(m == _NEG_INF, torch.zeros_like(m), m)


def _xlogy(w, a):
    return torch.where(w > 0, w * a, torch.zeros_like(a))


def _chunks(N: int, Vr: int, elems: int = 0):
    step = max(1, (elems or CHUNK_ELEMS) // max(Vr, 1))
    for r0 in range(0, N, step):
        yield slice(r0, min(N, r0 + step))


# ----------------------------------------------------------------------------- one run (plan + shard)
class _Run:
    """The plan, the shard and the per-call row data that the stages share."""

    def __init__(self, p: KDPlan, sh: _Shard, labels, ids, k: int):
        self.p, self.sh, self.labels, self.ids, self.k = p, sh, labels, ids, k
        self.ce = labels is not None and p.alpha > 0
        self.dense = p.topk == 0
        self.three = self.dense and p.div not in (_FKL, _RKL)
        self.checked = False
        # SUM columns: es, et, e1, A (fkl/rkl), zl, own (label), ownk, uk[k]
        self.nsum = 7 + (k if not self.dense else 0)

    def post_checks(self) -> None:
        """Checks that need the global vocabulary V (all ranks raise together: V is global)."""
        V = self.sh.V
        if self.k > V:
            raise ValueError(f"teacher_topk: k = {self.k} exceeds the global vocabulary {V}")
        cpu = not torch.compiler.is_compiling()
        if self.labels is not None and cpu and self.labels.device.type == "cpu" and self.labels.numel():
            lab = self.labels
            bad = (lab != self.p.ignore_index) & ((lab < 0) | (lab >= V))
            if bool(bad.any()):
                raise ValueError(f"labels: values must be global vocab ids in [0, {V}) or "
                                 f"ignore_index={self.p.ignore_index}, got {lab[bad][:4].tolist()}")
        if self.ids is not None and cpu and self.ids.device.type == "cpu" and self.ids.numel():
            if bool(((self.ids < 0) | (self.ids >= V)).any()):
                raise ValueError(f"teacher_topk ids: values must be global vocab ids in [0, {V})")

    # ---------------------------------------------------------------- stage A: local statistics
    def stage_a(self, zs_raw, teacher, lab):
        """One pass over a block of rows of the shard: the local maxima [n, 3] (student, teacher,
        untempered student) and the local sums [n, nsum] relative to those maxima."""
        p, sh = self.p, self.sh
        acc = p.accum_dtype
        z = transform(p, zs_raw.to(acc))
        us = z / p.temperature if p.temperature != 1.0 else z
        n = z.shape[0]
        mx = z.new_full((n, 3), _NEG_INF)
        sm = z.new_zeros((n, self.nsum))
        ms = _rowmax(us)
        ds = us - _safe(ms)[:, None]
        qs = ds.exp()
        mx[:, 0], sm[:, 0] = ms, qs.sum(1)
        if self.dense:
            ut = transform(p, teacher.to(acc)) / p.teacher_temperature
            mt = _rowmax(ut)
            dt = ut - _safe(mt)[:, None]
            pt = dt.exp()
            mx[:, 1], sm[:, 1] = mt, pt.sum(1)
            if p.div == _FKL:
                sm[:, 3] = _xlogy(pt, dt - ds).sum(1)
            elif p.div == _RKL:
                sm[:, 3] = _xlogy(qs, ds - dt).sum(1)
        if self.ce:
            if p.temperature == 1.0:
                mx[:, 2], sm[:, 2] = mx[:, 0], sm[:, 0]
            else:
                m1 = _rowmax(z)
                mx[:, 2], sm[:, 2] = m1, (z - _safe(m1)[:, None]).exp().sum(1)
            loc = lab - sh.start
            own = (lab != p.ignore_index) & (loc >= 0) & (loc < sh.Vr)
            if sh.Vr:
                zl = z.gather(1, loc.clamp(0, sh.Vr - 1)[:, None])[:, 0]
                sm[:, 4] = torch.where(own, zl, torch.zeros_like(zl))
            sm[:, 5] = own.to(acc)
        if not self.dense:
            loc = teacher[0].long() - sh.start
            own = (loc >= 0) & (loc < sh.Vr)
            if sh.Vr:
                uk = us.gather(1, loc.clamp(0, sh.Vr - 1))
                sm[:, 7:] = torch.where(own, uk, torch.zeros_like(uk))
            sm[:, 6] = own.to(acc).sum(1)
        return mx, sm

    # ---------------------------------------------------------------- collectives 1 + 2
    def collect(self, mx, sm):
        """MAX all_reduce (maxima + layout), rescale the local sums to the global maxima, SUM all_reduce.
        Returns (global maxima shifts [n, 3], global sums [n, nsum]) and V on the device."""
        sh, W = self.sh, self.sh.world
        lay = sh.layout_block(mx.dtype)
        flat = torch.cat([lay.reshape(-1), mx.reshape(-1)])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=sh.group)
        lay_g, M = flat[: 2 * W].view(W, 2), flat[2 * W :].view(mx.shape)
        if not self.checked:
            sh.check(lay_g)
            self.post_checks()
            self.checked = True
        a, A = _safe(mx), _safe(M)
        r = torch.where(mx == _NEG_INF, torch.zeros_like(mx), torch.exp(a - A))  # local → global shift
        if self.dense and self.p.div in (_FKL, _RKL):
            # Σ w·(d_w − d_o) relative to the local shifts → relative to the global ones
            i, o = (1, 0) if self.p.div == _FKL else (0, 1)
            corr = sm[:, i] * ((a[:, i] - A[:, i]) - (a[:, o] - A[:, o]))
            sm[:, 3] = torch.where(r[:, i] > 0, r[:, i] * (sm[:, 3] + corr), torch.zeros_like(corr))
        sm[:, 0:3] *= r
        dist.all_reduce(sm, op=dist.ReduceOp.SUM, group=sh.group)
        return A, sm, lay_g[:, 1].max()

    # ---------------------------------------------------------------- stage B + collective 3
    def stage_b(self, zs_raw, zt_raw, lse_s, lse_t):
        """Partial divergence and Σ q·g over the shard's columns (jsd / skl / srkl / tvd)."""
        p = self.p
        acc = p.accum_dtype
        z = transform(p, zs_raw.to(acc))
        us = z / p.temperature if p.temperature != 1.0 else z
        ut = transform(p, zt_raw.to(acc)) / p.teacher_temperature
        lq, lp = us - _safe(lse_s)[:, None], ut - _safe(lse_t)[:, None]
        D, g = bucket_div(p, lq, lp)
        return torch.stack([D, (lq.exp() * g).sum(1)], 1)

    # ---------------------------------------------------------------- per-row loss
    def finish(self, A, G, part, lps, lab, mask, w):
        """Global per-row statistics st [n, 8] (lse_s, extra, lse1, D, S, contrib, ce, valid) and the
        student's tempered logits at the top-k ids uk [n, k] (top-k teachers; else None)."""
        p = self.p
        n = G.shape[0]
        st = G.new_zeros((n, 8))
        es, et = G[:, 0], G[:, 1]
        lse_s = A[:, 0] + es.log()
        ok = lse_s != _NEG_INF
        uk = None
        if self.dense:
            lse_t = A[:, 1] + et.log()
            ok &= lse_t != _NEG_INF
            if p.div == _FKL:
                D, S = G[:, 3] / et - et.log() + es.log(), torch.zeros_like(es)
            elif p.div == _RKL:
                D, S = G[:, 3] / es - es.log() + et.log(), torch.zeros_like(es)
            else:
                D, S = part[:, 0], part[:, 1]
            extra = lse_t
        else:
            uk = G[:, 7:]
            D, S, extra = _topk_rows(p, uk, lse_s, lps.to(G.dtype))
            D = torch.where(G[:, 6] == uk.shape[1], D, torch.full_like(D, math.nan))  # an id no rank holds
        if lab is not None:
            ok &= lab != p.ignore_index
        if mask is not None:
            ok &= mask
        ce = torch.zeros_like(es)
        if self.ce:
            lse1 = A[:, 2] + G[:, 2].log()
            st[:, _LSE1] = lse1
            ce = torch.where(G[:, 5] == 1, lse1 - G[:, 4], torch.full_like(es, math.nan))  # label out of range
            ce = torch.where(lab == p.ignore_index, torch.zeros_like(ce), ce)
        D = torch.where(ok, D, torch.zeros_like(D)).clamp_min(0)
        kd = (1 - p.alpha) * p.t2 * D if p.alpha < 1 else torch.zeros_like(D)
        loss = kd + p.alpha * ce
        if w is not None:
            loss = loss * w.to(loss.dtype)
        st[:, _LSE_S], st[:, _EXTRA], st[:, _D], st[:, _S] = lse_s, extra, D, S
        st[:, _CONTRIB] = torch.where(ok, loss, torch.zeros_like(loss))
        st[:, _CE], st[:, _VALID] = ce, ok.to(st.dtype)
        return st, uk

    # ---------------------------------------------------------------- gradient (no communication)
    def grad(self, zs_raw, teacher, lab, w, st, uk, rowscale):
        """∂loss/∂(raw student logits) of a block of rows of the shard, times ``rowscale`` ([n, 1] or a
        scalar tensor: the reduction factor and the upstream gradient). In the accumulation dtype."""
        p, sh = self.p, self.sh
        acc = p.accum_dtype
        z = transform(p, zs_raw.to(acc))
        us = z / p.temperature if p.temperature != 1.0 else z
        lq = us - st[:, _LSE_S : _LSE_S + 1]
        q = lq.exp()
        if not self.dense:
            du = _topk_du(p, sh, q, st, uk, teacher[0], teacher[1].to(acc))
        else:
            ut = transform(p, teacher.to(acc)) / p.teacher_temperature
            lp = ut - st[:, _EXTRA : _EXTRA + 1]
            if p.div == _FKL:
                du = q - lp.exp()
            elif p.div == _RKL:
                du = torch.where(q > 0, q * (lq - lp - st[:, _D : _D + 1]), torch.zeros_like(q))
            else:
                _, g = bucket_div(p, lq, lp)
                du = q * (g - st[:, _S : _S + 1])
        gz = (1 - p.alpha) * p.t2 / p.temperature * du
        if self.ce:
            gz = gz + p.alpha * (z - st[:, _LSE1 : _LSE1 + 1]).exp()
            loc = lab - sh.start
            own = (lab != p.ignore_index) & (loc >= 0) & (loc < sh.Vr)
            if sh.Vr:
                gz.scatter_add_(1, loc.clamp(0, sh.Vr - 1)[:, None], (own.to(acc) * -p.alpha)[:, None])
        if w is not None:
            gz = gz * w.to(acc)[:, None]
        valid = st[:, _VALID : _VALID + 1]
        gz = torch.where(valid > 0, gz * (valid * rowscale), torch.zeros_like(gz))
        if p.softcap > 0:
            th = z / p.softcap
            gz = gz * (1 - th * th)
        if p.logit_scale != 1.0:
            gz = gz * p.logit_scale
        return gz


def _topk_rows(p: KDPlan, uk, lse_s, lps):
    """(D, S, extra) per row of a top-k teacher from the student's tempered logits at the ids (docs/kd_ops.md):
    extra is g_tail (tail_bucket), Σ p (zero_tail) or the student's logsumexp over the k (renorm)."""
    if p.topk == _TOPK_RENORM:
        lse_k = torch.logsumexp(uk, 1)
        lq, lp = uk - lse_k[:, None], torch.log_softmax(lps / p.teacher_temperature, 1)
        D, g = bucket_div(p, lq, lp)
        return D, (lq.exp() * g).sum(1), lse_k
    lqk = uk - _safe(lse_s)[:, None]
    if p.topk == _TOPK_ZERO:
        return _xlogy(lps.exp(), lps - lqk).sum(1), torch.zeros_like(lse_s), lps.exp().sum(1)
    q_tail = (1 - lqk.exp().sum(1)).clamp_min(0)
    p_tail = (1 - lps.exp().sum(1)).clamp_min(0)
    lq = torch.cat([lqk, q_tail.log()[:, None]], 1)
    lp = torch.cat([lps, p_tail.log()[:, None]], 1)
    D, g = bucket_div(p, lq, lp)
    return D, (lq.exp() * g).sum(1), g[:, -1]


def _topk_du(p: KDPlan, sh: _Shard, q, st, uk, ids, lps):
    """∂D/∂u_s on the shard's columns for a top-k teacher: a dense part, and the values at the ids this
    rank holds (written through a padded buffer whose last column absorbs the ids of other ranks)."""
    n, Vr = q.shape
    S, extra = st[:, _S : _S + 1], st[:, _EXTRA : _EXTRA + 1]
    loc = ids.long() - sh.start
    idx = torch.where((loc >= 0) & (loc < Vr), loc, torch.full_like(loc, Vr))
    buf = q.new_empty((n, Vr + 1))
    if p.topk == _TOPK_ZERO:
        buf[:, :Vr] = extra * q
        buf[:, Vr] = 0
        buf.scatter_add_(1, idx, -lps.exp())
        return buf[:, :Vr]
    if p.topk == _TOPK_RENORM:
        lqk = uk - extra
        _, g = bucket_div(p, lqk, torch.log_softmax(lps / p.teacher_temperature, 1))
        buf.zero_()
        buf.scatter_(1, idx, lqk.exp() * (g - S))
        return buf[:, :Vr]
    lqk = uk - _safe(st[:, _LSE_S : _LSE_S + 1])
    _, g = bucket_div(p, lqk, lps)  # g at the ids (elementwise in (q_b, p_b))
    buf[:, :Vr] = q * (extra - S)
    buf.scatter_(1, idx, lqk.exp() * (g - S))
    return buf[:, :Vr]


def _reduce(p: KDPlan, st, V):
    """(loss, factor) as kd_loss reduces: batchmean / sum / mean over the valid rows (or num_items)."""
    valid, contrib = st[:, _VALID], st[:, _CONTRIB]
    n = torch.full((), p.num_items, dtype=st.dtype, device=st.device) if p.num_items > 0 else valid.sum()
    if p.red == 0:
        factor = torch.where(n > 0, 1.0 / n.clamp_min(1e-30), torch.zeros_like(n))
    elif p.red == 2:
        factor = torch.where(n > 0, 1.0 / (n.clamp_min(1e-30) * V), torch.zeros_like(n))
    else:
        factor = torch.ones_like(n)
    return contrib.sum() * factor, factor


# ----------------------------------------------------------------------------- the unfused loss
def _forward(run: _Run, s, t, ids, labels, mask, weights):
    """All rows: stage A in chunks, collectives 1 + 2 over all rows, stage B + collective 3 (3-pass
    divergences). ``t``: the teacher shard, or the top-k log-probs with ``ids``. Returns (st, uk, V)."""
    N, Vr = s.shape
    acc = run.p.accum_dtype
    mx = torch.empty((N, 3), dtype=acc, device=s.device)
    sm = torch.empty((N, run.nsum), dtype=acc, device=s.device)
    for sl in _chunks(N, Vr):
        tb = t[sl] if run.dense else (ids[sl], t[sl])
        mx[sl], sm[sl] = run.stage_a(s[sl], tb, labels[sl] if labels is not None else None)
    A, G, V = run.collect(mx, sm)
    part = None
    if run.three:
        part = torch.empty((N, 2), dtype=acc, device=s.device)
        lse_s, lse_t = A[:, 0] + G[:, 0].log(), A[:, 1] + G[:, 1].log()
        for sl in _chunks(N, Vr):
            part[sl] = run.stage_b(s[sl], t[sl], lse_s[sl], lse_t[sl])
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=run.sh.group)
    st, uk = run.finish(A, G, part, None if run.dense else t, labels, mask, weights)
    return st, uk, V


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, s, t, ids, labels, mask, weights):
        st, uk, V = _forward(run, s, t, ids, labels, mask, weights)
        loss, factor = _reduce(run.p, st, V)
        ctx.run = run
        ctx.save_for_backward(s, t, ids, labels, weights, st, uk, factor)
        ctx.set_materialize_grads(False)
        return st[:, _CONTRIB].clone() if run.p.red == 3 else loss

    @staticmethod
    def backward(ctx, g):
        if g is None:
            return (None,) * 7
        s, t, ids, labels, weights, st, uk, factor = ctx.saved_tensors
        run = ctx.run
        acc = run.p.accum_dtype
        out = torch.empty_like(s)
        go = g.reshape(-1).to(acc)
        for sl in _chunks(*s.shape):
            rowscale = factor * (go[sl][:, None] if go.numel() > 1 else go)
            teacher = t[sl] if run.dense else (ids[sl], t[sl])
            out[sl] = run.grad(s[sl], teacher, labels[sl] if labels is not None else None,
                               weights[sl] if weights is not None else None, st[sl],
                               uk[sl] if uk is not None else None, rowscale).to(out.dtype)
        return None, out, None, None, None, None, None


# ----------------------------------------------------------------------------- argument checks
def _rows(name, v, lead, N, device, dtypes, kind):
    if v is None:
        return None
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor of shape {tuple(lead)} or None, got {type(v).__name__}")
    if v.device != device:
        raise ValueError(f"{name}: expected device {device} (the device of the student), got {v.device}")
    if v.shape != lead and v.shape != (N,):
        raise ValueError(f"{name}: expected shape {tuple(lead)} (the student's leading dims), got {tuple(v.shape)}")
    if v.dtype not in dtypes:
        raise TypeError(f"{name}: expected {kind}, got {v.dtype}")
    return v.reshape(N).contiguous()


def _teacher_args(lead, N, device, teacher_logits, teacher_topk, topk_semantics, Vr, tname):
    """(t2 [N, V_r] or logprobs [N, k], ids [N, k] or None, topk code, k)."""
    check_choice("topk_semantics", topk_semantics, tuple(TOPK_SEMANTICS))
    if teacher_topk is None and teacher_logits is None:  # fused linear: teacher logits from its hidden states
        return None, None, 0, 0
    if teacher_topk is None:
        t = teacher_logits
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{tname}: expected a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != device:
            raise ValueError(f"{tname}: expected device {device} (the device of the student), got {t.device}")
        if t.shape[:-1] != lead or t.shape[-1] != Vr:
            raise ValueError(f"{tname}: expected shape {(*lead, Vr)} (the student shard's: the same rows and the "
                             f"same vocab slice), got {tuple(t.shape)}")
        t2 = t.reshape(N, Vr)
        return (t2 if t2.stride(-1) == 1 else t2.contiguous()), None, 0, 0
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk: expected a pair (ids, logprobs)")
    ids, lps = teacher_topk
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_topk ids: expected an int64/int32 tensor, got {getattr(ids, 'dtype', ids)}")
    if not isinstance(lps, torch.Tensor) or lps.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"teacher_topk logprobs: expected a floating tensor, got {getattr(lps, 'dtype', lps)}")
    for nm, v in (("teacher_topk ids", ids), ("teacher_topk logprobs", lps)):
        if v.device != device:
            raise ValueError(f"{nm}: expected device {device} (the device of the student), got {v.device}")
        if v.dim() < 1 or v.shape[:-1] != lead:
            raise ValueError(f"{nm}: expected leading dims {tuple(lead)} (the student's), got {tuple(v.shape)}")
    if ids.shape != lps.shape:
        raise ValueError(f"teacher_topk: ids {tuple(ids.shape)} and logprobs {tuple(lps.shape)} differ in shape")
    k = ids.shape[-1]
    return lps.reshape(N, k).contiguous(), ids.reshape(N, k).contiguous(), TOPK_SEMANTICS[topk_semantics], k


def _common(student, lead_of, N, Vr, teacher_logits, teacher_topk, topk_semantics, labels, mask, weights, group,
            vocab_start, tname, **opts):
    device = student.device
    t2, ids, topk, k = _teacher_args(lead_of, N, device, teacher_logits, teacher_topk, topk_semantics, Vr, tname)
    labels2 = _rows("labels", labels, lead_of, N, device, (torch.int64, torch.int32), "int64 / int32 labels")
    mask2 = _rows("mask", mask, lead_of, N, device, (torch.bool,), "a bool mask")
    w2 = _rows("weights", weights, lead_of, N, device, _FLOAT_DTYPES, "a floating dtype")
    p = make_plan(topk=topk, has_labels=labels2 is not None, **opts)
    sh = _Shard(group, vocab_start, Vr, device)
    return _Run(p, sh, labels2, ids, k), t2, ids, labels2, mask2, w2


# ----------------------------------------------------------------------------- public API
@torch.compiler.disable  # collectives and host-side layout checks: always eager
def vocab_parallel_kd_loss(
    student_logits_shard: torch.Tensor,
    teacher_logits_shard: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
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
    accum_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``fastdistill.kd_loss`` on vocab-sharded logits (tensor parallelism): every rank of ``group`` holds
    the same rows and the vocab slice ``[vocab_start, vocab_start + V_r)`` of both models.

    ``student_logits_shard`` / ``teacher_logits_shard``: ``[N, V_r]`` or ``[B, T, V_r]``, sliced the same
    way. ``vocab_start``: this rank's first vocab id (None: equal shards, ``rank * V_r``). ``labels`` and
    top-k ids (``teacher_topk=(ids, logprobs)``, ``[..., k]``) are *global* vocab ids and the same on every
    rank, as are ``mask`` / ``weights``. Every other option is ``kd_loss``'s (docs/kd_ops.md). The result
    (identical on all ranks) and the gradient of the student shard equal ``kd_loss`` on the gathered
    logits. Two all_reduces per call (three for jsd / skl / srkl / tvd); the backward communicates nothing.

    Example::

        loss = vocab_parallel_kd_loss(student_logits_shard, teacher_logits_shard, group=tp_group,
                                      divergence="jsd", temperature=2.0, t2_scale=True, labels=labels)
    """
    s = student_logits_shard
    if not isinstance(s, torch.Tensor) or s.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"student_logits_shard: expected a floating tensor, got {getattr(s, 'dtype', type(s))}")
    if s.dim() < 2:
        raise ValueError(f"student_logits_shard: expected shape [N, V_r] or [B, T, V_r], got {tuple(s.shape)}")
    if (teacher_logits_shard is None) == (teacher_topk is None):
        raise ValueError("teacher_logits_shard / teacher_topk: give exactly one of them")
    lead, Vr = s.shape[:-1], s.shape[-1]
    N = int(torch.Size(lead).numel())
    run, t2, ids, labels2, mask2, w2 = _common(
        s, lead, N, Vr, teacher_logits_shard, teacher_topk, topk_semantics, labels, mask, weights, group,
        vocab_start, "teacher_logits_shard", divergence=divergence, beta=beta, skew=skew, temperature=temperature,
        teacher_temperature=teacher_temperature, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
        num_items=num_items, hard_label_alpha=hard_label_alpha, softcap=softcap, logit_scale=logit_scale,
        accum_dtype=accum_dtype)
    s2 = s.reshape(N, Vr)
    if s2.stride(-1) != 1:
        s2 = s2.contiguous()
    out = _VocabParallelKD.apply(run, s2, t2, ids, labels2, mask2, w2)
    return out.view(lead) if run.p.red == 3 else out


@torch.compiler.disable  # collectives and host-side layout checks: always eager
def vocab_parallel_topk(
    teacher_logits_shard: torch.Tensor,
    k: int,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global top-k of a vocab-sharded teacher, for offline top-k targets (``teacher_topk=``).

    ``teacher_logits_shard``: ``[..., V_r]``. Returns ``(ids, logprobs)``, each ``[..., k]``, identical on
    every rank: the global vocab ids of the k largest logits (descending) and
    ``log_softmax(z / temperature)`` at them, normalised with the global logsumexp (fp32; fp64 for fp64
    logits). One all_gather of each rank's local top-k, its logsumexp and its shard bounds."""
    z = teacher_logits_shard
    if not isinstance(z, torch.Tensor) or z.dtype not in _FLOAT_DTYPES or z.dim() < 1:
        raise TypeError(f"teacher_logits_shard: expected a floating tensor [..., V_r], got {getattr(z, 'dtype', z)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    lead, Vr = z.shape[:-1], z.shape[-1]
    N = int(torch.Size(lead).numel())
    sh = _Shard(group, vocab_start, Vr, z.device)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    z2 = z.reshape(N, Vr)
    kl = min(k, Vr)
    pack = torch.full((N + 1, 2 * k + 1), _NEG_INF, dtype=torch.float64, device=z.device)
    pack[N, :2] = torch.tensor([sh.start, sh.start + Vr], dtype=torch.float64)
    for sl in _chunks(N, Vr):
        u = z2[sl].to(acc) / float(temperature)
        if kl:
            v, i = u.topk(kl, 1)
            pack[sl, :kl], pack[sl, k : k + kl] = v.double(), (i + sh.start).double()
        pack[sl, 2 * k] = torch.logsumexp(u, 1).double() if Vr else _NEG_INF
    parts = [torch.empty_like(pack) for _ in range(sh.world)]
    dist.all_gather(parts, pack, group=sh.group)
    allp = torch.stack(parts, 1)  # [N + 1, W, 2k + 1]
    sh.check(allp[N, :, :2])
    if k > sh.V:
        raise ValueError(f"k: {k} exceeds the global vocabulary {sh.V}")
    vals = allp[:N, :, :k].reshape(N, -1)
    gids = allp[:N, :, k : 2 * k].reshape(N, -1)
    lse = torch.logsumexp(allp[:N, :, 2 * k], 1)
    top, pos = vals.topk(k, 1)
    ids = gids.gather(1, pos).long()
    lps = (top - lse[:, None]).to(acc)
    return ids.view(*lead, k), lps.view(*lead, k)




# ----------------------------------------------------------------------------- fused linear (lm_head shard)
_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=torch.float32) works here (probed on first use)


def _mm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """a @ b with an ``acc`` result. Low-precision CUDA operands: fp32 output straight from the GEMM
    (never rounded to bf16/fp16 first); otherwise both operands are upcast."""
    lp = (torch.bfloat16, torch.float16)
    if a.is_cuda and acc == torch.float32 and b.dtype in lp and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a.to(b.dtype), b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[0] = False
    return a.to(acc) @ b.to(acc)


class _Linear:
    """Per-chunk logits of one model from its hidden states and weight shard (or a given logits shard)."""

    def __init__(self, h, W, b, acc):
        self.h, self.acc, self.b = h, acc, b
        self.fast = h.is_cuda and acc == torch.float32 and W.dtype in (torch.bfloat16, torch.float16) \
            and h.dtype == W.dtype
        self.W = W if self.fast else W.to(acc)  # on the CPU (or fp32/fp64 weights): upcast once
        self.Wt = self.W.t()

    def logits(self, sl):
        z = _mm(self.h[sl] if self.fast else self.h[sl].to(self.acc), self.Wt, self.acc)
        return z + self.b.to(self.acc) if self.b is not None else z


class _VocabParallelFusedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, cfg, h, W, b, th, tW, tb, t, ids, labels, mask, weights):
        with torch.autocast(h.device.type, enabled=False):  # the GEMMs choose their own precision
            return _VocabParallelFusedLinear._forward(ctx, run, cfg, h, W, b, th, tW, tb, t, ids, labels, mask,
                                                      weights)

    @staticmethod
    def _forward(ctx, run, cfg, h, W, b, th, tW, tb, t, ids, labels, mask, weights):
        p, sh = run.p, run.sh
        acc = p.accum_dtype
        N, Vr = h.shape[0], W.shape[0]
        stu = _Linear(h, W, b, acc)
        tea = _Linear(th, tW, tb, acc) if th is not None else None
        need = [cfg["grad_on"] and ctx.needs_input_grad[i] for i in (2, 3, 4)]
        eager = any(need) and p.red != 3  # gradient in the forward: no teacher recompute in the backward
        dh = torch.zeros(h.shape, dtype=acc, device=h.device) if eager and need[0] else None
        dW = torch.zeros(W.shape, dtype=acc, device=W.device) if eager and need[1] else None
        db = torch.zeros(Vr, dtype=acc, device=W.device) if eager and need[2] else None
        st = torch.empty((N, 8), dtype=acc, device=h.device)
        uk = torch.empty((N, run.k), dtype=acc, device=h.device) if not run.dense else None
        V = torch.ones((), dtype=acc, device=h.device)
        for sl in _rows_chunks(N, cfg["rows"]):
            zs = stu.logits(sl)
            tb_ = (tea.logits(sl) if tea is not None else t[sl]) if run.dense else (ids[sl], t[sl])
            lab = labels[sl] if labels is not None else None
            mx, sm = run.stage_a(zs, tb_, lab)
            A, G, V = run.collect(mx, sm)
            part = None
            if run.three:
                part = run.stage_b(zs, tb_, A[:, 0] + G[:, 0].log(), A[:, 1] + G[:, 1].log())
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=sh.group)
            st[sl], u = run.finish(A, G, part, None if run.dense else t[sl], lab,
                                   mask[sl] if mask is not None else None, weights[sl] if weights is not None else None)
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
            ctx.save_for_backward(h, W, b, th, tW, tb, t, ids, labels, weights, st, uk, factor)
        return st[:, _CONTRIB].clone() if p.red == 3 else loss

    @staticmethod
    def backward(ctx, go):
        if go is None:
            return (None,) * 13
        with torch.autocast(go.device.type, enabled=False):
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
            h, W, b, th, tW, tb, t, ids, labels, weights, st, uk, factor = ctx.saved_tensors
            need = ctx.needs_input_grad[2:5]
            out = [torch.zeros(x.shape, dtype=acc, device=x.device) if x is not None and n else None
                   for x, n in zip((h, W, b), need)]
            stu = _Linear(h, W, b, acc)
            tea = _Linear(th, tW, tb, acc) if th is not None else None
            gor = go.reshape(-1).to(acc)
            for sl in _rows_chunks(h.shape[0], cfg["rows"]):
                zs = stu.logits(sl)
                tb_ = (tea.logits(sl) if tea is not None else t[sl]) if run.dense else (ids[sl], t[sl])
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
    rows = max(1, FUSED_CHUNK_ELEMS // max(Vr, H, 1))
    rows = 1 << (rows.bit_length() - 1)  # a power of two: the same on every rank for equal shards
    if sh.given and sh.world > 1:  # shard widths may differ: the ranks must agree on the number of chunks
        t = torch.tensor([float(rows)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=sh.group)
        rows = int(t.item())  # one host sync; pass an int chunk_size to avoid it
    return max(1, min(rows, N))


@torch.compiler.disable  # collectives and host-side layout checks: always eager
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
    accum_dtype: torch.dtype = torch.float32,
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
    ``FUSED_CHUNK_ELEMS`` logits). Every other option is ``kd_loss``'s.

    Example::

        loss = vocab_parallel_fused_linear_kd_loss(h, lm_head_shard.weight, h_teacher, t_lm_head_shard.weight,
                                                   group=tp_group, divergence="fkl", temperature=2.0)
    """
    h, W = student_hidden, student_weight_shard
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
        h, lead, N, Vr, teacher_logits_shard, teacher_topk, topk_semantics, labels, mask, weights, group,
        vocab_start, "teacher_logits_shard", divergence=divergence, beta=beta, skew=skew, temperature=temperature,
        teacher_temperature=teacher_temperature, t2_scale=t2_scale, ignore_index=ignore_index, reduction=reduction,
        num_items=num_items, hard_label_alpha=hard_label_alpha, softcap=softcap, logit_scale=logit_scale,
        accum_dtype=accum_dtype)
    if chunk_size == "auto":
        rows = _auto_rows(run.sh, N, Vr, H, h.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected 'auto' or a positive int (the same on every rank), got {chunk_size!r}")
    else:
        rows = chunk_size
    cfg = {"rows": rows, "reduce_hidden_grad": bool(reduce_hidden_grad),
           "grad_on": torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                                      for x in (h, W, student_bias_shard))}
    h2 = h.reshape(N, H)
    out = _VocabParallelFusedLinear.apply(run, cfg, h2, W, student_bias_shard, th2, tW, teacher_bias_shard, t2, ids,
                                          labels2, mask2, w2)
    return out.view(lead) if run.p.red == 3 else out
