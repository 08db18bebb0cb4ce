"""Triton kernels for the score-difference losses (score_distill, sid_loss, scm_tangent_loss,
denoise_regression_loss). Semantics: docs/score_ops.md.

Every op is the same three-launch pipeline over ``[B, M]`` views of its inputs:

1. ``_score_stats_kernel``   grid (B, NB): per (sample, block) partial statistics of two affine
   combinations of ``x`` and the terms, ``c1 = A[b,0,:]·[x, T]`` and ``c2 = A[b,1,:]·[x, T]``
   (fixed-order, deterministic: no atomics).
2. ``_score_finalize_kernel`` grid (1,): reduces the partials in block order, computes the
   per-sample normaliser, loss, bad-sample flag and gradient factor, and the reduced loss.
3. ``_score_grad_kernel``    grid (B, NB): recomputes the combinations and writes the gradient
   directly (never as x − (x − g)), scaled by the upstream gradient.

Per-op meaning of the combinations and statistics (s0..s4 per sample):
  SCORE    c1 = d, c2 = ref            s0 Σ|x − ref|, s1 Σ m·ψ(d), s2 Σ m, s3 #non-finite, s4 max m|φ(d)|
  SID      c1 = f_r, c2 = f_f          s0 Σ|f_r − y|, s1 Σ m (f_r−f_f)((f_r−y) − α(f_r−f_f)), s2, s3,
                                       s4 max m·|∂/∂y|, m·|∂/∂T_k|·(y's range / T_k's range) (needed k)
  SCM      c1 = g                      s0 Σ g², s3, s4 max |g|
  DENOISE  c1 = d                      s0 Σ m d², s2 Σ m, s3, s4 max m|a0·d|
s4 is the largest gradient element over the per-sample gradient factor: the finalize flags a sample
whose s4·gco exceeds the gradient dtype's range (nan="zero_sample").

Term dtypes reach the kernels as TDT, two bits per term (``dtype_codes``): the range of each
term's gradient dtype, within the accumulation dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastdistill._backend import on_tensor_device

OP_SCORE, OP_SID, OP_SCM, OP_DENOISE = 0, 1, 2, 3
NSTAT = 5
NSTATE = 4  # per-sample state: gradient factor, normaliser, bad flag, d loss / d logvar
BLOCK = 1024
NUM_WARPS = 8  # 4 elements per thread: a 16-byte load for fp32, no spills at K = 8 (benchmarks/triton_codegen.py)
MAX_BLOCKS_PER_SAMPLE = 1024
# TDT codes 0..3: fp16, bf16, fp32, fp64, whose largest finite values (torch.finfo(...).max) the
# kernels spell out in constexpr conditionals (a jit function reads no global tuple)


@triton.jit
def _combos(x, terms, coef_ptr, base, offs, inb, K: tl.constexpr, USE1: tl.constexpr,
            USE2: tl.constexpr, TWO: tl.constexpr, ACC: tl.constexpr, X1: tl.constexpr = True):
    """c1 = A[0,0] x + Σ_k A[0,k+1] T_k and (if TWO) c2 likewise with row 1; terms outside a
    row's USE bitmask are not read for it (and not at all if neither row uses them). X1 false:
    c1 has no x column (SCORE's d), so a non-finite x cannot make it NaN through 0·inf."""
    if X1:
        c1 = x * tl.load(coef_ptr).to(ACC)
    else:
        c1 = tl.zeros_like(x)
    c2 = x * tl.load(coef_ptr + (K + 1)).to(ACC)
    for k in tl.static_range(K):
        if ((USE1 | USE2) >> k) & 1:
            t = tl.load(terms[k] + base + offs, mask=inb, other=0.0).to(ACC)
            if (USE1 >> k) & 1:
                c1 += tl.load(coef_ptr + 1 + k).to(ACC) * t
            if TWO and (USE2 >> k) & 1:
                c2 += tl.load(coef_ptr + (K + 2) + k).to(ACC) * t
    return c1, c2


@triton.jit
def _phi(d, huber_c, PHI_HUBER: tl.constexpr):
    if PHI_HUBER:  # where d² overflows (|d| > ~1.8e19 in fp32): d / (|d|·sqrt(1 + (c/d)²)), not d / sqrt(inf) = 0
        dd = d * d
        a = tl.abs(d)
        r = huber_c / tl.where(dd < float("inf"), 1.0, a)
        return tl.where(dd < float("inf"), d / tl.sqrt(dd + huber_c * huber_c), d / (a * tl.sqrt(1.0 + r * r)))
    else:
        return d


@triton.jit
def _psi_huber(d, huber_c):
    """ψ = sqrt(d²+c²) − c, written without cancellation (d²/(sqrt(d²+c²)+c)); |d| − c where d² overflows."""
    dd = d * d
    return tl.where(dd < float("inf"), dd / (tl.sqrt(dd + huber_c * huber_c) + huber_c), tl.abs(d) - huber_c)


@triton.jit
def _nonfinite(v):
    return (~(tl.abs(v) < float("inf"))).to(tl.int32)


@triton.jit
def _in_unit(v, UNIT: tl.constexpr, CODE: tl.constexpr):
    """v · UNIT / (the range of dtype code CODE) (≤ v: UNIT is the narrowest range in play): a term's gradient
    element measured in the common unit of s4."""
    if CODE == 0:
        r = v * (UNIT / 65504.0)
    elif CODE == 1:
        r = v * (UNIT / 3.3895313892515355e38)
    elif CODE == 2:
        r = v * (UNIT / 3.4028234663852886e38)
    else:
        r = v * (UNIT / 1.7976931348623157e308)
    return r


@triton.jit
def _score_stats_kernel(x_ptr, terms, coef_ptr, coef_sb, mask_ptr, part_ptr, M, n_iter, NB, prm_ptr,
                        OP: tl.constexpr, K: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
                        HAS_MASK: tl.constexpr, PHI_HUBER: tl.constexpr, NORM_ON_LOSS: tl.constexpr,
                        TNEED: tl.constexpr, TDT: tl.constexpr, UNIT: tl.constexpr, XR: tl.constexpr,
                        BLOCK: tl.constexpr, ACC: tl.constexpr):
    huber_c, alpha = tl.load(prm_ptr + 0), tl.load(prm_ptr + 1)  # in ACC (float arguments would be fp32)
    b = tl.program_id(0)
    blk = tl.program_id(1)
    base = b.to(tl.int64) * M
    coef_ptr += b * coef_sb
    TWO: tl.constexpr = OP <= 1
    ar = tl.arange(0, BLOCK)
    s0 = tl.zeros([BLOCK], ACC)
    s1 = tl.zeros([BLOCK], ACC)
    s2 = tl.zeros([BLOCK], ACC)
    s3 = tl.zeros([BLOCK], tl.int32)
    s4 = tl.zeros([BLOCK], ACC)
    start = blk.to(tl.int64) * n_iter * BLOCK
    for it in range(n_iter):
        offs = start + it * BLOCK + ar
        inb = offs < M
        x = tl.load(x_ptr + base + offs, mask=inb, other=0.0).to(ACC)
        c1, c2 = _combos(x, terms, coef_ptr, base, offs, inb, K, USE1, USE2, TWO, ACC, OP != 0)
        if HAS_MASK:
            m = tl.load(mask_ptr + base + offs, mask=inb, other=0).to(ACC)
        else:
            m = inb.to(ACC)
        nf = _nonfinite(x) | _nonfinite(c1)
        if TWO:
            nf = nf | _nonfinite(c2)
        s3 += nf
        if OP == 0:  # SCORE: c1 = d, c2 = ref (the normaliser reference)
            s0 += tl.abs(x - c2)
            ph = _phi(c1, huber_c, PHI_HUBER)
            if NORM_ON_LOSS:
                if PHI_HUBER:
                    psi = _psi_huber(c1, huber_c)
                else:
                    psi = 0.5 * c1 * c1
            else:
                psi = 0.5 * ph * ph
            s1 += m * psi
            s2 += m
            s4 = tl.maximum(s4, m * tl.abs(ph), propagate_nan=tl.PropagateNan.ALL)
        elif OP == 1:  # SID: c1 = f_r, c2 = f_f, x = y
            e = c1 - x
            diff = c1 - c2
            s0 += tl.abs(e)
            s1 += m * diff * (e - alpha * diff)
            s2 += m
            dfr = e + (1.0 - 2.0 * alpha) * diff
            dff = 2.0 * alpha * diff - e
            big = tl.abs(tl.load(coef_ptr).to(ACC) * dfr + tl.load(coef_ptr + (K + 1)).to(ACC) * dff - diff)
            if XR != 1.0:  # x's gradient in the unit (the narrowest range among the gradients asked for)
                big = big * XR
            for k in tl.static_range(K):
                if (TNEED >> k) & 1:
                    gk = tl.load(coef_ptr + 1 + k).to(ACC) * dfr + tl.load(coef_ptr + (K + 2) + k).to(ACC) * dff
                    gk = _in_unit(tl.abs(gk), UNIT, (TDT >> (2 * k)) & 3)
                    big = tl.maximum(big, gk, propagate_nan=tl.PropagateNan.ALL)
            s4 = tl.maximum(s4, m * big, propagate_nan=tl.PropagateNan.ALL)
        elif OP == 2:  # SCM: c1 = g
            s0 += c1 * c1
            s4 = tl.maximum(s4, tl.abs(c1), propagate_nan=tl.PropagateNan.ALL)
        else:  # DENOISE: c1 = d
            s0 += m * c1 * c1
            s2 += m
            s4 = tl.maximum(s4, m * tl.abs(tl.load(coef_ptr).to(ACC) * c1), propagate_nan=tl.PropagateNan.ALL)
    out = part_ptr + (b * NB + blk) * 5
    tl.store(out + 0, tl.sum(s0, 0))
    tl.store(out + 1, tl.sum(s1, 0))
    tl.store(out + 2, tl.sum(s2, 0))
    tl.store(out + 3, tl.sum(s3, 0).to(ACC))
    tl.store(out + 4, _nanmax(s4))


@triton.jit
def _nanmax(v):
    """Max of a 1-D block, +inf if any element is NaN (tl.max drops NaN; s4 only feeds the
    finite-gradient test, for which inf and NaN mean the same)."""
    return tl.max(tl.where(v != v, float("inf"), v), 0)


@triton.jit
def _fits(v, gmax):
    """|v| within the gradient dtype's range (false for NaN): a larger element marks the sample bad."""
    return tl.abs(v) <= gmax


@triton.jit
def _finite(v):
    return tl.abs(v) < float("inf")


@triton.jit
def _score_finalize_kernel(part_ptr, sums_ptr, weight_ptr, logvar_ptr, state_ptr, loss_i_ptr, loss_ptr,
                           B, M, NB, prm_ptr,
                           OP: tl.constexpr, NORM: tl.constexpr, NORM_ON_LOSS: tl.constexpr,
                           RED: tl.constexpr, SAMPLE_MEAN: tl.constexpr, RMS: tl.constexpr,
                           TO_NUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_LOGVAR: tl.constexpr,
                           NBP: tl.constexpr, ACC: tl.constexpr):
    """RED: 0 mean (SCORE/SID: ÷ valid elements; SCM/DENOISE: ÷ B), 1 sum, 2 batchmean (÷ B), 3 none.
    NORM (SCORE): 0 none, 1 per sample, 2 global."""
    scale, clamp = tl.load(prm_ptr + 2), tl.load(prm_ptr + 3)
    eps, c, gmax = tl.load(prm_ptr + 4), tl.load(prm_ptr + 5), tl.load(prm_ptr + 6)
    FMAX: tl.constexpr = 3.4028234663852886e38
    blocks = tl.arange(0, NBP)
    bm = blocks < NB
    Mf = M.to(ACC)
    tot0 = tl.zeros([1], ACC).sum(0)
    tot2 = tl.zeros([1], ACC).sum(0)
    # pass 1: per-sample sums in block order (deterministic), and the batch totals
    for b in range(B):
        p = part_ptr + (b * NB + blocks) * 5
        v0 = tl.sum(tl.load(p + 0, mask=bm, other=0.0), 0)
        v1 = tl.sum(tl.load(p + 1, mask=bm, other=0.0), 0)
        v2 = tl.sum(tl.load(p + 2, mask=bm, other=0.0), 0)
        v3 = tl.sum(tl.load(p + 3, mask=bm, other=0.0), 0)
        v4 = _nanmax(tl.load(p + 4, mask=bm, other=0.0))
        q = sums_ptr + b * 5
        tl.store(q + 0, v0)
        tl.store(q + 1, v1)
        tl.store(q + 2, v2)
        tl.store(q + 3, v3)
        tl.store(q + 4, v4)
        tot0 += v0
        tot2 += v2
    Bf = B.to(ACC)
    if OP <= 1:
        if RED == 0:
            kappa = tl.where(tot2 > 0, scale / tl.where(tot2 > 0, tot2, 1.0), 0.0)
        elif RED == 2:
            kappa = scale / Bf
        else:
            kappa = scale
    else:
        if RED == 0:
            beta = 1.0 / Bf
        else:
            beta = tl.full([], 1.0, ACC)
    if NORM == 2:
        w_glob = tl.maximum(tot0 / (Bf * Mf), clamp, propagate_nan=tl.PropagateNan.ALL) + eps
    total = tl.zeros([1], ACC).sum(0)
    for b in range(B):
        q = sums_ptr + b * 5
        v0 = tl.load(q + 0)
        v1 = tl.load(q + 1)
        v2 = tl.load(q + 2)
        v3 = tl.load(q + 3)
        v4 = tl.load(q + 4)
        if HAS_WEIGHT:
            h = tl.load(weight_ptr + b).to(ACC)
        else:
            h = tl.full([], 1.0, ACC)
        if OP >= 2:  # SCM / DENOISE: a float weight arrives as scale
            h = h * scale
        dlv = tl.full([], 0.0, ACC)
        if OP == 0:
            if NORM == 0:
                w = tl.full([], 1.0, ACC)
            elif NORM == 1:
                w = tl.maximum(v0 / Mf, clamp, propagate_nan=tl.PropagateNan.ALL) + eps
            else:
                w = w_glob
            gco = kappa * h / w
            if NORM_ON_LOSS:
                loss = gco * v1
            else:
                loss = gco * v1 / w
            bad = (v3 > 0) | ~(_finite(w) & (w > 0)) | ~_fits(v4 * gco, gmax) | ~_finite(h)
        elif OP == 1:
            w = tl.maximum(v0 / Mf, clamp, propagate_nan=tl.PropagateNan.ALL) + eps
            gco = kappa / w
            loss = gco * v1
            bad = (v3 > 0) | ~(_finite(w) & (w > 0)) | ~_fits(v4 * gco, gmax)
        elif OP == 2:
            if RMS:
                nrm = tl.sqrt(v0 / Mf)
            else:
                nrm = tl.sqrt(v0)
            w = nrm + c
            inv = tl.where(w > 0, 1.0 / tl.where(w > 0, w, 1.0), 0.0)
            a = v0 * inv * inv
            if SAMPLE_MEAN:
                a = a / Mf
            if HAS_LOGVAR:
                lv = tl.load(logvar_ptr + b).to(ACC)
                wexp = h * tl.exp(-lv)
            else:
                lv = tl.full([], 0.0, ACC)
                wexp = h
            gco = -2.0 * beta * wexp * inv
            if SAMPLE_MEAN:
                gco = gco / Mf
            bad = (v3 > 0) | ~_finite(v0) | ~_finite(h) | ~_finite(lv) | ~_finite(wexp) | ~_fits(v4 * gco, gmax)
            wa = wexp * a
            lv_ok = _finite(lv)
            if not TO_NUM:  # a bad sample keeps only its logvar term (none if logvar is not finite)
                wa = tl.where(bad, 0.0, wa)
                lv = tl.where(lv_ok, lv, 0.0)
            loss = beta * (wa + lv)
            if HAS_LOGVAR:
                dlv = beta * (1.0 - wa)
                if not TO_NUM:
                    dlv = tl.where(lv_ok, dlv, 0.0)
        else:
            w = tl.full([], 1.0, ACC)
            if SAMPLE_MEAN:
                inv = tl.where(v2 > 0, 1.0 / tl.where(v2 > 0, v2, 1.0), 0.0)
            else:
                inv = tl.full([], 1.0, ACC)
            loss = beta * h * v0 * inv
            gco = 2.0 * beta * h * inv
            bad = (v3 > 0) | ~_fits(v4 * gco, gmax) | ~_finite(h)
        if TO_NUM:  # NaN -> 0, ±inf -> ±max of the accumulation dtype (torch.nan_to_num; finite values kept)
            if ACC == tl.float64:
                loss = _to_num(loss, 1.7976931348623157e308)
                dlv = _to_num(dlv, 1.7976931348623157e308)
            else:
                loss = _to_num(loss, FMAX)
                dlv = _to_num(dlv, FMAX)
        elif OP != 2:
            loss = tl.where(bad, 0.0, loss)
            gco = tl.where(bad, 0.0, gco)
        else:
            gco = tl.where(bad, 0.0, gco)
        st = state_ptr + b * 4
        tl.store(st + 0, gco)
        tl.store(st + 1, w)
        tl.store(st + 2, bad.to(ACC))
        tl.store(st + 3, dlv)
        tl.store(loss_i_ptr + b, loss)
        total += loss
    tl.store(loss_ptr, total)


@triton.jit
def _to_num(v, VMAX: tl.constexpr):
    v = tl.where(v != v, 0.0, v)
    return tl.minimum(tl.maximum(v, -VMAX), VMAX)


@triton.jit
def _to_num_code(v, CODE: tl.constexpr):
    """nan_to_num into the range of dtype code CODE (fp16, bf16, fp32, fp64)."""
    if CODE == 0:
        r = _to_num(v, 65504.0)
    elif CODE == 1:
        r = _to_num(v, 3.3895313892515355e38)
    elif CODE == 2:
        r = _to_num(v, 3.4028234663852886e38)
    else:
        r = _to_num(v, 1.7976931348623157e308)
    return r


@triton.jit
def _score_grad_kernel(x_ptr, terms, coef_ptr, coef_sb, mask_ptr, state_ptr, go_ptr, go_sb, gx_ptr, gterms,
                       M, n_iter, prm_ptr,
                       OP: tl.constexpr, K: tl.constexpr, USE1: tl.constexpr, USE2: tl.constexpr,
                       HAS_MASK: tl.constexpr, PHI_HUBER: tl.constexpr, TO_NUM: tl.constexpr,
                       GMAX: tl.constexpr, TDT: tl.constexpr, WRITE_X: tl.constexpr, TGRAD: tl.constexpr,
                       BLOCK: tl.constexpr, ACC: tl.constexpr):
    huber_c, alpha = tl.load(prm_ptr + 0), tl.load(prm_ptr + 1)
    b = tl.program_id(0)
    blk = tl.program_id(1)
    base = b.to(tl.int64) * M
    coef_ptr += b * coef_sb
    TWO: tl.constexpr = OP == 1  # (the launcher passes USE2 = 0 unless OP is SID)
    # SCORE's d never contains x (its row-0 x coefficient is 0 by construction): skip the read.
    NEED_X: tl.constexpr = OP != 0
    go = tl.load(go_ptr + b * go_sb).to(ACC)
    # TO_NUM maps the op's own gradient, then the upstream gradient multiplies it (a GradScaler's overflow stays inf)
    if TO_NUM:
        f = tl.load(state_ptr + b * 4).to(ACC)
    else:
        f = tl.load(state_ptr + b * 4).to(ACC) * go
    bad = tl.load(state_ptr + b * 4 + 2) > 0
    a0 = tl.load(coef_ptr).to(ACC)
    b0 = tl.load(coef_ptr + (K + 1)).to(ACC)
    ar = tl.arange(0, BLOCK)
    start = blk.to(tl.int64) * n_iter * BLOCK
    for it in range(n_iter):
        offs = start + it * BLOCK + ar
        inb = offs < M
        if NEED_X:
            x = tl.load(x_ptr + base + offs, mask=inb, other=0.0).to(ACC)
        else:
            x = tl.zeros([BLOCK], ACC)
        c1, c2 = _combos(x, terms, coef_ptr, base, offs, inb, K, USE1, USE2, TWO, ACC)
        if HAS_MASK:
            m = tl.load(mask_ptr + base + offs, mask=inb, other=0).to(ACC) * f
        else:
            m = f + tl.zeros([BLOCK], ACC)
        if OP == 0:
            gx = m * _phi(c1, huber_c, PHI_HUBER)
        elif OP == 1:
            e = c1 - x
            diff = c1 - c2
            dfr = e + (1.0 - 2.0 * alpha) * diff
            dff = 2.0 * alpha * diff - e
            gx = m * (a0 * dfr + b0 * dff - diff)
            for k in tl.static_range(K):
                if (TGRAD >> k) & 1:
                    gt = m * (tl.load(coef_ptr + 1 + k).to(ACC) * dfr + tl.load(coef_ptr + (K + 2) + k).to(ACC) * dff)
                    if TO_NUM:  # in term k's own dtype range (within ACC)
                        gt = _to_num_code(gt, (TDT >> (2 * k)) & 3) * go
                    else:
                        gt = tl.where(bad, 0.0, gt)
                    tl.store(gterms[k] + base + offs, gt.to(gterms[k].dtype.element_ty), mask=inb)
        elif OP == 2:
            gx = m * c1
        else:
            gx = m * a0 * c1
        if WRITE_X:
            if TO_NUM:
                gx = _to_num(gx, GMAX) * go
            else:
                gx = tl.where(bad, 0.0, gx)
            tl.store(gx_ptr + base + offs, gx.to(gx_ptr.dtype.element_ty), mask=inb)


# ----------------------------------------------------------------------------- launchers
_TL_ACC = {"float32": tl.float32, "float64": tl.float64}


def grad_max(dtype, acc) -> float:
    """The largest finite gradient element: the gradient's dtype, within the accumulation dtype."""
    import torch

    return float(min(torch.finfo(dtype).max, torch.finfo(acc).max))


def dtype_codes(terms, acc) -> int:
    """TDT: two bits per term, the code (0 fp16, 1 bf16, 2 fp32, 3 fp64) of its gradient dtype's
    range within ``acc``."""
    import torch

    codes = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
    cap = codes[acc] if acc in (torch.float32, torch.float64) else 3
    return sum(min(codes[t.dtype], cap) << (2 * k) for k, t in enumerate(terms))


def _blocking(M: int) -> tuple[int, int]:
    """(n_iter, NB): each program reduces n_iter·BLOCK elements; at most MAX_BLOCKS_PER_SAMPLE blocks."""
    nblk = max(1, triton.cdiv(M, BLOCK))
    n_iter = triton.cdiv(nblk, MAX_BLOCKS_PER_SAMPLE)
    return n_iter, triton.cdiv(nblk, n_iter)


def grad_unit(p, x_dtype, term_dtypes) -> float:
    """s4's unit: the narrowest range among the gradients asked for (x's, and SID's terms that require grad)."""
    acc = p.accum_dtype
    tneed = p.tneed if p.op == OP_SID else 0
    return min([grad_max(x_dtype, acc)] + [grad_max(d, acc) for k, d in enumerate(term_dtypes) if (tneed >> k) & 1])


def _params(p, unit: float, device, acc):
    """The plan's float parameters (huber_c, alpha, scale, clamp, eps, c, the gradient range) as a device tensor in
    the accumulation dtype (``p.param_vector``: cached in eager mode; under torch.compile built in the graph): kernel
    float arguments are fp32, too coarse for accum_dtype=float64 (1.2 became 1.2000000477; the fp64 range's bound
    became inf)."""
    return p.param_vector(unit, device, acc)


@on_tensor_device
def score_fwd(p, x, terms, coef, mask, weight, logvar):
    """Passes 1 and 2. ``p`` is the op's static plan (fastdistill.ops.score.Plan); tensors are
    ``[B, M]`` contiguous views. Returns (loss [1], loss_i [B], state [B, 4]) in the plan's
    accumulation dtype."""
    import torch

    B, M = x.shape
    acc = p.accum_dtype
    n_iter, NB = _blocking(M)
    part = torch.empty((B, NB, NSTAT), dtype=acc, device=x.device)
    sums = torch.empty((B, NSTAT), dtype=acc, device=x.device)
    state = torch.empty((B, NSTATE), dtype=acc, device=x.device)
    loss_i = torch.empty((B,), dtype=acc, device=x.device)
    loss = torch.empty((1,), dtype=acc, device=x.device)
    ACC = _TL_ACC[str(acc).removeprefix("torch.")]
    coef_sb = coef.stride(0) if coef.shape[0] > 1 else 0
    tneed = p.tneed if p.op == OP_SID else 0
    tdt = dtype_codes(terms, acc)
    unit = grad_unit(p, x.dtype, [t.dtype for t in terms])
    prm = _params(p, unit, x.device, acc)
    _score_stats_kernel[(B, NB)](
        x, tuple(terms), coef, coef_sb, mask if mask is not None else x, part, M, n_iter, NB, prm,
        OP=p.op, K=len(terms), USE1=p.use1, USE2=p.use2 if p.op <= OP_SID else 0,
        HAS_MASK=mask is not None, PHI_HUBER=p.phi_huber, NORM_ON_LOSS=p.norm_on_loss,
        TNEED=tneed, TDT=tdt, UNIT=unit, XR=unit / grad_max(x.dtype, acc),
        BLOCK=BLOCK, ACC=ACC, num_warps=NUM_WARPS,
    )
    _score_finalize_kernel[(1,)](
        part, sums, weight if weight is not None else x, logvar if logvar is not None else x,
        state, loss_i, loss, B, M, NB, prm,
        OP=p.op, NORM=p.norm, NORM_ON_LOSS=p.norm_on_loss, RED=p.red, SAMPLE_MEAN=p.sample_mean,
        RMS=p.rms, TO_NUM=p.to_num, HAS_WEIGHT=weight is not None, HAS_LOGVAR=logvar is not None,
        NBP=triton.next_power_of_2(NB), ACC=ACC, num_warps=4,
    )
    return loss, loss_i, state


@on_tensor_device
def score_bwd(p, x, terms, coef, mask, state, grad_out, need_x, need_terms):
    """Pass 3: the gradients. ``grad_out`` is [1] (scalar loss) or [B] (reduction "none").
    Returns (grad_x or None, [grad_term_k or None])."""
    import torch

    B, M = x.shape
    n_iter, NB = _blocking(M)
    gx = torch.empty_like(x) if need_x else None
    gterms = [torch.empty_like(t) if need else None for t, need in zip(terms, need_terms)]
    tgrad = sum(1 << k for k, need in enumerate(need_terms) if need)
    ACC = _TL_ACC[str(p.accum_dtype).removeprefix("torch.")]
    _score_grad_kernel[(B, NB)](
        x, tuple(terms), coef, coef.stride(0) if coef.shape[0] > 1 else 0, mask if mask is not None else x,
        state, grad_out, 1 if grad_out.numel() > 1 else 0, gx if gx is not None else x,
        tuple(g if g is not None else x for g in gterms), M, n_iter,
        _params(p, 0.0, x.device, p.accum_dtype),  # (the gradient range is the GMAX constexpr here)
        OP=p.op, K=len(terms), USE1=p.use1, USE2=p.use2 if p.op == OP_SID else 0,
        HAS_MASK=mask is not None, PHI_HUBER=p.phi_huber, TO_NUM=p.to_num,
        GMAX=grad_max(x.dtype, p.accum_dtype), TDT=dtype_codes(terms, p.accum_dtype), WRITE_X=need_x, TGRAD=tgrad,
        BLOCK=BLOCK, ACC=ACC, num_warps=NUM_WARPS,
    )
    return gx, gterms
