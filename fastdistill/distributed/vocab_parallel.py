"""Vocab-parallel (tensor-parallel) knowledge distillation on torch.distributed process groups.

Every rank of ``group`` holds the same rows (tokens) and a contiguous slice ``[start, start + V_r)``
of the vocabulary, student and teacher sliced the same way (Megatron's vocab-parallel lm_head).
The loss and the student-shard gradients equal ``fastdistill.kd_loss`` on the gathered logits, with
every option of docs/kd_ops.md. Semantics, communication and memory: docs/vocab_parallel_kd.md.

Communication per call (the rows' statistics stacked into one tensor per collective):
1. all_reduce MAX: the per-row maxima of both models (+ the untempered student for the CE term; a
   tail_bucket top-k teacher: the student's maximum off the ids in the teacher's column), with every rank's
   shard layout ``(start, end, vocab_start given)`` and a fingerprint of its options
   piggybacked (no extra collective);
2. all_reduce SUM: the sum-exps rescaled to the global maxima, forward/reverse KL's partial sums,
   the label's logit (held by one rank) and, for top-k teachers, the student's logits at the k ids;
3. jsd / skl / srkl / tvd only: all_reduce SUM of the partial divergence and ``Σ q·g``.
The backward needs no communication (the reduced per-row statistics are saved).

Every decision that changes which collectives run, or whether a call raises after collective 1, is taken
from the gathered layout or from values that every rank shares, never from a rank's own arguments alone.
Options that differ between ranks (a temperature, a divergence, a mask given or not) raise on every rank where the
layout is checked on the host, naming the option and each rank's value; on the device path they give NaN
(``_device_ok``). What changes collective 1's size or dtype (the rows, the accumulation dtype) cannot be compared.
The fused-linear variant lives in ``vocab_parallel_fused.py`` and is re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math

import torch
import torch.distributed as dist

from fastdistill.ops._common import (
    as_rows,
    check_choice,
    count_option,
    eager_only,
    first_order,
    int_option,
    n_rows,
    refuse_transforms,
    resolve_accum,
    row_chunk,
    row_view,
    save_constants,
    saved_constants,
)
from fastdistill.ops.kd_softmax import (
    DIVERGENCES,
    REDUCTIONS,
    TOPK_SEMANTICS,
    KDPlan,
    check_row_args,
    make_plan,
    positive_option,
)
from fastdistill.reference.kd_softmax import (
    bucket_div,
    chain,
    hi_lo,
    kd_du,
    lse_split,
    q_minus_p,
    tail_qg,
    tail_state,
    transform,
    tvd_terms,
    xlogy,
)

# vocab_parallel_fused_linear_kd_loss: served by __getattr__ below (from vocab_parallel_fused)
__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_fused_linear_kd_loss", "vocab_parallel_topk"]  # noqa: F822

CHUNK_ELEMS = 1 << 22  # rows per chunk of the unfused loss: at most this many logits of a shard at a time
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NEG_INF = float("-inf")
_FKL, _RKL = 0, 1
_TOPK_TAIL, _TOPK_ZERO, _TOPK_RENORM = 1, 2, 3
# st columns (per row, saved for the backward), as in fastdistill.reference.kd_softmax: the student's logsumexp
# (hi word), the extra scalar (dense: the teacher's logsumexp, hi word; top-k: tail_state / Σ p / the student's
# logsumexp over the k ids), lse of the untempered student, D, S = Σ q·g, contrib, ce, valid, and the low words of
# the student's logsumexp and of the extra column where it is a logsumexp (dense, renorm; else 0); the global
# shifts and sum-exps of the student and (dense) the teacher, from which dense fkl / rkl form their probabilities
_LSE_S, _EXTRA, _LSE1, _D, _S, _CONTRIB, _CE, _VALID, _LO_S, _LO_X, _M_S, _E_S, _LO1 = range(13)
NSTATE = 13
# Groups whose layout passed the host check, keyed on what every member shares: (the group's global ranks,
# device type). Hit or miss is then the same on every rank; later calls check the layout on the device.
_LAYOUTS: set = set()
_HOST_CHECK_ALWAYS = ("cpu",)  # device types checked on the host at every call (no synchronisation there)
_EXPORTS_FUSED = ("vocab_parallel_fused_linear_kd_loss", "FUSED_CHUNK_ELEMS")
LAYOUT_COLS = 5  # per rank: start, end, vocab_start given, the options' fingerprint (two 24-bit words: exact in fp32)


def __getattr__(name: str):
    """The fused-linear variant, re-exported lazily (its module imports this one)."""
    if name in _EXPORTS_FUSED:
        from fastdistill.distributed import vocab_parallel_fused

        return getattr(vocab_parallel_fused, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- layout of the group
class _Shard:
    """This rank's place in the group: rank, world, first vocab id, shard width; the global V once checked."""

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
                try:  # a numpy or one-element tensor integer
                    vocab_start = int_option("vocab_start", vocab_start)
                except TypeError:
                    raise TypeError(f"vocab_start: expected an int (this rank's first vocab id) or None, "
                                    f"got {type(vocab_start).__name__}") from None
            if vocab_start < 0:
                raise ValueError(f"vocab_start: expected >= 0, got {vocab_start}")
        self.start = int(vocab_start) if self.given else rank * Vr
        self.device = device
        self.V: int | None = None  # global vocabulary, from the gathered layout (None: checked on the device)
        self.on_device = False  # the host check was skipped (cached group): _device_ok() guards the call
        pg = group if group is not None else dist.group.WORLD
        self.key = (tuple(dist.get_process_group_ranks(pg)), device.type)
        self.options: dict = {}
        self.fingerprint = (0.0, 0.0)

    def set_options(self, op: str, **options) -> None:
        """What must be the same on every rank of the group (the call's options, its rows, which per-row
        arguments are given), as normalised values. Its fingerprint travels with the layout."""
        self.options = {"op": op, **options}
        digest = hashlib.blake2b(repr(sorted(self.options.items())).encode(), digest_size=6).digest()
        h = int.from_bytes(digest, "big")
        self.fingerprint = (float(h >> 24), float(h & 0xFFFFFF))

    def fill_row(self, row: torch.Tensor) -> None:
        """Write this rank's LAYOUT_COLS entries (start, end, given, fingerprint) into ``row``. Scalar fills: no
        host-to-device copy."""
        row[0], row[1], row[2] = float(self.start), float(self.start + self.Vr), float(self.given)
        row[3], row[4] = self.fingerprint

    def fill_layout(self, lay: torch.Tensor) -> None:
        """Fill ``lay`` [world, LAYOUT_COLS] with this rank's row and −inf elsewhere (for a MAX all_reduce)."""
        lay.fill_(_NEG_INF)
        self.fill_row(lay[self.rank])

    def check(self, lay: torch.Tensor) -> None:
        """Check the gathered layout [world, LAYOUT_COLS] on the host: at every call on CPU tensors (free), once
        per group on a GPU (one host sync); later calls on a GPU set ``on_device`` instead (see ``_device_ok``).
        Every rank sees the same ``lay`` and the same cache state, so all raise together or none does."""
        if self.device.type not in _HOST_CHECK_ALWAYS and self.key in _LAYOUTS:
            self.on_device = True
            return
        rows = lay.cpu().tolist()
        if len({(r[3], r[4]) for r in rows}) > 1:
            self._options_differ()
        spans = [(int(a), int(b)) for a, b, *_ in rows]
        pos = 0
        for a, b in sorted(spans):
            if a != pos:
                widths = [b - a for a, b in spans]
                nones = [r for r, row in enumerate(rows) if row[2] <= 0]
                if nones and len(set(widths)) > 1:
                    raise ValueError(
                        f"vocab_start: None means equal shards (start = rank * V_r) over the group of size "
                        f"{self.world}, but the ranks hold shard widths {widths} and ranks {nones} passed None, so "
                        f"the shards {spans} do not tile [0, V): pass each rank's vocab_start")
                raise ValueError(f"vocab_start: the shards [start, end) of the group's ranks {spans} do not tile "
                                 f"[0, V) contiguously (a gap or an overlap at vocab id {min(a, pos)})")
            pos = b
        self.V = pos
        if self.device.type not in _HOST_CHECK_ALWAYS:
            _LAYOUTS.add(self.key)

    def _options_differ(self) -> None:
        """The fingerprints differ: every rank sees that in the same gathered layout, so all of them gather the
        options (one more collective, on this error path only) and raise the same error naming what differs."""
        every = [None] * self.world
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            dist.all_gather_object(every, self.options, group=self.group)  # (NCCL: on this rank's device)
        keys = list(dict.fromkeys(k for o in every for k in o))  # in the order of the arguments
        diff = [k for k in keys if len({repr(o.get(k)) for o in every}) > 1]
        what = "; ".join(f"{k} (" + ", ".join(f"rank {r}: {o.get(k)!r}" for r, o in enumerate(every)) + ")"
                         for k in diff)
        raise ValueError(f"{', '.join(diff) or 'options'}: the ranks of the group called {self.options['op']} with "
                         f"different arguments: {what or 'fingerprints differ'}. Every rank of the group must pass "
                         "the same options, the same rows and the same per-row arguments (only the shards differ)")


def _device_ok(lay: torch.Tensor, k: int = 0) -> torch.Tensor:
    """On the device, no host sync: whether the shards of the gathered layout (rows ``(start, end, given,
    fingerprint)``) tile [0, V) contiguously, in (start, end) order as the host check, k <= V, and every rank
    passed the same options (equal fingerprints). A bool scalar tensor."""
    same = (lay[:, 3:LAYOUT_COLS] == lay[:1, 3:LAYOUT_COLS]).all()
    a, b = lay[:, 0], lay[:, 1]
    o = b.argsort(stable=True)
    o = o[a[o].argsort(stable=True)]  # lexicographic (start, end)
    a, b = a[o], b[o]
    return same & (a[0] == 0) & (a[1:] == b[:-1]).all() & (b[-1] >= k)


def _poison(ok: torch.Tensor, dtype) -> torch.Tensor:
    """0 where ``ok``, NaN where not (added to the statistics of a call whose layout is invalid)."""
    return torch.where(ok, 0.0, math.nan).to(dtype)


def _rowmax(x: torch.Tensor) -> torch.Tensor:
    return x.amax(1) if x.shape[1] else x.new_full((x.shape[0],), _NEG_INF)


def _safe(m: torch.Tensor) -> torch.Tensor:
    """A finite shift for exp(x − m): 0 where the row is all −inf."""
    return torch.where(m == _NEG_INF, torch.zeros_like(m), m)


def _split(A: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A row logsumexp from its global shift A (finite) and the sum-exp s relative to it, as hi + lo =
    A + log s (``hi_lo``, as ``lse_split``); lo = 0 where that is not finite (s = 0: an all −inf row).
    Log-probs are then (u − hi) − lo: hi alone is rounded at |A| (an error of ulp(A) in every log-prob, which
    the cancellation q − p of a teacher close to the student magnifies)."""
    return hi_lo(A, s)


def _logratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(a / b) for sum-exps a, b >= 0: log1p((a − b) / b) where they are within 2x (a − b exact: a teacher close
    to the student, where log a − log b would add two roundings to a small D), else log a − log b (log1p of a
    quotient near −1 would lose the digits)."""
    near = (a <= 2 * b) & (b <= 2 * a)
    return torch.where(near, torch.log1p((a - b) / b), a.log() - b.log())


def _logp(u: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, safe: bool = False) -> torch.Tensor:
    """(u − hi) − lo for [n, m] logits and per-row hi, lo ([n] or [n, 1]); ``safe``: hi = −inf (an all −inf
    row) shifts by 0."""
    if hi.dim() == 1:
        hi, lo = hi[:, None], lo[:, None]
    return (u - (_safe(hi) if safe else hi)) - lo


def _chunks(N: int, Vr: int, elems: int = 0):
    step = max(1, (elems or CHUNK_ELEMS) // max(Vr, 1))
    for r0 in range(0, N, step):
        yield slice(r0, min(N, r0 + step))


# ----------------------------------------------------------------------------- one run (plan + shard)
class _Run:
    """The plan, the shard and the per-call row data that the stages share."""

    def __init__(self, p: KDPlan, sh: _Shard, labels, ids, k: int, mask=None):
        self.p, self.sh, self.labels, self.ids, self.k, self.mask = p, sh, labels, ids, k, mask
        self.ce = labels is not None and p.alpha > 0
        self.dense = p.topk == 0
        self.three = self.dense and p.div not in (_FKL, _RKL)
        self.checked = False
        self.poison: torch.Tensor | None = None  # NaN when the device-side layout check fails (cached groups)
        # SUM columns: es, et (tail_bucket: the student's sum-exp off the ids, relative to its own maximum there),
        # e1, A (dense fkl/rkl), zl, own (label), ownk, uk[k]
        self.nsum = 7 + (k if not self.dense else 0)

    def post_checks(self) -> None:
        """Checks that need the global vocabulary V (all ranks raise together: V is global). Skipped when the
        layout is checked on the device (a GPU after the group's first call): k > V poisons the loss instead."""
        V = self.sh.V
        if V is None:
            return
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
            check_row_args(self.p, self.ids, self.labels, self.mask, None)  # repeated ids (after k <= V)

    # ---------------------------------------------------------------- stage A: local statistics
    def stage_a(self, zs_raw, teacher, lab):
        """One pass over a block of rows of the shard: the local maxima [n, 3] (student, teacher or, for a
        tail_bucket teacher, the student off the ids, untempered student) and the local sums [n, nsum] relative
        to those maxima."""
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
                sm[:, 3] = xlogy(pt, dt - ds).sum(1)
            elif p.div == _RKL:
                sm[:, 3] = xlogy(qs, ds - dt).sum(1)
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
                if p.topk == _TOPK_TAIL:  # the tail mass summed off the ids, never 1 − Σ q (it cancels)
                    idx = torch.where(own, loc, torch.full_like(loc, sh.Vr))  # other ranks' ids: a spare column
                    hit = qs.new_zeros((n, sh.Vr + 1), dtype=torch.bool).scatter_(1, idx, True)[:, : sh.Vr]
                    # relative to its own maximum (the teacher's idle column): relative to the student's, the
                    # sum underflows on a confident row whose tail is below the dtype's range (+inf forward KL)
                    uo = torch.where(hit, torch.full_like(us, _NEG_INF), us)
                    mo = _rowmax(uo)
                    mx[:, 1], sm[:, 1] = mo, (uo - _safe(mo)[:, None]).exp().sum(1)
            sm[:, 6] = own.to(acc).sum(1)
        return mx, sm

    # ---------------------------------------------------------------- collectives 1 + 2
    def collect(self, mx, sm):
        """MAX all_reduce (maxima + layout), rescale the local sums to the global maxima, SUM all_reduce.
        Returns (global maxima shifts [n, 3], global sums [n, nsum]) and V on the device."""
        sh, W = self.sh, self.sh.world
        L = LAYOUT_COLS * W
        flat = torch.empty(L + mx.numel(), dtype=mx.dtype, device=mx.device)
        sh.fill_layout(flat[:L].view(W, LAYOUT_COLS))
        flat[L:] = mx.reshape(-1)
        dist.all_reduce(flat, op=dist.ReduceOp.MAX, group=sh.group)
        lay_g, M = flat[:L].view(W, LAYOUT_COLS), flat[L:].view(mx.shape)
        if not self.checked:
            sh.check(lay_g)
            self.post_checks()
            self.checked = True
        if sh.on_device and self.poison is None:  # the layout of this group was checked on an earlier call
            self.poison = _poison(_device_ok(lay_g, self.k), mx.dtype)
        a, A = _safe(mx), _safe(M)
        r = torch.where(mx == _NEG_INF, torch.zeros_like(mx), torch.exp(a - A))  # local → global shift
        if self.dense and self.p.div in (_FKL, _RKL):
            # Σ w·(d_w − d_o) relative to the local shifts → relative to the global ones
            i, o = (1, 0) if self.p.div == _FKL else (0, 1)
            corr = sm[:, i] * ((a[:, i] - A[:, i]) - (a[:, o] - A[:, o]))
            sm[:, 3] = torch.where(r[:, i] > 0, r[:, i] * (sm[:, 3] + corr), torch.zeros_like(corr))
        sm[:, 0:3] *= r  # (tail_bucket: column 1 is the off-id sum-exp, moved to the global off-id maximum)
        dist.all_reduce(sm, op=dist.ReduceOp.SUM, group=sh.group)
        V = lay_g[:, 1].max()
        if self.poison is not None:  # an invalid layout on a cached group: NaN statistics, on every rank alike
            sm, V = sm + self.poison, V + self.poison
        return A, sm, V

    # ---------------------------------------------------------------- stage B + collective 3
    def stage_b(self, zs_raw, zt_raw, A, G):
        """Partial divergence and Σ q·g over the shard's columns (jsd / skl / srkl / tvd), from the global shifts
        A and sums G of ``collect`` (the log-probs as the backward forms them: (u − hi) − lo)."""
        p = self.p
        acc = p.accum_dtype
        z = transform(p, zs_raw.to(acc))
        us = z / p.temperature if p.temperature != 1.0 else z
        ut = transform(p, zt_raw.to(acc)) / p.teacher_temperature
        (hs, ls), (ht, lt) = _split(A[:, 0], G[:, 0]), _split(A[:, 1], G[:, 1])
        lq, lp = _logp(us, hs, ls, safe=True), _logp(ut, ht, lt, safe=True)
        tvd = tvd_terms(p, ut, _safe(ht)[:, None], lt[:, None], us, _safe(hs)[:, None], ls[:, None])
        D, qg = bucket_div(p, lq, lp, tvd)
        return torch.stack([D, qg.sum(1)], 1)

    # ---------------------------------------------------------------- per-row loss
    def finish(self, A, G, part, lps, lab, mask, w, V):
        """Global per-row statistics st [n, NSTATE] (lse_s, extra, lse1, D, S, contrib, ce, valid, lo_s, lo_x,
        m_s, e_s, lo1) and the student's tempered logits at the top-k ids uk [n, k] (top-k teachers; else
        None). ``V``: the global vocabulary (a tensor, from ``collect``)."""
        p = self.p
        n = G.shape[0]
        st = G.new_zeros((n, NSTATE))
        es, et = G[:, 0], G[:, 1]
        lse_s, lo_s = _split(A[:, 0], es)
        ok = lse_s != _NEG_INF
        uk = None
        lo_x = torch.zeros_like(lo_s)
        if self.dense:
            lse_t, lo_x = _split(A[:, 1], et)
            ok &= lse_t != _NEG_INF
            if p.div == _FKL:
                D, S = G[:, 3] / et + _logratio(es, et), torch.zeros_like(es)
            elif p.div == _RKL:
                D, S = G[:, 3] / es + _logratio(et, es), torch.zeros_like(es)
            else:
                D, S = part[:, 0], part[:, 1]
            extra = lse_t
        else:
            uk = G[:, 7:]
            # log q_tail = logsumexp of the off-id log-probs (u − hi) − lo, as the reference: ((m_off − hi) − lo)
            # + log Σ_off e^{u − m_off}. −inf where no column off the ids has mass (m_off = −inf; renorm and
            # zero_tail leave column 1 at −inf, unused)
            lq_tail = ((A[:, 1] - _safe(lse_s)) - lo_s) + G[:, 1].log()
            D, S, extra, lo_x = _topk_rows(p, uk, lse_s, lo_s, lps.to(G.dtype), lq_tail, V)
            D = torch.where(G[:, 6] == uk.shape[1], D, torch.full_like(D, math.nan))  # an id no rank holds
            if p.topk == _TOPK_RENORM:  # k teacher log-probs all −inf: no teacher distribution (row invalid)
                ok &= ~(lps == _NEG_INF).all(1)  # (not amax > −inf: a NaN log-prob keeps the row valid, NaN)
                ok &= extra != _NEG_INF  # the student −inf at all k ids: none renormalised over them (0/0)
        if lab is not None:
            ok &= lab != p.ignore_index
        if mask is not None:
            ok &= mask
        ce = torch.zeros_like(es)
        if self.ce:
            # CE as (A − z_label) + log G, its gradient e^{(z − hi) − lo}: lse1 = A + log G rounded to one number
            # carries its rounding at |A| into both (a label out of range: NaN)
            st[:, _LSE1], st[:, _LO1] = _split(A[:, 2], G[:, 2])
            ce = torch.where(G[:, 5] == 1, (A[:, 2] - G[:, 4]) + G[:, 2].log(), torch.full_like(es, math.nan))
            ce = torch.where(lab == p.ignore_index, torch.zeros_like(ce), ce)
        D = torch.where(ok, D, torch.zeros_like(D))
        if p.topk != _TOPK_ZERO:  # true divergences, below 0 only by rounding; zero_tail's formula is not one
            D = D.clamp_min(0)
        kd = (1 - p.alpha) * p.t2 * D if p.alpha < 1 else torch.zeros_like(D)
        loss = kd + p.alpha * ce
        if w is not None:  # weight 0 adds exactly nothing, like a masked row (not 0·inf = NaN)
            wr = w.to(loss.dtype)
            loss = torch.where(wr == 0, torch.zeros_like(loss), loss * wr)
        st[:, _LSE_S], st[:, _EXTRA], st[:, _D], st[:, _S] = lse_s, extra, D, S
        st[:, _LO_S], st[:, _LO_X] = lo_s, lo_x
        st[:, _M_S], st[:, _E_S] = A[:, 0], es
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

        def col(i):
            return st[:, i : i + 1]

        if not self.dense:
            lq = _logp(us, col(_LSE_S), col(_LO_S))
            du = _topk_du(p, sh, lq, lq.exp(), st, uk, teacher[0], teacher[1].to(acc))
        else:
            ut = transform(p, teacher.to(acc)) / p.teacher_temperature
            if p.div == _FKL:  # q − p without the cancellation of a teacher close to the student
                du = q_minus_p(ut, col(_EXTRA), col(_LO_X), us, col(_LSE_S), col(_LO_S))
            elif p.div == _RKL:
                # q as softmax forms it, e^{u − m} / Σ e^{u − m}: exp of a log-prob (rounded at |log q|) loses
                # eps·|log q| relative
                q = torch.exp(us - col(_M_S)) / col(_E_S)
                lq, lp = _logp(us, col(_LSE_S), col(_LO_S)), _logp(ut, col(_EXTRA), col(_LO_X))
                D = col(_D)  # 0 on a row whose D is +inf (no finite gradient)
                du = torch.where((q > 0) & (D != math.inf), q * (lq - lp - D), torch.zeros_like(q))
            else:
                lq, lp = _logp(us, col(_LSE_S), col(_LO_S)), _logp(ut, col(_EXTRA), col(_LO_X))
                tvd = tvd_terms(p, ut, col(_EXTRA), col(_LO_X), us, col(_LSE_S), col(_LO_S))
                _, qg = bucket_div(p, lq, lp, tvd)
                du = kd_du(qg, lq.exp() if tvd is None else tvd[1], col(_S))
        # α = 1: no KD term at all (not 0·NaN where D is +inf)
        gz = (1 - p.alpha) * p.t2 / p.temperature * du if p.alpha < 1 else torch.zeros_like(du)
        if self.ce:
            gz = gz + p.alpha * _logp(z, col(_LSE1), col(_LO1)).exp()
            loc = lab - sh.start
            own = (lab != p.ignore_index) & (loc >= 0) & (loc < sh.Vr)
            if sh.Vr:
                gz.scatter_add_(1, loc.clamp(0, sh.Vr - 1)[:, None], (own.to(acc) * -p.alpha)[:, None])
        if w is not None:
            wr = w.to(acc)[:, None]  # weight 0: a zero gradient like a masked row (not 0·NaN)
            gz = torch.where(wr == 0, torch.zeros_like(gz), gz * wr)
        valid = st[:, _VALID : _VALID + 1]
        gz = torch.where(valid > 0, gz * (valid * rowscale), torch.zeros_like(gz))
        return chain(p, zs_raw.to(acc), gz)


def _topk_rows(p: KDPlan, uk, lse_s, lo_s, lps, lq_tail, V):
    """(D, S, extra, lo_x) per row of a top-k teacher from the student's tempered logits at the ids and its log
    tail mass (docs/kd_ops.md): extra is the tail term of the reference's state (tail_bucket), Σ p (zero_tail)
    or the student's logsumexp over the k (renorm; lo_x its low word, else 0). tail_bucket with k == V (the
    ids, unique per row, cover the vocabulary): no tail bucket, p_tail = 0 (not 1 − Σ p, rounding noise)."""
    zero = torch.zeros_like(lse_s)
    if p.topk == _TOPK_RENORM:
        lse_k, lo_k = lse_split(uk)
        ut = lps / p.teacher_temperature
        hi_t, lo_t = lse_split(ut)
        lq, lp = _logp(uk, lse_k, lo_k), _logp(ut, hi_t, lo_t)
        D, qg = bucket_div(p, lq, lp, tvd_terms(p, ut, hi_t[:, None], lo_t[:, None], uk, lse_k[:, None], lo_k[:, None]))
        return D, qg.sum(1), lse_k, lo_k
    lqk = _logp(uk, lse_s, lo_s, safe=True)
    if p.topk == _TOPK_ZERO:
        return xlogy(lps.exp(), lps - lqk).sum(1), zero, lps.exp().sum(1), zero
    p_tail = (1 - lps.exp().sum(1)).clamp_min(0)
    p_tail = torch.where(V == uk.shape[1], zero, p_tail)  # on the device: V is a tensor (no host sync)
    lq = torch.cat([lqk, lq_tail[:, None]], 1)
    lp = torch.cat([lps, p_tail.log()[:, None]], 1)
    tvd = tvd_terms(p, lps, 0.0, 0.0, uk, _safe(lse_s)[:, None], lo_s[:, None])
    if tvd is not None:  # the tail bucket: its log-probs as they are
        tvd = torch.cat([tvd[0], lp[:, -1:] - lq[:, -1:]], 1), torch.cat([tvd[1], lq[:, -1:].exp()], 1)
    D, qg = bucket_div(p, lq, lp, tvd)
    return D, qg.sum(1), tail_state(p, lq_tail, lp[:, -1]), zero


def _topk_du(p: KDPlan, sh: _Shard, lq, q, st, uk, ids, lps):
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
        lo_k = st[:, _LO_X : _LO_X + 1]
        lqk = _logp(uk, extra, lo_k)
        ut = lps / p.teacher_temperature
        hi_t, lo_t = lse_split(ut)
        tvd = tvd_terms(p, ut, hi_t[:, None], lo_t[:, None], uk, extra, lo_k)
        _, qg = bucket_div(p, lqk, _logp(ut, hi_t, lo_t), tvd)
        buf.zero_()
        buf.scatter_(1, idx, kd_du(qg, lqk.exp() if tvd is None else tvd[1], S))
        return buf[:, :Vr]
    buf[:, :Vr] = kd_du(tail_qg(p, lq, q, extra), q, S)  # off the ids
    hs, ls = st[:, _LSE_S : _LSE_S + 1], st[:, _LO_S : _LO_S + 1]
    lqk = _logp(uk, hs, ls, safe=True)
    tvd = tvd_terms(p, lps, 0.0, 0.0, uk, _safe(hs), ls)
    _, qgk = bucket_div(p, lqk, lps, tvd)  # the id buckets (elementwise in (q_b, p_b))
    buf.scatter_(1, idx, kd_du(qgk, lqk.exp() if tvd is None else tvd[1], S))
    return buf[:, :Vr]


def _reduce(p: KDPlan, st, V):
    """(loss, factor) as kd_loss reduces: batchmean / sum / mean over the valid rows (or num_items)."""
    valid, contrib = st[:, _VALID], st[:, _CONTRIB]
    n = torch.full((), p.num_items, dtype=st.dtype, device=st.device) if p.num_items > 0 else valid.sum()
    if p.red == 0:
        factor = torch.where(n > 0, 1.0 / n.clamp_min(1e-30), torch.zeros_like(n))
    elif p.red == 2:  # V = 0 (every shard empty, every row invalid): 0, as kd_loss (not 1/0; a NaN V stays NaN)
        factor = torch.where((n > 0) & (V != 0), 1.0 / (n.clamp_min(1e-30) * V), torch.zeros_like(n))
    else:
        factor = torch.ones_like(n)
    return contrib.sum() * factor, factor


# ----------------------------------------------------------------------------- the unfused loss
def _forward(run: _Run, s, t, ids, labels, mask, weights):
    """All rows: stage A in chunks, collectives 1 + 2 over all rows, stage B + collective 3 (3-pass
    divergences). ``t``: the teacher shard, or the top-k log-probs with ``ids``. Returns (st, uk, V)."""
    N, Vr = n_rows(s), s.shape[-1]
    acc = run.p.accum_dtype
    mx = torch.empty((N, 3), dtype=acc, device=s.device)
    sm = torch.empty((N, run.nsum), dtype=acc, device=s.device)
    for sl in _chunks(N, Vr):
        tb = row_chunk(t, sl) if run.dense else (ids[sl], t[sl])
        mx[sl], sm[sl] = run.stage_a(row_chunk(s, sl), tb, labels[sl] if labels is not None else None)
    A, G, V = run.collect(mx, sm)
    part = None
    if run.three:
        part = torch.empty((N, 2), dtype=acc, device=s.device)
        for sl in _chunks(N, Vr):
            part[sl] = run.stage_b(row_chunk(s, sl), row_chunk(t, sl), A[sl], G[sl])
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=run.sh.group)
    st, uk = run.finish(A, G, part, None if run.dense else t, labels, mask, weights, V)
    return st, uk, V


class _VocabParallelKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, s, t, ids, labels, mask, weights):
        st, uk, V = _forward(run, s, t, ids, labels, mask, weights)
        loss, factor = _reduce(run.p, st, V)
        ctx.run = run
        save_constants(ctx, s, t, ids, labels, weights, st, uk, factor)
        ctx.set_materialize_grads(False)
        return st[:, _CONTRIB].clone() if run.p.red == 3 else loss

    @staticmethod
    @first_order("vocab_parallel_kd_loss")
    def backward(ctx, g):
        if g is None:
            return (None,) * 7
        s, t, ids, labels, weights, st, uk, factor = saved_constants(ctx)
        run = ctx.run
        acc = run.p.accum_dtype
        out = torch.empty(s.shape, dtype=s.dtype, device=s.device)
        o2 = out.view(n_rows(s), s.shape[-1])
        go = g.reshape(-1).to(acc)
        for sl in _chunks(n_rows(s), s.shape[-1]):
            rowscale = factor * (go[sl][:, None] if go.numel() > 1 else go)
            teacher = row_chunk(t, sl) if run.dense else (ids[sl], t[sl])
            o2[sl] = run.grad(row_chunk(s, sl), teacher, labels[sl] if labels is not None else None,
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
        return as_rows(t, N, row_view(t, N) is None), None, 0, 0
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
    if k < 1:
        raise ValueError("teacher_topk: k = 0 (no teacher ids); give at least one id per row")
    return lps.reshape(N, k).contiguous(), ids.reshape(N, k).contiguous(), TOPK_SEMANTICS[topk_semantics], k


def local_args(group, **tensors):
    """The group as a ProcessGroup (a 1-D DeviceMesh gives its group), after checking that no argument is a
    DTensor: these losses take this rank's local shard as a plain tensor (a DTensor failed deep inside, or blamed
    another argument's shape)."""
    try:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor
    except Exception:  # torch without distributed tensors
        DeviceMesh = DTensor = ()
    for name, v in tensors.items():
        if any(isinstance(x, DTensor) for x in (v if isinstance(v, (tuple, list)) else (v,))):
            raise TypeError(f"{name}: got a DTensor; pass this rank's local shard as a plain tensor (.to_local(); "
                            "ColwiseParallel(use_local_output=True) on an lm_head returns plain tensors)")
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(f"group: got a {group.ndim}-D DeviceMesh; pass its tensor-parallel dimension "
                             "(mesh['tp']) or that dimension's process group")
        group = group.get_group()
    return group


def _common(op, student, lead_of, N, Vr, teacher_logits, teacher_topk, topk_semantics, labels, mask, weights, group,
            vocab_start, tname, **opts):
    device = student.device
    t2, ids, topk, k = _teacher_args(lead_of, N, device, teacher_logits, teacher_topk, topk_semantics, Vr, tname)
    labels2 = _rows("labels", labels, lead_of, N, device, (torch.int64, torch.int32), "int64 / int32 labels")
    mask2 = _rows("mask", mask, lead_of, N, device, (torch.bool,), "a bool mask")
    w2 = _rows("weights", weights, lead_of, N, device, _FLOAT_DTYPES, "a floating dtype")
    p = make_plan(topk=topk, has_labels=labels2 is not None, **opts)
    check_row_args(p, None, labels2, mask2, w2)  # weights; the ids in post_checks, once k <= V is known
    sh = _Shard(group, vocab_start, Vr, device)
    sh.set_options(op, **plan_options(p), rows=N, k=k, labels=labels2 is not None, mask=mask2 is not None,
                   weights=w2 is not None)
    return _Run(p, sh, labels2, ids, k, mask2), t2, ids, labels2, mask2, w2


_PLAN_NAMES = {"div": "divergence", "red": "reduction", "fp64": "accum_dtype", "topk": "topk_semantics",
               "alpha": "hard_label_alpha", "t2": "t2_scale (its T² factor)"}
_CODES = {"div": DIVERGENCES, "red": REDUCTIONS, "topk": {"(dense teacher)": 0, **TOPK_SEMANTICS}}


def plan_options(p: KDPlan) -> dict:
    """The plan's options under their argument names, as the values the plan resolved (choices by name; a
    teacher_temperature of None is the temperature; num_items None; −0.0 as 0.0): equal options hash equal."""
    out = {}
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        if f.name in _CODES:
            v = next(name for name, code in _CODES[f.name].items() if code == v)
        elif f.name == "fp64":
            v = str(p.accum_dtype)
        elif f.name == "num_items" and v == 0:
            v = None
        elif isinstance(v, float):
            v = v + 0.0
        out[_PLAN_NAMES.get(f.name, f.name)] = v
    return out


# ----------------------------------------------------------------------------- public API
@eager_only("vocab-parallel KD runs eagerly: collectives and host-side layout checks")
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
    accum_dtype: torch.dtype | None = None,
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
    refuse_transforms("vocab_parallel_kd_loss")
    group = local_args(group, student_logits_shard=student_logits_shard, teacher_logits_shard=teacher_logits_shard,
                       teacher_topk=teacher_topk, labels=labels, mask=mask, weights=weights)
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
        "vocab_parallel_kd_loss", s, lead, N, Vr, teacher_logits_shard, teacher_topk, topk_semantics, labels, mask,
        weights, group, vocab_start, "teacher_logits_shard", divergence=divergence, beta=beta, skew=skew,
        temperature=temperature, teacher_temperature=teacher_temperature, t2_scale=t2_scale, ignore_index=ignore_index,
        reduction=reduction, num_items=num_items, hard_label_alpha=hard_label_alpha, softcap=softcap,
        logit_scale=logit_scale, accum_dtype=resolve_accum(accum_dtype, s))
    out = _VocabParallelKD.apply(run, as_rows(s, N, row_view(s, N) is None), t2, ids, labels2, mask2, w2)
    return out.view(lead) if run.p.red == 3 else out


@eager_only("vocab-parallel KD runs eagerly: collectives and host-side layout checks")
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
    logits). One all_gather of each rank's local top-k, its logsumexp and its shard bounds.

    Ties (``−inf`` logits included) go to any of the tied ids; the ids are always distinct global ids in
    ``[0, V)``. A row whose logits are all ``−inf`` gets ``−inf`` log-probs."""
    group = local_args(group, teacher_logits_shard=teacher_logits_shard)
    z = teacher_logits_shard
    if not isinstance(z, torch.Tensor) or z.dtype not in _FLOAT_DTYPES or z.dim() < 1:
        raise TypeError(f"teacher_logits_shard: expected a floating tensor [..., V_r], got {getattr(z, 'dtype', z)}")
    k = count_option("k", k, "a positive int")
    temperature = positive_option("temperature", temperature)  # as the losses' (its log-probs feed teacher_topk=)
    lead, Vr = z.shape[:-1], z.shape[-1]
    N = int(torch.Size(lead).numel())
    sh = _Shard(group, vocab_start, Vr, z.device)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    sh.set_options("vocab_parallel_topk", k=k, temperature=float(temperature), rows=N, accum_dtype=str(acc))
    z2 = z.reshape(N, Vr)
    kl = min(k, Vr)
    # per row: k values, k global ids (padding: value −inf, id −1), the logsumexp as hi, lo; row N: the layout row
    pack = torch.full((N + 1, max(2 * k + 2, LAYOUT_COLS)), _NEG_INF, dtype=torch.float64, device=z.device)
    pack[:N, k : 2 * k] = -1.0
    sh.fill_row(pack[N])
    for sl in _chunks(N, Vr):
        u = z2[sl].to(acc) / float(temperature)
        if kl:
            v, i = u.topk(kl, 1)
            pack[sl, :kl], pack[sl, k : k + kl] = v.double(), (i + sh.start).double()
        if Vr:  # hi, lo kept apart (their fp64 sum drops lo once |hi| passes ~1e15: finfo.min rows, −1e30)
            hi, lo = lse_split(u)
            pack[sl, 2 * k], pack[sl, 2 * k + 1] = hi.double(), lo.double()
        else:
            pack[sl, 2 * k], pack[sl, 2 * k + 1] = _NEG_INF, 0.0
    parts = [torch.empty_like(pack) for _ in range(sh.world)]
    dist.all_gather(parts, pack, group=sh.group)
    allp = torch.stack(parts, 1)  # [N + 1, W, max(2k + 2, LAYOUT_COLS)]
    sh.check(allp[N, :, :LAYOUT_COLS])
    if sh.V is not None and k > sh.V:
        raise ValueError(f"k: {k} exceeds the global vocabulary {sh.V}")
    vals = allp[:N, :, :k].reshape(N, sh.world * k)  # (explicit sizes: N = 0 is an empty batch)
    gids = allp[:N, :, k : 2 * k].reshape(N, sh.world * k)
    # real candidates first, then a stable descending sort: a padding slot never wins a tie with a real −inf
    # logit (there are >= k real candidates when k <= V: Σ_r min(k, V_r) >= min(k, V))
    real_first = (gids < 0).to(torch.uint8).argsort(dim=1, stable=True)
    vals, gids = vals.gather(1, real_first), gids.gather(1, real_first)
    top, pos = vals.sort(dim=1, descending=True, stable=True)
    top, ids = top[:, :k], gids.gather(1, pos[:, :k]).long()
    # log-probs (top − H) − log Σ_r e^{(hi_r − H) + lo_r} with H the largest hi: top − H and hi_r − H are exact
    # differences of nearby values, as log_softmax's (u − m) − log l
    his, los = allp[:N, :, 2 * k], allp[:N, :, 2 * k + 1]
    H = his.amax(1)
    Hs = torch.where(torch.isfinite(H), H, 0.0)
    logs = torch.log(torch.exp((his - Hs[:, None]) + torch.where(torch.isfinite(los), los, 0.0)).sum(1))
    lps = torch.where(top == _NEG_INF, top, (top - Hs[:, None]) - logs[:, None])  # an all −inf row: −inf, not NaN
    if sh.on_device:  # cached group: an invalid layout (or k > V) gives NaN log-probs, on every rank alike
        lps = lps + _poison(_device_ok(allp[N, :, :LAYOUT_COLS], k), lps.dtype)
        ids = ids.clamp_min(0)
    return ids.view(*lead, k), lps.to(acc).view(*lead, k)
