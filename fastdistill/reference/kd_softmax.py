"""Pure-PyTorch backend of ``kd_loss`` (any device; the CPU product path). docs/kd_ops.md.

Same contract as ``fastdistill.kernels.kd_softmax.kd_fwd / kd_bwd``: rows are processed in
chunks of at most ``CHUNK_ELEMS`` logits, so no temporary is larger than a chunk besides the
gradient itself. Statistics are kept per row in the plan's accumulation dtype.
"""

from __future__ import annotations

import torch

DIV_FKL, DIV_RKL, DIV_JSD, DIV_SKL, DIV_SRKL, DIV_TVD = range(6)
# lse_s, lse_t, lse_s1 (untempered; CE's), D, S = Σ q·g, contrib, ce, valid, lse_s_lo, lse_t_lo, lse_s1_lo
NSTATE = 11
CHUNK_ELEMS = 1 << 22


def _chunks(N: int, V: int):
    step = max(1, CHUNK_ELEMS // max(V, 1))
    for r0 in range(0, N, step):
        yield slice(r0, min(N, r0 + step))


def transform(p, z: torch.Tensor) -> torch.Tensor:
    """logit_scale, then softcap (both models). A −inf logit stays −inf (probability 0: a masked or padded
    column, handled as without softcap), where softcap·tanh would make it −softcap, a positive probability."""
    if p.logit_scale != 1.0:
        z = z * p.logit_scale
    if p.softcap > 0:
        z = torch.where(z == float("-inf"), z, p.softcap * torch.tanh(z / p.softcap))
    return z


def chain(p, z_raw: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """g (a gradient w.r.t. the transformed logits) times d transform / d raw: logit_scale, and softcap's
    1 − tanh²(y) = 4e/(1 + e)², e = e^{−2|y|}, from the uncapped y (1 − th² from the rounded capped logit loses
    eps/(1 − th²) relative where tanh saturates)."""
    if p.logit_scale != 1.0:
        g = g * p.logit_scale
    if p.softcap > 0:
        y = (z_raw * p.logit_scale if p.logit_scale != 1.0 else z_raw) / p.softcap
        e = torch.exp(-2.0 * y.abs())
        g = g * (4.0 * e / ((1.0 + e) * (1.0 + e)))
    return g


def _teacher(p, t, sl, V, acc):
    """Teacher logits of rows ``sl`` on the student's V columns (sliced, or −inf padded)."""
    zt = transform(p, t[sl, :V].to(acc))
    if zt.shape[1] < V:
        zt = torch.cat([zt, zt.new_full((zt.shape[0], V - zt.shape[1]), float("-inf"))], 1)
    return zt


def lse_split(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row logsumexp as hi + lo = m + log Σ e^{u − m} exactly (TwoSum; lo = 0 on an all −inf row). Log-probs are
    then (u − hi) − lo: u − hi is exact near the row max, so they keep the accuracy of log_softmax's (u − m) − log l
    (hi alone is rounded at |m|: an error of ulp(m) in every log-prob, which a close teacher's divergence amplifies)."""
    m = u.amax(1) if u.shape[1] else u.new_full((u.shape[0],), float("-inf"))
    ms = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    l = torch.exp(u - ms[:, None]).sum(1)
    hi, lo = hi_lo(ms, l)
    # −inf: an empty / all −inf row; NaN where a logit is NaN or +inf (counted as NaN inputs, as the kernels' e^{u − m}
    # = e^{inf − inf} and log_softmax do: m + log l would be +inf there, and CE = (hi − z_label) + lo +inf)
    hi = torch.where(m == float("-inf"), m, torch.where(torch.isfinite(m), hi, torch.full_like(m, float("nan"))))
    return hi, lo


def hi_lo(ms: torch.Tensor, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ms + log l (ms finite, l ≥ 0 a sum-exp relative to it) as hi + lo; lo = 0 where that is not finite. Below
    float64, log l is taken in float64 (once per row) and lo = (ms − hi) + log l there: log l rounded in the
    working dtype would be off by ulp(log l) ~ eps·log V, a shift of every log-prob that a divergence of a close
    teacher magnifies (the common part of softmax's error is only 1/l's rounding, eps). In float64, TwoSum."""
    if ms.dtype == torch.float64:
        ll = torch.log(l)
        hi = ms + ll
        bb = hi - ms
        lo = (ms - (hi - bb)) + (ll - bb)
    else:  # ms − hi is exact; hd − hi with hd = ms + log l would carry hd's rounding at |ms|·2⁻⁵³ (finfo.min rows)
        ll = torch.log(l.double())
        hi = (ms.double() + ll).to(ms.dtype)
        lo = ((ms.double() - hi.double()) + ll).to(ms.dtype)
    return hi, torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))


def log_probs(u, hi, lo):
    """(u − hi) − lo for [n, V] logits and per-row hi, lo (lse_split)."""
    return (u - hi[:, None]) - lo[:, None]


def log_ratio(a, ha, la, b, hb, lb):
    """log p − log q for log p = (a − ha) − la and log q = (b − hb) − lb (hi + lo logsumexps), to about an ulp of the
    difference itself: a − b and ha − hb kept exactly (TwoSum), then (a − b) − (ha − hb) is exact where the two
    nearly cancel (a teacher close to the student). The difference of the two rounded log-probs is off by
    ~ulp(log q) there, which TVD's |p − q| = q·|e^{log p − log q} − 1| magnifies. Where it is ≥ 1 in size (or not
    finite: a −inf log-prob) the plain difference is kept."""
    s, e = _two_diff(a, b)
    c, f = _two_diff(ha, hb)
    naive = ((a - ha) - la) - ((b - hb) - lb)
    fine = (s - c) + ((e - f) - (la - lb))
    return torch.where((naive.abs() < 1) & torch.isfinite(fine), fine, naive)  # a − b overflowing: inf − inf


def _two_diff(a, b):
    """a − b as s + e exactly (TwoSum of a and −b)."""
    s = a - b
    bb = s - a
    return s, (a - (s - bb)) - (b + bb)


def xlogy(w, a):
    """w·a with 0 where w == 0 (0·log 0 = 0, 0·(−inf) = 0); NaN where w is NaN (a NaN input shows)."""
    return torch.where(w > 0, w * a, torch.where(torch.isnan(w), w, torch.zeros_like(a)))


def _mixdiffs(a, la, b, lb):
    """(la − lm, lb − lm) with lm = log(a·e^la + b·e^lb), a, b > 0, formed without lm itself: lm rounded at
    |lm| (~ulp of a log-prob) would add that error to every term of a divergence that is a small difference."""
    mx = torch.maximum(la, lb)
    mx = torch.where(mx == float("-inf"), torch.zeros_like(mx), mx)
    da, db = la - mx, lb - mx
    r = torch.log(a * torch.exp(da) + b * torch.exp(db))
    return da - r, db - r


def _row_div(p, lq, lp, tvd=None):
    """(D per row, q·g per element) for the 3-pass divergences, from log q and log p, where
    g = ∂D/∂q; q·g is 0 where q = 0 (its limit: these g are finite or grow like log q there).
    ``tvd``: (log p − log q, q) as ``tvd_terms`` forms them (TVD only; default lp − lq, e^{lq})."""
    q, pp = lq.exp(), lp.exp()
    zero = torch.zeros_like(lq)
    if p.div == DIV_JSD:
        dp, dq = _mixdiffs(p.beta, lp, 1 - p.beta, lq)
        D = p.beta * xlogy(pp, dp).sum(1) + (1 - p.beta) * xlogy(q, dq).sum(1)
        g = (1 - p.beta) * torch.where(q > 0, dq, zero)
    elif p.div == DIV_SKL:
        dp, _ = _mixdiffs(p.skew, lp, 1 - p.skew, lq)
        D = xlogy(pp, dp).sum(1)
        g = -(1 - p.skew) * torch.where(pp > 0, torch.exp(dp), zero)
    elif p.div == DIV_SRKL:
        _, dq = _mixdiffs(1 - p.skew, lp, p.skew, lq)
        D = xlogy(q, dq).sum(1)
        g = torch.where(q > 0, dq + 1 - p.skew * torch.exp(dq), zero)
    else:  # TVD: |p − q| = q·|e^{dl} − 1| where |dl| < 1/2 (no cancellation), the sign of q − p that of −dl
        dl, q = (lp - lq, q) if tvd is None else tvd
        D = 0.5 * torch.where(dl.abs() < 0.5, q * torch.expm1(dl).abs(), (pp - q).abs()).sum(1)
        g = torch.where(dl < 0, 0.5, torch.where(dl > 0, -0.5, 0.0)).to(lq.dtype)
    return D, torch.where(q > 0, q * g, zero)


TOPK_TAIL, TOPK_ZERO, TOPK_RENORM = 1, 2, 3  # plan.topk (0: dense teacher)


def bucket_div(p, lq, lp, tvd=None):
    """(D per row, q·g per element) of the plan's divergence over buckets with log-probs lq, lp.
    Forward KL: q·g = −p, also where q = 0 (the limit of q·(−p/q); the divergence is +inf there)."""
    if p.div == DIV_FKL:
        pp = lp.exp()
        return xlogy(pp, lp - lq).sum(1), -pp
    if p.div == DIV_RKL:
        q = lq.exp()
        return xlogy(q, lq - lp).sum(1), torch.where(q > 0, q * (lq - lp + 1), torch.zeros_like(lq))
    return _row_div(p, lq, lp, tvd)


def q_minus_p(a, ha, la, b, hb, lb):
    """q − p for log p = (a − ha) − la, log q = (b − hb) − lb (hi + lo logsumexps): −q·(e^{dl} − 1) with dl from
    ``log_ratio`` and q = e^{b − hb}·e^{−lb} where |dl| < 1/2 (a teacher close to the student: e^{log q} − e^{log p}
    would cancel, magnifying the ~eps·|log q| rounding of each log-prob), else e^{log q} − e^{log p}."""
    dl = log_ratio(a, ha, la, b, hb, lb)
    small = dl.abs() < 0.5
    near = -(torch.exp(b - hb) * torch.exp(-lb)) * torch.expm1(torch.where(small, dl, torch.zeros_like(dl)))
    return torch.where(small, near, torch.exp((b - hb) - lb) - torch.exp((a - ha) - la))


def tvd_terms(p, a, ha, la, b, hb, lb):
    """Where the plan's divergence is TVD (the only one that forms p − q; else None): ``log_ratio`` of
    log p = (a − ha) − la and log q = (b − hb) − lb, and q = e^{b − hb}·e^{−lb} (e^{log q} would carry the
    rounding of log q at |log q|, eps·|log q| relative: the gradient q·(±1/2 − S) shows it)."""
    if p.div != DIV_TVD:
        return None
    return log_ratio(a, ha, la, b, hb, lb), torch.exp(b - hb) * torch.exp(-lb)


def kd_du(qg, q, S):
    """∂D/∂u = q·g − q·S over a softmax, with S = Σ q·g; 0 where S = +inf: a reverse-type divergence
    that is +inf (p = 0 where q > 0) has no finite gradient (docs/kd_ops.md, "Non-finite inputs")."""
    du = qg - q * S
    return torch.where(S == float("inf"), torch.zeros_like(du), du)


def _topk_buckets(p, us, lse_s, lo_s, ids, lps):
    """Per-row (lq, lp) over the buckets of the top-k semantics, and the row's extra scalar
    (tail: none; zero_tail: Σ p; renorm: logsumexp of the student over the k ids). The student's
    tail mass is summed over the columns off the ids (never 1 − Σ q, which rounds to 0 for a
    confident student)."""
    uk = us.gather(1, ids)
    if p.topk == TOPK_RENORM:  # the student's logsumexp over the k ids as hi + lo (hi alone: ulp(m) off)
        lse_k, lo_k = lse_split(uk)
        ut = lps / p.teacher_temperature
        hi_t, lo_t = lse_split(ut)
        tvd = tvd_terms(p, ut, hi_t[:, None], lo_t[:, None], uk, lse_k[:, None], lo_k[:, None])
        return log_probs(uk, lse_k, lo_k), log_probs(ut, hi_t, lo_t), (lse_k, lo_k), tvd
    lqk, lpk = log_probs(uk, lse_s, lo_s), lps
    if p.topk == TOPK_ZERO:
        return lqk, lpk, lpk.exp().sum(1), None
    # over the off-id log-probs (u − hi) − lo, each exact near the row max: a logsumexp of the logits themselves is
    # rounded at |max u| (at a logit offset of 300 in fp32, 40x plain PyTorch's error of the loss)
    lq_tail = torch.logsumexp(log_probs(us, lse_s, lo_s).scatter(1, ids, float("-inf")), 1)
    p_tail = (1 - lpk.exp().sum(1)).clamp_min(0)
    if ids.shape[1] >= us.shape[1]:  # the ids (unique) cover the vocabulary: no tail, 1 − Σ p is rounding only
        p_tail = torch.zeros_like(p_tail)
    lq, lp = torch.cat([lqk, lq_tail[:, None]], 1), torch.cat([lpk, p_tail.log()[:, None]], 1)
    tvd = tvd_terms(p, lpk, 0.0, 0.0, uk, lse_s[:, None], lo_s[:, None])
    if tvd is not None:  # the tail bucket: its log-probs as they are
        tvd = torch.cat([tvd[0], lp[:, -1:] - lq[:, -1:]], 1), torch.cat([tvd[1], lq[:, -1:].exp()], 1)
    return lq, lp, None, tvd


def kd_fwd(p, s, t, labels, mask, weights):
    N, V = s.shape
    acc = p.accum_dtype
    st = torch.zeros(N, NSTATE, dtype=acc, device=s.device)
    for sl in _chunks(N, V):
        z = transform(p, s[sl].to(acc))
        us = z / p.temperature
        lse_s, lo_s = lse_split(us)
        lo_t = torch.zeros_like(lo_s)
        if p.topk:
            ids, lps = t[0][sl].long(), t[1][sl].to(acc)
            good = ((ids >= 0) & (ids < V)).all(1)  # a bad id never reads out of the row; its row's loss is NaN
            lq, lp, extra, tvd = _topk_buckets(p, us, lse_s, lo_s, ids.clamp(0, V - 1), lps)
            if p.topk == TOPK_ZERO:
                D = xlogy(lp.exp(), lp - lq).sum(1)
                S = torch.zeros_like(D)
                lse_t = extra
            else:
                D, qg = bucket_div(p, lq, lp, tvd)
                S = qg.sum(1)
                if p.topk == TOPK_RENORM:
                    lse_t, lo_t = extra
                else:
                    lse_t = tail_state(p, lq[:, -1], lp[:, -1])
        else:
            zt = _teacher(p, t, sl, V, acc)
            ut = zt / p.teacher_temperature
            lse_t, lo_t = lse_split(ut)
            lq, lp = log_probs(us, lse_s, lo_s), log_probs(ut, lse_t, lo_t)
        if p.topk:
            pass
        elif p.div == DIV_FKL:
            D, S = xlogy(lp.exp(), lp - lq).sum(1), torch.zeros_like(lse_s)
        elif p.div == DIV_RKL:
            D, S = xlogy(lq.exp(), lq - lp).sum(1), torch.zeros_like(lse_s)
        else:
            tvd = tvd_terms(p, ut, lse_t[:, None], lo_t[:, None], us, lse_s[:, None], lo_s[:, None])
            D, qg = _row_div(p, lq, lp, tvd)
            S = qg.sum(1)
        # an all −inf row is invalid; a NaN / +inf logit keeps the row valid so that the NaN shows
        ok = (lse_s != float("-inf")) & ((lse_t != float("-inf")) if not p.topk else True)
        if p.topk == TOPK_RENORM:  # k teacher log-probs all −inf: no teacher distribution (as a dense one)
            ok &= ~(t[1][sl].to(acc) == float("-inf")).all(1)  # (not amax > −inf: a NaN keeps the row valid)
            ok &= lse_t != float("-inf")  # the student −inf at all k ids: renormalised over them it is 0/0, none
        if labels is not None:
            ok &= labels[sl] != p.ignore_index
        if mask is not None:
            ok &= mask[sl] != 0
        ce = hi1 = lo1 = torch.zeros_like(lse_s)
        if labels is not None and p.alpha > 0:
            lab = labels[sl]
            lab_ok = (lab >= 0) & (lab < V)
            zl = z.gather(1, lab.clamp(0, V - 1)[:, None])[:, 0]
            # CE as (hi − z_label) + lo, its gradient e^{(z − hi) − lo}: hi + lo rounded to one number carries its
            # rounding at |max z| into both (on a confident row at an offset of 300: 170x / 80x plain fp32's error)
            hi1, lo1 = lse_split(z)
            ce = torch.where(lab_ok, (hi1 - zl) + lo1, torch.full_like(ce, float("nan")))
        if p.topk != TOPK_ZERO:  # true divergences, below 0 only by rounding; zero_tail's formula is not one
            D = D.clamp_min(0)
        if p.topk:
            D = torch.where(good, D, torch.full_like(D, float("nan")))
        kd = (1 - p.alpha) * p.t2 * D if p.alpha < 1 else torch.zeros_like(D)  # α = 1: no KD term at all
        loss = kd + p.alpha * ce
        if weights is not None:  # weight 0 adds exactly nothing, like a masked row (not 0·inf = NaN)
            w = weights[sl].to(acc)
            loss = torch.where(w == 0, torch.zeros_like(loss), loss * w)
        contrib = torch.where(ok, loss, torch.zeros_like(loss))
        st[sl] = torch.stack([lse_s, lse_t, hi1, D, S, contrib, ce, ok.to(acc), lo_s, lo_t, lo1], 1)
    return _reduce(p, st, N, V)


def _reduce(p, st, N, V):
    valid, contrib = st[:, 7], st[:, 5]
    n = torch.full((), float(p.num_items), dtype=st.dtype, device=st.device) if p.num_items > 0 else valid.sum()
    if p.red == 0:  # batchmean
        factor = torch.where(n > 0, 1.0 / n.clamp_min(1e-30), torch.zeros_like(n))
    elif p.red == 2:  # mean
        factor = torch.where(n > 0, 1.0 / (n.clamp_min(1e-30) * V), torch.zeros_like(n))
    else:
        factor = torch.ones_like(n)
    loss = (contrib.sum() * factor).reshape(1)
    return loss, contrib, st, factor.reshape(1)


def kd_bwd(p, s, t, labels, weights, st, factor, grad_out, out):
    """Gradient w.r.t. the raw student logits, written into ``out`` (may alias ``s``)."""
    N, V = s.shape
    acc = p.accum_dtype
    go = grad_out.to(acc)
    for sl in _chunks(N, V):
        z_raw = s[sl].to(acc)
        z = transform(p, z_raw)
        us = z / p.temperature
        row = st[sl]
        lq = (us - row[:, 0:1]) - row[:, 8:9]
        q = lq.exp()
        if p.topk:
            du = _topk_du(p, us, row, t[0][sl].long().clamp(0, V - 1), t[1][sl].to(acc), q)
        elif p.div == DIV_FKL:
            ut = _teacher(p, t, sl, V, acc) / p.teacher_temperature
            du = q_minus_p(ut, row[:, 1:2], row[:, 9:10], us, row[:, 0:1], row[:, 8:9])
        elif p.div == DIV_RKL:  # q(log q − log p − D); 0 on a row whose D is +inf (no finite gradient)
            zt = _teacher(p, t, sl, V, acc)
            lp = (zt / p.teacher_temperature - row[:, 1:2]) - row[:, 9:10]
            D = row[:, 3:4]
            du = torch.where((q > 0) & (D != float("inf")), q * (lq - lp - D), torch.zeros_like(q))
        else:
            ut = _teacher(p, t, sl, V, acc) / p.teacher_temperature
            lp = (ut - row[:, 1:2]) - row[:, 9:10]
            tvd = tvd_terms(p, ut, row[:, 1:2], row[:, 9:10], us, row[:, 0:1], row[:, 8:9])
            _, qg = _row_div(p, lq, lp, tvd)
            du = kd_du(qg, q if tvd is None else tvd[1], row[:, 4:5])
        # α = 1: no KD term at all (not 0·NaN where D is +inf)
        gz = (1 - p.alpha) * p.t2 / p.temperature * du if p.alpha < 1 else torch.zeros_like(du)
        if labels is not None and p.alpha > 0:
            q1 = ((z - row[:, 2:3]) - row[:, 10:11]).exp()
            onehot = torch.zeros_like(q1)
            lab = labels[sl]
            onehot.scatter_(1, lab.clamp(0, V - 1)[:, None], 1.0)
            gz = gz + p.alpha * (q1 - onehot)
        if weights is not None:
            w = weights[sl].to(acc)[:, None]  # weight 0: a zero gradient like a masked row (not 0·NaN)
            gz = torch.where(w == 0, torch.zeros_like(gz), gz * w)
        rowf = row[:, 7:8] * factor.to(acc) * (go[sl][:, None] if go.numel() > 1 else go)
        gz = torch.where(row[:, 7:8] > 0, gz * rowf, torch.zeros_like(gz))
        out[sl] = chain(p, z_raw, gz).to(out.dtype)
    return out


def tail_state(p, lq_t, lp_t):
    """What the off-id columns' gradient needs of the tail bucket, kept in state slot 1: forward KL
    log(p_tail/q_tail) (q_j·g_tail = −e^{log q_j + that}: finite whatever q_tail), else g_tail."""
    if p.div == DIV_FKL:
        return torch.where(lp_t == float("-inf"), lp_t, lp_t - lq_t)
    _, qg = bucket_div(p, lq_t[:, None], lp_t[:, None])
    q = lq_t[:, None].exp()  # 0 where log q_tail is finite but below the dtype's range: so is every q_j off the ids
    return torch.where(q > 0, qg / torch.where(q > 0, q, torch.ones_like(q)), torch.zeros_like(qg))[:, 0]


def tail_qg(p, lq, q, extra):
    """q_j·g_tail on the columns off the ids from the tail state ``extra`` (tail_state): forward KL
    −p_tail·q_j/q_tail = −e^{log q_j + log(p_tail/q_tail)}, finite whatever q_tail, 0 where log q_j = −inf (not
    where q_j = 0: on a confident row q_j and q_tail both underflow while q_j/q_tail is O(1)); else 0 where q_j = 0."""
    if p.div == DIV_FKL:
        return torch.where(lq > float("-inf"), -torch.exp(lq + extra), torch.zeros_like(q))
    return torch.where(q > 0, q * extra, torch.zeros_like(q))


def _topk_du(p, us, row, ids, lps, q):
    """∂D/∂u_s over the full row for a top-k teacher (docs/kd_ops.md, "Top-k teachers")."""
    S = row[:, 4:5]
    if p.topk == TOPK_ZERO:
        du = row[:, 1:2] * q
        return du.scatter_add(1, ids, -lps.exp())
    if p.topk == TOPK_RENORM:
        uk = us.gather(1, ids)
        lqk = (uk - row[:, 1:2]) - row[:, 9:10]
        ut = lps / p.teacher_temperature
        hi_t, lo_t = lse_split(ut)
        hi_t, lo_t = hi_t[:, None], lo_t[:, None]
        tvd = tvd_terms(p, ut, hi_t, lo_t, uk, row[:, 1:2], row[:, 9:10])
        _, qg = bucket_div(p, lqk, log_probs(ut, hi_t[:, 0], lo_t[:, 0]), tvd)
        return torch.zeros_like(q).scatter(1, ids, kd_du(qg, lqk.exp() if tvd is None else tvd[1], S))
    lq = (us - row[:, 0:1]) - row[:, 8:9]
    qg = tail_qg(p, lq, q, row[:, 1:2])
    tvd = tvd_terms(p, lps, 0.0, 0.0, us.gather(1, ids), row[:, 0:1], row[:, 8:9])
    _, qgk = bucket_div(p, lq.gather(1, ids), lps, tvd)  # the id buckets (elementwise in (q_b, p_b))
    return kd_du(qg, q, S).scatter(1, ids, kd_du(qgk, q.gather(1, ids) if tvd is None else tvd[1], S))
