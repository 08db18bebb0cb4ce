"""GPU tier for the CUDA backend of the score ops (csrc/score.cu through fastdistill._C): every op
against the reference backend on the same GPU, bf16/fp16/fp32 inputs, odd and vector-friendly
sizes, misaligned views (the scalar path), masks, per-sample coefficients, NaN policies and
reduction modes; bitwise determinism of repeated runs.

Tolerances (docs/score_ops.md: all math fp32, gradients written once in their own dtype):
fp32 values within 1e-5 relative; bf16/fp16 gradients within 2 ulp of the output dtype at the
reference's own value. Both get an absolute floor of 1e-6 × the largest reference value, which
covers elements where the combination cancels (FMA vs separate multiply-add in fp32).

``run_case`` / ``compare`` are device-agnostic: tests/test_csrc_build.py runs the same cases on the
CPU through a host emulation of the kernels.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import fastdistill as fd
from fastdistill import _backend

GPU = torch.cuda.is_available()
ULP_BITS = {torch.float16: 11, torch.bfloat16: 8}  # significant bits (spacing 2^(e - bits))
MIN_SPACING = {torch.float16: 2.0**-24, torch.bfloat16: 2.0**-133}


@dataclasses.dataclass(frozen=True)
class Case:
    op: str  # score | sid | scm | denoise
    dtype: torch.dtype
    B: int
    S: tuple
    kw: tuple = ()  # extra keyword arguments of the op, as (name, value) pairs
    per_sample: bool = False  # coefficients as [B, K] tensors (else lists of floats)
    mask: str | None = None  # None | "rand" | "bcast" | "empty" (one sample fully masked)
    inject: str | None = None  # None | "nan" | "inf" (non-finite samples 0, 1) | "huge" (gradients overflow)
    misaligned: bool = False  # inputs viewed at an odd element offset: the scalar path
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [self.op, str(self.dtype).removeprefix("torch."), f"B{self.B}-{'x'.join(map(str, self.S))}"]
        parts += [f"{k}={v}" for k, v in self.kw]
        parts += [n for n, on in (("coefB", self.per_sample), ("misaligned", self.misaligned)) if on]
        parts += [f"mask-{self.mask}"] if self.mask else []
        parts += [f"inject-{self.inject}"] if self.inject else []
        return "-".join(parts)


def _tensor(shape, dtype, g, device, misaligned, scale=1.0):
    n = 1
    for s in shape:
        n *= s
    buf = (torch.randn(n + 1, generator=g) * scale).to(dtype).to(device)
    return (buf[1:] if misaligned else buf[:n]).view(shape)


def run_case(c: Case, backend: str, device) -> dict:
    """Inputs from ``c.seed`` (identical for every backend), the op under ``backend``, a non-unit
    upstream gradient; returns the loss, the stats and every gradient."""
    g = torch.Generator().manual_seed(c.seed)
    shape = (c.B, *c.S)
    mk = lambda scale=1.0: _tensor(shape, c.dtype, g, device, c.misaligned, scale)
    x = mk()
    terms = [mk() for _ in range(4)]
    coef = lambda K: (torch.randn(c.B, K, generator=g).to(device) if c.per_sample
                      else torch.randn(K, generator=g).tolist())
    vec = lambda lo, hi: (torch.rand(c.B, generator=g) * (hi - lo) + lo).to(device)
    if c.inject in ("nan", "inf"):
        x, terms = x.clone(), [t.clone() for t in terms]
        if c.inject == "nan":
            terms[1][1].view(-1)[-1] = float("nan")
            x[0].view(-1)[0] = float("inf")
        else:
            terms[0][1].view(-1)[0] = float("-inf")
    mask = None
    if c.mask == "rand":
        mask = (torch.rand(shape, generator=g) > 0.3).to(device)
    elif c.mask == "bcast":
        mask = (torch.rand(c.B, *([1] * len(c.S)), generator=g) > 0.3).to(device)
        mask[0] = True
    elif c.mask == "empty":
        mask = (torch.rand(shape, generator=g) > 0.5).to(device)
        mask[-1] = False
    kw = dict(c.kw)
    x.requires_grad_()
    leaves = [x]
    out = {}
    with fd.use_backend(backend):
        if c.op == "score":
            f, cd, u, xt = terms
            norm = kw.pop("norm", "mean_abs")
            nkw = {} if norm is None else dict(norm_terms=[cd, u, xt], norm_coeffs=coef(3))
            if kw.pop("sample_weight", False):
                kw["sample_weight"] = vec(0.5, 2.0)
            loss, st = fd.score_distill(x, [f, cd, u], coef(3), norm=norm, mask=mask, return_stats=True, **nkw, **kw)
        elif c.op == "sid":
            f, cd, u, xt = [t.requires_grad_() for t in terms]
            leaves += [f, cd, u, xt]
            loss, st = fd.sid_loss(x, ([cd, u, xt], coef(3)), ([f, xt], coef(2)), mask=mask, return_stats=True,
                                   **kw)
        elif c.op == "scm":
            if kw.pop("weight_vec", False):
                kw["weight"] = vec(0.5, 2.0)
            if kw.pop("logvar", False):
                kw["logvar"] = vec(-1.0, 1.0).requires_grad_()
                leaves.append(kw["logvar"])
            fc = vec(0.2, 1.0) if c.per_sample else 0.5
            loss, st = fd.scm_tangent_loss(x, terms, coef(4), f_coeff=fc, return_stats=True, **kw)
        else:
            if kw.pop("weight_vec", False):
                kw["weight"] = vec(0.5, 2.0)
            pc = vec(0.5, 1.5) if c.per_sample else 1.0
            loss, st = fd.denoise_regression_loss(x, terms[:2], coef(2), pred_coeff=pc, mask=mask,
                                                  return_stats=True, **kw)
        up = (torch.full_like(loss, 0.75) if loss.dim() == 0
              else torch.linspace(0.5, 1.5, loss.numel(), device=loss.device))
        if c.inject == "huge":  # a loss scale that makes gradient elements overflow their dtype (fp16: not fp32):
            up = up * (1e7 if c.dtype == torch.float16 else 1e38)  # inf there, finite elsewhere (docs/score_ops.md)
        loss.backward(up)
    out["loss"] = loss.detach()
    out.update({k: v.detach() for k, v in st.items()})
    for i, t in enumerate(leaves):
        out[f"grad{i}"] = t.grad
    return out


def _spacing(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ulp of ``dtype`` at |ref| (computed in fp64)."""
    _, e = torch.frexp(ref.double().abs())
    return torch.ldexp(torch.ones_like(ref, dtype=torch.float64), e - ULP_BITS[dtype]).clamp_min(MIN_SPACING[dtype])


def assert_close(name: str, got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None):
    """fp32 values: 1e-5 relative; low-precision tensors (dtype given): 2 ulp of that dtype. NaN and
    ±inf must sit at the same places."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, \
        f"{name}: {got.shape}/{got.dtype} vs {ref.shape}/{ref.dtype}"
    a, b = got.double().cpu(), ref.double().cpu()
    nan_a, nan_b = a.isnan(), b.isnan()
    assert torch.equal(nan_a, nan_b), f"{name}: NaN at {nan_a.nonzero()[:5].tolist()} vs {nan_b.nonzero()[:5].tolist()}"
    inf_b = b.isinf()
    assert torch.equal(a.isinf(), inf_b) and torch.equal(a[inf_b], b[inf_b]), f"{name}: infinities differ"
    fin = ~(nan_b | inf_b)
    a, b = a[fin], b[fin]
    if b.numel() == 0:
        return
    floor = 1e-6 * b.abs().max().item()
    tol = 2 * _spacing(b, dtype) if dtype in ULP_BITS else 1e-5 * b.abs()
    err = (a - b).abs() - tol - floor
    worst = int(err.argmax())
    assert err[worst] <= 0, (f"{name}: {got.numel()} elements, worst {a[worst].item()!r} vs reference "
                             f"{b[worst].item()!r} (tolerance {tol[worst].item() + floor:.3g})")


def compare(c: Case, got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys()
    assert torch.equal(got["bad"], ref["bad"]), f"bad flags {got['bad'].tolist()} vs {ref['bad'].tolist()}"
    for k in ("loss", "loss_per_sample", "normalizer"):
        assert_close(k, got[k], ref[k])
    for k in sorted(k for k in got if k.startswith("grad")):
        if (got[k] is None) != (ref[k] is None):
            raise AssertionError(f"{k}: one backend produced no gradient")
        if got[k] is not None:
            # (to_num maps the gradient for an upstream gradient of 1 in the output dtype, then the upstream
            # multiplies it: a scaled overflow is inf in both backends, at the same places)
            assert_close(k, got[k], ref[k], got[k].dtype)


# ----------------------------------------------------------------------------- case list
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SIZES = ((3, (1,)), (2, (7,)), (4, (1001,)), (2, (4, 32, 32)), (3, (5, 8)))  # M = 1, 7, 1001, 4096, 40
OP_CONFIGS = {
    "score": [
        dict(),
        dict(per_sample=True, mask="rand", kw=(("reduction", "sum"), ("scale", 2.0))),
        dict(kw=(("norm", "mean_abs_global"), ("norm_on", "loss"), ("phi", "pseudo_huber"), ("huber_c", 0.3))),
        dict(per_sample=True, kw=(("norm", None), ("reduction", "batchmean"), ("sample_weight", True))),
        dict(mask="bcast", kw=(("norm_on", "loss"), ("norm_clamp", 0.9), ("norm_eps", 0.01), ("reduction", "none"))),
        dict(per_sample=True, kw=(("phi", "pseudo_huber"), ("huber_c", 0.05))),
    ],
    "sid": [
        dict(),
        dict(per_sample=True, mask="rand", kw=(("alpha", 0.5), ("reduction", "mean"))),
        dict(kw=(("alpha", 1.0), ("reduction", "none"), ("scale", 3.0), ("w_eps", 0.1))),
    ],
    "scm": [
        dict(),
        dict(per_sample=True, kw=(("norm", "rms"), ("sample_reduction", "mean"), ("logvar", True))),
        dict(kw=(("weight", 2.5), ("reduction", "sum"), ("c", 0.0))),
        dict(per_sample=True, kw=(("weight_vec", True), ("logvar", True), ("reduction", "none"))),
    ],
    "denoise": [
        dict(),
        dict(per_sample=True, mask="empty", kw=(("weight_vec", True),)),
        dict(mask="rand", kw=(("sample_reduction", "sum"), ("reduction", "none"), ("weight", 0.5))),
        dict(per_sample=True, kw=(("reduction", "sum"),)),
    ],
}


def cases(sizes=SIZES, dtypes=DTYPES) -> list[Case]:
    out = []
    for op, cfgs in OP_CONFIGS.items():
        for i, cfg in enumerate(cfgs):
            for dtype in dtypes:
                for B, S in sizes:
                    out.append(Case(op, dtype, B, S, seed=i, **cfg))
    return out


NAN_CASES = [Case(op, dt, 3, (5, 8), kw=(("nan", pol),), inject=inj)
             for op in OP_CONFIGS for dt in DTYPES for pol in ("zero_sample", "to_num")
             for inj in ("nan", "inf", "huge")]
EDGE_CASES = [
    *[Case(op, dt, 2, (4, 32, 32), misaligned=True, mask="rand") for op in OP_CONFIGS for dt in DTYPES],
    *[Case(op, torch.bfloat16, 1, (2**21 + 3,), per_sample=True) for op in OP_CONFIGS],  # NB = 683, n_iter = 3
    *[Case(op, torch.float32, 2, (2**20 + 8,), mask="rand") for op in OP_CONFIGS],  # vectorised, n_iter = 2
    Case("score", torch.bfloat16, 64, (3, 7)),  # many samples in one finalize block
    Case("scm", torch.float16, 1100, (9,), kw=(("logvar", True), ("reduction", "none"))),  # B > FIN_THREADS
]
ALL_CASES = cases() + NAN_CASES + EDGE_CASES


# ----------------------------------------------------------------------------- GPU tests
@pytest.fixture(scope="module")
def cuda_backend():
    if not GPU:
        pytest.skip("GPU tier: no CUDA device visible")
    why = fd.available_backends("score_distill", torch.zeros(1, device="cuda"))["cuda"]
    if why:
        pytest.skip(f"the cuda backend cannot run here: {'; '.join(why)}")
    return "cuda"


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_matches_reference(cuda_backend, case):
    got = run_case(case, "cuda", "cuda")
    ref = run_case(case, "reference", "cuda")
    compare(case, got, ref)


@pytest.mark.parametrize("op", list(OP_CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_raise_policy(cuda_backend, op, dtype):
    case = Case(op, dtype, 3, (5, 8), kw=(("nan", "raise"),), inject="nan")
    for backend in ("cuda", "reference"):
        with pytest.raises(FloatingPointError, match=r"samples \[0, 1\]"):
            run_case(case, backend, "cuda")


@pytest.mark.parametrize("case", [Case("score", torch.bfloat16, 4, (16, 21, 60, 104), per_sample=True, mask="rand"),
                                  Case("sid", torch.float16, 3, (1001, 7)), Case("scm", torch.float32, 2, (2**21 + 3,)),
                                  Case("denoise", torch.bfloat16, 5, (3, 1001), misaligned=True)],
                         ids=lambda c: c.id)
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_bitwise_deterministic(cuda_backend, case):
    first = run_case(case, "cuda", "cuda")
    for _ in range(2):
        again = run_case(case, "cuda", "cuda")
        for k, v in first.items():
            w = again[k]
            if v is not None:
                assert v.dtype == w.dtype and torch.equal(v.view(-1).view(torch.uint8), w.view(-1).view(torch.uint8)), k


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_blocking_matches_triton(cuda_backend):
    from fastdistill.kernels import score as tk

    ext = _backend.extension()
    for M in (1, 7, 1024, 1025, 4096, 2**20, 2**20 + 1, 2**21 + 3, 10**9):
        assert tuple(ext.score_blocking(M)) == tk._blocking(M), M


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_refuses_mixed_dtypes(cuda_backend):
    x = torch.randn(2, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(2, 8, device="cuda")
    with fd.use_backend("cuda"), pytest.raises(fd.BackendUnavailableError, match="every term in x's dtype"):
        fd.score_distill(x, [t], [1.0], norm=None)
