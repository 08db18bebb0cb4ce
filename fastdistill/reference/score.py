"""Pure-PyTorch backend of the score-difference ops (any device; the CPU product path).

Same contract as ``fastdistill.kernels.score.score_fwd / score_bwd`` (docs/score_ops.md):
inputs are ``[B, M]`` views, statistics are accumulated in the plan's accumulation dtype, and
the element dimension is processed in column chunks so that no temporary larger than
``B × CHUNK`` is ever allocated besides the gradient itself.
"""

from __future__ import annotations

import math

import torch

OP_SCORE, OP_SID, OP_SCM, OP_DENOISE = 0, 1, 2, 3
CHUNK_ELEMS = 1 << 22  # elements per chunk over the whole batch (≈ 16 MB of fp32 per temporary)


def _chunks(B: int, M: int):
    step = max(1, CHUNK_ELEMS // max(B, 1))
    for j0 in range(0, M, step):
        yield slice(j0, min(M, j0 + step))


def _combos(p, x, terms, coef, sl, acc, rows):
    xs = x[:, sl].to(acc)
    out = []
    for r in rows:
        # score_distill's d has no x column (its coefficient is 0 by construction): a non-finite x
        # must not turn d into NaN through 0·inf (it still marks the sample bad, through s3)
        c = torch.zeros_like(xs) if p.op == OP_SCORE and r == 0 else coef[:, r, 0:1].to(acc) * xs
        use = p.use1 if r == 0 else p.use2
        for k, t in enumerate(terms):
            if (use >> k) & 1:
                c = c + coef[:, r, k + 1 : k + 2].to(acc) * t[:, sl].to(acc)
        out.append(c)
    return xs, out


def _nonfinite(*vs):
    return sum((~torch.isfinite(v)).sum(dim=1) for v in vs)


def _phi(p, d):
    if not p.phi_huber:
        return d
    dd = d * d  # where d² overflows: d / (|d|·sqrt(1 + (c/d)²)), not d / sqrt(inf) = 0
    ok = dd < math.inf
    a = torch.where(ok, torch.ones_like(d), d.abs())
    return torch.where(ok, d / torch.sqrt(dd + p.huber_c**2), d / (a * torch.sqrt(1 + (p.huber_c / a) ** 2)))


def _psi_huber(p, d):
    """ψ = sqrt(d²+c²) − c without cancellation; |d| − c where d² overflows."""
    dd = d * d
    return torch.where(dd < math.inf, dd / (torch.sqrt(dd + p.huber_c**2) + p.huber_c), d.abs() - p.huber_c)


def _nan_to_num(v, dtype):
    """torch.nan_to_num in the output dtype, within the accumulation dtype of ``v``: NaN → 0, and anything
    beyond that range → ±max."""
    big = min(torch.finfo(dtype).max, torch.finfo(v.dtype).max)
    return torch.nan_to_num(v, nan=0.0, posinf=big, neginf=-big).clamp(-big, big)


def _range(dtype, acc) -> float:
    """The largest finite gradient element of a tensor of ``dtype``, within the accumulation dtype."""
    return min(torch.finfo(dtype).max, torch.finfo(acc).max)


def score_fwd(p, x, terms, coef, mask, weight, logvar):
    B, M = x.shape
    acc = p.accum_dtype
    dev = x.device
    s = torch.zeros(5, B, dtype=acc, device=dev)
    two = p.op in (OP_SCORE, OP_SID)
    a0, b0 = coef[:, 0, 0:1].to(acc), coef[:, 1, 0:1].to(acc)
    # s4 is measured in the narrowest range among the gradients asked for (x's, and SID's terms that require
    # grad): each gradient scaled by unit / its own range (≤ 1, never overflows), one comparison with unit
    need = [k for k in range(len(terms)) if p.op == OP_SID and (p.tneed >> k) & 1]
    unit = min([_range(x.dtype, acc)] + [_range(terms[k].dtype, acc) for k in need])
    xr = unit / _range(x.dtype, acc)
    tneed = [(k, unit / _range(terms[k].dtype, acc)) for k in need]
    for sl in _chunks(B, M):
        xs, cs = _combos(p, x, terms, coef, sl, acc, (0, 1) if two else (0,))
        c1 = cs[0]
        m = mask[:, sl].to(acc) if mask is not None else torch.ones_like(c1)
        s[3] += _nonfinite(xs, *cs).to(acc)
        if p.op == OP_SCORE:
            d, ref = cs
            ph = _phi(p, d)
            if p.norm_on_loss:
                psi = _psi_huber(p, d) if p.phi_huber else 0.5 * d * d
            else:
                psi = 0.5 * ph * ph
            s[0] += (xs - ref).abs().sum(1)
            s[1] += (m * psi).sum(1)
            s[2] += m.sum(1)
            s[4] = torch.maximum(s[4], (m * ph.abs()).amax(1))
        elif p.op == OP_SID:
            fr, ff = cs
            e, diff = fr - xs, fr - ff
            s[0] += e.abs().sum(1)
            s[1] += (m * diff * (e - p.alpha * diff)).sum(1)
            s[2] += m.sum(1)
            # the largest gradient element over gco: y's, and each needed term's (scaled to y's range)
            dfr = e + (1.0 - 2.0 * p.alpha) * diff
            dff = 2.0 * p.alpha * diff - e
            big = (a0 * dfr + b0 * dff - diff).abs() * xr
            for k, ratio in tneed:
                gk = (coef[:, 0, k + 1 : k + 2].to(acc) * dfr + coef[:, 1, k + 1 : k + 2].to(acc) * dff).abs()
                big = torch.maximum(big, gk * ratio)
            s[4] = torch.maximum(s[4], (m * big).amax(1))
        elif p.op == OP_SCM:
            s[0] += (c1 * c1).sum(1)
            s[4] = torch.maximum(s[4], c1.abs().amax(1))
        else:
            s[0] += (m * c1 * c1).sum(1)
            s[2] += m.sum(1)
            s[4] = torch.maximum(s[4], (m * (a0 * c1).abs()).amax(1))
    return _finalize(p, s, B, M, weight, logvar, unit)


def _finalize(p, s, B, M, weight, logvar, gmax):
    acc = p.accum_dtype
    v0, v1, v2, v3, v4 = s
    h = weight.to(acc) if weight is not None else torch.ones_like(v0)
    if p.op in (OP_SCM, OP_DENOISE):  # a float weight arrives as scale
        h = h * p.scale
    dlv = torch.zeros_like(v0)
    fin = torch.isfinite

    def fits(v):  # within the gradient dtype's range (false for NaN): a larger element marks the sample bad
        return v.abs() <= gmax

    if p.op in (OP_SCORE, OP_SID):
        tot2 = v2.sum()
        if p.red == 0:
            kappa = torch.where(tot2 > 0, p.scale / tot2.clamp_min(1), torch.zeros_like(tot2))
        elif p.red == 2:
            kappa = torch.full_like(tot2, p.scale / B)
        else:
            kappa = torch.full_like(tot2, p.scale)
    else:
        beta = 1.0 / B if p.red == 0 else 1.0
    if p.op == OP_SCORE:
        if p.norm == 0:
            w = torch.ones_like(v0)
        elif p.norm == 1:
            w = torch.clamp(v0 / M, min=p.clamp) + p.eps
        else:
            w = (torch.clamp(v0.sum() / (B * M), min=p.clamp) + p.eps).expand(B).clone()
        gco = kappa * h / w
        loss = gco * v1 if p.norm_on_loss else gco * v1 / w
        bad = (v3 > 0) | ~(fin(w) & (w > 0)) | ~fits(v4 * gco) | ~fin(h)
    elif p.op == OP_SID:
        w = torch.clamp(v0 / M, min=p.clamp) + p.eps
        gco = kappa / w
        loss = gco * v1
        bad = (v3 > 0) | ~(fin(w) & (w > 0)) | ~fits(v4 * gco)
    elif p.op == OP_SCM:
        nrm = torch.sqrt(v0 / M) if p.rms else torch.sqrt(v0)
        w = nrm + p.c
        inv = torch.where(w > 0, 1.0 / w, torch.zeros_like(w))
        a = v0 * inv * inv / (M if p.sample_mean else 1)
        lv = logvar.to(acc) if logvar is not None else torch.zeros_like(v0)
        wexp = h * torch.exp(-lv)
        gco = -2.0 * beta * wexp * inv / (M if p.sample_mean else 1)
        bad = (v3 > 0) | ~fin(v0) | ~fin(h) | ~fin(lv) | ~fin(wexp) | ~fits(v4 * gco)
        wa = wexp * a
        if not p.to_num:  # a bad sample keeps only its logvar term (none if logvar itself is not finite)
            wa = torch.where(bad, torch.zeros_like(wa), wa)
            lv = torch.where(fin(lv), lv, torch.zeros_like(lv))
        loss = beta * (wa + lv)
        if logvar is not None:
            dlv = beta * (1.0 - wa)
            if not p.to_num:
                dlv = torch.where(fin(logvar.to(acc)), dlv, torch.zeros_like(dlv))
    else:
        w = torch.ones_like(v0)
        inv = torch.where(v2 > 0, 1.0 / v2.clamp_min(1), torch.zeros_like(v2)) if p.sample_mean else w
        loss = beta * h * v0 * inv
        gco = 2.0 * beta * h * inv
        bad = (v3 > 0) | ~fits(v4 * gco) | ~fin(h)
    zero = torch.zeros_like(gco)
    if p.to_num:
        big = torch.finfo(loss.dtype).max  # the accumulation dtype's range, as the Triton finalize
        loss = torch.nan_to_num(loss, nan=0.0, posinf=big, neginf=-big)
        dlv = torch.nan_to_num(dlv, nan=0.0)
    else:
        if p.op != OP_SCM:
            loss = torch.where(bad, zero, loss)
        gco = torch.where(bad, zero, gco)
    state = torch.stack([gco, w, bad.to(w.dtype), dlv], dim=1)
    return loss.sum().reshape(1), loss, state


def score_bwd(p, x, terms, coef, mask, state, grad_out, need_x, need_terms):
    B, M = x.shape
    acc = p.accum_dtype
    go = grad_out.to(acc).reshape(-1, 1)  # [1, 1] or [B, 1]
    # to_num maps the op's own gradient, then the upstream gradient multiplies it: a GradScaler's scale that makes
    # it overflow gives inf, which the scaler must see (clamping after the scale hid it: a clipped step)
    f = state[:, 0].unsqueeze(1) if p.to_num else state[:, 0].unsqueeze(1) * go
    bad = (state[:, 2] > 0).unsqueeze(1)
    gx = torch.empty_like(x) if need_x else None
    gterms = [torch.empty_like(t) if need else None for t, need in zip(terms, need_terms)]
    a0 = coef[:, 0, 0:1].to(acc)
    b0 = coef[:, 1, 0:1].to(acc)

    def put(dst, sl, v):
        v = _nan_to_num(v, dst.dtype) * go if p.to_num else torch.where(bad, torch.zeros_like(v), v)
        dst[:, sl] = v.to(dst.dtype)

    for sl in _chunks(B, M):
        xs, cs = _combos(p, x, terms, coef, sl, acc, (0, 1) if p.op == OP_SID else (0,))
        c1 = cs[0]
        m = f * (mask[:, sl].to(acc) if mask is not None else torch.ones_like(c1))
        if p.op == OP_SCORE:
            g = m * _phi(p, c1)
        elif p.op == OP_SID:
            fr, ff = cs
            e, diff = fr - xs, fr - ff
            dfr = e + (1.0 - 2.0 * p.alpha) * diff
            dff = 2.0 * p.alpha * diff - e
            g = m * (a0 * dfr + b0 * dff - diff)
            for k, gt in enumerate(gterms):
                if gt is not None:
                    put(gt, sl, m * (coef[:, 0, k + 1 : k + 2].to(acc) * dfr + coef[:, 1, k + 1 : k + 2].to(acc) * dff))
        elif p.op == OP_SCM:
            g = m * c1
        else:
            g = m * a0 * c1
        if gx is not None:
            put(gx, sl, g)
    return gx, gterms
