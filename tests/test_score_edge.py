"""Score ops: empty inputs, non-finite values and the NaN policies, bad arguments, dispatch,
torch.compile / opcheck, determinism, and a long single sample split across many blocks."""

from __future__ import annotations

import math

import pytest
import torch

import fastdistill as fd
from fastdistill import _backend
from test_score import F64, assert_rel, make, oracle_scm, oracle_score


# ----------------------------------------------------------------------------- empty
@pytest.mark.parametrize("shape", [(0, 4, 5), (3, 0), (2, 4, 0, 3)], ids=["B0", "M0", "M0-nd"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty(use, shape, reduction):
    x = torch.randn(shape).requires_grad_()
    t = [torch.randn(shape) for _ in range(2)]
    loss = fd.score_distill(x, t, [1.0, -1.0], norm_coeffs=[1.0, 0.0], reduction=reduction)
    assert loss.shape == ((shape[0],) if reduction == "none" else ())
    assert torch.all(loss == 0)
    loss.sum().backward()
    assert x.grad.shape == x.shape and torch.all(x.grad == 0)
    red = {"mean": "mean", "none": "none"}[reduction]
    for fn in (lambda: fd.scm_tangent_loss(x, t, [1.0, 1.0], reduction=red),
               lambda: fd.denoise_regression_loss(x, t, [1.0, 1.0], reduction=red),
               lambda: fd.sid_loss(x, t[0], t[1])):
        out = fn()
        assert torch.all(out == 0) and not torch.isnan(out).any()
    # an empty sample holds nothing non-finite: not bad, normaliser 0 (not the 0/0 of a mean over no elements)
    _, stats = fd.score_distill(x, t, [1.0, -1.0], norm_coeffs=[1.0, 0.0], reduction=reduction, return_stats=True)
    assert not stats["bad"].any() and torch.equal(stats["normalizer"], torch.zeros(shape[0]))


# ----------------------------------------------------------------------------- NaN / inf policies
def _dmd_inputs(seed=0):
    x, (f, c, xt), g = make(4, (3, 40), 3, seed=seed)
    co = torch.randn(4, 2, generator=g, dtype=F64)
    nco = torch.randn(4, 2, generator=g, dtype=F64)
    return x, f, c, xt, co, nco


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["term", "x"])
def test_zero_sample_policy(use, bad_value, where):
    x, f, c, xt, co, nco = _dmd_inputs()
    x_bad, f_bad = x.detach().clone(), f.clone()
    (f_bad if where == "term" else x_bad)[2, 1, 7] = bad_value
    x_bad.requires_grad_()
    kw = dict(norm_terms=[c, xt], norm_coeffs=nco, reduction="sum", accum_dtype=F64)
    loss, st = fd.score_distill(x_bad, [f_bad, c], co, return_stats=True, **kw)
    loss.backward()
    assert st["bad"].tolist() == [False, False, True, False]
    assert torch.isfinite(loss) and torch.all(x_bad.grad[2] == 0)
    # the other samples are exactly what they are without the bad one
    ref, xr = oracle_score(x, [f, c], co, norm="mean_abs", **{k: v for k, v in kw.items() if k != "accum_dtype"})
    per = fd.score_distill(x.detach(), [f, c], co, reduction="none", norm_terms=[c, xt], norm_coeffs=nco,
                           accum_dtype=F64)
    assert_rel(loss.detach(), per[[0, 1, 3]].sum(), 1e-12)
    ref.backward()
    keep = [0, 1, 3]
    assert_rel(x_bad.grad[keep], xr.grad[keep], 1e-12)


def test_zero_normaliser_is_bad_sample(use):
    x, f, c, xt, co, nco = _dmd_inputs()
    x2 = x.detach().clone()
    x2[1] = c[1] * 0.5  # r = x − 0.5·c = 0 exactly for sample 1 → w = 0
    x2.requires_grad_()
    loss, st = fd.score_distill(x2, [f, c], co, norm_terms=[c], norm_coeffs=[0.5], return_stats=True)
    loss.backward()
    assert st["bad"].tolist() == [False, True, False, False]
    assert torch.isfinite(loss) and torch.all(x2.grad[1] == 0) and torch.isfinite(x2.grad).all()
    # with a clamp the sample is fine again
    x3 = x2.detach().clone().requires_grad_()
    loss, st = fd.score_distill(x3, [f, c], co, norm_terms=[c], norm_coeffs=[0.5], norm_clamp=1e-5, return_stats=True)
    assert not st["bad"].any()


def test_to_num_policy(use):
    """nan='to_num': the gradient is torch.nan_to_num of κ·φ(d)/w in its dtype, as DMD2 does."""
    x, f, c, xt, co, nco = _dmd_inputs(seed=1)
    x = x.detach().float().requires_grad_()
    f, c = f.float().clone(), c.float()
    f[0, 0, 0] = float("nan")
    f[1, 0, 1] = float("inf")
    loss = fd.score_distill(x, [f, c], [1.0, -1.0], norm=None, nan="to_num", reduction="sum")
    loss.backward()
    expected = torch.nan_to_num(f - c)
    assert torch.equal(x.grad, expected)
    assert torch.isfinite(loss)


def test_raise_policy(use):
    x, f, c, xt, co, nco = _dmd_inputs()
    f = f.clone()
    f[3, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"samples \[3\]"):
        fd.score_distill(x, [f, c], co, norm=None, nan="raise")
    fd.score_distill(x, [f.nan_to_num(), c], co, norm=None, nan="raise")  # clean input: no error


def test_scm_nan_sample(use):
    F, terms, g = make(3, (50,), 2, seed=4)
    terms[1] = terms[1].clone()
    terms[1][1, 3] = float("nan")
    lv = torch.zeros(3, dtype=F64, requires_grad=True)
    loss, st = fd.scm_tangent_loss(F, terms, [1.0, 0.5], logvar=lv, reduction="none", return_stats=True)
    loss.sum().backward()
    assert st["bad"].tolist() == [False, True, False]
    assert loss[1].item() == 0.0 and torch.all(F.grad[1] == 0) and lv.grad[1].item() == 1.0


def test_scm_zero_tangent_with_c_zero(use):
    """c = 0 and g ≡ 0 in a sample: ĝ = 0/0 is defined as 0 (docs/score_ops.md), so ℓ = logvar, ∂ℓ/∂F = 0,
    ∂ℓ/∂logvar = 1, and the sample is not bad; the others as the fp64 oracle. A mutation check found it untested:
    the Triton kernel with 1/(n + c) unguarded gave a NaN loss while every test passed."""
    F, terms, g = make(3, (50,), 2, seed=6)
    terms = [t.clone() for t in terms]
    for t in terms:
        t[1] = 0.0
    lv = torch.tensor([0.1, -0.2, 0.3], dtype=F64, requires_grad=True)
    loss, st = fd.scm_tangent_loss(F, terms, [1.0, 0.5], c=0.0, logvar=lv, reduction="none", accum_dtype=F64,
                                   return_stats=True)
    loss.sum().backward()
    assert st["bad"].tolist() == [False, False, False]
    assert loss[1].item() == -0.2 and torch.all(F.grad[1] == 0) and lv.grad[1].item() == 1.0
    co = torch.tensor([[1.0, 0.5]] * 3, dtype=F64)
    ref, Fr, _ = oracle_scm(F, terms, co, f_coeff=torch.zeros(3, dtype=F64), c=0.0, logvar=lv, reduction="none")
    ref[[0, 2]].sum().backward()
    assert_rel(loss[[0, 2]].detach(), ref[[0, 2]].detach(), 1e-12)
    assert_rel(F.grad[[0, 2]], Fr.grad[[0, 2]], 1e-12)


def test_to_num_saturates_before_the_upstream_gradient(use):
    """nan="to_num": a gradient element saturated at ±max for an upstream gradient of 1 is ±inf when the upstream
    gradient is larger than 1 (docs/score_ops.md: nan_to_num comes before the upstream gradient, as in DMD2, so that
    GradScaler sees an overflow); every other element is the unit-upstream gradient times it, exactly. (The
    explore profile drew such a case; the property test had asserted finite gradients for every upstream.)"""
    g = torch.Generator().manual_seed(9)
    pred = torch.randn(2, 3, 4, generator=g, dtype=F64)
    pred[0, 0, 0] = float("-inf")
    tgt = torch.randn(2, 3, 4, generator=g, dtype=F64)
    grads = []
    for up in (1.0, 2.0):
        x = pred.clone().requires_grad_()
        loss = fd.denoise_regression_loss(x, [tgt], [1.0], nan="to_num")
        assert torch.isfinite(loss)
        (gx,) = torch.autograd.grad(loss, x, torch.tensor(up, dtype=F64))
        grads.append(gx)
    g1, g2 = grads
    assert torch.isfinite(g1).all() and g1[0, 0, 0] == -torch.finfo(F64).max
    assert g2[0, 0, 0] == float("-inf")
    rest = torch.ones_like(g1, dtype=torch.bool)
    rest[0, 0, 0] = False
    assert torch.equal(g2[rest], 2.0 * g1[rest])


# ----------------------------------------------------------------------------- bad arguments
def _args():
    x, (f, c), _ = make(2, (3, 4), 2)
    return x, f, c


@pytest.mark.parametrize("mutate,match", [
    (lambda a: a.update(terms=[a["terms"][0], torch.randn(2, 3, 5)]), r"terms\[1\]: expected shape"),
    (lambda a: a.update(terms=[a["terms"][0], torch.ones(2, 3, 4, dtype=torch.int32)]),
     r"terms\[1\]: expected a floating"),
    (lambda a: a.update(terms=[a["terms"][0], torch.randn(2, 3, 4, device="meta")]),
     r"terms\[1\]: expected device"),
    (lambda a: a.update(coeffs=[1.0, 2.0, 3.0]), r"^coeffs: expected 2 coefficients"),
    (lambda a: a.update(coeffs=torch.ones(3, 2)), r"^coeffs: expected shape \[2\] or \[2, 2\]"),
    (lambda a: a.update(coeffs=torch.ones(3)), r"^coeffs: expected shape \[2\] or \[2, 2\]"),
    (lambda a: a.update(coeffs=torch.ones(2, dtype=torch.int64)), r"^coeffs: expected a floating dtype"),
    # a list with a tensor among its entries
    (lambda a: a.update(coeffs=[torch.ones(2), 1.0, 2.0]), r"^coeffs: expected 2 coefficients"),
    (lambda a: a.update(coeffs=[torch.ones(2, dtype=torch.int64), 1.0]), r"^coeffs\[0\]: expected a floating"),
    (lambda a: a.update(coeffs=[1.0, torch.ones(2, device="meta")]), r"^coeffs\[1\]: expected device cpu"),
    (lambda a: a.update(norm_coeffs=None), r"norm_coeffs: required"),
    (lambda a: a.update(reduction="avg"), r"reduction: expected one of"),
    (lambda a: a.update(nan="ignore"), r"nan: expected one of"),
    (lambda a: a.update(norm="l1"), r"norm: expected one of"),
    (lambda a: a.update(sample_weight=torch.ones(3)), r"sample_weight: expected shape \[2\]"),
    (lambda a: a.update(sample_weight=torch.ones(1, 2)), r"^sample_weight: expected shape \[2\] .*got \(1, 2\)"),
    (lambda a: a.update(sample_weight=torch.ones(2, dtype=torch.int64)), r"^sample_weight: expected a floating"),
    (lambda a: a.update(terms=[a["terms"][0], torch.randn(2, 4, 3)]), r"^terms\[1\]: expected shape \(2, 3, 4\)"),
    (lambda a: a.update(mask=torch.ones(2, 3, 4)), r"mask: expected a bool tensor"),
    (lambda a: a.update(mask=torch.ones(2, 5, dtype=torch.bool)), r"mask: shape .* does not broadcast"),
    (lambda a: a.update(x=torch.tensor(1.0)), r"x: expected a tensor of shape \[B, ...\]"),
    (lambda a: a.update(terms=a["terms"][0]), r"terms: expected a list of tensors"),
    (lambda a: a.update(accum_dtype=torch.float16), r"accum_dtype"),
    (lambda a: a.update(coeffs="ab"), r"^coeffs: expected a sequence of 2 floats"),
    (lambda a: a.update(coeffs=[1.0, float("nan")]), r"^coeffs\[1\]: expected a finite number"),
    (lambda a: a.update(coeffs=[True, -1.0]), r"^coeffs\[0\]: expected a float, got bool"),  # (was read as 1.0)
    (lambda a: a.update(coeffs=[torch.ones(1, 2), -1.0]), r"^coeffs\[0\]: expected a float or a tensor of shape"),
    (lambda a: a.update(sample_weight=True), r"^sample_weight: expected a float, got bool"),
    (lambda a: a.update(scale=torch.ones(2)),
     r"^scale: expected a float \(or a one-element CPU tensor\), got a tensor of shape \(2,\)"),
    (lambda a: a.update(phi="pseudo_huber", huber_c=float("nan")), r"huber_c: expected a finite number"),
    # c² below fp32's normal range: φ(0) = 0/0 (before: NaN on the reference backend, every sample flagged bad on
    # Triton through its padded lanes); fp64 accumulation takes it
    (lambda a: a.update(phi="pseudo_huber", huber_c=1e-23, accum_dtype=torch.float32),
     r"huber_c: 1e-23 is below 1.08e-19"),
    (lambda a: a.update(norm_clamp=float("inf")), r"norm_clamp: expected a finite number"),
    # c <= 0 is refused as such (not as "below the normal range": c = 0 or -1 is no rounding question)
    (lambda a: a.update(phi="pseudo_huber", huber_c=0.0), r"^huber_c: expected > 0, got 0.0"),
    (lambda a: a.update(phi="pseudo_huber", huber_c=-1.0, accum_dtype=torch.float64), r"^huber_c: expected > 0"),
    # no term anywhere (norm=None: no reference list either): d would be 0 for every sample
    (lambda a: a.update(terms=[], coeffs=[], norm=None, norm_coeffs=None), r"^terms: expected at least one tensor"),
])
def test_score_distill_bad_args(mutate, match):
    x, f, c = _args()
    a = dict(x=x, terms=[f, c], coeffs=[1.0, -1.0], norm_coeffs=[1.0, 0.0])
    mutate(a)
    with pytest.raises((ValueError, TypeError), match=match):
        fd.score_distill(a.pop("x"), a.pop("terms"), a.pop("coeffs"), **a)


def test_one_dim_mask_of_batch_length():
    """A 1-D mask of length B broadcasts along x's last dim (PyTorch's rule), not per sample: where that dim is also
    B it raises as ambiguous with both spellings (before: a silently different loss, the wrong samples trained;
    found by a DMD2 audit), and a [B] mask that does not broadcast says how to make a per-sample one. Each spelling
    gives the loss of the mask it means."""
    g = torch.Generator().manual_seed(9)
    x, f = (torch.randn(2, 3, 2, generator=g, dtype=F64) for _ in range(2))
    keep = torch.tensor([True, False])
    with pytest.raises(ValueError, match=r"mask: a 1-D mask of length 2 .* ambiguous.*mask.view\(2, 1, 1\).*"
                                         r"mask.view\(1, 1, 2\)"):
        fd.denoise_regression_loss(x, [f], [-1.0], mask=keep, reduction="sum")
    per_sample = fd.denoise_regression_loss(x, [f], [-1.0], mask=keep.view(2, 1, 1), reduction="sum")
    last_dim = fd.denoise_regression_loss(x, [f], [-1.0], mask=keep.view(1, 1, 2), reduction="sum")
    d2 = (x - f) ** 2
    assert torch.allclose(per_sample, d2[0].mean()) and torch.allclose(last_dim, d2[..., 0].mean(1).sum())
    with pytest.raises(ValueError, match=r"does not broadcast .* mask.view\(2, 1, 1\)"):
        fd.score_distill(torch.randn(2, 3, 4), [torch.randn(2, 3, 4)], [1.0], norm=None, mask=keep)
    # B ≤ 1: both readings agree (an empty batch: nothing to mask), so no error (a review caught the first cut)
    x1, f1 = x[:1, :, :1], f[:1, :, :1]
    assert torch.equal(fd.denoise_regression_loss(x1, [f1], [-1.0], mask=torch.tensor([True])),
                       fd.denoise_regression_loss(x1, [f1], [-1.0], mask=torch.ones(1, 1, 1, dtype=torch.bool)))
    assert fd.denoise_regression_loss(x[:0, 0, :0], [f[:0, 0, :0]], [-1.0], mask=keep[:0]) == 0


def test_multi_dim_mask_of_batch_length():
    """The 1-D rule with more dims: x [B, C, T, H, W] with C = B and a mask [B, T, H, W] (one per sample, the channel
    dim left out) would broadcast onto (C, T, H, W), every sample trained under sample 0's mask (found by an
    audit). It raises, naming both spellings, and each spelling gives the loss of the mask it means."""
    g = torch.Generator().manual_seed(4)
    x, f = (torch.randn(3, 3, 2, 2, generator=g, dtype=F64) for _ in range(2))
    keep = torch.zeros(3, 2, 2, dtype=torch.bool)
    keep[0] = True
    with pytest.raises(ValueError, match=r"mask: shape \(3, 2, 2\) has fewer dims .* batch size 3, as x's dim 1 .*"
                                         r"mask\[:, None\] if it is per sample .* mask\[None\] if it is shared"):
        fd.score_distill(x, [f], [-1.0], norm=None, mask=keep, reduction="sum")
    loss = lambda m: fd.score_distill(x, [f], [-1.0], norm=None, mask=m, reduction="sum")
    assert torch.equal(loss(keep[:, None]), loss(keep[:, None].expand(x.shape).clone()))
    assert torch.equal(loss(keep[None]), loss(keep[None].expand(x.shape).clone()))
    assert loss(keep[:, None]) != loss(keep[None])  # the two readings differ here
    # fewer dims whose first is not the batch size: unambiguous, as before
    assert torch.equal(loss(keep[0]), loss(keep[0].expand(x.shape).clone()))
    # a 2-D mask [B, W] on x [B, B, W]: the same ambiguity with the fewest dims it can have
    x2, f2 = x[:, :, 0], f[:, :, 0]
    with pytest.raises(ValueError, match=r"mask: shape \(3, 2\) has fewer dims .* as x's dim 1"):
        fd.score_distill(x2, [f2], [-1.0], norm=None, mask=keep[:, :, 0], reduction="sum")
    # B = 1: both readings are one, so no error (a [1, W] mask on x [1, 1, W])
    one = lambda m: fd.score_distill(x2[:1, :1], [f2[:1, :1]], [-1.0], norm=None, mask=m, reduction="sum")
    assert torch.equal(one(keep[:1, 0]), one(keep[:1, 0][:, None]))


def test_tiny_huber_c_in_fp64(use):
    """huber_c = 1e-23 with fp64 accumulation: φ(0) = 0, finite loss and gradient (c² is normal in fp64)."""
    x, f, c = (t.double() for t in _args())
    x.requires_grad_()
    f = f.clone()
    f[0, 0] = c[0, 0]  # d = 0 at one element
    loss, stats = fd.score_distill(x, [f, c], [1.0, -1.0], norm=None, phi="pseudo_huber", huber_c=1e-23,
                                   accum_dtype=torch.float64, return_stats=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all() and not stats["bad"].any()


def test_to_num_keeps_finite_fp64_losses(use):
    """nan="to_num" with fp64 accumulation: per-sample losses beyond fp32's range but finite are kept, as
    torch.nan_to_num does (before: the Triton kernel clamped them to 3.4e38 while the reference kept them)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, generator=g, dtype=F64)
    fake, real = (torch.randn(2, 32, generator=g, dtype=F64) * 1e30 for _ in range(2))
    loss = fd.score_distill(x, [fake, real], [1.0, -1.0], norm=None, reduction="none", nan="to_num",
                            accum_dtype=torch.float64)
    ref = 0.5 * ((fake - real) ** 2).sum(1)
    assert ref.min() > 1e50 and torch.allclose(loss.double(), ref, rtol=1e-12)
    # an infinite per-sample loss goes to the accumulation dtype's max on every backend (the reference clamped it to
    # fp32's 3.4e38, Triton to fp64's 1.8e308: found by the property test's explore profile)
    x[0, 3] = math.inf
    loss = fd.denoise_regression_loss(x, [real], [-1.0], reduction="none", nan="to_num")
    assert loss.dtype == F64 and loss[0] == torch.finfo(F64).max and torch.isfinite(loss[1]), loss


@pytest.mark.parametrize("nan", ["zero_sample", "to_num", "raise"])
def test_meta_tensors(nan):
    """Shapes on the meta device (model-size dry runs), forward and backward, every NaN policy (before: nan="raise"
    read the bad flags' values, which meta tensors do not have)."""
    x = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    f, c = torch.empty(2, 3, 8, device="meta"), torch.empty(2, 3, 8, device="meta")
    loss = fd.score_distill(x, [f, c], [1.0, -1.0], norm_terms=[c], norm_coeffs=[1.0], nan=nan)
    assert loss.device.type == "meta" and loss.shape == ()
    loss.backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"


def test_other_ops_bad_args():
    x, f, c = _args()
    # adversarial-API audit: a negative epsilon made every normaliser <= 0 (every sample bad, loss 0, silently);
    # a weight that requires grad silently got no gradient
    with pytest.raises(ValueError, match="norm_eps: expected a number >= 0"):
        fd.score_distill(x, [f, c], [1.0, -1.0], norm_terms=[c], norm_coeffs=[1.0], norm_eps=-1e9)
    with pytest.raises(ValueError, match="w_eps: expected a number >= 0"):
        fd.sid_loss(x, f, c, w_eps=-1.0)
    with pytest.raises(ValueError, match="sample_weight: requires grad"):
        fd.score_distill(x, [f, c], [1.0, -1.0], norm=None, sample_weight=torch.ones(2, requires_grad=True))
    with pytest.raises(ValueError, match="weight: requires grad"):
        fd.scm_tangent_loss(x, [f], [1.0], weight=torch.ones(2, requires_grad=True))
    with torch.no_grad():  # no gradient wanted: nothing to lose
        fd.denoise_regression_loss(x, [f], [1.0], weight=torch.ones(2, requires_grad=True))
    with pytest.raises(TypeError, match="f_real: expected a tensor or a pair"):
        fd.sid_loss(x, [f], c)
    with pytest.raises(ValueError, match="y itself cannot be a term"):
        fd.sid_loss(x, ([x, f], [1.0, 1.0]), c)
    with pytest.raises(ValueError, match="y itself cannot be a term"):  # among the fake terms too
        fd.sid_loss(x, f, ([c, x], [1.0, 1.0]))
    with pytest.raises(ValueError, match="norm_coeffs / norm_terms: given, but norm=None"):  # norm_terms alone too
        fd.score_distill(x, [f, c], [1.0, -1.0], norm=None, norm_terms=[c])
    # a [terms, coeffs] list is the same pair as a tuple
    assert torch.equal(fd.sid_loss(x, [[f], [1.0]], [[c], [1.0]]), fd.sid_loss(x, f, c))
    with pytest.raises(ValueError, match="logvar: expected shape"):
        fd.scm_tangent_loss(x, [f], [1.0], logvar=torch.zeros(5))
    with pytest.raises(ValueError, match="sample_reduction"):
        fd.scm_tangent_loss(x, [f], [1.0], sample_reduction="max")
    with pytest.raises(ValueError, match="reduction: expected one of"):
        fd.denoise_regression_loss(x, [f], [1.0], reduction="batchmean")
    with pytest.raises(ValueError, match="pred_coeff: expected shape"):
        fd.denoise_regression_loss(x, [f], [1.0], pred_coeff=torch.ones(3))
    # float options: errors name them (before: a bare float() error, or a NaN accepted silently)
    with pytest.raises(TypeError, match="alpha: expected a float"):
        fd.sid_loss(x, f, c, alpha=torch.ones(2))
    with pytest.raises(TypeError, match="weight: expected a float, got list"):
        fd.scm_tangent_loss(x, [f], [1.0], weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="c: expected a finite number"):
        fd.scm_tangent_loss(x, [f], [1.0], c=float("nan"))
    with pytest.raises(ValueError, match=r"^c: expected >= 0, got -0.5"):  # ‖g‖ + c could be 0 or negative
        fd.scm_tangent_loss(x, [f], [1.0], c=-0.5)
    with pytest.raises(TypeError, match="f_coeff: expected a float or a per-sample tensor"):
        fd.scm_tangent_loss(x, [f], [1.0], f_coeff="1")
    with pytest.raises(ValueError, match="^f_coeff: expected device cpu"):
        fd.scm_tangent_loss(x, [f], [1.0], f_coeff=torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match="^pred_coeff: expected device cpu"):
        fd.denoise_regression_loss(x, [f], [1.0], pred_coeff=torch.tensor(1.0, device="meta"))
    with pytest.raises(ValueError, match="w_clamp: expected a finite number"):
        fd.sid_loss(x, f, c, w_clamp=float("nan"))
    fd.sid_loss(x, f, c, alpha=torch.tensor(1.2))  # a 0-d CPU tensor is a number (no host sync)


# ----------------------------------------------------------------------------- dispatch
def test_forced_backend_fails_loudly(monkeypatch):
    x, f, c = _args()
    monkeypatch.setenv("FASTDISTILL_BACKEND", "cuda")
    with pytest.raises(fd.BackendUnavailableError, match=r"forced backend 'cuda'.*reference: ok"):
        fd.score_distill(x, [f, c], [1.0, -1.0], norm=None)
    monkeypatch.setenv("FASTDISTILL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        fd.score_distill(x, [f, c], [1.0, -1.0], norm=None)


def test_default_dispatch_on_cpu(monkeypatch):
    monkeypatch.delenv("FASTDISTILL_BACKEND", raising=False)
    x = torch.zeros(2, 3)
    why = fd.available_backends("score_distill", x)
    assert why["reference"] == [] and why["cuda"]
    expected = "triton" if _backend.interpreting() else "reference"
    assert _backend.select("score_distill", x) == expected
    assert fd.available_backends("score_distill", x, fp64=True)["cuda"]


def test_info_runs(capsys):
    _backend.print_info()
    out = capsys.readouterr().out
    assert "score_distill" in out and "reference  can run" in out
    assert "fused_linear_kd_loss" in out  # every public op (its chunks run kd_loss's backends)
    if "CUDA extension: unavailable" in out:
        assert "pip install --no-build-isolation -e ." in out  # how to build it


# ----------------------------------------------------------------------------- compile, opcheck, determinism
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(use, compiler):
    x, (f, c, u, xt), g = make(2, (3, 16), 4, dtype=torch.float32)
    s = torch.tensor([2.0, 3.0])

    def step(x, f, c, u, xt, s):
        co = torch.stack([torch.ones_like(s), -s, s - 1], 1)
        nco = torch.stack([s, 1 - s, torch.ones_like(s)], 1)
        return fd.score_distill(x, [f, c, u], co, norm_terms=[c, u, xt], norm_coeffs=nco, norm_eps=1e-6) * 2

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    out = compiled(x, f, c, u, xt, s)
    (gx,) = torch.autograd.grad(out, x)
    x2 = x.detach().clone().requires_grad_()
    ref = step(x2, f, c, u, xt, s)
    (gref,) = torch.autograd.grad(ref, x2)
    assert torch.allclose(out, ref, rtol=1e-6) and torch.allclose(gx, gref, rtol=1e-6)


def test_torch_compile_fullgraph_float_options_that_change():
    """A float option that changes between calls (a scheduled scale, SiD's alpha, a CFG coefficient, a float
    weight) under torch.compile(fullgraph=True), static and dynamic=True (a schedule compiles twice:
    test_float_options_schedule_one_dynamic_graph), and the ops' finiteness
    check must trace (before: math.isfinite raised "Unsupported" there, and dynamic=True failed on the
    first call). Results match eager for every value; a non-finite option still raises. (The reference backend:
    the options are checked before any backend runs; the CPU suite's time.)"""
    with fd.use_backend("reference"):
        _float_options_that_change()


def _float_options_that_change():
    x0, (f, c), _ = make(2, (3, 8), 2, dtype=torch.float32)
    calls = {
        "score_distill scale": lambda x, s: fd.score_distill(x, [f, c], [1.0, -1.0], norm_terms=[c], norm_coeffs=[1.0],
                                                             scale=s),
        "score_distill coeffs": lambda x, s: fd.score_distill(x, [f, c], [s, -s], norm=None),
        "sid_loss alpha": lambda x, s: fd.sid_loss(x, f, c, alpha=s),
        "scm_tangent_loss weight": lambda x, s: fd.scm_tangent_loss(x, [f, c], [1.0, -1.0], weight=s),
        "denoise_regression_loss pred_coeff": lambda x, s: fd.denoise_regression_loss(x, [f], [-1.0], pred_coeff=s),
        # huber_c reached the backend choice (a constant of the graph) as a symbol: "Unsupported" from its 2nd value
        "score_distill huber_c": lambda x, s: fd.score_distill(x, [f, c], [1.0, -1.0], norm=None, phi="pseudo_huber",
                                                               huber_c=s),
    }
    for name, fn in calls.items():
        for dynamic in (None, True):
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
            for s in (1.5, 2.5):
                x = x0.detach().clone().requires_grad_()
                out = compiled(x, s)
                (gx,) = torch.autograd.grad(out, x)
                x2 = x0.detach().clone().requires_grad_()
                ref = fn(x2, s)
                (gref,) = torch.autograd.grad(ref, x2)
                assert torch.allclose(out, ref, rtol=1e-6) and torch.allclose(gx, gref, rtol=1e-6), (name, s)
        with pytest.raises(ValueError, match="finite"):
            fn(x0, math.inf)


def test_opcheck(use):
    from fastdistill.ops._score_engine import Plan, _score_fwd_op, op_args

    x, (f, c), _ = make(2, (3, 8), 2, dtype=torch.float32)
    coef = torch.tensor([[[0.0, 1.0, -1.0], [1.0, 0.0, -0.5]]])
    ip, vals = op_args(Plan(op=0, use1=3, use2=2, norm=1, scale=1.5, clamp=1e-3), use, x, [f, c])
    torch.library.opcheck(_score_fwd_op, (x, [f, c], coef, None, None, None, ip, vals, use),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_backward_channels_last(use):
    """The backward op's fake gives its gradients the real op's (contiguous) strides for a channels-last or permuted
    x (before: empty_like kept x's strides, and inductor's stride assertion failed in the backward of a compiled
    step on a channels-last generator output or a permuted video latent; found by a DMD2 audit)."""
    from fastdistill.ops._score_engine import Plan, _score_bwd_op, _score_fwd_op, op_args

    g = torch.Generator().manual_seed(5)
    x, f, c = (torch.randn(2, 4, 3, 5, generator=g) for _ in range(3))
    coef = torch.tensor([[[0.0, 1.0, -1.0], [0.0, 0.0, 0.0]]])
    ip, vals = op_args(Plan(op=0, use1=3), use, x, [f, c])
    for xin in (x.to(memory_format=torch.channels_last), x.permute(0, 2, 1, 3)):
        fc = [t.permute(0, 2, 1, 3) if xin.dim() == 4 and xin.shape[1] == 3 else t for t in (f, c)]
        _, _, state = _score_fwd_op(xin, fc, coef, None, None, None, ip, vals, use)
        args = (xin, fc, coef, None, state, torch.tensor(1.0), ip, vals, True, [True, False], use)
        torch.library.opcheck(_score_bwd_op, args, test_utils=("test_schema", "test_faketensor"))


def test_score_ops_refuse_a_loss_that_trains_nothing(use):
    """Terms are stop-gradient: a main input that does not require grad while a term does (swapped arguments, e.g.
    denoise_regression_loss(noise, [eps_pred], [-1.0])) raises naming it; before, the loss required grad and its
    backward gave the network nothing, silently (plain MSE is symmetric and still trains). A detached term, grad
    mode off, or a logvar that requires grad (scm) is fine. Found by a DMD2 audit."""
    g = torch.Generator().manual_seed(6)
    target, x0 = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    pred = x0.clone().requires_grad_()
    with pytest.raises(ValueError, match="pred: does not require grad while a term does"):
        fd.denoise_regression_loss(target, [pred], [-1.0])
    with pytest.raises(ValueError, match="x: does not require grad"):
        fd.score_distill(target, [pred, x0], [1.0, -1.0], norm=None)
    with pytest.raises(ValueError, match="F: does not require grad"):
        fd.scm_tangent_loss(target, [pred], [1.0])
    fd.denoise_regression_loss(target, [pred.detach()], [-1.0])
    with torch.no_grad():
        fd.denoise_regression_loss(target, [pred], [-1.0])
    lv = torch.zeros(3, requires_grad=True)
    fd.scm_tangent_loss(target, [pred], [1.0], logvar=lv).backward()
    assert lv.grad is not None
    loss = fd.denoise_regression_loss(pred, [target], [-1.0])
    loss.backward()
    assert torch.allclose(pred.grad, 2 * (x0 - target) / x0.numel())


def test_deterministic(use):
    x, (f, c, xt), _ = make(2, (5000,), 3, dtype=torch.float32)
    outs = []
    for _ in range(2):
        xx = x.detach().clone().requires_grad_()
        loss = fd.score_distill(xx, [f, c], [1.0, -1.0], norm_terms=[c, xt], norm_coeffs=[0.3, 0.7])
        loss.backward()
        outs.append((loss.detach(), xx.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.slow
def test_long_single_sample(use):
    """B = 1 with 2^20 + 3 elements: many blocks per sample, each program reducing two of them (n_iter = 2; the
    grid has at most MAX_BLOCKS_PER_SAMPLE = 1024 programs per sample), a masked tail, fp32 accumulation."""
    M = (1 << 20) + 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, M, generator=g).requires_grad_()
    f, c, xt = (torch.randn(1, M, generator=g) for _ in range(3))
    loss = fd.score_distill(x, [f, c], [0.8, -0.8], norm_terms=[c, xt], norm_coeffs=[0.5, 1.0])
    loss.backward()
    ref, xr = oracle_score(x, [f, c], torch.tensor([[0.8, -0.8]], dtype=F64), norm_terms=[c, xt],
                           norm_coeffs=torch.tensor([[0.5, 1.0]], dtype=F64))
    ref.backward()
    assert_rel(loss.detach(), ref.detach(), 1e-5, "loss")
    assert_rel(x.grad, xr.grad, 1e-5, "grad")


def test_constant_coefficient_cache_is_not_mutated(use):
    """Float coefficients are cached as a device tensor; per-sample tensor coefficients are added
    onto a copy of it, never onto the cached tensor itself."""
    x, (f, c), _ = make(2, (3, 8), 2)
    call = lambda co: fd.score_distill(x, [f, c], co, norm=None, reduction="sum", accum_dtype=F64)
    before = call([0.5, -0.25])
    vec = torch.tensor([3.0, 4.0], dtype=F64)  # Bc = 1: the copy is exactly the cached matrix's size
    first = call(vec)
    call(torch.tensor([[3.0, 4.0], [1.0, 2.0]], dtype=F64))
    assert torch.equal(call(vec), first)
    assert torch.equal(call([0.5, -0.25]), before)


@pytest.mark.parametrize("op", ["score", "scm", "denoise"])
def test_terms_are_stop_gradient(use, op):
    """Terms of score_distill / scm_tangent_loss / denoise_regression_loss are constants: a term
    that requires grad receives none (never an uninitialised buffer)."""
    x, (f, c), _ = make(2, (3, 8), 2)
    f.requires_grad_()
    if op == "score":
        loss = fd.score_distill(x, [f, c], [1.0, -1.0], norm_coeffs=[0.0, 1.0])
    elif op == "scm":
        loss = fd.scm_tangent_loss(x, [f, c], [1.0, -1.0])
    else:
        loss = fd.denoise_regression_loss(x, [f, c], [1.0, -1.0])
    loss.backward()
    assert f.grad is None and x.grad is not None and torch.isfinite(x.grad).all()


def test_to_num_clamps_to_output_dtype(use):
    """nan='to_num' clamps a finite fp32 gradient beyond the fp16 range to ±65504, not inf."""
    x = torch.zeros(1, 4, dtype=torch.float16, requires_grad=True)
    f = torch.tensor([[60000.0, -60000.0, 1.0, float("nan")]], dtype=torch.float16)
    loss = fd.score_distill(x, [f], [4.0], norm=None, reduction="sum", nan="to_num")
    loss.backward()
    assert x.grad.tolist() == [[65504.0, -65504.0, 4.0, 0.0]]


def test_fp16_gradient_overflow_marks_sample_bad(use):
    """zero_sample: a gradient element beyond the fp16 range marks its sample bad (zero gradient),
    never an inf in the fp16 gradient."""
    x = torch.zeros(2, 4, dtype=torch.float16, requires_grad=True)
    f = torch.tensor([[60000.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0]], dtype=torch.float16)
    loss, st = fd.score_distill(x, [f], [4.0], norm=None, reduction="sum", return_stats=True)
    loss.backward()
    assert st["bad"].tolist() == [True, False]
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[0] == 0)
    assert x.grad[1].tolist() == [4.0, 8.0, 12.0, 16.0]


# ----------------------------------------------------------------------------- strided arguments
def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous view (every other element of a wider buffer)."""
    wide = torch.zeros(*t.shape, 2, dtype=t.dtype)
    wide[..., 0] = t.detach()
    v = wide[..., 0]
    assert not v.is_contiguous() or t.numel() <= 1
    return v


@pytest.mark.parametrize("op", ["score", "scm", "denoise", "sid"])
def test_strided_arguments_equal_contiguous(use, op):
    """Every tensor argument (inputs, terms, [B, K] coefficients, per-sample weight / logvar /
    x-coefficient vectors, masks) gives the same loss and gradient as a non-contiguous view as it
    does contiguous: a per-sample vector read as if dense would weight the wrong samples."""
    B, S = 3, (2, 5)
    x0, (f, c, xt), g = make(B, S, 3, seed=4)
    w = torch.rand(B, generator=g, dtype=F64) + 0.5
    lv = torch.randn(B, generator=g, dtype=F64) * 0.3
    co = torch.randn(B, 3, generator=g, dtype=F64)
    nco = torch.randn(B, 2, generator=g, dtype=F64)
    mask = torch.rand(B, *S, generator=g) > 0.3

    def call(s):
        t = _strided if s else (lambda v: v)
        x = t(x0).requires_grad_()
        lvar = t(lv).requires_grad_()
        terms = [t(f), t(c), t(xt)]
        if op == "score":
            out = fd.score_distill(x, terms, t(co), norm_terms=terms[1:], norm_coeffs=t(nco),
                                   sample_weight=t(w), mask=t(mask), reduction="none", accum_dtype=F64)
        elif op == "scm":
            out = fd.scm_tangent_loss(x, terms, t(co), f_coeff=t(w), weight=t(w * 2), logvar=lvar,
                                      reduction="none", accum_dtype=F64)
        elif op == "denoise":
            out = fd.denoise_regression_loss(x, terms, t(co), pred_coeff=t(w), weight=t(w * 2), mask=t(mask),
                                             reduction="none", accum_dtype=F64)
        else:
            out = fd.sid_loss(x, (terms[:2], t(co[:, :2])), (terms[1:], t(co[:, 1:])), mask=t(mask),
                              reduction="none", accum_dtype=F64)
        out.backward(torch.linspace(0.5, 2.0, B, dtype=out.dtype))
        return out.detach(), x.grad, lvar.grad

    dense, strided = call(False), call(True)
    for a, b in zip(dense, strided):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a, b), (a, b)


# ----------------------------------------------------------------------------- gradient overflow (zero_sample)
F16 = torch.float16


def _run(op, *args, **kw):
    """(loss_i, bad, {name: grad}) of one call with reduction="sum"; every input that requires grad
    gets its gradient (the terms of sid included)."""
    loss, st = op(*args, reduction="sum", return_stats=True, **kw)
    loss.backward()
    leaves = [a for a in list(args) + list(kw.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    for a in args:
        if isinstance(a, tuple):
            leaves += [t for t in a[0] if t.requires_grad]
    return st["loss_per_sample"], st["bad"], leaves


def overflow_pins(backend):
    """Pinned cases of the zero_sample overflow rule (a sample is bad exactly when an element of a gradient
    that is asked for would overflow its dtype) and of non-finite logvar / x values; returns nothing, asserts.
    Shared with the emulated CUDA kernels (tests/test_csrc_build.py)."""
    z = torch.zeros(1, 4, dtype=F16)
    with fastdistill_backend(backend):
        # sid: f_real = 400·a, ∂/∂a = 400·∂/∂f_r = 80000 > fp16 max while y's gradient is -100
        for a_grad in (True, False):
            y, a = z.clone().requires_grad_(), (z + 0.5).requires_grad_(a_grad)
            loss_i, bad, leaves = _run(fd.sid_loss, y, ([a], [400.0]), z.clone(), alpha=0.0, w_clamp=1.0, scale=100.0)
            assert bad.tolist() == [a_grad], a_grad
            for t in leaves:
                assert torch.isfinite(t.grad).all() and (not a_grad or torch.all(t.grad == 0))
            if not a_grad:
                assert y.grad.tolist() == [[-100.0] * 4]
        # scm: |∂ℓ/∂F| = 2·e^{−logvar}·|ĝ|: e^12 overflows fp16, e^5 does not
        for lv0, want_bad in ((-12.0, True), (-5.0, False)):
            F = torch.linspace(-1, 1, 8, dtype=F16).reshape(1, 8).requires_grad_()
            lv = torch.tensor([lv0], requires_grad=True)
            loss_i, bad, _ = _run(fd.scm_tangent_loss, F, [torch.linspace(2, -1, 8, dtype=F16).reshape(1, 8)], [1.0],
                                  logvar=lv)
            assert bad.tolist() == [want_bad] and torch.isfinite(F.grad).all(), lv0
            if want_bad:  # a bad sample keeps only its logvar term
                assert loss_i.tolist() == [lv0] and torch.all(F.grad == 0) and lv.grad.tolist() == [1.0]
        # scm: a non-finite logvar makes the sample bad, with no loss and no gradient at all
        for lv0 in (float("nan"), float("inf"), -float("inf")):
            F = torch.linspace(-1, 1, 8, dtype=F16).reshape(1, 8).requires_grad_()
            lv = torch.tensor([lv0], requires_grad=True)
            loss_i, bad, _ = _run(fd.scm_tangent_loss, F, [z.new_ones(1, 8)], [1.0], logvar=lv)
            assert bad.tolist() == [True] and loss_i.tolist() == [0.0], lv0
            assert torch.all(F.grad == 0) and lv.grad.tolist() == [0.0], lv0
        # scm, nan="to_num": e^{−logvar} overflows fp32 at logvar = −100; the logvar gradient is clamped to
        # −max like the loss (torch.nan_to_num), not −inf
        F = torch.linspace(-1, 1, 8).reshape(1, 8).expand(2, 8).clone().requires_grad_()
        lv = torch.tensor([0.0, -100.0], requires_grad=True)
        fd.scm_tangent_loss(F, [torch.linspace(2, -1, 8).expand(2, 8)], [1.0], logvar=lv, nan="to_num",
                            reduction="sum").backward()
        fmax = torch.finfo(torch.float32).max
        assert lv.grad[1].item() == -fmax and torch.isfinite(lv.grad).all(), lv.grad
        # pseudo-Huber at a finite |d| > 1.8e19: d² overflows fp32; φ = d/sqrt(d²+c²) -> ±1 and ψ -> |d| − c
        # (before: φ = 0 and, with norm_on="loss", ψ = inf/inf = NaN, not flagged: a NaN loss)
        fake = torch.zeros(2, 8)
        fake[0, 0] = 1e20
        for norm_on in ("loss", "grad"):
            x = torch.zeros(2, 8, requires_grad=True)
            loss_i, bad, _ = _run(fd.score_distill, x, [fake, torch.ones(2, 8)], [1.0, -1.0],
                                  norm_coeffs=[0.0, 1.0], phi="pseudo_huber", norm_on=norm_on)
            assert bad.tolist() == [False, False] and torch.isfinite(loss_i).all(), (norm_on, loss_i)
            assert x.grad[0, 0].item() == 1.0 and torch.isfinite(x.grad).all(), (norm_on, x.grad[0])
            if norm_on == "loss":
                assert abs(loss_i[0].item() / 1e20 - 1) < 1e-6, loss_i
        # denoise: the bound includes pred_coeff. d = 0.01·100 = 1, ∂/∂pred = 2·5e4·0.01·1 = 1000 fits;
        # d = 1000·0.5 = 500, ∂/∂pred = 2·50·1000·500 = 5e7 does not
        for p0, pc, w, want_bad in ((100.0, 0.01, 5e4, False), (0.5, 1000.0, 50.0, True)):
            pred = (z + p0).requires_grad_()
            loss_i, bad, _ = _run(fd.denoise_regression_loss, pred, [z.clone()], [1.0], pred_coeff=torch.tensor([pc]),
                                  weight=torch.tensor([w]), sample_reduction="sum")
            assert bad.tolist() == [want_bad] and torch.isfinite(pred.grad).all(), (p0, pc)
            if not want_bad:
                assert pred.grad.tolist() == [[1000.0] * 4] and loss_i.tolist() == [2e5]
        # a masked-out element's gradient is 0 whatever its size: it cannot make the sample bad (score: 4·60000 and
        # denoise: 2·100·(100·60) beyond fp16 at the masked position only, 2·100·(100·0.5) = 1e4 elsewhere)
        m = torch.tensor([[False, True, True, True]])
        x = z.clone().requires_grad_()
        f = torch.tensor([[60000.0, 1.0, 1.0, 1.0]], dtype=F16)
        loss_i, bad, _ = _run(fd.score_distill, x, [f], [4.0], norm=None, mask=m)
        assert bad.tolist() == [False] and x.grad.tolist() == [[0.0, 4.0, 4.0, 4.0]], (bad, x.grad)
        pred = torch.tensor([[60.0, 0.5, 0.5, 0.5]], dtype=F16).requires_grad_()
        loss_i, bad, _ = _run(fd.denoise_regression_loss, pred, [z.clone()], [1.0], pred_coeff=torch.tensor([100.0]),
                              mask=m, sample_reduction="sum")
        assert bad.tolist() == [False] and pred.grad.tolist() == [[0.0, 1e4, 1e4, 1e4]], (bad, pred.grad)
        # the overflowing element far into the sample (element 700 of 1024: another warp's than the first elements in
        # the CUDA kernels' per-block maximum) marks it bad all the same
        x = torch.zeros(1, 1024, dtype=F16, requires_grad=True)
        f = torch.ones(1, 1024, dtype=F16)
        f[0, 700] = 60000.0
        loss_i, bad, _ = _run(fd.score_distill, x, [f], [4.0], norm=None)
        assert bad.tolist() == [True] and torch.all(x.grad == 0), bad
        # every element masked out (batchmean over no valid element): loss 0, no gradient, no sample bad
        x = torch.zeros(2, 4, dtype=F16, requires_grad=True)
        loss, st = fd.score_distill(x, [z.new_ones(2, 4)], [4.0], norm=None, mask=torch.zeros(2, 4, dtype=torch.bool),
                                    return_stats=True)
        loss.backward()
        assert loss.item() == 0.0 and st["bad"].tolist() == [False, False] and torch.all(x.grad == 0), st
        # scm with c = 0 and a zero tangent: the normaliser ‖g‖ + c is 0, and the loss 0 (not 0·(1/0)² = NaN)
        F = z.new_zeros(1, 8).requires_grad_()
        loss_i, bad, _ = _run(fd.scm_tangent_loss, F, [z.new_zeros(1, 8)], [1.0], c=0.0)
        assert loss_i.tolist() == [0.0] and bad.tolist() == [False] and torch.all(F.grad == 0), (loss_i, bad, F.grad)
        # nan="to_num" with an upstream gradient s (a GradScaler's scale, 1/accumulation steps): the gradient for an
        # upstream gradient of 1 is mapped into the output dtype, then s multiplies it, so the backward is linear in
        # s and a scaled fp16 overflow is inf, which GradScaler must see to skip the step (before: the clamp came
        # after s, turning that overflow into a silently clipped ±65504 step)
        t = torch.full((1, 4), 100.0, dtype=F16)
        for s_, want in ((1.0, 100.0), (1024.0, float("inf")), (0.5, 50.0)):
            x = torch.zeros(1, 4, dtype=F16, requires_grad=True)
            (fd.score_distill(x, [t], [1.0], norm=None, nan="to_num", reduction="sum") * s_).backward()
            assert x.grad.tolist() == [[want] * 4], (s_, x.grad)
        # and a term's gradient (sid: ∂/∂a = 400·200 = 80000, beyond fp16 at s = 1: mapped to 65504, then × s)
        for s_, want in ((1.0, 65504.0), (0.25, 16376.0), (2.0, float("inf"))):
            y, a = z.clone().requires_grad_(), (z + 0.5).requires_grad_()
            (fd.sid_loss(y, ([a], [400.0]), z.clone(), alpha=0.0, w_clamp=1.0, scale=100.0, nan="to_num",
                         reduction="sum") * s_).backward()
            assert a.grad.tolist() == [[want] * 4] and y.grad.tolist() == [[-100.0 * s_] * 4], (s_, a.grad)
        # score_distill without a normaliser does not read x: an inf in x flags the sample, and to_num
        # keeps its (x-independent) loss and gradient
        t = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
        for policy in ("zero_sample", "to_num"):
            x = torch.tensor([[float("inf"), 0.0, 1.0, 2.0]], requires_grad=True)
            loss_i, bad, _ = _run(fd.score_distill, x, [t], [1.0], norm=None, nan=policy)
            assert bad.tolist() == [True], policy
            want = (0.0, [[0.0] * 4]) if policy == "zero_sample" else (0.5 * float((t * t).sum()), t.tolist())
            assert loss_i.tolist() == [want[0]] and x.grad.tolist() == want[1], policy


def fastdistill_backend(backend):
    return fd.use_backend(backend)


def test_zero_sample_overflow_pins(use):
    overflow_pins(use)


def test_gradient_ranges_per_term_dtype(use):
    """Term gradients are judged (zero_sample) and clamped (to_num) in their own dtype's range, not in the
    narrowest range among the terms: an fp32 term's gradient of 80000 is kept beside fp16 ones."""
    y = torch.zeros(1, 4, dtype=F16, requires_grad=True)
    a = torch.full((1, 4), 0.5, requires_grad=True)  # fp32
    b = torch.zeros(1, 4, dtype=F16, requires_grad=True)
    for policy in ("zero_sample", "to_num"):
        for t in (y, a, b):
            t.grad = None
        _, bad, _ = _run(fd.sid_loss, y, ([a, b], [400.0, 1.0]), torch.zeros(1, 4, dtype=F16), alpha=0.0,
                         w_clamp=1.0, scale=100.0, nan=policy)
        assert bad.tolist() == [False], policy
        assert a.grad.tolist() == [[80000.0] * 4] and y.grad.tolist() == [[-100.0] * 4], policy
        assert b.grad.tolist() == [[200.0] * 4], policy


def test_narrow_term_dtype_judged_in_its_own_range(use):
    """sid_loss with fp32 y and fp16 terms that require grad: a term gradient that fits fp16 after the gradient
    factor does not flag the sample (the ratio of ranges applied before the factor overflowed to inf); fp64
    terms under fp32 accumulation with to_num clamp within fp32 (no overflow error)."""
    y = torch.zeros(1, 4, requires_grad=True)
    fr = torch.full((1, 4), 60000.0, dtype=F16, requires_grad=True)
    ff = torch.zeros(1, 4, dtype=F16, requires_grad=True)
    loss, st = fd.sid_loss(y, fr, ff, return_stats=True)
    loss.backward()
    assert st["bad"].tolist() == [False]
    y64, fr64, ff64 = (t.detach().double().requires_grad_() for t in (y, fr, ff))
    with fd.use_backend("reference"):
        fd.sid_loss(y64, fr64, ff64, accum_dtype=F64).backward()
    for a, b in ((y.grad, y64.grad), (fr.grad, fr64.grad), (ff.grad, ff64.grad)):
        assert_rel(a, b, 2e-3)
    yb = torch.randn(2, 4, requires_grad=True)
    t64 = torch.randn(2, 4, dtype=F64, requires_grad=True)
    t64.data[0, 0] = float("inf")
    out = fd.sid_loss(yb, t64, torch.zeros(2, 4, dtype=F64), nan="to_num")
    out.backward()
    assert torch.isfinite(t64.grad).all() and torch.isfinite(yb.grad).all()
    assert t64.grad.abs().max() <= torch.finfo(torch.float32).max


# ----------------------------------------------------------------------------- fp64 parameters
def test_float_parameters_reach_the_kernels_in_the_accumulation_dtype(monkeypatch):
    """Triton types a Python float kernel argument as fp32 (1.2 -> 1.2000000477, the fp64 range -> inf): the
    compiled kernels of accum_dtype=float64 would lose the parity they promise (the interpreter keeps fp64, so
    only the launch arguments can show it on a CPU). Every float parameter goes in a tensor of the accumulation
    dtype, exactly."""
    from triton.runtime.jit import mangle_type

    from fastdistill.kernels import score as S

    assert mangle_type(1.2) == "fp32"  # the premise
    seen = []

    class Spy:
        def __init__(self, k):
            self.k = k

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(args)
                return self.k[grid](*args, **kw)

            return launch

    for name in ("_score_stats_kernel", "_score_finalize_kernel", "_score_grad_kernel"):
        monkeypatch.setattr(S, name, Spy(getattr(S, name)))
    x, (f, r), _ = make(3, (4, 5), 2, seed=40)
    with fd.use_backend("triton"):
        fd.sid_loss(x, f, r, alpha=1.2, accum_dtype=F64).backward()
        fd.scm_tangent_loss(x, [f, r], [1.0, 1.0], weight=1 / 0.3, c=0.1, accum_dtype=F64)
        fd.score_distill(x, [f, r], [1.0, -1.0], norm_coeffs=[1.0, 0.0], phi="pseudo_huber", huber_c=0.37,
                         accum_dtype=F64)
    assert len(seen) >= 7
    for args in seen:
        assert not any(isinstance(a, float) for a in args), [a for a in args if isinstance(a, float)]
        prm = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == F64 and a.numel() == 7]
        assert prm, "the parameter tensor"
    vals = {v for args in seen for a in args if isinstance(a, torch.Tensor) and a.numel() == 7 for v in a.tolist()}
    assert {1.2, 1 / 0.3, 0.1, 0.37} <= vals, vals


def test_coeffs_as_a_list_of_per_sample_tensors(use):
    """``coeffs=[C, -C * s, -C * (1 - s)]`` with per-sample [B] tensors (how DMD2-style code writes it) equals the
    stacked [B, K] tensor (before: "expected a sequence of 2 floats or a tensor, got list"; a list of 0-d tensors
    was read on the host, a recompilation per step under torch.compile)."""
    g = torch.Generator().manual_seed(5)
    B = 3
    x = torch.randn(B, 2, 8, generator=g, dtype=F64)
    terms = [torch.randn(B, 2, 8, generator=g, dtype=F64) for _ in range(3)]
    C, s = torch.rand(B, generator=g, dtype=F64) + 0.5, torch.rand(B, generator=g, dtype=F64) * 3
    listed = [C, -C * s, -C * (1 - s)]
    stacked = torch.stack(listed, 1)
    with fastdistill_backend(use):
        grads = []
        for coeffs, norm_coeffs in ((listed, [C * s, 0.25, torch.tensor(0.5, dtype=F64)]),
                                    (stacked, torch.stack([C * s, torch.full((B,), 0.25, dtype=F64),
                                                           torch.full((B,), 0.5, dtype=F64)], 1))):
            xx = x.clone().requires_grad_()
            loss = fd.score_distill(xx, terms, coeffs, norm_terms=terms, norm_coeffs=norm_coeffs, reduction="sum")
            loss.backward()
            grads.append((loss.detach(), xx.grad))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-12) and torch.allclose(grads[0][1], grads[1][1],
                                                                                   rtol=1e-12)


def test_coeffs_list_floats_keep_their_value_next_to_bf16_tensors():
    """A float next to a bf16 / fp16 per-sample tensor keeps its value (before: the stack took the tensors' dtype:
    -0.3 became -0.30078 next to bf16, and 1e5 overflowed next to fp16 with an unexplained RuntimeError)."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 16, generator=g)
    t = [torch.randn(2, 16, generator=g), torch.randn(2, 16, generator=g)]
    for dt, c in ((torch.bfloat16, -0.3), (torch.float16, 1e5)):
        one = torch.ones(2, dtype=dt)
        a = fd.score_distill(x, t, [one, c], norm=None, reduction="sum")
        b = fd.score_distill(x, t, [1.0, c], norm=None, reduction="sum")
        assert torch.allclose(a, b, rtol=1e-6), (dt, a, b)


def test_score_argument_errors_name_the_argument():
    x = torch.zeros(2, 4)
    t = [torch.ones(2, 4), torch.zeros(2, 4)]
    with pytest.raises(ValueError, match=r"^coeffs: expected 2 coefficients"):  # (before: "terms coefficients")
        fd.score_distill(x, t, [1.0, -1.0, 2.0], norm=None)
    with pytest.raises(ValueError, match=r"^norm_coeffs: expected 2 coefficients"):
        fd.score_distill(x, t, [1.0, -1.0], norm_terms=t, norm_coeffs=[1.0])
    with pytest.raises(ValueError, match=r"^coeffs\[1\]: expected a float or a tensor of shape \[\] or \[2\]"):
        fd.score_distill(x, t, [1.0, torch.ones(3)], norm=None)
    with pytest.raises(TypeError, match=r"^coeffs\[0\]: expected a float, got str"):
        fd.score_distill(x, t, ["a", torch.ones(2)], norm=None)
    with pytest.raises(TypeError, match=r"^alpha: expected a float \(or a one-element CPU tensor\), got a tensor of "
                                        r"shape \(2,\) on cpu$"):  # (before: a hint at weight / sample_weight)
        fd.sid_loss(x, t[0], t[1], alpha=torch.ones(2))


def test_float_option_tensor_that_requires_grad_raises():
    """A one-element tensor given for a float option that requires grad (a learnable loss scale, an SiD alpha
    schedule made by a module) raises naming the option with grad mode on, as a weight that requires grad does:
    the op reads its value on the host, so no gradient could reach it (before: accepted, and its .grad silently
    stayed None). Under no_grad, or detached, its value is taken."""
    x = torch.randn(2, 4, requires_grad=True)
    t = [torch.randn(2, 4), torch.randn(2, 4)]
    s = torch.tensor(2.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"^scale: requires grad"):
        fd.score_distill(x, t, [1.0, -1.0], norm=None, scale=s)
    with pytest.raises(ValueError, match=r"^alpha: requires grad"):
        fd.sid_loss(x, t[0], t[1], alpha=s)
    with pytest.raises(ValueError, match=r"^c: requires grad"):
        fd.scm_tangent_loss(x, t, [1.0, -1.0], c=s)
    ref = fd.score_distill(x, t, [1.0, -1.0], norm=None, scale=2.0)
    assert torch.equal(fd.score_distill(x, t, [1.0, -1.0], norm=None, scale=s.detach()), ref)
    with torch.no_grad():
        assert torch.equal(fd.score_distill(x, t, [1.0, -1.0], norm=None, scale=s), ref)


def test_one_element_weight_tensor_is_the_batch_weight():
    """A one-element weight tensor weighs every sample (before: it worked at B = 1 only, and raised "expected shape
    [3]" at B = 3, while the docs listed it among the float options that accept one)."""
    g = torch.Generator().manual_seed(2)
    for B in (2, 3):  # (any B > 1)
        F_ = torch.randn(B, 8, generator=g, dtype=F64)
        T = [torch.randn(B, 8, generator=g, dtype=F64)]
        pred = torch.randn(B, 8, generator=g, dtype=F64)
        for w in (torch.tensor(2.5, dtype=F64), torch.tensor([2.5], dtype=F64)):
            assert torch.equal(fd.scm_tangent_loss(F_, T, [1.0], weight=w),
                               fd.scm_tangent_loss(F_, T, [1.0], weight=2.5))
            assert torch.equal(fd.denoise_regression_loss(pred, T, [1.0], weight=w),
                               fd.denoise_regression_loss(pred, T, [1.0], weight=2.5))
            assert torch.equal(fd.score_distill(pred, T, [1.0], norm=None, sample_weight=w),
                               fd.score_distill(pred, T, [1.0], norm=None, sample_weight=2.5))


_SCHEDULES = {  # a float option given a new value every step
    "score_distill scale": lambda x, f, c, s: fd.score_distill(x, [f, c], [1.0, -1.0], norm_terms=[c],
                                                               norm_coeffs=[1.0], scale=s),
    "score_distill coeffs": lambda x, f, c, s: fd.score_distill(x, [f, c], [s, 1.0 - s], norm_terms=[c, f],
                                                                norm_coeffs=[s, -0.5 * s], norm_clamp=0.01 * s),
    # a float next to a per-sample tensor (stacked on the device): the DMD2 CFG form with a scheduled scale
    "score_distill mixed coeffs": lambda x, f, c, s: fd.score_distill(x, [f, c], [c[:, 0, 0] + 2.0, -s], norm=None),
    "score_distill huber_c": lambda x, f, c, s: fd.score_distill(x, [f, c], [1.0, -1.0], norm=None,
                                                                 phi="pseudo_huber", huber_c=0.1 * s, norm_eps=s),
    "sid_loss alpha": lambda x, f, c, s: fd.sid_loss(x, f, ([c, f], [s, 1.0 - s]), alpha=s, w_eps=0.1 * s),
    "scm_tangent_loss weight": lambda x, f, c, s: fd.scm_tangent_loss(x, [f, c], [1.0, -s], weight=s, c=0.1 * s,
                                                                      f_coeff=0.5 * s),
    "denoise_regression_loss weight": lambda x, f, c, s: fd.denoise_regression_loss(x, [f], [-s], weight=s,
                                                                                    pred_coeff=s),
}


@pytest.mark.parametrize("call", list(_SCHEDULES))
def test_float_options_schedule_one_dynamic_graph(use, call):
    """A schedule of a float option (a CFG scale, SiD's alpha, a ramped float weight, float coefficients) under
    torch.compile(fullgraph=True): the first value, then one graph with the values as graph inputs (before: each
    value was a graph constant, a recompilation per step until the recompile limit, then FailOnRecompileLimitHit).
    Loss and gradients equal eager at every value, bit for bit (the kernels' parameter vector and the constant
    coefficients are built in the graph in float64, as on the host, then cast; the reference reads the floats
    exactly)."""
    import torch._dynamo as dynamo
    import torch._dynamo.testing as dt

    x0, (f, c), _ = make(2, (3, 8), 2, dtype=torch.float32)
    fn = _SCHEDULES[call]
    dynamo.reset()
    cnt = dt.CompileCounterWithBackend("aot_eager")  # AOTAutograd: where an untensorified float is specialised
    cf = torch.compile(fn, backend=cnt, fullgraph=True)
    for s in (1.5, 2.25, 0.7, 3.1, 1.9):
        x, y = x0.detach().clone().requires_grad_(), x0.detach().clone().requires_grad_()
        got, want = cf(x, f, c, s), fn(y, f, c, s)
        got.backward()
        want.backward()
        assert torch.equal(got, want) and torch.equal(x.grad, y.grad), (call, s)
    # torch 2.11 (checked; 2.12 not) still specialises these floats in AOTAutograd: one graph per value, right values
    if tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13):
        assert cnt.frame_count <= 2, (call, cnt.frame_count)
    dynamo.reset()


def test_compiled_options_and_per_sample_coeffs():
    """Under torch.compile(fullgraph=True): per-sample coefficients given as a list stay one graph across steps
    whose values change; a tensor given for a float option raises naming it (before: an internal dynamo error
    about List[float] that named nothing)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, generator=g)
    t = [torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)]
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    with fd.use_backend("reference"):
        f = torch.compile(lambda x, C: fd.score_distill(x, t, [C, -C], norm=None), fullgraph=True, backend=backend)
        for step in range(3):
            C = torch.rand(2, generator=g) + step
            assert torch.allclose(f(x, C), fd.score_distill(x, t, torch.stack([C, -C], 1), norm=None))
        assert counts["frames"] == 1, counts
        h = torch.compile(lambda x: fd.score_distill(x, t, [1.0, -1.0], norm=None, scale=torch.tensor(2.0)),
                          fullgraph=True, backend=backend)
        with pytest.raises(Exception, match=r"scale: pass a Python float under torch.compile"):
            h(x)
        # nan="raise" reads the bad flags on the host: refused by name under torch.compile
        r = torch.compile(lambda x: fd.score_distill(x, t, [1.0, -1.0], norm=None, nan="raise"), fullgraph=True,
                          backend=backend)
        with pytest.raises(Exception, match=r"score_distill: nan='raise' needs a host synchronisation"):
            r(x)
    dynamo.reset()


@pytest.mark.parametrize("op", ["score_distill", "sid_loss", "scm_tangent_loss", "denoise_regression_loss"])
def test_compiled_fresh_tensors_every_step(op):
    """A training loop hands fresh tensors to the op every step: under torch.compile(fullgraph=True) that is one
    graph (two once the batch size changes), with values and gradients equal to eager. Before: the terms were
    merged by id(), a guard on the very objects, so every step recompiled until the limit (8), then raised under
    fullgraph=True (without it: silently eager, 200-1800 ms a step on the CPU). Found by a compile audit."""
    import torch._dynamo as dynamo

    dynamo.reset()
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    calls = {
        "score_distill": lambda x, a, b: fd.score_distill(x, [a, b], [1.0, -1.0], norm=None),
        "sid_loss": lambda x, a, b: fd.sid_loss(x, a, b, alpha=1.2),
        "scm_tangent_loss": lambda x, a, b: fd.scm_tangent_loss(x, [a, b], [0.5, -0.5], c=0.1),
        "denoise_regression_loss": lambda x, a, b: fd.denoise_regression_loss(x, [a, b], [1.0, 0.3]),
    }
    fn = calls[op]
    f = torch.compile(fn, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(7)
    for step, B in enumerate((2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 4, 5)):
        x, a, b = (torch.randn(B, 3, 5, generator=g, dtype=F64).requires_grad_() for _ in range(3))
        got = f(x, a, b)
        got.backward()
        x2, a2, b2 = (t.detach().clone().requires_grad_() for t in (x, a, b))
        want = fn(x2, a2, b2)
        want.backward()
        assert torch.allclose(got, want, rtol=1e-12, atol=0), (op, step)
        for u, w in ((x, x2), (a, a2), (b, b2)):
            assert (u.grad is None) == (w.grad is None) and (u.grad is None or torch.allclose(u.grad, w.grad)), op
    assert counts["frames"] <= 2, counts
    dynamo.reset()


def test_compiled_tensor_schedules_one_graph():
    """Values that change every step (a ramped weight, a scheduled CFG scale) given as tensors: 0-d and per-sample
    coefficient tensors, sample_weight and a tensor weight compile one graph for all values under fullgraph=True,
    with results equal to eager (Python floats compile twice: test_float_options_schedule_one_dynamic_graph)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm.forward

    def fn(x, a, b, s, w):
        return (fd.score_distill(x, [a, b], [s, -s * w], norm=None, sample_weight=w)
                + fd.scm_tangent_loss(x, [a], [s], weight=w) + fd.denoise_regression_loss(x, [a], [-s], weight=w))

    f = torch.compile(fn, fullgraph=True, backend=backend)
    g = torch.Generator().manual_seed(8)
    a, b, x0 = (torch.randn(3, 5, generator=g, dtype=F64) for _ in range(3))
    for step in range(10):
        s, w = torch.tensor(1.0 + 0.25 * step, dtype=F64), torch.rand(3, generator=g, dtype=F64) + step
        x, x2 = x0.clone().requires_grad_(), x0.clone().requires_grad_()
        got, want = f(x, a, b, s, w), fn(x2, a, b, s, w)
        got.backward()
        want.backward()
        assert torch.allclose(got, want, rtol=1e-12, atol=0) and torch.allclose(x.grad, x2.grad, rtol=1e-12), step
    assert counts["frames"] == 1, counts
    dynamo.reset()


def test_empty_batch_with_per_sample_coefficient_list():
    """B = 0 with per-sample coefficients given as a list of [0] tensors: loss 0 like the stacked [B, K] form
    (before: an expand error, the block had one row)."""
    x, a, b = (torch.randn(0, 4, dtype=F64) for _ in range(3))
    c = torch.ones(0, dtype=F64)
    assert fd.score_distill(x, [a, b], [c, -c], norm=None).item() == 0.0
    assert fd.score_distill(x, [a, b], torch.stack([c, -c], 1), norm=None).item() == 0.0


def test_score_distill_broadcast_shaped_coefficients_and_scalar_sample_weight(use):
    """Argument forms users have at hand: coefficient entries shaped [B, 1, ...] (x0_coeffs of a sigma viewed to
    broadcast against x, sigma.view(B, 1, 1, 1)) and a sample_weight given as a float or a one-element tensor (as
    scm_tangent_loss / denoise_regression_loss take their weight). Before, both raised."""
    g = torch.Generator().manual_seed(2)
    B = 3
    x = torch.randn(B, 2, 4, 5, generator=g, dtype=F64)
    xt, v_fake, v_real = (torch.randn(B, 2, 4, 5, generator=g, dtype=F64) for _ in range(3))
    sigma = torch.rand(B, generator=g, dtype=F64) + 0.1
    A4, C4 = fd.coeffs.x0_coeffs("flow", sigma=sigma.view(B, 1, 1, 1))
    A, C = fd.coeffs.x0_coeffs("flow", sigma=sigma)
    w = torch.rand(B, generator=g, dtype=F64) + 0.5
    kw = dict(norm_terms=[v_real, xt], reduction="sum", accum_dtype=F64)

    def run(coeffs, norm_coeffs, sample_weight):
        y = x.clone().requires_grad_()
        loss = fd.score_distill(y, [v_fake, v_real], coeffs, norm_coeffs=norm_coeffs, sample_weight=sample_weight,
                                **kw)
        loss.backward()
        return loss, y.grad

    want = run([C, -C], [C, A], w)
    got = run([C4, -C4], [C4, A4], w.view(B, 1, 1, 1))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    want = run([C, -C], [C, A], torch.full((B,), 0.7, dtype=F64))
    for sw in (0.7, torch.tensor(0.7, dtype=F64), torch.tensor([0.7], dtype=F64)):
        got = run([C, -C], [C, A], sw)
        assert torch.allclose(got[0], want[0], rtol=1e-14) and torch.allclose(got[1], want[1], rtol=1e-14), sw


def test_at_most_eight_distinct_terms():
    """The kernels read at most 8 distinct term tensors; a tensor in both lists (terms, norm_terms) counts once, so
    8 distinct tensors referenced 10 times are served, and equal the fp64 oracle; 9 distinct ones raise."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 12, generator=g, dtype=F64, requires_grad=True)
    ts = [torch.randn(2, 12, generator=g, dtype=F64) for _ in range(9)]
    co, nco = [0.1 * (k + 1) for k in range(8)], [1.0, -0.5]
    loss = fd.score_distill(x, ts[:8], co, norm_terms=ts[6:8], norm_coeffs=nco, accum_dtype=F64)
    full = lambda v: torch.tensor(v, dtype=F64).expand(2, len(v))
    ref, xr = oracle_score(x, ts[:8], full(co), norm_terms=ts[6:8], norm_coeffs=full(nco))
    assert_rel(loss.detach(), ref.detach(), 1e-12, "loss")
    with pytest.raises(ValueError, match="at most 8 distinct term tensors are supported, got 9"):
        fd.score_distill(x, ts[:8], co, norm_terms=ts[7:9], norm_coeffs=nco)


@pytest.mark.parametrize("lv_grad", [True, False], ids=["logvar-grad", "logvar-const"])
def test_compiled_scm_with_logvar(use, lv_grad):
    """torch.compile(fullgraph=True) of scm_tangent_loss with a per-sample logvar, reduction="none" and an upstream
    gradient that is not 1: loss, ∂F and ∂logvar equal eager's. A mutation check found the compiled path's logvar
    gradient never compared (dropping the upstream factor passed the suite)."""
    import torch._dynamo as dynamo

    dynamo.reset()
    g = torch.Generator().manual_seed(5)
    F_ = torch.randn(3, 16, generator=g, requires_grad=True)
    T = [torch.randn(3, 16, generator=g) for _ in range(2)]
    lv = torch.randn(3, generator=g).requires_grad_(lv_grad)
    up = torch.randn(3, generator=g)

    def step(F_, lv):
        return fd.scm_tangent_loss(F_, T, [1.0, -0.5], logvar=lv, reduction="none")

    inputs = [F_, lv] if lv_grad else [F_]
    got_loss = torch.compile(step, fullgraph=True, backend="aot_eager")(F_, lv)
    want_loss = step(F_, lv)
    got = torch.autograd.grad(got_loss, inputs, up)
    want = torch.autograd.grad(want_loss, inputs, up)
    assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=0)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)
    dynamo.reset()
