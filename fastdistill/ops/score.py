"""Fused score-difference losses for DMD/VSD/SiD/sCM-style distillation.

Exact semantics (formulas, conventions, mapping of each public codebase): docs/score_ops.md.
Every parameterisation and CFG form is passed as per-sample coefficients of full-size
``terms``; ``fastdistill.coeffs`` builds them for the common cases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdistill.ops._common import check_choice, real_option, refuse_transforms, resolve_accum
from fastdistill.ops._score_engine import (
    NAN_POLICIES,
    OP_DENOISE,
    OP_SCM,
    OP_SCORE,
    OP_SID,
    Plan,
    check_tensor,
    mask_2d,
    pack_coef,
    per_sample,
    run,
    unify_terms,
    x_coef,
)

Coeffs = Sequence[float] | torch.Tensor
_RED = {"mean": 0, "sum": 1, "batchmean": 2, "none": 3}
_RED_BATCH = {"mean": 0, "sum": 1, "none": 3}


def _common(x: torch.Tensor, name: str, nan: str, accum_dtype: torch.dtype) -> tuple[int, int]:
    check_tensor(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name}: expected a tensor of shape [B, ...], got a 0-d tensor")
    check_choice("nan", nan, NAN_POLICIES)
    if accum_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"accum_dtype: expected torch.float32 or torch.float64, got {accum_dtype}")
    B = x.shape[0]
    return B, (x.numel() // B if B else 0)


def _trains_something(op: str, name: str, x: torch.Tensor, terms: Sequence[torch.Tensor], logvar=None) -> None:
    """Terms are stop-gradient in these ops: with grad mode on, a loss whose main input does not require grad while
    a term does would train nothing (swapped arguments: ``denoise_regression_loss(target, [pred], ...)``)."""
    if (torch.is_grad_enabled() and not x.requires_grad and not (logvar is not None and logvar.requires_grad)
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in terms)):
        raise ValueError(f"{name}: does not require grad while a term does; terms are stop-gradient (constants) in "
                         f"{op}, so the loss would train nothing: swapped arguments? ({name} is the tensor trained; "
                         "detach the terms to evaluate the loss as is)")


def _nan_flags(nan: str) -> dict:
    return {"to_num": nan != "zero_sample", "raise_": nan == "raise"}


def score_distill(
    x: torch.Tensor,
    terms: Sequence[torch.Tensor],
    coeffs: Coeffs,
    *,
    norm: str | None = "mean_abs",
    norm_terms: Sequence[torch.Tensor] | None = None,
    norm_coeffs: Coeffs | None = None,
    norm_clamp: float = 0.0,
    norm_eps: float = 0.0,
    norm_on: str = "grad",
    phi: str = "l2",
    huber_c: float = 1e-3,
    sample_weight: float | torch.Tensor | None = None,
    reduction: str = "mean",
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
    nan: str = "zero_sample",
    accum_dtype: torch.dtype | None = None,
    return_stats: bool = False,
):
    """DMD / DMD2 / VSD / SDS-family generator loss with the gradient ``κ·h·φ(d)/w`` on ``x``.

    ``x``: ``[B, *S]`` generator output (fp32/bf16/fp16/fp64). ``terms``: tensors of ``x``'s
    shape (predictions, ``x_t``, noise), stop-gradient. ``d = Σ_k coeffs[:, k]·terms[k]``
    (``coeffs``: ``K`` floats, a ``[K]`` or ``[B, K]`` tensor, or ``K`` entries each a float or a per-sample
    ``[B]`` tensor, stacked on the device). With ``norm="mean_abs"`` the per-sample normaliser is
    ``w = max(mean|x − Σ norm_coeffs·norm_terms|, norm_clamp) + norm_eps`` (``"mean_abs_global"``:
    one over the batch; ``None``: 1). ``norm_terms`` defaults to ``terms``; a tensor in both lists
    is read once. ``φ`` is ``d`` (``"l2"``) or ``d/sqrt(d²+c²)`` (``"pseudo_huber"``).
    ``κ = scale × (1/N_valid | 1 | 1/B | 1)`` for reduction ``"mean" | "sum" | "batchmean" | "none"``;
    ``sample_weight`` ``h``: a ``[B]`` tensor, or a float / one-element tensor for every sample.
    Returns the loss in the accumulation dtype (fp32; fp64 for fp64 inputs or ``accum_dtype=torch.float64``),
    ``[B]`` for ``"none"``; with ``return_stats`` also a dict of
    ``loss_per_sample``, ``normalizer`` and ``bad`` flags.

    Example (DMD2, flow matching ``x0 = x_t − σ·v``, CFG scale s)::

        A, C = fastdistill.coeffs.x0_coeffs("flow", sigma=sigma)          # [B] each
        loss = score_distill(x, [v_fake, v_cond, v_uncond], torch.stack([C, -C * s, -C * (1 - s)], 1),
                             norm_terms=[v_cond, v_uncond, xt], norm_coeffs=torch.stack([C * s, C * (1 - s), A], 1))
    """
    refuse_transforms("score_distill")
    accum_dtype = resolve_accum(accum_dtype, x)
    B, M = _common(x, "x", nan, accum_dtype)
    check_choice("norm", norm, (None, "mean_abs", "mean_abs_global"))
    check_choice("norm_on", norm_on, ("grad", "loss"))
    check_choice("phi", phi, ("l2", "pseudo_huber"))
    check_choice("reduction", reduction, tuple(_RED))
    groups = [("terms", terms, coeffs)]
    if norm is not None:
        if norm_coeffs is None:
            raise ValueError("norm_coeffs: required when norm is not None (the normaliser reference "
                             "Σ norm_coeffs·norm_terms)")
        groups.append(("norm_terms", terms if norm_terms is None else norm_terms, norm_coeffs))
    elif norm_coeffs is not None or norm_terms is not None:
        raise ValueError("norm_coeffs / norm_terms: given, but norm=None")
    if real_option("huber_c", huber_c) <= 0 and phi == "pseudo_huber":
        raise ValueError(f"huber_c: expected > 0, got {huber_c}")
    c_min = torch.finfo(accum_dtype).tiny ** 0.5  # (accum_dtype checked by _common)
    if phi == "pseudo_huber" and real_option("huber_c", huber_c) < c_min:  # c² below the normal range: φ(0) = 0/0
        raise ValueError(f"huber_c: {huber_c:.3g} is below {c_min:.3g}, where c² leaves {accum_dtype}'s normal "
                         "range (φ(d) = d/√(d² + c²) would be 0/0 at d = 0); use accum_dtype=torch.float64 or a "
                         "larger c")
    all_terms, rows, uses = unify_terms(groups, x, B)
    if len(all_terms) == 0:
        raise ValueError("terms: expected at least one tensor")
    _trains_something("score_distill", "x", x, all_terms)
    w_scale, weight = _weight_arg(sample_weight, B, x.device, "sample_weight")
    acc = accum_dtype
    # row 0: d = Σ c·T; row 1: the normaliser reference Σ c'·N (the kernels form x − ref)
    coef = pack_coef([rows[0], rows[1] if norm is not None else []], len(all_terms), B, x.device, acc)
    p = Plan(op=OP_SCORE, use1=uses[0], use2=uses[1] if norm is not None else 0, phi_huber=phi == "pseudo_huber",
             norm_on_loss=norm_on == "loss", norm={None: 0, "mean_abs": 1, "mean_abs_global": 2}[norm],
             red=_RED[reduction], fp64=acc == torch.float64, huber_c=real_option("huber_c", huber_c),
             scale=real_option("scale", scale) * w_scale,
             clamp=real_option("norm_clamp", norm_clamp), eps=_non_negative("norm_eps", norm_eps),
             **_nan_flags(nan))
    return run(p, x, all_terms, coef, mask_2d(mask, x, B, M), weight, None, return_stats)


def _combo_arg(name: str, f) -> tuple[list[torch.Tensor], Coeffs]:
    if isinstance(f, torch.Tensor):
        return [f], (1.0,)
    if isinstance(f, (tuple, list)) and len(f) == 2:
        return list(f[0]), f[1]
    raise TypeError(f"{name}: expected a tensor or a pair (terms, coeffs), got {type(f).__name__}")


def sid_loss(
    y: torch.Tensor,
    f_real,
    f_fake,
    *,
    alpha: float = 1.2,
    w_clamp: float = 1e-5,
    w_eps: float = 0.0,
    reduction: str = "batchmean",
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
    nan: str = "zero_sample",
    accum_dtype: torch.dtype | None = None,
    return_stats: bool = False,
):
    """SiD / SiD-LSG generator loss ``(f_r − f_f)·((f_r − y) − α(f_r − f_f))/w`` with gradients
    for ``y`` and for every real/fake input that requires grad.

    ``y``: ``[B, *S]`` generator output. ``f_real`` / ``f_fake``: a tensor of ``y``'s shape (the
    x0 prediction) or a pair ``(terms, coeffs)`` combining raw outputs (CFG, x0 conversion);
    gradients reach each raw term as ``a_k ∂L/∂f_r + b_k ∂L/∂f_f``. ``w = max(mean|y − f_r|,
    w_clamp) + w_eps`` per sample (stop-gradient). SiD's ``loss.sum()·lsg/B`` is
    ``reduction="batchmean", scale=lsg``.
    """
    refuse_transforms("sid_loss")
    accum_dtype = resolve_accum(accum_dtype, y)
    B, M = _common(y, "y", nan, accum_dtype)
    check_choice("reduction", reduction, tuple(_RED))
    rt, rc = _combo_arg("f_real", f_real)
    ft, fc = _combo_arg("f_fake", f_fake)
    if any(t is y for t in rt + ft):
        raise ValueError("f_real / f_fake: y itself cannot be a term; pass it only as y")
    terms, rows, uses = unify_terms([("f_real", rt, rc), ("f_fake", ft, fc)], y, B)
    coef = pack_coef(rows, len(terms), B, y.device, accum_dtype)
    tneed = sum(1 << k for k, t in enumerate(terms) if t.requires_grad)
    p = Plan(op=OP_SID, use1=uses[0], use2=uses[1], tneed=tneed, red=_RED[reduction],
             fp64=accum_dtype == torch.float64,
             alpha=real_option("alpha", alpha), scale=real_option("scale", scale),
             clamp=real_option("w_clamp", w_clamp), eps=_non_negative("w_eps", w_eps), **_nan_flags(nan))
    return run(p, y, terms, coef, mask_2d(mask, y, B, M), None, None, return_stats)


def scm_tangent_loss(
    F: torch.Tensor,
    terms: Sequence[torch.Tensor],
    coeffs: Coeffs,
    *,
    f_coeff: float | torch.Tensor = 0.0,
    c: float = 0.1,
    norm: str = "l2",
    weight: float | torch.Tensor | None = None,
    logvar: torch.Tensor | None = None,
    sample_reduction: str = "sum",
    reduction: str = "mean",
    nan: str = "zero_sample",
    accum_dtype: torch.dtype | None = None,
    return_stats: bool = False,
):
    """The sCM / rCM / SANA-Sprint tail after the JVP: ``g = f_coeff·sg(F) + Σ coeffs·terms``,
    ``ĝ = g/(‖g‖ + c)`` (L2 or RMS norm), per-sample ``ℓ = weight·e^{−logvar}·R_j(ĝ²) + logvar``,
    the value and gradient of ``weight·e^{−logvar}·R_j((F − sg(F) − sg(ĝ))²) + logvar``.

    ``F``: ``[B, *S]`` student output (requires grad). ``terms``: e.g. the CFG parts of F_T,
    ``x_t`` and the JVP tangent ``∂F`` (stop-gradient). ``weight``: float or ``[B]``; ``logvar``:
    ``[B]`` adaptive weighting (receives its gradient). ``sample_reduction`` R_j: ``"sum"`` |
    ``"mean"``; ``reduction`` over the batch: ``"mean"`` | ``"sum"`` | ``"none"``.
    """
    refuse_transforms("scm_tangent_loss")
    accum_dtype = resolve_accum(accum_dtype, F)
    B, M = _common(F, "F", nan, accum_dtype)
    check_choice("norm", norm, ("l2", "rms"))
    check_choice("sample_reduction", sample_reduction, ("sum", "mean"))
    check_choice("reduction", reduction, tuple(_RED_BATCH))
    if real_option("c", c) < 0:
        raise ValueError(f"c: expected >= 0, got {c}")
    all_terms, rows, uses = unify_terms([("terms", terms, coeffs)], F, B)
    row0 = rows[0] + [x_coef("f_coeff", f_coeff, B, F.device)]
    coef = pack_coef([row0, []], len(all_terms), B, F.device, accum_dtype)
    scale, wvec = _weight_arg(weight, B, F.device)
    p = Plan(op=OP_SCM, use1=uses[0], red=_RED_BATCH[reduction], sample_mean=sample_reduction == "mean",
             rms=norm == "rms", fp64=accum_dtype == torch.float64, c=real_option("c", c), scale=scale,
             **_nan_flags(nan))
    lv = per_sample("logvar", logvar, B, F.device)
    _trains_something("scm_tangent_loss", "F", F, all_terms, lv)
    return run(p, F, all_terms, coef, None, wvec, lv, return_stats)


def denoise_regression_loss(
    pred: torch.Tensor,
    terms: Sequence[torch.Tensor],
    coeffs: Coeffs,
    *,
    pred_coeff: float | torch.Tensor = 1.0,
    weight: float | torch.Tensor | None = None,
    sample_reduction: str = "mean",
    reduction: str = "mean",
    mask: torch.Tensor | None = None,
    nan: str = "zero_sample",
    accum_dtype: torch.dtype | None = None,
    return_stats: bool = False,
):
    """Fake-score / critic regression: ``d = pred_coeff·pred + Σ coeffs·terms`` (prediction minus
    target in any parameterisation), per-sample ``ℓ = weight·R_j(m·d²)`` with R_j a sum or a
    masked mean, reduced over the batch (``"mean" | "sum" | "none"``). Gradient to ``pred`` only.
    """
    refuse_transforms("denoise_regression_loss")
    accum_dtype = resolve_accum(accum_dtype, pred)
    B, M = _common(pred, "pred", nan, accum_dtype)
    check_choice("sample_reduction", sample_reduction, ("sum", "mean"))
    check_choice("reduction", reduction, tuple(_RED_BATCH))
    all_terms, rows, uses = unify_terms([("terms", terms, coeffs)], pred, B)
    row0 = rows[0] + [x_coef("pred_coeff", pred_coeff, B, pred.device)]
    coef = pack_coef([row0, []], len(all_terms), B, pred.device, accum_dtype)
    scale, wvec = _weight_arg(weight, B, pred.device)
    _trains_something("denoise_regression_loss", "pred", pred, all_terms)
    p = Plan(op=OP_DENOISE, use1=uses[0], red=_RED_BATCH[reduction], sample_mean=sample_reduction == "mean",
             fp64=accum_dtype == torch.float64, scale=scale, **_nan_flags(nan))
    return run(p, pred, all_terms, coef, mask_2d(mask, pred, B, M), wvec, None, return_stats)


def _non_negative(name: str, v) -> float:
    """An epsilon added to a normaliser: >= 0 (a negative one makes normalisers <= 0, every sample bad)."""
    f = real_option(name, v)
    if f < 0:
        raise ValueError(f"{name}: expected a number >= 0 (added to the normaliser), got {f}")
    return f


def _constant(name: str, v):
    """Per-sample weights are constants here: one that requires grad would silently get no gradient."""
    if isinstance(v, torch.Tensor) and v.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name}: requires grad, but the op treats it as a constant (no gradient reaches it); pass "
                         f"{name}.detach()")
    return v


def _weight_arg(weight, B: int, device, name: str = "weight") -> tuple[float, torch.Tensor | None]:
    """A per-sample weight given as a float (a factor on the loss: returned first) or a tensor of one element or
    [B] (or [B, 1, ...]), on the device (returned second, dense)."""
    if weight is None:
        return 1.0, None
    if isinstance(weight, torch.Tensor):
        if weight.numel() == 1 and B != 1:  # one weight for the batch, on the device: every sample's
            weight = _constant(name, weight).reshape(1).expand(B)
        return 1.0, per_sample(name, _constant(name, weight), B, device)
    return real_option(name, weight), None
