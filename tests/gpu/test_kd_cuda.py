"""GPU tier for the CUDA backend of kd_loss (csrc/kd_softmax.cu through fastdistill._C): every
divergence against the reference backend on the same GPU, fp32/bf16/fp16 logits, the 16-byte and
the scalar paths (odd vocabularies, misaligned and strided views), temperatures with the CE mix,
softcap + logit_scale, vocabulary mismatch both ways, labels/mask/weights, every reduction,
−inf rows and entries, in-place gradients, Llama-3's V = 128256; bitwise determinism.

Tolerance rule (docs/kd_ops.md: all statistics fp32, the gradient written once in the student
dtype): the normwise error of the CUDA result against the fp64 reference (run on the inputs
converted to float64) is at most 4× that of the fp32 reference backend, or 4× the error of merely
storing the exact gradient in the student dtype, plus 1e-5 (the fkl / rkl losses come from
A/l + lse_s − lse_t, whose rounding is a few ulp of the lse, and the GPU's exponentials are
ex2.approx, as Triton's). NaN and ±inf must sit where the fp32 reference has them.

``run_case`` / ``compare`` are device-agnostic: tests/test_csrc_build.py runs a subset of these
cases on the CPU through a host emulation of the kernels.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import fastdistill as fd

GPU = torch.cuda.is_available()
F64 = torch.float64
DIVS = {"fkl": {}, "rkl": dict(divergence="rkl"), "jsd": dict(divergence="jsd", beta=0.3),
        "skl": dict(divergence="skl", skew=0.2), "srkl": dict(divergence="srkl", skew=0.3),
        "tvd": dict(divergence="tvd")}


@dataclasses.dataclass(frozen=True)
class Case:
    div: str  # a key of DIVS
    dtype: torch.dtype
    N: int
    V: int
    Vt: int | None = None  # teacher vocabulary (None: V); > V sliced, < V padded with −inf
    kw: tuple = ()  # extra kd_loss keyword arguments, as (name, value) pairs
    labels: str | None = None  # None | "some" (a quarter ignore_index) | "int32" | "none_valid" (all ignored)
    mask: bool = False
    weights: torch.dtype | None = None
    neg_inf: str | None = None  # None | "rows" (all −inf rows and entries, N >= 4) | "fkl_inf" (q = 0 where p > 0)
    layout: str | None = None  # None | "misaligned" (odd element offset) | "strided" (row stride V + 16)
    inplace: bool = False
    scale: float = 2.0
    seed: int = 0

    @property
    def id(self) -> str:
        parts = [self.div, str(self.dtype).removeprefix("torch."), f"N{self.N}-V{self.V}"]
        parts += [f"Vt{self.Vt}"] if self.Vt is not None else []
        parts += [f"{k}={v}" for k, v in self.kw]
        parts += [f"labels-{self.labels}"] if self.labels else []
        parts += ["mask"] if self.mask else []
        parts += [f"w-{str(self.weights).removeprefix('torch.')}"] if self.weights else []
        parts += [f"inf-{self.neg_inf}"] if self.neg_inf else []
        parts += [self.layout] if self.layout else []
        parts += ["inplace"] if self.inplace else []
        return "-".join(parts)


def _logits(g, N, V, c: Case, device, fp64: bool):
    """[N, V] logits in c.dtype (then float64 for the exact reference), laid out on ``device`` as
    c.layout says (a copy to another device would drop an odd offset or a row stride)."""
    conv = (lambda x: x.double()) if fp64 else (lambda x: x)
    if c.layout == "strided":
        return conv((torch.randn(N, V + 16, generator=g) * c.scale).to(c.dtype)).to(device)[:, :V]
    buf = conv((torch.randn(N * V + 1, generator=g) * c.scale).to(c.dtype)).to(device)
    return (buf[1:] if c.layout == "misaligned" else buf[: N * V]).view(N, V)


def inputs(c: Case, device="cpu", fp64: bool = False):
    """(student, teacher, kd_loss kwargs) from ``c.seed``: the same values for every backend and
    device; ``fp64``: the logits converted (exactly) to float64."""
    g = torch.Generator().manual_seed(c.seed)
    Vt = c.V if c.Vt is None else c.Vt
    s = _logits(g, c.N, c.V, c, device, fp64)
    t = _logits(g, c.N, Vt, c, device, fp64)
    if c.neg_inf == "rows":
        s[0] = -math.inf  # invalid rows
        t[1] = -math.inf
        s[2, 3:7], t[2, 3:7] = -math.inf, -math.inf  # zero probability in both models
        if c.div == "rkl":  # finite: the student has no mass where the teacher has some
            s[3, 10:15] = -math.inf
        else:  # finite: the teacher has no mass where the student has some
            t[3, 10:15] = -math.inf
    elif c.neg_inf == "fkl_inf":
        s[1, 5] = -math.inf  # the teacher has mass there: KL(P‖Q) = +inf, the gradient stays finite
    kw = dict(DIVS[c.div], **dict(c.kw))
    if c.labels:
        lab = torch.randint(0, c.V, (c.N,), generator=g)
        if c.labels == "none_valid":
            lab[:] = -100
        else:
            lab[torch.rand(c.N, generator=g) < 0.25] = -100
            lab[0] = 1  # at least one labelled row
        kw["labels"] = lab.to(torch.int32) if c.labels == "int32" else lab
        kw.setdefault("hard_label_alpha", 0.3)
    if c.mask:
        m = torch.rand(c.N, generator=g) > 0.3
        m[0] = True
        kw["mask"] = m
    if c.weights is not None:
        kw["weights"] = (torch.rand(c.N, generator=g) + 0.5).to(c.weights)
    return s, t, kw


def run_case(c: Case, backend: str, device, fp64: bool = False) -> dict:
    """kd_loss under ``backend`` with a non-unit upstream gradient: {"loss", "grad"}. ``fp64``: the
    inputs converted to float64 and float64 accumulation (the reference's exact answer)."""
    s, t, kw = inputs(c, device, fp64)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    if fp64:
        kw["accum_dtype"] = F64
    x = s.requires_grad_()  # a leaf view: keeps the case's layout
    with fd.use_backend(backend):
        if c.inplace:
            z = x * 1.0  # the logits as an lm_head would produce them (a non-leaf); the gradient lands in z
            storage = z.detach()
            loss = fd.kd_loss(z, t, inplace_grad=True, **kw)
        else:
            loss = fd.kd_loss(x, t, **kw)
        up = (torch.full_like(loss, 0.75) if loss.dim() == 0
              else torch.linspace(0.5, 1.5, loss.numel(), device=loss.device, dtype=loss.dtype))
        loss.backward(up)
    out = {"loss": loss.detach(), "grad": x.grad}
    if c.inplace:
        assert storage.data_ptr() == z.data_ptr()
        out["storage"] = storage
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_close(name: str, got: torch.Tensor, r32: torch.Tensor, r64: torch.Tensor, dtype=None, floor=1e-5):
    assert got.shape == r32.shape and got.dtype == r32.dtype, \
        f"{name}: {got.shape}/{got.dtype} vs {r32.shape}/{r32.dtype}"
    a, b, e = got.double().cpu(), r32.double().cpu(), r64.double().cpu()
    for what, f in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(f(a), f(b)), f"{name}: {what} at {f(a).nonzero()[:5].tolist()} vs the fp32 reference's " \
                                        f"{f(b).nonzero()[:5].tolist()}"
    fin = torch.isfinite(b) & torch.isfinite(e)
    a, b, e = a[fin], b[fin], e[fin]
    if e.numel() == 0 or e.abs().max() == 0:
        assert (a == 0).all(), f"{name}: nonzero where the reference is exactly 0: {a.abs().max().item()}"
        return
    err_ref = rel_err(b, e)
    store = rel_err(e.to(dtype), e) if dtype is not None else 0.0
    tol = 4 * max(err_ref, store) + floor
    err = rel_err(a, e)
    assert err <= tol, f"{name}: normwise error {err:.3e} vs fp64 > {tol:.3e} (fp32 reference: {err_ref:.3e})"


def compare(c: Case, got: dict, r32: dict, r64: dict, floor: float = 1e-5) -> None:
    """``floor``: 1e-5 on the GPU (ex2.approx exponentials); the CPU emulation, whose exponentials
    are libm's, is held to 1e-6."""
    assert_close("loss", got["loss"], r32["loss"], r64["loss"], floor=floor)
    assert got["grad"].dtype == c.dtype
    assert_close("grad", got["grad"], r32["grad"], r64["grad"], None if c.dtype == torch.float32 else c.dtype,
                 floor=floor)
    if c.inplace:
        assert torch.equal(got["storage"], got["grad"]), "the logits' storage does not hold the gradient"


# ----------------------------------------------------------------------------- case lists
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
T2 = (("temperature", 2.0), ("t2_scale", True))


def grid(dtypes=DTYPES) -> list[Case]:
    """Per divergence: four configurations, each dtype in turn (the emulation takes a subset)."""
    out = []
    for i, div in enumerate(DIVS):
        for j, dt in enumerate(dtypes):
            pad = 260 if div == "rkl" else 200  # rkl with Vt < V is infinite (kd_loss raises)
            out += [
                # T != 1 with the CE mix (a separate untempered lse), labels with ignore_index
                Case(div, dt, 5, 300, kw=T2, labels="some", seed=10 * i + j),
                # softcap + logit_scale, teacher sliced (Vt > V), mask, weights, sum
                Case(div, dt, 4, 1000, Vt=1024, kw=(("softcap", 5.0), ("logit_scale", 1.7), ("reduction", "sum")),
                     mask=True, weights=torch.float32, seed=10 * i + j + 1),
                # teacher padded with −inf (Vt < V; rkl: sliced), −inf rows and entries, mean, separate T_t
                Case(div, dt, 6, 257, Vt=pad, kw=(("temperature", 0.7), ("teacher_temperature", 1.3),
                                                  ("reduction", "mean")), neg_inf="rows", seed=10 * i + j + 2),
                # reduction none, in-place gradient, int32 labels with the CE at T = 1
                Case(div, dt, 3, 520, kw=(("reduction", "none"), ("hard_label_alpha", 0.5)), labels="int32",
                     inplace=True, seed=10 * i + j + 3),
            ]
    return out


EXTRA = [
    Case("fkl", torch.float32, 4, 300, kw=(("num_items", 7),), labels="some"),  # batchmean over num_items
    Case("jsd", torch.bfloat16, 4, 300, kw=(("num_items", 3), ("reduction", "mean")), mask=True),
    Case("fkl", torch.float32, 3, 64, labels="none_valid"),  # n = 0: loss 0, zero gradient
    Case("srkl", torch.float32, 3, 64, labels="none_valid", kw=(("reduction", "mean"),)),
    Case("fkl", torch.float32, 4, 200, neg_inf="fkl_inf", kw=(("reduction", "none"),)),
    Case("fkl", torch.float32, 4, 200, neg_inf="fkl_inf"),
    Case("jsd", torch.bfloat16, 3, 1024, layout="misaligned", labels="some", kw=T2),  # scalar path, V % 8 == 0
    Case("skl", torch.float16, 3, 1000, Vt=1000, layout="strided", weights=torch.bfloat16),  # 16-byte, stride V+16
    Case("rkl", torch.bfloat16, 2, 5000, kw=T2, labels="some", inplace=True),  # 16-byte, 2 loop iterations
    Case("tvd", torch.float32, 2, 3001, Vt=2999, mask=True),  # scalar, 3 loop iterations
    Case("fkl", torch.float16, 1, 4104, Vt=4100, kw=(("softcap", 3.0),)),  # Vs % 8 != 0: scalar path
    Case("srkl", torch.float32, 2, 7, Vt=9, labels="some", kw=(("reduction", "sum"),)),  # tiny rows
]
BIG = [Case(div, dt, 3, 128256, kw=T2, labels="some", seed=3) for div in ("fkl", "jsd") for dt in DTYPES]
BIG += [Case("rkl", torch.bfloat16, 2, 128256, Vt=128320, kw=(("softcap", 30.0),), inplace=True),
        Case("tvd", torch.float16, 2, 128257, weights=torch.float32)]  # V odd: the scalar path
ALL_CASES = grid() + EXTRA + BIG


# ----------------------------------------------------------------------------- GPU tests
@pytest.fixture(scope="module")
def cuda_backend():
    if not GPU:
        pytest.skip("GPU tier: no CUDA device visible")
    why = fd.available_backends("kd_loss", torch.zeros(1, device="cuda"))["cuda"]
    if why:
        pytest.skip(f"the cuda backend cannot run here: {'; '.join(why)}")
    return "cuda"


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda c: c.id)
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_matches_reference(cuda_backend, case):
    got = run_case(case, "cuda", "cuda")
    r32 = run_case(case, "reference", "cuda")
    r64 = run_case(case, "reference", "cuda", fp64=True)
    compare(case, got, r32, r64)


@pytest.mark.parametrize("case", [Case("fkl", torch.bfloat16, 5, 128256, kw=T2, labels="some"),
                                  Case("jsd", torch.float32, 4, 32000, mask=True, weights=torch.float32),
                                  Case("tvd", torch.float16, 3, 50257, kw=(("reduction", "none"),)),
                                  Case("srkl", torch.bfloat16, 3, 1001, layout="misaligned", inplace=True)],
                         ids=lambda c: c.id)
@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_bitwise_deterministic(cuda_backend, case):
    first = run_case(case, "cuda", "cuda")
    for _ in range(2):
        again = run_case(case, "cuda", "cuda")
        for k, v in first.items():
            w = again[k]
            bits = lambda x: x.reshape(-1).view(torch.uint8)
            assert v.dtype == w.dtype and torch.equal(bits(v), bits(w)), k


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_out_of_range_label_is_nan(cuda_backend):
    """No host check on a GPU: an out-of-range label makes its row's CE (and the loss) NaN, as in the reference."""
    s = torch.randn(3, 100, device="cuda")
    t = torch.randn(3, 100, device="cuda")
    labels = torch.tensor([1, 100, -100], device="cuda")
    for backend in ("cuda", "reference"):
        with fd.use_backend(backend):
            loss = fd.kd_loss(s, t, labels=labels, hard_label_alpha=0.5, reduction="none")
        assert loss[0].isfinite() and loss[1].isnan() and loss[2] == 0, (backend, loss)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_refusals(cuda_backend):
    s = torch.randn(2, 8, device="cuda", dtype=torch.bfloat16)
    with fd.use_backend("cuda"), pytest.raises(fd.BackendUnavailableError, match="teacher_logits in the student's"):
        fd.kd_loss(s, torch.randn(2, 8, device="cuda"))
    with fd.use_backend("cuda"), pytest.raises(fd.BackendUnavailableError, match="accum_dtype=float64"):
        fd.kd_loss(s.float(), torch.randn(2, 8, device="cuda"), accum_dtype=F64)
    assert fd.available_backends("kd_loss", s, teacher_dtype=torch.bfloat16)["cuda"] == []


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_new_scalar_options_no_host_sync(backend):
    """A temperature / alpha schedule gives new per-call scalars (a miss of the device-constant cache): forward
    and backward still run under torch.cuda.set_sync_debug_mode("error") (the constants go up from pinned memory
    asynchronously), and match the reference."""
    why = fd.available_backends("kd_loss", torch.zeros(1, device="cuda", dtype=torch.bfloat16),
                                teacher_dtype=torch.bfloat16)[backend]
    if why:
        pytest.skip(f"{backend} cannot run here: {'; '.join(why)}")
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 3001, generator=g).to("cuda", torch.bfloat16)
    t = torch.randn(6, 3001, generator=g).to("cuda", torch.bfloat16)
    labels = torch.randint(0, 3001, (6,), generator=g).cuda()

    def step(T, alpha):
        x = s.clone().requires_grad_()
        loss = fd.kd_loss(x, t, divergence="jsd", temperature=T, labels=labels, hard_label_alpha=alpha)
        loss.backward()
        return loss.detach(), x.grad

    with fd.use_backend(backend):
        step(1.0, 0.1)  # compile / load once
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = [step(1.0 + 0.37 * i, 0.1 + 0.05 * i) for i in range(1, 4)]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    with fd.use_backend("reference"):
        ref = [step(1.0 + 0.37 * i, 0.1 + 0.05 * i) for i in range(1, 4)]
    for (a, ga), (b, gb) in zip(got, ref):
        assert rel_err(a, b) <= 2e-3, (a, b)
        assert rel_err(ga, gb) <= 2e-2, rel_err(ga, gb)
