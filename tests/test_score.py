"""Score-difference ops vs independent float64 oracles written from docs/score_ops.md.

The oracles below use plain autograd on the documented losses (the ``x − sg(x − g)`` surrogate
for score_distill, the full SiD loss through raw terms, ``(F − sg(F) − sg(ĝ))²`` for sCM), so the
hand-derived gradients of the backends are checked against autograd, not against themselves.
Codebase parity (DMD2, FastVideo, rCM, FastGen, TDM, SiD, SANA-Sprint) is in test_score_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastdistill as fd

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_rel(a, b, tol, what=""):
    e = rel_err(a, b)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.1e}"


def bshape(v, ref):
    return v.reshape(-1, *([1] * (ref.dim() - 1)))


# ----------------------------------------------------------------------------- oracles (fp64)
def oracle_score(x, terms, coeffs, *, norm="mean_abs", norm_terms=None, norm_coeffs=None, norm_clamp=0.0,
                 norm_eps=0.0, norm_on="grad", phi="l2", huber_c=1e-3, sample_weight=None, reduction="mean",
                 scale=1.0, mask=None):
    x = x.detach().double().requires_grad_()
    B = x.shape[0]
    dims = tuple(range(1, x.dim()))
    d = sum(bshape(coeffs[:, k], x) * t.double() for k, t in enumerate(terms))
    if norm is None:
        w = torch.ones(B, dtype=F64)
    else:
        nt = terms if norm_terms is None else norm_terms
        ref = sum(bshape(norm_coeffs[:, k], x) * t.double() for k, t in enumerate(nt))
        r = (x.detach() - ref).abs()
        if norm == "mean_abs":
            w = r.mean(dims).clamp_min(norm_clamp) + norm_eps
        else:
            w = (r.mean().clamp_min(norm_clamp) + norm_eps).expand(B)
    m = torch.ones_like(x) if mask is None else mask.expand(x.shape).double()
    h = torch.ones(B, dtype=F64) if sample_weight is None else sample_weight.double()
    kappa = scale * {"mean": 1.0 / m.sum().item() if m.sum() > 0 else 0.0, "sum": 1.0, "batchmean": 1.0 / B,
                     "none": 1.0}[reduction]
    ph = d / torch.sqrt(d * d + huber_c**2) if phi == "pseudo_huber" else d
    W = bshape(w, x)
    if norm_on == "grad":
        g = (ph / W).detach()
        per = 0.5 * (m * (x - (x - g).detach()) ** 2).sum(dims)
    else:
        psi = torch.sqrt(d * d + huber_c**2) - huber_c if phi == "pseudo_huber" else 0.5 * d * d
        per = (m * (psi + ph.detach() * (x - x.detach()))).sum(dims) / w
    per = kappa * h * per
    loss = per if reduction == "none" else per.sum()
    return loss, x


def oracle_sid(y, real, fake, *, alpha, w_clamp=1e-5, w_eps=0.0, reduction="batchmean", scale=1.0, mask=None):
    """real/fake: (terms, coeffs [B,K]); returns loss, y (grad-enabled) and the grad-enabled terms."""
    y = y.detach().double().requires_grad_()
    leaves = {}

    def combo(ts, cs):
        out = 0
        for k, t in enumerate(ts):
            if id(t) not in leaves:
                leaves[id(t)] = t.detach().double().requires_grad_()
            out = out + bshape(cs[:, k], y) * leaves[id(t)]
        return out

    fr, ff = combo(*real), combo(*fake)
    dims = tuple(range(1, y.dim()))
    w = (y - fr).abs().mean(dims).detach().clamp_min(w_clamp) + w_eps
    m = torch.ones_like(y) if mask is None else mask.expand(y.shape).double()
    B = y.shape[0]
    kappa = scale * {"mean": 1.0 / m.sum().item(), "sum": 1.0, "batchmean": 1.0 / B, "none": 1.0}[reduction]
    per = kappa * (m * (fr - ff) * ((fr - y) - alpha * (fr - ff))).sum(dims) / w
    return (per if reduction == "none" else per.sum()), y, leaves


def oracle_scm(F, terms, coeffs, *, f_coeff, c=0.1, norm="l2", weight=None, logvar=None, sample_reduction="sum",
               reduction="mean"):
    F = F.detach().double().requires_grad_()
    B = F.shape[0]
    dims = tuple(range(1, F.dim()))
    M = F[0].numel()
    g = bshape(f_coeff, F) * F.detach() + sum(bshape(coeffs[:, k], F) * t.double() for k, t in enumerate(terms))
    n = g.pow(2).sum(dims).sqrt()
    if norm == "rms":
        n = n / math.sqrt(M)
    gh = (g / bshape(n + c, F)).detach()
    sq = (F - F.detach() - gh) ** 2
    R = sq.sum(dims) if sample_reduction == "sum" else sq.mean(dims)
    wt = torch.ones(B, dtype=F64) if weight is None else weight.double()
    lv = None
    if logvar is not None:
        lv = logvar.detach().double().requires_grad_()
        per = wt * torch.exp(-lv) * R + lv
    else:
        per = wt * R
    loss = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    return loss, F, lv


def oracle_denoise(pred, terms, coeffs, *, pred_coeff, weight=None, sample_reduction="mean", reduction="mean",
                   mask=None):
    pred = pred.detach().double().requires_grad_()
    B = pred.shape[0]
    dims = tuple(range(1, pred.dim()))
    d = bshape(pred_coeff, pred) * pred + sum(bshape(coeffs[:, k], pred) * t.double() for k, t in enumerate(terms))
    m = torch.ones_like(pred) if mask is None else mask.expand(pred.shape).double()
    s = (m * d * d).sum(dims)
    if sample_reduction == "mean":
        cnt = m.sum(dims)
        s = torch.where(cnt > 0, s / cnt.clamp_min(1), torch.zeros_like(s))
    wt = torch.ones(B, dtype=F64) if weight is None else weight.double()
    per = wt * s
    return {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction], pred


# ----------------------------------------------------------------------------- helpers
def make(B, S, K, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *S, generator=g).to(dtype).requires_grad_()
    terms = [torch.randn(B, *S, generator=g).to(dtype) for _ in range(K)]
    return x, terms, g


def backward_with(loss, upstream=None):
    if upstream is None:
        n = loss.numel()
        upstream = torch.full_like(loss, 1.7) if loss.dim() == 0 else torch.linspace(0.5, 2.0, n, dtype=loss.dtype)
    loss.backward(upstream)
    return upstream


SHAPES = {"B3-4x5x7": (3, (4, 5, 7)), "B1-1001": (1, (1001,)), "B2-1": (2, (1,)), "B5-3x33": (5, (3, 33)),
          "B2-2x1100": (2, (2, 1100))}
SCORE_CASES = [
    dict(),
    dict(norm="mean_abs_global"),
    dict(norm=None),
    dict(norm_clamp=0.9, norm_eps=1e-3),
    dict(phi="pseudo_huber", huber_c=0.3),
    dict(norm_on="loss"),
    dict(norm_on="loss", phi="pseudo_huber", huber_c=0.05),
    dict(reduction="sum", scale=2.0),
    dict(reduction="batchmean"),
    dict(reduction="none"),
    dict(sample_weight=True),
    dict(mask=True),
    dict(mask=True, reduction="none", norm="mean_abs_global"),
]


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items()) or "default"


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("case", SCORE_CASES, ids=[_case_id(c) for c in SCORE_CASES])
def test_score_distill_fp64(use, shape, case):
    B, S = SHAPES[shape]
    x, (f, c, u, xt), g = make(B, S, 4)
    case = dict(case)
    coeffs = torch.randn(B, 3, generator=g, dtype=F64)
    ncoeffs = torch.randn(B, 3, generator=g, dtype=F64)
    if case.pop("sample_weight", False):
        case["sample_weight"] = torch.rand(B, generator=g, dtype=F64) + 0.5
    if case.pop("mask", False):
        case["mask"] = torch.rand(B, *S[:1], *([1] * (len(S) - 1)), generator=g) > 0.4
    kw = dict(case)
    if kw.get("norm", "mean_abs") is not None:
        kw.update(norm_terms=[c, u, xt], norm_coeffs=ncoeffs)
    loss = fd.score_distill(x, [f, c, u], coeffs, accum_dtype=F64, **kw)
    ref, xr = oracle_score(x, [f, c, u], coeffs, **kw)
    assert loss.dtype == F64 and loss.shape == ref.shape
    assert_rel(loss.detach(), ref.detach(), 1e-11, "loss")
    up = backward_with(loss)
    ref.backward(up)
    assert_rel(x.grad, xr.grad, 1e-11, "grad")


@pytest.mark.parametrize("coef_kind", ["floats", "vector", "per-sample", "shared-term", "empty-norm-terms"])
def test_score_distill_coefficient_forms(use, coef_kind):
    x, (f, c, u, xt), g = make(2, (3, 9), 4)
    B = 2
    if coef_kind == "floats":
        co, nco = [0.7, -1.2, 0.5], [1.2, -0.5, 0.3]
    elif coef_kind == "vector":
        co, nco = torch.tensor([0.7, -1.2, 0.5], dtype=F64), torch.tensor([1.2, -0.5, 0.3], dtype=F64)
    else:
        co, nco = torch.randn(B, 3, generator=g, dtype=F64), torch.randn(B, 3, generator=g, dtype=F64)
    full = lambda v: v if isinstance(v, torch.Tensor) and v.dim() == 2 else torch.as_tensor(v, dtype=F64).expand(B, 3)
    nterms = [c, u, xt]
    if coef_kind == "empty-norm-terms":  # an empty reference list is a zero reference (w = mean|x|), not `terms`
        loss = fd.score_distill(x, [f, c, u], co, norm_terms=[], norm_coeffs=[], accum_dtype=F64)
        ref, xr = oracle_score(x, [f, c, u], co, norm_terms=[], norm_coeffs=None)
    elif coef_kind == "shared-term":  # the same tensor twice in one list: coefficients add up
        loss = fd.score_distill(x, [f, c, c], co, norm_terms=nterms, norm_coeffs=nco, accum_dtype=F64)
        ref, xr = oracle_score(x, [f, c, c], full(co), norm_terms=nterms, norm_coeffs=full(nco))
    else:
        loss = fd.score_distill(x, [f, c, u], co, norm_terms=nterms, norm_coeffs=nco, accum_dtype=F64)
        ref, xr = oracle_score(x, [f, c, u], full(co), norm_terms=nterms, norm_coeffs=full(nco))
    assert_rel(loss.detach(), ref.detach(), 1e-11, "loss")
    loss.backward()
    ref.backward()
    assert_rel(x.grad, xr.grad, 1e-11, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_score_distill_low_precision(use, dtype):
    """Tolerance rule: error vs the fp64 oracle ≤ 2× that of plain PyTorch in the input dtype."""
    B, S = 2, (4, 300)
    x, terms, g = make(B, S, 4, dtype=dtype, seed=3)
    coeffs = torch.randn(B, 3, generator=g, dtype=F64)
    nco = torch.randn(B, 3, generator=g, dtype=F64)
    kw = dict(norm_terms=terms[1:], norm_coeffs=nco)
    loss = fd.score_distill(x, terms[:3], coeffs.to(torch.float32), norm_terms=terms[1:],
                            norm_coeffs=nco.to(torch.float32))
    loss.backward()
    assert x.grad.dtype == dtype and loss.dtype == torch.float32
    ref, xr = oracle_score(x, terms[:3], coeffs, **kw)
    ref.backward()
    # plain PyTorch in the input dtype: the same formulas evaluated in `dtype`
    xd = x.detach()
    d = sum(bshape(coeffs[:, k].to(dtype), xd) * t for k, t in enumerate(terms[:3]))
    r = xd - sum(bshape(nco[:, k].to(dtype), xd) * t for k, t in enumerate(terms[1:]))
    plain = d / bshape(r.abs().mean((1, 2)), xd) / xd.numel()
    tol = 2 * rel_err(plain, xr.grad) + 1e-6
    assert_rel(x.grad, xr.grad, tol, f"grad {dtype}")
    assert_rel(loss.detach(), ref.detach(), 1e-5, "loss")


@pytest.mark.parametrize("shape", ["B3-4x5x7", "B1-1001", "B5-3x33"])
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum", "none"])
def test_sid_loss_fp64(use, shape, reduction):
    B, S = SHAPES[shape]
    y, (c, u, xt, fk), g = make(B, S, 4, seed=1)
    c.requires_grad_()
    u.requires_grad_()
    fk.requires_grad_()
    a = torch.randn(B, 3, generator=g, dtype=F64)  # f_r = a0 c + a1 u + a2 xt
    b = torch.randn(B, 2, generator=g, dtype=F64)  # f_f = b0 fk + b1 xt   (xt shared, no grad)
    mask = (torch.rand(B, *S, generator=g) > 0.3) if shape == "B5-3x33" else None
    kw = dict(alpha=1.2, reduction=reduction, scale=3.0, mask=mask)
    loss = fd.sid_loss(y, ([c, u, xt], a), ([fk, xt], b), accum_dtype=F64, **kw)
    ref, yr, leaves = oracle_sid(y, ([c, u, xt], a), ([fk, xt], b), **kw)
    assert_rel(loss.detach(), ref.detach(), 1e-11, "loss")
    up = backward_with(loss)
    ref.backward(up)
    assert_rel(y.grad, yr.grad, 1e-11, "dy")
    for name, t in [("c", c), ("u", u), ("fk", fk)]:
        assert_rel(t.grad, leaves[id(t)].grad, 1e-11, f"d{name}")
    assert xt.grad is None


@pytest.mark.parametrize("w", [dict(), dict(w_clamp=1.13, w_eps=0.05)], ids=["default-w", "clamp-eps"])
def test_sid_loss_plain_tensors(use, w):
    """(``w_clamp`` 1.13: about the mean |y − f_r| of these draws, so it clamps some samples and not others.)"""
    y, (fr, ff), _ = make(4, (2, 50), 2, seed=2)
    fr.requires_grad_()
    ff.requires_grad_()
    loss = fd.sid_loss(y, fr, ff, alpha=1.0, accum_dtype=F64, **w)
    one = torch.ones(4, 1, dtype=F64)
    ref, yr, leaves = oracle_sid(y, ([fr], one), ([ff], one), alpha=1.0, **w)
    assert_rel(loss.detach(), ref.detach(), 1e-11)
    loss.backward()
    ref.backward()
    assert_rel(y.grad, yr.grad, 1e-11)
    assert_rel(fr.grad, leaves[id(fr)].grad, 1e-11)
    assert_rel(ff.grad, leaves[id(ff)].grad, 1e-11)


SCM_CASES = [dict(), dict(norm="rms"), dict(sample_reduction="mean"), dict(reduction="sum"),
             dict(reduction="none"), dict(logvar=True), dict(logvar=True, weight=True, sample_reduction="mean"),
             dict(weight=2.5), dict(c=0.0)]


@pytest.mark.parametrize("shape", ["B3-4x5x7", "B1-1001", "B2-2x1100"])
@pytest.mark.parametrize("case", SCM_CASES, ids=[_case_id(c) for c in SCM_CASES])
def test_scm_tangent_loss_fp64(use, shape, case):
    B, S = SHAPES[shape]
    F, terms, g = make(B, S, 4, seed=5)
    coeffs = torch.randn(B, 4, generator=g, dtype=F64)
    fco = torch.randn(B, generator=g, dtype=F64)
    kw = dict(case)
    if kw.pop("logvar", False):
        kw["logvar"] = (torch.randn(B, generator=g, dtype=F64) * 0.3).requires_grad_()
    if kw.get("weight") is True:
        kw["weight"] = torch.rand(B, generator=g, dtype=F64) + 0.5
    loss = fd.scm_tangent_loss(F, terms, coeffs, f_coeff=fco, accum_dtype=F64, **kw)
    okw = dict(kw)
    if isinstance(okw.get("weight"), float):
        okw["weight"] = torch.full((B,), okw["weight"], dtype=F64)
    ref, Fr, lvr = oracle_scm(F, terms, coeffs, f_coeff=fco, **okw)
    assert_rel(loss.detach(), ref.detach(), 1e-11, "loss")
    up = backward_with(loss)
    ref.backward(up)
    assert_rel(F.grad, Fr.grad, 1e-11, "dF")
    if lvr is not None:
        assert_rel(kw["logvar"].grad, lvr.grad, 1e-11, "dlogvar")


DEN_CASES = [dict(), dict(sample_reduction="sum"), dict(reduction="sum"), dict(reduction="none"),
             dict(weight=True), dict(weight=0.25), dict(mask=True), dict(mask=True, sample_reduction="sum")]


@pytest.mark.parametrize("shape", ["B3-4x5x7", "B1-1001", "B5-3x33"])
@pytest.mark.parametrize("case", DEN_CASES, ids=[_case_id(c) for c in DEN_CASES])
def test_denoise_regression_loss_fp64(use, shape, case):
    B, S = SHAPES[shape]
    pred, terms, g = make(B, S, 3, seed=7)
    coeffs = torch.randn(B, 3, generator=g, dtype=F64)
    pco = torch.randn(B, generator=g, dtype=F64)
    kw = dict(case)
    if kw.get("weight") is True:
        kw["weight"] = torch.rand(B, generator=g, dtype=F64) + 0.5
    if kw.pop("mask", False):
        kw["mask"] = torch.rand(B, *S, generator=g) > 0.5
        kw["mask"][0] = False  # a sample with no valid element: its mean is defined as 0
    loss = fd.denoise_regression_loss(pred, terms, coeffs, pred_coeff=pco, accum_dtype=F64, **kw)
    okw = dict(kw)
    if isinstance(okw.get("weight"), float):
        okw["weight"] = torch.full((B,), okw["weight"], dtype=F64)
    ref, pr = oracle_denoise(pred, terms, coeffs, pred_coeff=pco, **okw)
    assert_rel(loss.detach(), ref.detach(), 1e-11, "loss")
    up = backward_with(loss)
    ref.backward(up)
    assert_rel(pred.grad, pr.grad, 1e-11, "dpred")


def test_score_ops_keep_no_inputs_after_backward(use):
    """After backward, the loss graph (e.g. kept for logging) holds neither x nor the terms (the double-backward
    guard once held them as anchors; the saved tensors are freed by backward as usual)."""
    import weakref

    B, S = SHAPES["B3-4x5x7"]
    pred, terms, g = make(B, S, 2, seed=18)
    x = pred * 1.0
    wx, wt = weakref.ref(x), weakref.ref(terms[0])
    loss = fd.score_distill(x, terms, [1.0, -1.0], norm=None, accum_dtype=F64)
    loss.backward()
    del x, terms
    assert wx() is None and wt() is None and loss.grad_fn is not None


@pytest.mark.parametrize("op", ["denoise", "sid"])
def test_score_double_backward_raises(use, op):
    """Second derivatives of the score ops are not computed: differentiating a create_graph=True gradient again
    raises (before: the reference backend silently left the result unchanged, the kernels' gradient was a
    constant; denoise_regression_loss and sid_loss have non-zero second derivatives)."""
    B, S = SHAPES["B3-4x5x7"]
    pred, terms, g = make(B, S, 3, seed=17)
    if op == "denoise":
        loss = fd.denoise_regression_loss(pred, terms, torch.randn(B, 3, generator=g, dtype=F64), accum_dtype=F64)
    else:
        loss = fd.sid_loss(pred, terms[0], terms[1], alpha=1.2, accum_dtype=F64)
    gp, = torch.autograd.grad(loss, pred, create_graph=True)
    with pytest.raises(RuntimeError, match="score ops: double backward is not supported"):
        gp.square().sum().backward()


def test_decoupled_dmd_two_noisy_inputs(use):
    """Decoupled DMD (paper Eq. 8 in x0 space): four predictions at two independently noised
    inputs x_a (distribution matching, t_a) and x_b (CFG augmentation, t_b), eps-parameterised:
    d = [X_f^c(x_a) − X_r^c(x_a)] + (α − 1)[X_r^u(x_b) − X_r^c(x_b)], DMD2-style normaliser on X_r^c(x_a)."""
    B, S = 3, (4, 6, 6)
    x, (fa, rca, rub, rcb, xa, xb), g = make(B, S, 6, seed=11)
    ab_a, ab_b = torch.rand(B, generator=g, dtype=F64) * 0.9 + 0.05, torch.rand(B, generator=g, dtype=F64) * 0.9 + 0.05
    alpha = 4.0
    A_a, C_a = fd.coeffs.x0_coeffs("eps", alpha=ab_a.sqrt(), sigma=(1 - ab_a).sqrt())
    A_b, C_b = fd.coeffs.x0_coeffs("eps", alpha=ab_b.sqrt(), sigma=(1 - ab_b).sqrt())
    X = lambda A, C, xt, e: bshape(A, x) * xt + bshape(C, x) * e
    d = (X(A_a, C_a, xa, fa) - X(A_a, C_a, xa, rca)) + (alpha - 1) * (X(A_b, C_b, xb, rub) - X(A_b, C_b, xb, rcb))
    w = (x.detach() - X(A_a, C_a, xa, rca)).abs().mean((1, 2, 3))
    g_ref = d / bshape(w, x) / x.numel()
    # the op: x_a and x_b cancel in d; six distinct terms in all
    co = torch.stack([C_a, -C_a, (alpha - 1) * C_b, -(alpha - 1) * C_b], 1)
    loss = fd.score_distill(x, [fa, rca, rub, rcb], co, norm_terms=[rca, xa], norm_coeffs=torch.stack([C_a, A_a], 1),
                            accum_dtype=F64)
    loss.backward()
    assert_rel(x.grad, g_ref, 1e-11, "grad")
    assert_rel(loss.detach(), 0.5 * (g_ref**2).sum() * x.numel(), 1e-11, "loss")


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_score_double_backward_raises_toward_the_inputs(use, layout):
    """The double-backward guard reaches the op's real inputs: a gradient penalty taken with
    ``torch.autograd.grad(penalty, params)`` through sid_loss (whose gradients for f_r, f_f and y depend on
    them) raises, on contiguous and permuted inputs alike (before: the guard hung on copies made inside the
    op, so autograd.grad toward the parameters skipped it and treated the op's gradients as constants, a
    silently wrong second derivative; with a permuted input there was no guard at all). The same for
    denoise_regression_loss differentiated twice toward pred."""
    B = 2
    g = torch.Generator().manual_seed(29)
    W = torch.randn(4, 4, generator=g, dtype=F64, requires_grad=True)
    y = torch.randn(B, 3, 4, generator=g, dtype=F64, requires_grad=True)
    tr = (lambda t: t.transpose(1, 2)) if layout == "transposed" else (lambda t: t)
    loss = fd.sid_loss(tr(y), tr(torch.tanh(y @ W)), tr(0.5 * y @ W.t()), accum_dtype=F64)
    gW, = torch.autograd.grad(loss, W, create_graph=True)
    with pytest.raises(RuntimeError, match="score ops: double backward is not supported"):
        torch.autograd.grad(gW.square().sum(), W, allow_unused=True)
    pred = torch.randn(B, 3, 4, generator=g, dtype=F64, requires_grad=True)
    loss = fd.denoise_regression_loss(tr(pred), [tr(torch.randn(B, 3, 4, generator=g, dtype=F64))], [-1.0])
    gp, = torch.autograd.grad(loss, pred, create_graph=True)
    with pytest.raises(RuntimeError, match="score ops: double backward is not supported"):
        torch.autograd.grad(gp.square().sum(), pred, allow_unused=True)
