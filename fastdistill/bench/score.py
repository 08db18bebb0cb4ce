"""Benchmark family "score": the DMD2 generator loss on rectified-flow predictions.

Every provider computes the same objective (DMD2 ``compute_distribution_matching_loss`` with a
flow teacher, std CFG s = 5), from bf16 inputs: generator output ``x`` (requires grad), ``x_t``,
velocity predictions ``pred_real_cond``, ``pred_real_uncond``, ``pred_fake`` and per-sample
``sigma`` (x_t = (1 - sigma)·x + sigma·eps, x0 = x_t - sigma·v):

    X_f = x_t - sigma·v_f,   X_r = x_t - sigma·(u + s·(c - u))
    g   = (X_f - X_r) / mean_j |x - X_r|     (per sample),   L = ½·mean((x - sg(x - g))²)

Providers: ``fastdistill-{triton,cuda,reference}`` (``score_distill`` with a forced backend),
``eager-fp32`` (the same objective in plain PyTorch, bf16 in and every op in fp32: ANCHORS.md's
eager baseline and the speed-up column's), ``eager-dmd2`` (transcription of DMD2's code: float64
conversion, bf16 CFG), ``eager-fastvideo`` (FastVideo legacy ``_dmd_forward`` numerics),
``compile-fp32`` (``torch.compile`` of ``eager-fp32``, as ANCHORS.md's compiled row).

Error column: max_j |g_j - g64_j| / max_j |g64_j| on ``x.grad`` ("full"), or the relative
error of the loss value ("fwd"), against the same objective evaluated by the eager code on
float64 copies of the inputs. FastVideo's normaliser is one global mean (not per sample), so
its rows are checked against FastVideo's own code in float64: the same objective only at B = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastdistill.bench.runner import CPU_COMPILE_SKIP, Case

GUIDANCE = 5.0  # std CFG scale, u + s(c - u) (rCM's Wan setting)
# ANCHORS.md standard shapes: name -> [B, *S]
STANDARD = {"dmd-wan": (1, 16, 21, 60, 104), "dmd-wan-b8": (8, 16, 21, 60, 104), "dmd-sd": (32, 4, 64, 64)}
SMALL = {"dmd-video-small": (2, 4, 8, 16, 16), "dmd-image-small": (4, 4, 32, 32)}
MODES = ("fwd", "full")
ORDER = ["fastdistill-triton", "fastdistill-cuda", "fastdistill-reference", "eager-fp32", "eager-dmd2",
         "eager-fastvideo", "compile-fp32"]


def _up(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The codebases' ``.float()``: fp32, except float64 when ``like`` (the input) is float64 (the oracle)."""
    return t.to(torch.float64 if like.dtype == torch.float64 else torch.float32)


def _bcast(sigma: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return sigma.view(-1, *([1] * (ref.dim() - 1)))


def dmd2_loss(x, x_t, real_cond, real_uncond, fake, sigma, guidance: float = GUIDANCE):
    """DMD2 ``SDGuidance.compute_distribution_matching_loss`` with a flow teacher.

    As in DMD2: CFG is combined in the network output dtype (``predict_noise`` runs the real
    UNet in bf16), the prediction -> x0 conversion and the gradient are float64, the loss is
    ``0.5 * mse_loss(x.float(), (x - grad).detach().float())``.
    """
    with torch.no_grad():
        real = real_uncond + guidance * (real_cond - real_uncond)  # bf16 for bf16 inputs
        s = _bcast(sigma.double(), x)
        pred_fake_image = x_t.double() - s * fake.double()
        pred_real_image = x_t.double() - s * real.double()
        p_real = x - pred_real_image
        p_fake = x - pred_fake_image
        grad = (p_real - p_fake) / torch.abs(p_real).mean(dim=list(range(1, x.dim())), keepdim=True)
        grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(_up(x, x), _up((x - grad).detach(), x), reduction="mean")


def eager_fp32_loss(x, x_t, real_cond, real_uncond, fake, sigma, guidance: float = GUIDANCE):
    """The DMD2 generator loss as ANCHORS.md measured its eager baseline: bf16 in, every op in fp32 (the
    speed-up baseline; ``eager-dmd2`` keeps DMD2's own float64 conversion and bf16 CFG)."""
    with torch.no_grad():
        f = lambda t: _up(t, x)  # noqa: E731
        real = f(real_uncond) + guidance * (f(real_cond) - f(real_uncond))
        s = _bcast(f(sigma), x)
        p_real = f(x) - (f(x_t) - s * real)
        p_fake = f(x) - (f(x_t) - s * f(fake))
        grad = (p_real - p_fake) / torch.abs(p_real).mean(dim=list(range(1, x.dim())), keepdim=True)
        grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(f(x), (f(x) - grad).detach(), reduction="mean")


def fastvideo_loss(x, x_t, real_cond, real_uncond, fake, sigma, guidance: float = GUIDANCE):
    """FastVideo legacy ``DistillationPipeline._dmd_forward`` numerics, std CFG s written as offset s - 1.

    ``pred_noise_to_pred_video``: x0 = x_t - sigma·v in float64, cast back to the input dtype
    (sigma itself cast to the latent dtype first); offset CFG ``c + (c - u)·(s - 1)`` and the
    gradient in the input dtype; one global normaliser; ``0.5 * mse_loss`` in fp32.
    """
    with torch.no_grad():
        dt = x.dtype
        s = _bcast(sigma.to(dt).double(), x)

        def to_x0(v):
            return (x_t.double() - s * v.double()).to(dt)

        fake_x0, cond_x0, uncond_x0 = to_x0(fake), to_x0(real_cond), to_x0(real_uncond)
        real_x0 = cond_x0 + (cond_x0 - uncond_x0) * (guidance - 1.0)
        grad = (fake_x0 - real_x0) / torch.abs(x - real_x0).mean()
        grad = torch.nan_to_num(grad)
    return 0.5 * F.mse_loss(_up(x, x), (_up(x, x) - _up(grad, x)).detach())


_COMPILED = None


def _compiled_fp32():
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(eager_fp32_loss, dynamic=False)
    return _COMPILED


def _inputs(shape: tuple[int, ...], device: str, dtype: torch.dtype = torch.bfloat16) -> dict:
    g = torch.Generator(device=device).manual_seed(1234)
    B = shape[0]

    def randn():
        return torch.randn(shape, generator=g, device=device, dtype=torch.float32)

    x0, eps = randn(), randn()
    sigma = torch.linspace(0.25, 0.85, B, device=device) if B > 1 else torch.full((1,), 0.6, device=device)
    sb = _bcast(sigma, x0)
    v = eps - x0  # the exact flow velocity; the networks are off by a little, the fake more
    t = {
        "x": x0.to(dtype).requires_grad_(True),
        "x_t": ((1 - sb) * x0 + sb * eps).to(dtype),
        "real_cond": (v + 0.10 * randn()).to(dtype),
        "real_uncond": (v + 0.15 * randn()).to(dtype),
        "fake": (v + 0.30 * randn()).to(dtype),
        "sigma": sigma,
    }
    return t


def _fastdistill_args(t: dict[str, torch.Tensor], guidance: float = GUIDANCE):
    """terms, coeffs, norm_coeffs of DMD2 in fastdistill's convention (docs/score_ops.md).

    terms = [v_f, c, u, x_t];  X = A·x_t + C·v with A = 1, C = -sigma (rectified flow):
      d = X_f - X_r^cfg = -sigma·v_f + s·sigma·c + (1 - s)·sigma·u + 0·x_t
      X_r^cfg           =  0·v_f    - s·sigma·c - (1 - s)·sigma·u + 1·x_t   (norm_coeffs)
    """
    sig = t["sigma"].float()
    one, zero = torch.ones_like(sig), torch.zeros_like(sig)
    coeffs = torch.stack([-sig, guidance * sig, (1 - guidance) * sig, zero], dim=1)
    norm_coeffs = torch.stack([zero, -guidance * sig, -(1 - guidance) * sig, one], dim=1)
    terms = [t["fake"], t["real_cond"], t["real_uncond"], t["x_t"]]
    return terms, coeffs, norm_coeffs


def _fastdistill_providers(t: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """name -> closure computing the loss, and name -> reason for the backends that cannot run."""
    names = {"triton": "fastdistill-triton", "cuda": "fastdistill-cuda", "reference": "fastdistill-reference"}
    try:
        import fastdistill

        why = fastdistill.available_backends("score_distill", t["x"])
    except Exception as exc:
        reason = f"fastdistill.score_distill unavailable ({type(exc).__name__}: {exc})"
        return {}, {n: reason for n in names.values()}
    terms, coeffs, norm_coeffs = _fastdistill_args(t)
    fns, skipped = {}, {}
    for backend, name in names.items():
        reasons = why.get(backend, ["backend not reported by available_backends"])
        if reasons:
            skipped[name] = "; ".join(reasons)
            continue

        def fn(backend=backend):
            with fastdistill.use_backend(backend):
                return fastdistill.score_distill(t["x"], terms, coeffs, norm="mean_abs",
                                                 norm_coeffs=norm_coeffs, reduction="mean", nan="to_num")

        fns[name] = fn
    return fns, skipped


def _step(loss_fn, x: torch.Tensor, mode: str):
    def step():
        x.grad = None
        loss = loss_fn()
        if mode == "full":
            loss.backward()
        return loss

    return step


class _Oracle:
    """fp64 loss and x.grad of an eager objective on float64 copies of the inputs (computed once)."""

    def __init__(self, fn, t: dict[str, torch.Tensor]):
        self.fn, self.t, self._val = fn, t, None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._val is None:
            t = self.t
            x = t["x"].detach().double().requires_grad_(True)
            loss = self.fn(x, *(t[k].double() for k in ("x_t", "real_cond", "real_uncond", "fake", "sigma")))
            loss.backward()
            self._val = (loss.detach(), x.grad)
        return self._val


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    den = ref.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float(((out.detach().double() - ref).abs().max() / den).item())


def cases(device: str, quick: bool) -> list[Case]:
    small = quick or not device.startswith("cuda")
    shapes = SMALL if small else STANDARD
    note = f"{'quick' if device.startswith('cuda') else 'cpu'}-small-shape" if small else ""
    out = []
    for shape_name, shape in shapes.items():
        t = _inputs(shape, device)
        x = t["x"]
        args = [t[k] for k in ("x", "x_t", "real_cond", "real_uncond", "fake", "sigma")]
        oracles = {"dmd2": _Oracle(dmd2_loss, t), "fastvideo": _Oracle(fastvideo_loss, t)}
        fd, skipped = _fastdistill_providers(t)
        losses = {
            **fd,
            "eager-fp32": lambda args=args: eager_fp32_loss(*args),
            "eager-dmd2": lambda args=args: dmd2_loss(*args),
            "eager-fastvideo": lambda args=args: fastvideo_loss(*args),
        }
        if device.startswith("cuda"):
            losses["compile-fp32"] = lambda args=args: _compiled_fp32()(*args)
        else:
            skipped = {**skipped, "compile-fp32": CPU_COMPILE_SKIP}
        n, esize = x.numel(), x.element_size()
        for mode in MODES:
            # bytes of the ideal fused step: read x, x_t and 3 predictions, (full) write ∂x; all [B, *S]
            #   fwd:  5·B·M·esize     full: (5 + 1)·B·M·esize      (sigma and coefficients: negligible)
            nbytes = (5 + (mode == "full")) * n * esize
            providers = {name: _step(fn, x, mode) for name, fn in losses.items()}

            def error(name, mode=mode, providers=providers, oracles=oracles, x=x):
                loss64, g64 = oracles["fastvideo" if name == "eager-fastvideo" else "dmd2"].get()
                loss = providers[name]()
                return _rel_err(x.grad, g64) if mode == "full" else _rel_err(loss, loss64)

            def reset(x=x):
                x.grad = None

            case_note = "; ".join(filter(None, [note, "rel_err of the loss value" if mode == "fwd" else ""]))
            out.append(Case(shape=shape_name, mode=mode, providers=providers, bytes=nbytes, error=error,
                            skipped=skipped, reset=reset, baseline="eager-fp32", anchor="compile-fp32", order=ORDER,
                            note=case_note))
    return out
