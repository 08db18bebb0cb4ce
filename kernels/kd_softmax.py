"""Triton kernels of ``kd_loss`` (docs/kd_ops.md): one program per row, the vocabulary streamed
in blocks of BLOCK_V with online max / sum-exp for student and teacher together.

  _kd_stats_kernel   pass 1: lse of both models (and the untempered student lse for CE), the
                     label logit, and for fkl / rkl the divergence itself through the rescaled
                     running sums A = Σ e^{u_t − m_t}((u_t − m_t) − (u_s − m_s)) (fkl; rkl with the
                     roles swapped), re-based when the maxima move: Σ p (log p − log q) = A/l_t + ln(l_s / l_t), free of
                     the two models' logit offset.
  _kd_div_kernel     pass 2 (jsd / skl / srkl / tvd): with both lse known, the divergence and the
                     row sum S = Σ q·g that the softmax Jacobian of their gradient needs.
  _kd_reduce_kernel  one program: the valid-row count and the reduced loss (fixed order).
  _kd_grad_kernel    backward: the gradient w.r.t. the raw student logits, written directly
                     (into the logits buffer itself when inplace_grad).
Per-row state (fp32, [N, 11]): lse_s, lse_t, lse_s1, D, S, contrib, ce, valid, lse_s_lo, lse_t_lo, lse_s1_lo
(top-k tail_bucket: the stats pass leaves log q_tail in slot 1, which _kd_topk_kernel reads, then overwrites).
The logsumexps are kept as hi + lo (``_lse2``) and log-probs formed as (u − hi) − lo: as accurate as
log_softmax's (u − m) − log l, where u − hi alone would carry ulp(m) in every log-prob.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastdistill._backend import on_tensor_device
from fastdistill.ops._common import n_rows, row_groups, row_strides

DIV_FKL, DIV_RKL, DIV_JSD, DIV_SKL, DIV_SRKL, DIV_TVD = range(6)
NSTATE = 11
ST = tl.constexpr(NSTATE)  # the state's row stride inside the kernels
# The kernels that form an exact log-ratio (_log_ratio's TwoSum of tempered logits zt·inv_Tt, z·inv_T) are launched
# without fp fusion: a product that the compiler contracts into the TwoSum's subtraction (an fma) leaves its error
# term off by the product's rounding. They are memory bound (no fma-heavy loops). The stats kernel keeps fusion
# (without it, its forward-KL variant spills on sm_90a). LAUNCH_OPTS: by kernel name, for benchmarks/triton_codegen.py.
NO_FP_FUSION = {"enable_fp_fusion": False}
LAUNCH_OPTS = {name: NO_FP_FUSION for name in ("_kd_div_kernel", "_kd_topk_kernel", "_kd_grad_kernel")}
MAX_BLOCK_V = 2048
# tail_bucket: the stats pass forms the student's tail mass as l_tail / l, l_tail = l − Σ_ids e^{u_i − G}, the
# row's sum-exp l taken in float64 in a frame G that starts at the ids' largest logit and moves only when the row's
# max passes it by FRAME_SLACK: the ids' terms are then the very fp32 numbers summed into l, so l_tail is the float64
# sum of the off-id terms to float64's rounding, ≲ (log2 BLOCK_V + V / BLOCK_V)·2⁻⁵³·l (8e-15·l at V = 128k), no
# 1 − Σ q cancellation (1 − Σ q_ids in fp32: up to 11x plain fp32's loss error at q_tail ≈ 0.02). Below TAIL_EXACT that
# bound would reach ~0.1 ulp of q_tail, and the tail may lie in fp32's denormals: the log-space sum over the columns
# off the ids instead (a second read of the row, for confident rows only)
TAIL_EXACT = tl.constexpr(2.0 ** -20)
FRAME_SLACK = tl.constexpr(64.0)  # e^64 ≈ 6e27: a term never overflows fp32


@triton.jit
def _tanh(x):
    # odd series near 0 (no cancellation), (1 − e^{−2|x|})/(1 + e^{−2|x|}) elsewhere. The series through x^11 is
    # < 1 ulp in fp32 up to |x| = 0.3, where 1 − e amplifies the error of e (the GPU's approximate exp, ~2 ulp)
    # only 1.2x (at the old cutoff 0.1: 4.5x, ~10 ulp in tanh); fp64 (parity mode) keeps 0.1 (< 1e-15 there)
    ax = tl.abs(x)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    if x.dtype == tl.float64:
        return tl.where(ax < 0.1, small, big)
    else:
        return tl.where(ax < 0.3, small, big)


@triton.jit
def _sech2(x):
    """1 − tanh²(x) = 4e/(1 + e)², e = e^{−2|x|}: no cancellation where tanh saturates (1 − th² from a rounded
    th loses eps/(1 − th²) relative there)."""
    e = tl.exp(-2.0 * tl.abs(x))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _logits_d(ptr, cols, cm, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              ACC: tl.constexpr):
    """(the transformed logits, d transformed / d raw): the chain rule of logit_scale and softcap, the latter from
    the uncapped value (see _sech2)."""
    # masked-off columns load as −inf: with softcap one select on y serves them and −inf logits (which stay −inf, as
    # in _logits; d/dz = _sech2(−inf) = 0), keeping the grad kernel's top-k path spill-free on sm_90a with Triton
    # 3.6 and 3.9 (a select on z, or a second one for the column mask, spills 4 bytes in one or the other)
    z = tl.load(ptr + cols, mask=cm, other=float("-inf")).to(ACC)
    dz = tl.full(z.shape, 1.0, ACC)
    if HAS_SCALE:
        z = z * logit_scale
        dz = dz * logit_scale
    if HAS_SOFTCAP:
        y = z / softcap
        dz = dz * _sech2(y)
        z = tl.where(y == float("-inf"), y, softcap * _tanh(y))
    return z, dz


@triton.jit
def _logits(ptr, cols, cm, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
            ACC: tl.constexpr):
    z = tl.load(ptr + cols, mask=cm, other=float("-inf")).to(ACC)  # masked-off columns: −inf
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:  # −inf stays −inf (probability 0: a masked column)
        z = tl.where(z == float("-inf"), z, softcap * _tanh(z / softcap))
    return z


@triton.jit
def _params(prm_ptr):
    """The float parameters, from a small tensor in the accumulation dtype (kernel float arguments
    would be fp32, too coarse for the fp64 parity mode)."""
    return (tl.load(prm_ptr + 0), tl.load(prm_ptr + 1), tl.load(prm_ptr + 2), tl.load(prm_ptr + 3),
            tl.load(prm_ptr + 4), tl.load(prm_ptr + 5), tl.load(prm_ptr + 6), tl.load(prm_ptr + 7))


@triton.jit
def _mix_weights(prm_ptr):
    """(1 − beta, 1 − skew), formed on the host in float64: within fp32 rounding of 1, beta itself
    rounds to 1 and 1 − beta in the kernel would be 0 (a NaN divergence)."""
    return tl.load(prm_ptr + 8), tl.load(prm_ptr + 9)


@triton.jit
def _clamp0(D):
    """max(D, 0) for a divergence that may round below 0; NaN stays NaN (tl.maximum drops it)."""
    return tl.maximum(D, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _mix(D, ce, alpha, t2):
    """(1 − α)·t2·D + α·CE, with the KD term exactly absent at α = 1 (an infinite D stays out)."""
    return tl.where(alpha < 1.0, (1.0 - alpha) * t2 * D, 0.0) + alpha * ce


@triton.jit
def _safe(m):
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _rescale(acc, r):
    """A running divergence sum moved to a new max: 0 where the factor underflowed to 0. The sum can be +inf in
    its old frame (mass × an infinite log-ratio) while that mass is 0 in the row's frame: not inf · 0 = NaN."""
    return tl.where(r > 0, acc * r, 0.0)


@triton.jit
def _online_lse(m, l, x, km):
    """A chunk of values x (where km) into a running (max m, sum-exp l relative to it): m + log l is their
    logsumexp so far. m = −inf, l = 0 to start; one chunk gives the plain max-then-sum."""
    m_new = tl.maximum(m, tl.max(tl.where(km, x, float("-inf")), 0))
    return m_new, l * tl.exp(m - _safe(m_new)) + tl.sum(tl.where(km, tl.exp(x - _safe(m_new)), 0.0), 0)


@triton.jit
def _renorm_teacher(lp_row, K, inv_Tt, KB: tl.constexpr, ACC: tl.constexpr):
    """The logsumexp of the k stored teacher log-probs, tempered (lp·inv_Tt), as hi + lo (_lse2): renormalised, they
    are (lp·inv_Tt − hi) − lo. Read in chunks of KB."""
    m = tl.zeros([1], ACC).sum(0) + float("-inf")
    l = tl.zeros([1], ACC).sum(0)
    for k0 in range(0, K, KB):
        kk = k0 + tl.arange(0, KB)
        km = kk < K
        m, l = _online_lse(m, l, tl.load(lp_row + kk, mask=km, other=float("-inf")).to(ACC) * inv_Tt, km)
    return _lse2(m, l)


@triton.jit
def _two_diff(a, b):
    """a − b as s + e exactly (TwoSum of a and −b; additions only)."""
    s = a - b
    bb = s - a
    return s, (a - (s - bb)) - (b + bb)


@triton.jit
def _log_ratio(a, ha, la, b, hb, lb):
    """log p − log q for log p = (a − ha) − la, log q = (b − hb) − lb, to about an ulp of the difference itself:
    a − b and ha − hb kept exactly, so (a − b) − (ha − hb) is exact where they nearly cancel (a teacher close to
    the student). The difference of the two rounded log-probs is ~ulp(log q) off there, which TVD's
    |p − q| = q·|e^{log p − log q} − 1| magnifies. Where it is ≥ 1 in size, or not finite, the plain difference."""
    s, e = _two_diff(a, b)
    c, f = _two_diff(ha, hb)
    naive = ((a - ha) - la) - ((b - hb) - lb)
    fine = (s - c) + ((e - f) - (la - lb))
    return tl.where((tl.abs(naive) < 1.0) & (tl.abs(fine) < float("inf")), fine, naive)  # a − b overflowing: NaN


@triton.jit
def _tvd_terms(a, ha, la, b, hb, lb, DIV: tl.constexpr):
    """For TVD (the one divergence that forms p − q; placeholders otherwise, unused): _log_ratio of
    log p = (a − ha) − la and log q = (b − hb) − lb, and q = e^{b − hb}·e^{−lb} (e^{log q} would carry the rounding
    of log q at |log q|, eps·|log q| relative, into the gradient q·(±1/2 − S))."""
    if DIV == 5:
        return _log_ratio(a, ha, la, b, hb, lb), tl.exp(b - hb) * tl.exp(-lb)
    else:
        return b, b


@triton.jit
def _q_minus_p(a, ha, la, b, hb, lb):
    """q − p for log p = (a − ha) − la, log q = (b − hb) − lb: −q·(e^{dl} − 1), dl from _log_ratio and
    q = e^{b − hb}·e^{−lb}, where |dl| < 1/2 (a close teacher: e^{log q} − e^{log p} would cancel, magnifying the
    ~eps·|log q| rounding of each log-prob), else e^{log q} − e^{log p}."""
    dl = _log_ratio(a, ha, la, b, hb, lb)
    small = tl.abs(dl) < 0.5
    q = tl.exp(b - hb) * tl.exp(-lb)
    return tl.where(small, -q * _expm1_small(tl.where(small, dl, 0.0)), q - tl.exp((a - ha) - la))


@triton.jit
def _expm1_small(x):
    """e^x − 1 for |x| ≤ 1/2, no cancellation: Taylor in Horner form, truncated below the dtype's rounding
    (x^10/10! ≤ 3e-10 relative in fp32; x^17/17! ≤ 4e-20 in fp64)."""
    r = tl.zeros_like(x) + 1.0
    if x.dtype == tl.float64:
        for j in tl.static_range(0, 15):
            r = 1.0 + r * x * (1.0 / (16 - j))
    else:
        for j in tl.static_range(0, 8):
            r = 1.0 + r * x * (1.0 / (9 - j))
    return x * r


@triton.jit
def _lse2(m, l):
    """m + log l as hi + lo; lo = 0 where hi is not finite (an all −inf row). fp32: formed in fp64 (once per row):
    log l rounded in fp32 would be off by ulp(log l) ~ eps·log V, a shift of every log-prob that the divergence
    of a close teacher magnifies (softmax's common error is only 1/l's rounding, eps). fp64: TwoSum."""
    ms = _safe(m)
    if m.dtype == tl.float64:  # (fp32 m with a float64 l: the tail_bucket stats pass's sum, fp32 hi + lo below)
        ll = tl.log(l)
        hi = ms + ll
        bb = hi - ms
        lo = (ms - (hi - bb)) + (ll - bb)
    else:  # lo = (ms − hi) + log l with ms − hi exact (hd − hi would carry hd's rounding at |ms|·2⁻⁵³)
        ll = tl.log(l.to(tl.float64))
        hi = (ms.to(tl.float64) + ll).to(tl.float32)
        lo = ((ms.to(tl.float64) - hi.to(tl.float64)) + ll).to(tl.float32)
    return hi, tl.where(tl.abs(lo) < float("inf"), lo, 0.0)


@triton.jit
def _logp(z, inv_T, hi, lo):
    """Log-probabilities (z/T − hi) − lo of logits z given the row's logsumexp hi + lo (_lse2)."""
    return (z * inv_T - hi) - lo


@triton.jit
def _row(ptr, row, R, gstride, stride):
    """Row ``row`` of a [G, R, ·] view (group stride ``gstride``, row stride ``stride``; rows are numbered group-major:
    e.g. shifted [B, T − 1, V] logits sliced from [B, T, V] ones, read without a copy). A [N, ·] matrix is one
    group (R = N)."""
    r = row.to(tl.int64)
    return ptr + (r // R) * gstride + (r % R) * stride


@triton.jit
def _row_valid(row, lab_ptr, mask_ptr, ignore_index, HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr):
    ok = row >= 0
    if HAS_LABELS:
        ok = ok & (tl.load(lab_ptr + row) != ignore_index)
    if HAS_MASK:
        ok = ok & (tl.load(mask_ptr + row) != 0)
    return ok


@triton.jit
def _mixdiffs(a, la, b, lb):
    """(la − lm, lb − lm) with lm = log(a·e^la + b·e^lb) (a, b > 0), formed without lm itself: lm rounded at
    |lm| (~ulp of a log-prob) would add that error to every term of a divergence that is a small difference."""
    mx = _safe(tl.maximum(la, lb))
    da = la - mx
    db = lb - mx
    r = tl.log(a * tl.exp(da) + b * tl.exp(db))
    return da - r, db - r


@triton.jit
def _xlogy(w, a):
    """w·a with 0 where w == 0 (0·log 0 = 0, 0·(−inf) = 0); NaN where w is NaN (a NaN input shows in the loss)."""
    return tl.where(w > 0, w * a, tl.where(w != w, w, 0.0))


@triton.jit
def _div_terms(lq, lp, dl, qt, beta, skew, omb, oms, DIV: tl.constexpr):
    """Per-element divergence contribution d and q·g with g = ∂D/∂q, and q (any divergence; the
    dense fkl / rkl paths use their closed forms instead, top-k buckets use this for all). q·g is
    0 where q = 0, except forward KL's −p (the limit of q·(−p/q), where D is +inf). omb, oms:
    1 − beta, 1 − skew (see _mix_weights). dl, qt: log p − log q and q from _tvd_terms (TVD only)."""
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIV == 0:  # forward KL
        d = _xlogy(p, lp - lq)
        qg = -p
    elif DIV == 1:  # reverse KL
        d = _xlogy(q, lq - lp)
        qg = tl.where(q > 0, q * (lq - lp + 1.0), 0.0)
    elif DIV == 2:  # JSD(β), M = βP + (1−β)Q
        dp, dq = _mixdiffs(beta, lp, omb, lq)
        d = beta * _xlogy(p, dp) + omb * _xlogy(q, dq)
        qg = omb * tl.where(q > 0, q * dq, 0.0)
    elif DIV == 3:  # skew KL: KL(P ‖ λP + (1−λ)Q)
        dp, _ = _mixdiffs(skew, lp, oms, lq)
        d = _xlogy(p, dp)
        qg = -oms * tl.where((p > 0) & (q > 0), q * tl.exp(dp), 0.0)
    elif DIV == 4:  # skew reverse KL: KL(Q ‖ (1−λ)P + λQ)
        _, dq = _mixdiffs(oms, lp, skew, lq)
        d = _xlogy(q, dq)
        qg = tl.where(q > 0, q * (dq + 1.0 - skew * tl.exp(dq)), 0.0)
    else:  # TVD: |p − q| = q·|e^{dl} − 1| where |dl| < 1/2 (no cancellation); q − p has the sign of −dl
        q = qt
        small = tl.abs(dl) < 0.5
        d = 0.5 * tl.where(small, q * tl.abs(_expm1_small(tl.where(small, dl, 0.0))), tl.abs(p - q))
        qg = q * tl.where(dl < 0, 0.5, tl.where(dl > 0, -0.5, 0.0))
    return d, qg, q


@triton.jit
def _kd_du(qg, q, S):
    """∂D/∂u = q·g − q·S over a softmax (S = Σ q·g); 0 where S = +inf: a reverse-type divergence that
    is +inf (p = 0 where q > 0) has no finite gradient (docs/kd_ops.md, "Non-finite inputs")."""
    return tl.where(S == float("inf"), 0.0, qg - q * S)


@triton.jit
def _weighted(loss, w_ptr, row, HAS_W: tl.constexpr, ACC: tl.constexpr):
    """loss × the row's weight; weight 0 adds exactly nothing, like a masked row (not 0·inf = NaN)."""
    if HAS_W:
        w = tl.load(w_ptr + row).to(ACC)
        loss = tl.where(w == 0, 0.0, loss * w)
    return loss


@triton.jit
def _tail_terms(z, inv_T, g):
    """e^{u − G} of tempered logits u = z·inv_T, with z·inv_T − G rounded once (an fma): the stats loop and its
    epilogue then form the very same fp32 numbers whatever the compiler contracts (tail_bucket, see TAIL_EXACT)."""
    return tl.exp(tl.fma(z, inv_T, -_safe(g)))


@triton.jit
def _ids_chunk(ids_ptr, ids_stride, row, k0, K, V, KB: tl.constexpr, AGAIN: tl.constexpr = False):
    """Ids k0 .. k0 + KB of a row, clamped into [0, V) (never an out-of-row read; _kd_topk_kernel makes a bad row's
    loss NaN), and their mask. The kernels walk the k ids in chunks of KB ≤ K_CHUNK: never k values per row held in
    registers (k = 4096 took up to 255 registers and spilled on sm_90a)."""
    ids, km = _ids_raw(ids_ptr, ids_stride, row, k0, K, KB, AGAIN)
    return tl.minimum(tl.maximum(ids, 0), V - 1), km


@triton.jit
def _ids_raw(ids_ptr, ids_stride, row, k0, K, KB: tl.constexpr, AGAIN: tl.constexpr = False):
    kk = k0 + tl.arange(0, KB)
    km = kk < K
    return tl.load(ids_ptr + row.to(tl.int64) * ids_stride + kk, mask=km, other=0, volatile=AGAIN).to(tl.int64), km


@triton.jit
def _ids_checked(ids_ptr, ids_stride, row, k0, K, V, KB: tl.constexpr):
    """_ids_chunk, and how many of its ids lie outside [0, V)."""
    ids, km = _ids_raw(ids_ptr, ids_stride, row, k0, K, KB)
    bad = tl.sum(tl.where(km & ((ids < 0) | (ids >= V)), 1, 0), 0)
    return tl.minimum(tl.maximum(ids, 0), V - 1), km, bad


@triton.jit
def _off_ids(sid_row, p, K, cols, hi, TB: tl.constexpr, TW: tl.constexpr):
    """Which of the tile's columns (cols, all < hi) are off the ids, from the row's ids sorted ascending (sid_row),
    those before p lying below the tile: a merge walk, windows of TW ids until one reaches past the tile. O(V·TW +
    k·TB) comparisons for all of a row's tiles (comparing every column with every id was O(V·k)). Returns (off, p
    moved past the tile's ids)."""
    hits = tl.zeros([TB], tl.int32)
    aw = tl.arange(0, TW)
    more = True
    while more:
        kw = p + aw
        sid = tl.load(sid_row + kw, mask=kw < K, other=0)
        sid = tl.minimum(tl.maximum(sid, -1), hi).to(tl.int32)  # monotone: still sorted; int32 compares
        inw = (kw < K) & (sid < hi)  # sorted: the window's ids below hi are a prefix of it
        hits += tl.sum(tl.where((cols[:, None] == sid[None, :]) & inw[None, :], 1, 0), 1)
        n = tl.sum(inw.to(tl.int32), 0)
        p += n
        more = n == TW  # the whole window lay in the tile: there may be more
    return hits == 0, p


@triton.jit
def _tail_ids_max(s_row, ids_ptr, ids_stride, row, K, V, inv_T, logit_scale, softcap, HAS_SCALE: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, KB: tl.constexpr, ACC: tl.constexpr):
    g = tl.zeros([1], ACC).sum(0) + float("-inf")
    for k0 in range(0, K, KB):
        ids, km = _ids_chunk(ids_ptr, ids_stride, row, k0, K, V, KB)
        zk = _logits(s_row, ids, km, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
        g = tl.maximum(g, tl.max(zk * inv_T, 0))
    return g


@triton.jit
def _tail_ids_sum(s_row, ids_ptr, ids_stride, row, K, V, inv_T, g, logit_scale, softcap, HAS_SCALE: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr, KB: tl.constexpr, ACC: tl.constexpr):
    """Σ of the ids' terms e^{u − G} in float64, read again after the loop (not held across it in registers)."""
    acc = tl.zeros([1], tl.float64).sum(0)
    for k0 in range(0, K, KB):
        ids, km = _ids_chunk(ids_ptr, ids_stride, row, k0, K, V, KB, True)
        zk = _logits(s_row, ids, km, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
        acc += tl.sum(tl.where(km, _tail_terms(zk, inv_T, g), 0.0).to(tl.float64), 0)
    return acc


@triton.jit
def _kd_stats_kernel(s_ptr, t_ptr, lab_ptr, mask_ptr, w_ptr, st_ptr, prm_ptr, V, Vt, s_stride, t_stride,
                     R, s_gstride, t_gstride, ignore_index,
                     DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr,
                     CE: tl.constexpr, CE_SEP: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                     BLOCK_V: tl.constexpr, ACC: tl.constexpr, TOPK: tl.constexpr = False,
                     ids_ptr=None, ids_stride=0, K=1, TAIL: tl.constexpr = False, KB: tl.constexpr = 1):
    """TAIL (top-k tail_bucket; ids_ptr, ids_stride, K: the ids): the student's sum-exp in float64 in a lazy frame
    from the ids' largest logit, and log q_tail (see TAIL_EXACT) into state slot 1."""
    row = tl.program_id(0)
    inv_T, inv_Tt, _, _, logit_scale, softcap, _, _ = _params(prm_ptr)
    s_row = _row(s_ptr, row, R, s_gstride, s_stride)
    t_row = _row(t_ptr, row, R, t_gstride, t_stride)
    Vs = tl.minimum(V, Vt)
    ar = tl.arange(0, BLOCK_V)
    zero = tl.zeros([1], ACC).sum(0)
    m_s = zero + float("-inf")
    m_t = zero + float("-inf")
    m_1 = zero + float("-inf")
    l_s = zero
    l_t = zero
    l_1 = zero
    acc = zero
    zl = zero
    label = 0
    if HAS_LABELS:
        label = tl.load(lab_ptr + row).to(tl.int64)
    if TAIL:  # the frame G: the ids' largest (tempered) logit; l64: Σ e^{u − G} in float64
        g = _tail_ids_max(s_row, ids_ptr, ids_stride, row, K, V, inv_T, logit_scale, softcap, HAS_SCALE,
                          HAS_SOFTCAP, KB, ACC)
        l64 = tl.zeros([1], tl.float64).sum(0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + ar
        z = _logits(s_row, cols, cols < V, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
        if TAIL:  # the teacher is handled by _kd_topk_kernel
            ms_new = tl.maximum(m_s, tl.max(z * inv_T, 0))
            # the frame moves only where the row's max passes it by FRAME_SLACK (then the ids' terms are < e^{−64}
            # of the largest one) or where it has none yet (ids all −inf); its rescale in float64, skipped otherwise
            g_new = tl.where((g == float("-inf")) | (ms_new > g + FRAME_SLACK), ms_new, g)
            if g_new != g:
                l64 = _rescale(l64, tl.exp(g.to(tl.float64) - _safe(g_new).to(tl.float64)))
            l64 += tl.sum(_tail_terms(z, inv_T, g_new).to(tl.float64), 0)
            g = g_new
        elif TOPK:  # renorm / zero_tail: the student's sum-exp only (the teacher is handled by _kd_topk_kernel)
            us = z * inv_T
            ms_new = tl.maximum(m_s, tl.max(us, 0))
            l_s = l_s * tl.exp(m_s - _safe(ms_new)) + tl.sum(tl.exp(us - _safe(ms_new)), 0)
        else:
            zt = _logits(t_row, cols, cols < Vs, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
            us = z * inv_T
            ut = zt * inv_Tt
            ms_new = tl.maximum(m_s, tl.max(us, 0))
            mt_new = tl.maximum(m_t, tl.max(ut, 0))
            es = tl.exp(us - _safe(ms_new))
            et = tl.exp(ut - _safe(mt_new))
            rs = tl.exp(m_s - _safe(ms_new))
            rt = tl.exp(m_t - _safe(mt_new))
            # fkl / rkl: Σ w·(d_w − d_o) with d = u − m in each model's own frame (never u_t − u_s: that carries the
            # two models' logit offset, ulp(offset) in every term); moving frames re-bases the old sum by
            # δ = (m_w,new − m_w,old) − (m_o,new − m_o,old) times its old weight (l before this block), then rescales
            if DIV == 0:
                dlt = (_safe(mt_new) - _safe(m_t)) - (_safe(ms_new) - _safe(m_s))
                d = (ut - _safe(mt_new)) - (us - _safe(ms_new))
                acc = _rescale(acc - dlt * l_t, rt) + tl.sum(tl.where(et > 0, et * d, 0.0), 0)
            elif DIV == 1:
                dlt = (_safe(ms_new) - _safe(m_s)) - (_safe(mt_new) - _safe(m_t))
                d = (us - _safe(ms_new)) - (ut - _safe(mt_new))
                acc = _rescale(acc - dlt * l_s, rs) + tl.sum(tl.where(es > 0, es * d, 0.0), 0)
            l_s = l_s * rs + tl.sum(es, 0)
            l_t = l_t * rt + tl.sum(et, 0)
            m_t = mt_new
        if CE_SEP:
            m1_new = tl.maximum(m_1, tl.max(z, 0))
            l_1 = l_1 * tl.exp(m_1 - _safe(m1_new)) + tl.sum(tl.exp(z - _safe(m1_new)), 0)
            m_1 = m1_new
        if CE:
            zl += tl.sum(tl.where(cols == label, z, 0.0), 0)
        m_s = ms_new
    if TAIL:
        lse_s, lo_s = _lse2(g, l64)
        # log q_tail = log(l_tail / l): l_tail = l − the ids' terms, recomputed as in the loop (the same fp32 numbers
        # where the frame never moved; where it did, they are < e^{−64} of l). NaN: a NaN logit, shown in D anyway
        # inv_T, logit_scale, softcap read again: not held across the loop (8 bytes spilled on sm_90a otherwise)
        inv_T, _, _, _, logit_scale, softcap, _, _ = _params(prm_ptr)
        l_tail = l64 - _tail_ids_sum(s_row, ids_ptr, ids_stride, row, K, V, inv_T, g, logit_scale, softcap, HAS_SCALE,
                                     HAS_SOFTCAP, KB, ACC)
        lse_t = tl.log(tl.where(l_tail > 0, l_tail, 0.0) / l64).to(ACC)  # (state slot 1: log q_tail)
        lo_t = zero
        m_s = g  # CE at T = 1 below: m + log l in the frame G
        l_s = l64
    else:
        lse_s, lo_s = _lse2(m_s, l_s)
        lse_t, lo_t = _lse2(m_t, l_t)
    if CE_SEP:
        lse_1, lo_1 = _lse2(m_1, l_1)
        m_ce = m_1
        l_ce = l_1
    else:
        lse_1 = lse_s
        lo_1 = lo_s
        m_ce = m_s  # (T = 1: the student's u is z)
        l_ce = l_s
    ok = _row_valid(row, lab_ptr, mask_ptr, ignore_index, HAS_LABELS, HAS_MASK)
    # an all −inf row is invalid; a NaN / +inf logit keeps the row valid so that the NaN shows
    ok = ok & (lse_s != float("-inf"))
    if not TOPK:
        ok = ok & (lse_t != float("-inf"))
    ce = zero
    if CE:
        # (m − z_label) + log l, as cross_entropy's log_softmax: lse_1 − z_label carries lse_1's rounding at |m|
        # (170x its error on a confident row at a logit offset of 300)
        ce = tl.where((label >= 0) & (label < V), ((m_ce - zl) + tl.log(l_ce)).to(ACC), float("nan"))
    D = zero
    # Σ p (log p − log q) = A/l_t + (m_t − m_s) − lse_t + lse_s = A/l_t + ln(l_s / l_t): no offset either
    if DIV == 0:
        D = _clamp0(acc / l_t + tl.log(l_s / l_t))
    elif DIV == 1:
        D = _clamp0(acc / l_s + tl.log(l_t / l_s))
    _, _, alpha, t2, _, _, _, _ = _params(prm_ptr)  # read here: not held across the loop (sm_90a spills otherwise)
    loss = _weighted(_mix(D, ce, alpha, t2), w_ptr, row, HAS_W, ACC)
    st = st_ptr + row * ST
    tl.store(st + 8, lo_s)
    tl.store(st + 9, lo_t)
    tl.store(st + 10, lo_1)
    tl.store(st + 0, lse_s)
    tl.store(st + 1, lse_t)
    tl.store(st + 2, lse_1)
    tl.store(st + 3, D)
    tl.store(st + 4, zero)
    tl.store(st + 5, tl.where(ok, loss, 0.0))
    tl.store(st + 6, ce)
    tl.store(st + 7, ok.to(ACC))


@triton.jit
def _kd_div_kernel(s_ptr, t_ptr, w_ptr, st_ptr, prm_ptr, V, Vt, s_stride, t_stride, R, s_gstride, t_gstride,
                   DIV: tl.constexpr, HAS_W: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                   BLOCK_V: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    inv_T, inv_Tt, _, _, logit_scale, softcap, beta, skew = _params(prm_ptr)  # alpha, t2: after the loop
    omb, oms = _mix_weights(prm_ptr)
    s_row = _row(s_ptr, row, R, s_gstride, s_stride)
    t_row = _row(t_ptr, row, R, t_gstride, t_stride)
    st = st_ptr + row * ST
    lse_s = tl.load(st + 0)
    lse_t = tl.load(st + 1)
    lo_s = tl.load(st + 8)
    lo_t = tl.load(st + 9)
    Vs = tl.minimum(V, Vt)
    ar = tl.arange(0, BLOCK_V)
    dsum = tl.zeros([BLOCK_V], ACC)
    ssum = tl.zeros([BLOCK_V], ACC)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + ar
        z = _logits(s_row, cols, cols < V, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
        zt = _logits(t_row, cols, cols < Vs, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
        us = z * inv_T
        ut = zt * inv_Tt
        dl, qt = _tvd_terms(ut, lse_t, lo_t, us, lse_s, lo_s, DIV)
        d, qg, q = _div_terms((us - lse_s) - lo_s, (ut - lse_t) - lo_t, dl, qt, beta, skew, omb, oms, DIV)
        dsum += tl.where(cols < V, d, 0.0)
        ssum += tl.where(cols < V, qg, 0.0)
    D = _clamp0(tl.sum(dsum, 0))
    ok = tl.load(st + 7) > 0
    # alpha, t2 read here, not held in registers across the loop (the jsd kernel spilled 4 bytes on sm_90a)
    loss = _weighted(_mix(D, tl.load(st + 6), tl.load(prm_ptr + 2), tl.load(prm_ptr + 3)), w_ptr, row, HAS_W, ACC)
    tl.store(st + 3, D)
    tl.store(st + 4, tl.sum(ssum, 0))
    tl.store(st + 5, tl.where(ok, loss, 0.0))


@triton.jit
def _kd_topk_kernel(s_ptr, ids_ptr, lps_ptr, w_ptr, st_ptr, prm_ptr, V, K, s_stride, ids_stride, lps_stride, R,
                    s_gstride, sid_ptr, sid_stride,
                    DIV: tl.constexpr, MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_SCALE: tl.constexpr,
                    HAS_SOFTCAP: tl.constexpr, KB: tl.constexpr, TB: tl.constexpr, TW: tl.constexpr,
                    ACC: tl.constexpr):
    """Top-k teacher (MODE 1 tail bucket, 2 zero tail, 3 renormalised): the divergence over the
    buckets from the k gathered student logits and the stored teacher log-probs.
    State slot 1 receives: MODE 1 what the off-id gradient needs of the tail bucket (forward KL
    log(p_tail / q_tail), else g_tail), MODE 2 Σ p, MODE 3 the student's lse over the k ids.
    sid_ptr, sid_stride (MODE 1): the row's ids sorted ascending, for the exact tail's walk (see _off_ids)."""
    row = tl.program_id(0)
    inv_T, inv_Tt, _, _, logit_scale, softcap, beta, skew = _params(prm_ptr)
    omb, oms = _mix_weights(prm_ptr)
    st = st_ptr + row * ST
    lse_s = tl.load(st + 0)
    lo_s = tl.load(st + 8)
    s_row = _row(s_ptr, row, R, s_gstride, s_stride)
    lp_row = lps_ptr + row.to(tl.int64) * lps_stride
    ar = tl.arange(0, KB)
    zero = tl.zeros([1], ACC).sum(0)
    D = zero
    S = zero
    extra = zero
    n_bad = 0  # ids outside [0, V): the row's loss is NaN
    t_live = True  # renorm: a row whose k teacher log-probs (or student logits at the ids) are all −inf is invalid
    if MODE == 3:
        # pass 1 over the ids: the student's logsumexp over them and the teacher's renormaliser
        m_k = zero + float("-inf")
        l_k = zero
        m_t = zero + float("-inf")
        l_t = zero
        n_inf = 0
        for k0 in range(0, K, KB):
            ids, km, nb = _ids_checked(ids_ptr, ids_stride, row, k0, K, V, KB)
            n_bad += nb
            uk = _logits(s_row, ids, km, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC) * inv_T
            m_k, l_k = _online_lse(m_k, l_k, uk, km)
            lpk = tl.load(lp_row + k0 + ar, mask=km, other=float("-inf")).to(ACC)
            m_t, l_t = _online_lse(m_t, l_t, lpk * inv_Tt, km)  # as _renorm_teacher (the gradient's)
            n_inf += tl.sum(tl.where(km & (lpk == float("-inf")), 1, 0), 0)
        lse_k, lo_k = _lse2(m_k, l_k)
        # (a NaN keeps the row: NaN) the student −inf at all k ids has no distribution renormalised over them (0/0)
        t_live = (n_inf < K) & (lse_k != float("-inf"))
        tl.store(st + 9, lo_k)
        hi_t, lo_t = _lse2(m_t, l_t)
        for k0 in range(0, K, KB):  # pass 2: the divergence over the k
            ids, km = _ids_chunk(ids_ptr, ids_stride, row, k0, K, V, KB)
            uk = _logits(s_row, ids, km, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC) * inv_T
            lqk = (uk - lse_k) - lo_k  # hi + lo: hi alone is rounded at |m| (ulp(m) off in every log-prob)
            ut = tl.load(lp_row + k0 + ar, mask=km, other=float("-inf")).to(ACC) * inv_Tt
            dl, qt = _tvd_terms(ut, hi_t, lo_t, uk, lse_k, lo_k, DIV)
            d, qg, q = _div_terms(lqk, (ut - hi_t) - lo_t, dl, qt, beta, skew, omb, oms, DIV)
            D += tl.sum(tl.where(km, d, 0.0), 0)
            S += tl.sum(tl.where(km, qg, 0.0), 0)
        D = _clamp0(D)
        extra = lse_k
    else:
        P = zero  # Σ p over the k ids
        for k0 in range(0, K, KB):
            ids, km, nb = _ids_checked(ids_ptr, ids_stride, row, k0, K, V, KB)
            n_bad += nb
            uk = _logits(s_row, ids, km, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC) * inv_T
            lpk = tl.load(lp_row + k0 + ar, mask=km, other=float("-inf")).to(ACC)
            lqk = (uk - lse_s) - lo_s
            dl, qt = _tvd_terms(lpk, 0.0, 0.0, uk, lse_s, lo_s, DIV)
            d, qg, q = _div_terms(lqk, lpk, dl, qt, beta, skew, omb, oms, DIV)
            D += tl.sum(tl.where(km, d, 0.0), 0)
            S += tl.sum(tl.where(km, qg, 0.0), 0)
            P += tl.sum(tl.where(km, tl.exp(lpk), 0.0), 0)
        if MODE == 2:  # the documented formula, not a divergence when Σ p < 1: not clamped at 0
            extra = P
            S = S * 0.0
        else:
            lq_t = tl.load(st + 1)  # log q_tail from the stats pass (see TAIL_EXACT)
            if tl.exp(lq_t) < TAIL_EXACT:  # the logsumexp of the log-probs off the ids instead
                # online: a running max m and per-lane sums relative to it (log q_tail = m + log Σ). A linear Σ q_j
                # keeps only a few digits on a confident row whose tail lies below fp32's normal range (e^{−87}:
                # denormals) and is 0 below e^{−103}: forward KL's p_tail·log(p_tail / q_tail) was +inf
                m = zero + float("-inf")
                tail = tl.zeros([TB], ACC)
                tc = tl.arange(0, TB)
                sid_row = sid_ptr + row.to(tl.int64) * sid_stride
                p = 0  # the sorted ids before p lie below this tile
                for v0 in range(0, V, TB):
                    cols = v0 + tc
                    off, p = _off_ids(sid_row, p, K, cols, v0 + TB, TB, TW)
                    z = _logits(s_row, cols, (cols < V) & off, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
                    lq = _logp(z, inv_T, lse_s, lo_s)  # −inf on the ids and past V
                    m_new = tl.maximum(m, tl.max(lq, 0))
                    tail = tail * tl.exp(m - _safe(m_new)) + tl.exp(lq - _safe(m_new))
                    m = m_new
                lq_t = m + tl.log(tl.sum(tail, 0))  # −inf: no column off the ids has mass
            p_t = tl.maximum(1.0 - P, 0.0)
            p_t = tl.where(K >= V, 0.0, p_t)  # the (unique) ids cover the vocabulary: no tail, only rounding
            lp_t = tl.log(p_t)
            q_t = tl.exp(lq_t)  # may underflow to 0 where lq_t is finite: forward KL's terms use lq_t only
            d_t, qg_t, _ = _div_terms(lq_t, lp_t, lp_t - lq_t, q_t, beta, skew, omb, oms, DIV)
            D += d_t
            S += qg_t
            if DIV == 0:
                extra = tl.where(p_t > 0, lp_t - lq_t, float("-inf"))
            else:
                extra = tl.where(q_t > 0, qg_t / tl.where(q_t > 0, q_t, 1.0), 0.0)
        if MODE != 2:
            D = _clamp0(D)
    good = n_bad == 0
    D = tl.where(good, D, float("nan"))
    ok = (tl.load(st + 7) > 0) & t_live
    _, _, alpha, t2, _, _, _, _ = _params(prm_ptr)  # read here: not held across the loops (sm_90a spills otherwise)
    loss = _weighted(_mix(D, tl.load(st + 6), alpha, t2), w_ptr, row, HAS_W, ACC)
    tl.store(st + 7, ok.to(ACC))
    tl.store(st + 1, extra)
    tl.store(st + 3, D)
    tl.store(st + 4, S)
    tl.store(st + 5, tl.where(ok, loss, 0.0))


@triton.jit
def _kd_reduce_kernel(st_ptr, loss_ptr, factor_ptr, N, V, num_items, RED: tl.constexpr, BLOCK_R: tl.constexpr,
                      ACC: tl.constexpr):
    ar = tl.arange(0, BLOCK_R)
    cs = tl.zeros([BLOCK_R], ACC)
    vs = tl.zeros([BLOCK_R], ACC)
    for r0 in range(0, N, BLOCK_R):
        rows = r0 + ar
        rm = rows < N
        cs += tl.load(st_ptr + rows * ST + 5, mask=rm, other=0.0)
        vs += tl.load(st_ptr + rows * ST + 7, mask=rm, other=0.0)
    n = tl.sum(vs, 0)
    if num_items > 0:
        n = n * 0.0 + num_items
    if RED == 0:
        factor = tl.where(n > 0, 1.0 / tl.where(n > 0, n, 1.0), 0.0)
    elif RED == 2:
        factor = tl.where(n > 0, 1.0 / (tl.where(n > 0, n, 1.0) * V), 0.0)
    else:
        factor = n * 0.0 + 1.0
    tl.store(loss_ptr, tl.sum(cs, 0) * factor)
    tl.store(factor_ptr, factor)


@triton.jit
def _grad_store(o_row, du, z, dz, cols, cm, label, lse_1, lo_1, coeff, kd_scale, alpha, ok,
                CE: tl.constexpr, CHAIN: tl.constexpr):
    """dL/dz from dD/du: KD scale, CE mixing, the row factor, the softcap / logit_scale chain rule dz."""
    gz = tl.where(kd_scale != 0.0, kd_scale * du, 0.0)  # hard_label_alpha = 1: no KD term at all (not 0·NaN)
    if CE:
        # e^{(z − hi) − lo}: e^{z − lse_1} with lse_1 one rounded number carries its rounding at |max z|
        gz += alpha * (tl.exp((z - lse_1) - lo_1) - tl.where(cols == label, 1.0, 0.0))
    gz = gz * coeff
    if CHAIN:
        gz = gz * dz
    gz = tl.where(ok, gz, 0.0)
    tl.store(o_row + cols, gz.to(o_row.dtype.element_ty), mask=cm)


@triton.jit
def _kd_grad_kernel(s_ptr, t_ptr, lab_ptr, w_ptr, st_ptr, prm_ptr, factor_ptr, go_ptr, go_stride, out_ptr, V, Vt,
                    s_stride, t_stride, o_stride, R, s_gstride, t_gstride, o_gstride, ids_ptr, ids_stride, K,
                    stash_ptr,
                    DIV: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_W: tl.constexpr, CE: tl.constexpr,
                    HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr, ACC: tl.constexpr,
                    MODE: tl.constexpr = 0, KB: tl.constexpr = 1, CE_SEP: tl.constexpr = False,
                    STASH: tl.constexpr = False):
    """MODE 0: dense teacher (t_ptr: logits). MODE 1/2/3: top-k teacher (t_ptr: log-probs [N, K],
    ids_ptr: ids): the full row gets the off-ids formula, then (after a CTA barrier) the k ids are
    overwritten with their exact values, in chunks of KB ids. STASH (out is the logits buffer, inplace_grad): the
    raw logits at the ids are first copied to stash_ptr ([N, K], the logits' dtype), which the fix-up reads."""
    row = tl.program_id(0)
    inv_T, inv_Tt, alpha, t2, logit_scale, softcap, beta, skew = _params(prm_ptr)
    omb, oms = _mix_weights(prm_ptr)
    s_row = _row(s_ptr, row, R, s_gstride, s_stride)
    t_row = _row(t_ptr, row, R, t_gstride, t_stride)
    o_row = _row(out_ptr, row, R, o_gstride, o_stride)
    st = st_ptr + row * ST
    lse_s = tl.load(st + 0)
    lo_s = tl.load(st + 8)
    lse_t = tl.load(st + 1)  # top-k: the tail term (1, see _kd_topk_kernel), Σ p (2), lse over the k ids (3)
    lse_1 = lse_s  # CE's untempered logsumexp hi + lo: the student's at T = 1 (no register more)
    lo_1 = lo_s
    if CE_SEP:
        lse_1 = tl.load(st + 2)
        lo_1 = tl.load(st + 10)
    D = tl.load(st + 3)
    S = tl.load(st + 4)
    ok = tl.load(st + 7) > 0
    if MODE == 1:  # the off-id row constants with lo folded in (see the loop)
        e_lo = tl.exp(-lo_s)
        s_lo = S * e_lo
        if DIV == 0:
            t_lo = lse_t - lo_s
        else:
            t_lo = lse_t * e_lo
    coeff = tl.load(factor_ptr).to(ACC) * tl.load(go_ptr + row * go_stride).to(ACC)
    if HAS_W:  # weight 0: a zero gradient, like a masked row, whatever the row holds (not 0·NaN)
        w = tl.load(w_ptr + row).to(ACC)
        coeff = coeff * w
        ok = ok & (w != 0)
    label = 0
    if HAS_LABELS:
        label = tl.load(lab_ptr + row).to(tl.int64)
    kd_scale = (1.0 - alpha) * t2 * inv_T
    Vs = tl.minimum(V, Vt)
    ar = tl.arange(0, BLOCK_V)
    kk = tl.arange(0, KB)
    stash_row = stash_ptr + row.to(tl.int64) * K
    if MODE > 0 and STASH:  # the raw logits at the k ids, copied before the loop below overwrites them
        for k0 in range(0, K, KB):
            ids, km = _ids_chunk(ids_ptr, ids_stride, row, k0, K, V, KB)
            tl.store(stash_row + k0 + kk, tl.load(s_row + ids, mask=km), mask=km)
        tl.debug_barrier()  # every thread of the CTA has read them before any store below
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + ar
        cm = cols < V
        z, dz = _logits_d(s_row, cols, cm, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
        if MODE == 1:  # off the ids: q_j·g_tail (forward KL: −p_tail·q_j/q_tail = −e^{log q_j + log(p_t/q_t)})
            # q_j = e^{u − hi}·e^{−lo}: lo goes into the row constants (no per-element op, and no spill on sm_90a)
            lq = z * inv_T - lse_s
            q = tl.exp(lq)
            if DIV == 0:  # by log q_j, not q_j > 0: q_j and q_tail may both underflow while their ratio is O(1)
                qg = tl.where(lq > float("-inf"), -tl.exp(lq + t_lo), 0.0)
            else:
                qg = tl.where(q > 0, q * t_lo, 0.0)
            du = _kd_du(qg, q, s_lo)
        elif MODE == 2:
            du = tl.exp(_logp(z, inv_T, lse_s, lo_s)) * lse_t
        elif MODE == 3:
            du = tl.zeros([BLOCK_V], ACC)
        else:
            zt = _logits(t_row, cols, cols < Vs, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
            lo_t = tl.load(st + 9)
            lq = _logp(z, inv_T, lse_s, lo_s)
            lp = _logp(zt, inv_Tt, lse_t, lo_t)
            if DIV == 0:
                du = _q_minus_p(zt * inv_Tt, lse_t, lo_t, z * inv_T, lse_s, lo_s)
            elif DIV == 1:  # 0 on a row whose D is +inf (p = 0 where q > 0): no finite gradient
                q = tl.exp(lq)
                du = tl.where(D == float("inf"), 0.0, tl.where(q > 0, q * (lq - lp - D), 0.0))
            else:
                dl, qt = _tvd_terms(zt * inv_Tt, lse_t, lo_t, z * inv_T, lse_s, lo_s, DIV)
                _, qg, q = _div_terms(lq, lp, dl, qt, beta, skew, omb, oms, DIV)
                du = _kd_du(qg, q, S)
        _grad_store(o_row, du, z, dz, cols, cm, label, lse_1, lo_1, coeff, kd_scale, alpha, ok, CE,
                    HAS_SCALE or HAS_SOFTCAP)
    if MODE > 0:
        tl.debug_barrier()  # the fix-up below overwrites elements other threads of this CTA stored
        lo_s = tl.load(st + 8)  # read again: not held in a register across the loop (sm_90a spills otherwise)
        lo_1 = lo_s
        if CE_SEP:
            lo_1 = tl.load(st + 10)
        if MODE == 3:
            lo_k = tl.load(st + 9)
            hi_t, lo_t = _renorm_teacher(t_row, K, inv_Tt, KB, ACC)
        for k0 in range(0, K, KB):
            ids, km = _ids_chunk(ids_ptr, ids_stride, row, k0, K, V, KB)
            if STASH:
                z, dzk = _logits_d(stash_row + k0, kk, km, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
            else:
                z, dzk = _logits_d(s_row, ids, km, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP, ACC)
            lpk = tl.load(t_row + k0 + kk, mask=km, other=float("-inf")).to(ACC)
            if MODE == 3:
                uk = z * inv_T
                lqk = (uk - lse_t) - lo_k
                ut = lpk * inv_Tt
                dl, qt = _tvd_terms(ut, hi_t, lo_t, uk, lse_t, lo_k, DIV)
                _, qg, q = _div_terms(lqk, (ut - hi_t) - lo_t, dl, qt, beta, skew, omb, oms, DIV)
                du = _kd_du(qg, q, S)
            elif MODE == 2:
                du = tl.exp(_logp(z, inv_T, lse_s, lo_s)) * lse_t - tl.exp(lpk)
            else:
                dl, qt = _tvd_terms(lpk, 0.0, 0.0, z * inv_T, lse_s, lo_s, DIV)
                _, qg, q = _div_terms(_logp(z, inv_T, lse_s, lo_s), lpk, dl, qt, beta, skew, omb, oms, DIV)
                du = _kd_du(qg, q, S)
            _grad_store(o_row, du, z, dzk, ids, km, label, lse_1, lo_1, coeff, kd_scale, alpha, ok, CE,
                        HAS_SCALE or HAS_SOFTCAP)


# ----------------------------------------------------------------------------- launchers
_TL_ACC = {"float32": tl.float32, "float64": tl.float64}


def _cfg(V: int) -> tuple[int, int]:
    block = min(MAX_BLOCK_V, max(128, triton.next_power_of_2(V)))
    return block, max(4, block // 256)  # 8 elements per thread: one 16-byte load of bf16 (see triton_codegen.py)


K_CHUNK = 128  # top-k ids per step of the kernels' loops over them (see _ids_chunk)


def _k_block(K: int) -> int:
    return min(triton.next_power_of_2(K), K_CHUNK)


TAIL_TB = 256  # columns per step of the exact tail sum (_off_ids) ...
TAIL_TW = 4  # ... and sorted ids per window of its walk: a [256, 4] comparison; ~k·256/V ids fall in a tile


def params(p, device, dtype):
    """The plan's kernel_params() as a device tensor in ``dtype`` (KDPlan.param_vector)."""
    return p.param_vector(device, dtype)


@on_tensor_device
def kd_fwd(p, s, t, labels, mask, weights):
    """(loss [1], contrib [N], state [N, 11], factor [1]) — see fastdistill.reference.kd_softmax.
    ``t``: teacher logits [N, Vt], or (ids, logprobs) [N, k] each for a top-k teacher (p.topk)."""
    import torch

    N, V = n_rows(s), s.shape[-1]
    R = row_groups(s)
    s_gs, s_rs = row_strides(s, R)
    acc = p.accum_dtype
    ACC = _TL_ACC[str(acc).removeprefix("torch.")]
    st = torch.empty((N, NSTATE), dtype=acc, device=s.device)
    loss = torch.empty((1,), dtype=acc, device=s.device)
    factor = torch.empty((1,), dtype=acc, device=s.device)
    BLOCK_V, nw = _cfg(V)
    flags = dict(HAS_SCALE=p.scaled, HAS_SOFTCAP=p.capped, ACC=ACC)
    ce = labels is not None and p.mixes_ce
    dummy = st
    prm = params(p, s.device, acc)
    tt = t[1] if p.topk else t
    t_gs, t_rs = row_strides(tt, R)
    tail = p.topk == 1  # tail_bucket: the stats pass also forms log q_tail (see TAIL_EXACT)
    ids_k = dict(ids_ptr=t[0], ids_stride=t[0].stride(0), K=t[0].shape[1], TAIL=True,
                 KB=_k_block(t[0].shape[1])) if tail else {}
    _kd_stats_kernel[(N,)](
        s, tt, labels if labels is not None else dummy, mask if mask is not None else dummy,
        weights if weights is not None else dummy, st, prm, V, 0 if p.topk else tt.shape[-1], s_rs, t_rs, R, s_gs,
        t_gs, ignore_index=p.ignore_index, DIV=99 if p.topk or p.div > DIV_RKL else p.div,
        HAS_LABELS=labels is not None, HAS_MASK=mask is not None, HAS_W=weights is not None, CE=ce,
        CE_SEP=ce and p.ce_sep, TOPK=bool(p.topk), BLOCK_V=BLOCK_V, num_warps=nw, **flags, **ids_k,
    )
    if p.topk:
        ids, lps = t
        K = ids.shape[1]
        # tail_bucket: the ids sorted, for the exact tail's walk (confident rows; which are is known in the kernel only)
        sid = torch.sort(ids, dim=1).values if tail else ids
        _kd_topk_kernel[(N,)](
            s, ids, lps, weights if weights is not None else dummy, st, prm, V, K, s_rs, ids.stride(0),
            lps.stride(0), R, s_gs, sid, sid.stride(0), DIV=p.div, MODE=p.topk, HAS_W=weights is not None,
            KB=_k_block(K), TB=TAIL_TB, TW=TAIL_TW, num_warps=4, **flags, **NO_FP_FUSION,
        )
    elif p.div > DIV_RKL:
        _kd_div_kernel[(N,)](
            s, tt, weights if weights is not None else dummy, st, prm, V, tt.shape[-1], s_rs, t_rs, R, s_gs, t_gs,
            DIV=p.div, HAS_W=weights is not None, BLOCK_V=BLOCK_V, num_warps=nw, **flags, **NO_FP_FUSION,
        )
    _kd_reduce_kernel[(1,)](st, loss, factor, N, V, float(p.num_items), RED=p.red, BLOCK_R=1024, ACC=ACC,
                            num_warps=4)
    return loss, st[:, 5], st, factor


@on_tensor_device
def kd_bwd(p, s, t, labels, weights, st, factor, grad_out, out):
    import torch

    N, V = n_rows(s), s.shape[-1]
    R = row_groups(s)
    ACC = _TL_ACC[str(p.accum_dtype).removeprefix("torch.")]
    BLOCK_V, nw = _cfg(V)
    ce = labels is not None and p.mixes_ce
    stash = None
    if p.topk:
        ids, tt = t
        K = ids.shape[1]
        if out.untyped_storage().data_ptr() == s.untyped_storage().data_ptr():  # inplace_grad: see STASH
            stash = torch.empty((N, K), dtype=s.dtype, device=s.device)
    else:
        ids, tt, K = st, t, 1
    (s_gs, s_rs), (t_gs, t_rs), (o_gs, o_rs) = (row_strides(x, R) for x in (s, tt, out))
    rs, gs = (s_rs, t_rs, o_rs), (R, s_gs, t_gs, o_gs)
    _kd_grad_kernel[(N,)](
        s, tt, labels if labels is not None else st, weights if weights is not None else st, st,
        params(p, s.device, p.accum_dtype), factor, grad_out, 1 if grad_out.numel() > 1 else 0, out, V,
        0 if p.topk else tt.shape[-1], *rs, *gs, ids, ids.stride(0), K, stash if stash is not None else s,
        DIV=p.div, HAS_LABELS=labels is not None, HAS_W=weights is not None, CE=ce,
        HAS_SCALE=p.scaled, HAS_SOFTCAP=p.capped, BLOCK_V=BLOCK_V, ACC=ACC, num_warps=nw,
        MODE=p.topk, KB=_k_block(K), CE_SEP=ce and p.ce_sep, STASH=stash is not None, **NO_FP_FUSION,
    )
    return out
