"""GPU tier for jvp_attention on the Triton backend: fp32/fp16/bf16, head dims 32–256 and Dqk ≠ Dv,
sequences up to 16384, causal and not, Sq ≠ Sk (fully masked rows), GQA/MQA, strided inputs, the
backward (dq, dk, dv), both tangent schedules (fused, two_pass), key masks (bool and float, with their own block
configurations), bitwise determinism, the torch.func.jvp path and CUDA-graph capture. Skipped with a reason without
a GPU.

Oracle and tolerance rule: test_jvp_attention.py (fp64 math attention; error ≤ 2·max(plain PyTorch
in the input dtype, storage) + floor). The floor is 1e-5 of max |oracle| here, not 1e-6: Triton's
exponentials on the GPU are ex2.approx (as in gpu/test_kd_cuda.py); fp32 is still held far below
TF32's ~1e-3. Long sequences are checked on a subset of query rows (each row depends only on itself
given the full k, v): the oracle runs on those rows, in fp64, on the GPU. dk and dv need every row:
backward cases stay at S ≤ 2048.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_jvp_attention import check, oracle

import fastdistill as fd

pytestmark = pytest.mark.gpu
GPU = torch.cuda.is_available()
DEV = "cuda"
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class G:
    Sq: int
    Sk: int | None = None
    D: int = 128
    Dv: int | None = None
    B: int = 2
    Hq: int = 4
    Hkv: int | None = None
    dtype: torch.dtype = BF16
    causal: bool = False
    layout: str = "bshd"
    packed: bool = False  # q, k, v slices of one [B, S, 3, H, D] buffer
    rows: int | None = None  # check this many query rows (spread over the sequence); None: all
    tangents: str = "qkv"  # subset of "qkv" or "none"
    tangent_dtype: torch.dtype | None = None
    seed: int = 0

    @property
    def sk(self):
        return self.Sq if self.Sk is None else self.Sk

    @property
    def dv(self):
        return self.D if self.Dv is None else self.Dv

    @property
    def hkv(self):
        return self.Hq if self.Hkv is None else self.Hkv

    @property
    def id(self) -> str:
        p = [f"B{self.B}", f"H{self.Hq}" + (f"kv{self.Hkv}" if self.Hkv is not None else "")]
        p.append(f"S{self.Sq}" if self.Sk is None else f"Sq{self.Sq}-Sk{self.Sk}")
        p.append(f"D{self.D}" + (f"v{self.Dv}" if self.Dv is not None else ""))
        p.append(str(self.dtype).removeprefix("torch."))
        p += ["causal"] if self.causal else []
        p += [self.layout] if self.layout != "bshd" else []
        p += ["packed"] if self.packed else []
        p += [f"rows{self.rows}"] if self.rows else []
        p += [f"t-{self.tangents}"] if self.tangents != "qkv" else []
        p += ["to-fp32"] if self.tangent_dtype is not None else []
        return "-".join(p)


def bhsd(x, layout):
    return x if x is None or layout == "bhsd" else x.transpose(1, 2)


def inputs(c: G):
    """(q, k, v, tq, tk, tv) on the GPU in c's layout, and the same values as [B, H, S, D] views."""
    g = torch.Generator(device=DEV).manual_seed(c.seed)
    rnd = lambda H, S, D: torch.randn(c.B, H, S, D, generator=g, device=DEV).to(c.dtype)
    vals = [rnd(c.Hq, c.Sq, c.D), rnd(c.hkv, c.sk, c.D), rnd(c.hkv, c.sk, c.dv)]
    tans = [rnd(c.Hq, c.Sq, c.D), rnd(c.hkv, c.sk, c.D), rnd(c.hkv, c.sk, c.dv)]
    tans = [t if n in c.tangents else None for t, n in zip(tans, "qkv")]
    if c.packed:
        buf = torch.stack([x.transpose(1, 2) for x in vals], 2).contiguous()  # [B, S, 3, H, D]
        prim = [buf[:, :, i] if c.layout == "bshd" else buf[:, :, i].transpose(1, 2) for i in range(3)]
    else:
        prim = [x.contiguous() if c.layout == "bhsd" else x.transpose(1, 2).contiguous() for x in vals]
    tans_l = [None if t is None else (t if c.layout == "bhsd" else t.transpose(1, 2).contiguous()) for t in tans]
    return (*prim, *tans_l), vals + tans


def pick_rows(c: G) -> torch.Tensor | None:
    if c.rows is None or c.rows >= c.Sq:
        return None
    r = torch.linspace(0, c.Sq - 1, c.rows, device=DEV).round().long()
    if c.causal and c.Sq > c.sk:  # include the last fully masked row and the first one that sees a key
        r = torch.cat([r, torch.tensor([c.Sq - c.sk - 1, c.Sq - c.sk], device=DEV)])
    return torch.unique(r)


def need_triton(dtype: torch.dtype) -> None:
    """Skip an fp32 case forced onto the Triton kernels on a GPU where they do not serve fp32 (no FP64 tensor
    cores: kernels/jvp_attention.py, fp32_supported; test_fp32_reference_fallback_gpu covers those)."""
    from fastdistill.kernels import jvp_attention as kern

    arch = kern.device_arch(torch.empty(0, device=DEV))
    if dtype == F32 and not kern.fp32_supported(arch):
        pytest.skip(f"fp32 runs on the reference backend on sm_{arch}")


def run(c: G, *, bwd: bool = False, seed_up: int = 1, key_mask: torch.Tensor | None = None) -> dict:
    need_triton(c.dtype)
    (q, k, v, tq, tk, tv), vals = inputs(c)
    if bwd:
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    with fd.use_backend("triton"):
        o, to, lse, dlse = fd.jvp_attention(q, k, v, tq, tk, tv, causal=c.causal, layout=c.layout, return_lse=True,
                                            tangent_dtype=c.tangent_dtype,
                                            **({} if key_mask is None else {"key_mask": key_mask}))
        out = dict(o=bhsd(o, c.layout), to=bhsd(to, c.layout), lse=lse, dlse=dlse)
        if bwd:
            g = torch.Generator(device=DEV).manual_seed(seed_up)
            go = torch.randn(o.shape, generator=g, device=DEV).to(o.dtype)
            glse = torch.randn(lse.shape, generator=g, device=DEV)
            dq, dk, dv = torch.autograd.grad([o, lse], [q, k, v], [go, glse])
            out.update(dq=bhsd(dq, c.layout), dk=bhsd(dk, c.layout), dv=bhsd(dv, c.layout),
                       go=bhsd(go, c.layout), glse=glse)
    return dict(out, vals=vals)


def compare(c: G, got: dict, bwd: bool = False, bias: torch.Tensor | None = None) -> None:
    """``bias``: the key mask as the oracle's [B, Hq, Sk] additive bias (−inf: masked)."""
    rows = None if bwd else pick_rows(c)
    q, k, v, tq, tk, tv = got["vals"]
    if rows is not None:
        q, tq = q[:, :, rows], None if tq is None else tq[:, :, rows]
    kw = dict(causal=c.causal, rows=rows, Sq=c.Sq, bias=bias)
    if bwd:
        kw.update(go=got["go"], glse=got["glse"])
    exact = oracle(q, k, v, tq, tk, tv, **kw)
    plain = oracle(q, k, v, tq, tk, tv, dtype=c.dtype, **kw)
    names = ["o", "lse"] + (["to", "dlse"] if c.tangents != "none" else []) + (["dq", "dk", "dv"] if bwd else [])
    for name in names:
        x = got[name]
        if rows is not None:
            x = x[:, :, rows]
        check(name, x, exact[name], plain[name], FLOOR)


# ----------------------------------------------------------------------------- cases
HEAD_DIMS = (32, 64, 80, 96, 128, 256)
FWD = [G(1024 + 7 * i, D=d, dtype=dt, causal=bool(i % 2), rows=256, seed=i)
       for i, (dt, d) in enumerate((dt, d) for dt in (F32, F16, BF16) for d in HEAD_DIMS)]
FWD += [
    G(2048, D=64, Dv=128, dtype=BF16, causal=True, rows=256),
    G(2048, D=128, Dv=64, dtype=F16, rows=256),
    G(1000, D=32, Dv=256, dtype=BF16, rows=200),
    G(777, D=256, Dv=32, dtype=F32, causal=True),
    G(1000, 3000, D=128, dtype=BF16, causal=True, rows=256),  # Sq < Sk
    G(3000, 1000, D=64, dtype=F16, causal=True, rows=300),  # Sq > Sk: fully masked rows
    G(3000, 1000, D=96, dtype=F32, rows=300),
    G(1, 4096, D=128, dtype=BF16, B=4, causal=True),  # decoding step
    G(4096, D=128, Hq=8, Hkv=2, dtype=BF16, causal=True, rows=256),  # GQA
    G(2048, 4099, D=64, Hq=8, Hkv=1, dtype=F16, rows=256),  # MQA, odd Sk
    G(2048, D=128, dtype=BF16, layout="bhsd", causal=True, rows=256),
    G(2048, D=64, dtype=F16, packed=True, causal=True, rows=256),
    G(2048, D=128, dtype=BF16, tangents="q", rows=256),  # frozen context: tk = tv = None
    G(2048, D=128, dtype=BF16, tangents="v", causal=True, rows=256),
    G(2048, D=128, dtype=BF16, tangent_dtype=F32, causal=True, rows=256),
    G(2048, D=64, dtype=F16, tangents="none", rows=256),
    G(8192, D=64, dtype=F16, Hq=8, Hkv=4, B=1, causal=True, rows=256),
    G(16384, D=128, dtype=BF16, B=1, Hq=2, rows=256),
    G(16384, D=128, dtype=BF16, B=1, Hq=2, causal=True, rows=256),
]


@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
@pytest.mark.parametrize("case", FWD, ids=lambda c: c.id)
def test_forward_gpu(case):
    compare(case, run(case))


@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
@pytest.mark.parametrize("case", [G(2048, 4099, D=64, Hq=8, Hkv=1, dtype=F16, rows=256),
                                  G(3000, 1000, D=128, dtype=BF16, causal=True, rows=300),
                                  G(1000, D=256, Dv=64, dtype=F32, causal=True, rows=200)], ids=lambda c: c.id)
def test_two_pass_gpu(case, monkeypatch):
    monkeypatch.setenv("FASTDISTILL_ATTN_JVP", "two_pass")
    compare(case, run(case))


BWD = [G(1024 + 5 * i, D=d, dtype=dt, causal=bool(i % 2), seed=i)
       for i, (dt, d) in enumerate((dt, d) for dt in (F32, F16, BF16) for d in (32, 64, 128, 256))
       if not (d == 256 and dt == F32 and i % 2 == 0)]
BWD += [
    G(2048, D=128, Hq=8, Hkv=2, dtype=BF16, causal=True),
    G(1000, 2048, D=64, Hq=8, Hkv=1, dtype=F16),
    G(2048, 500, D=80, dtype=BF16, causal=True),  # fully masked rows
    G(1537, D=64, Dv=128, dtype=BF16, causal=True),
    G(1537, D=96, Dv=32, dtype=F32),
    G(2048, D=128, dtype=F16, layout="bhsd", packed=True, causal=True),
    G(2048, D=128, dtype=BF16, tangents="none"),
]


@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
@pytest.mark.parametrize("case", BWD, ids=lambda c: c.id)
def test_backward_gpu(case):
    compare(case, run(case, bwd=True), bwd=True)


# head dims whose masked calls have their own block configurations on sm_90a (80/96, 256) and two that share the
# unmasked ones (64, 128)
KM_DIMS = [(64, BF16, 4, False), (96, F16, 2, True), (128, BF16, 1, True), (256, F16, 2, False)]
KM_CASES = [G(2048, 3001, D=d, dtype=dt, Hq=4, Hkv=hkv, causal=causal, rows=256, seed=20 + i)
            for i, (d, dt, hkv, causal) in enumerate(KM_DIMS)]


def padding_mask(case: G, kind: str, Sk: int, seed: int):
    """(key_mask for jvp_attention, its [B, Hq, Sk] float64 bias for the oracle): text padding, each sample keeping
    a prefix of its keys (sample 0 all, the others a third); ``float``: a random bias on the kept keys besides."""
    keep = torch.arange(Sk, device=DEV)[None, :] < torch.tensor([Sk] + [Sk // 3] * (case.B - 1), device=DEV)[:, None]
    if kind == "bool":
        return keep[:, None, :], torch.where(keep, 0.0, float("-inf"))[:, None, :].double().expand(-1, case.Hq, -1)
    g = torch.Generator(device=DEV).manual_seed(seed)
    mask = torch.where(keep[:, None, :], torch.randn(case.B, case.Hq, Sk, generator=g, device=DEV) * 3, float("-inf"))
    return mask, mask.double()


def check_key_mask(case: G, kind: str, bwd_sq: int, bwd_sk: int, monkeypatch) -> None:
    for sched in ("fused", "two_pass"):
        monkeypatch.setenv("FASTDISTILL_ATTN_JVP", sched)
        mask, bias = padding_mask(case, kind, case.sk, case.seed)
        compare(case, run(case, key_mask=mask), bias=bias)
    small = dataclasses.replace(case, Sq=bwd_sq, Sk=bwd_sk, rows=None)
    mask, bias = padding_mask(small, kind, bwd_sk, case.seed + 1)
    compare(small, run(small, bwd=True, key_mask=mask), bwd=True, bias=bias)


@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("case", KM_CASES, ids=lambda c: c.id)
def test_key_mask_gpu(case, kind, monkeypatch):
    """Key masks (padded text) in both tangent schedules and the backward, head dims 32–256 (the masked calls' own
    block configurations), GQA, causal with Sq < Sk, against the fp64 oracle with the same bias. Backward at
    Sq 512, Sk 700 (dk, dv need every row)."""
    check_key_mask(case, kind, 512, 700, monkeypatch)


@pytest.mark.parametrize("D", [64, 256])  # 256: the two_pass tangent pass reads the low word of lse too
def test_fp32_large_logits_gpu(D):
    """fp32 at scale × 30 (|S| ~ 100, nearly one-hot rows), causal, forward + tangent + backward, under the rule
    (the CPU tier's test_fp32_large_logits_low_word holds the interpreted kernels to 1.25x plain here; on the
    GPU, FMA contraction of s·scale − lse and ex2.approx enter as well, so the contract is checked)."""
    need_triton(F32)
    g = torch.Generator().manual_seed(7)
    B, S, H = 1, 1024, 2
    q, k, v, tq, tk, tv = (torch.randn(B, H, S, D, generator=g, dtype=torch.float64).float() for _ in range(6))
    go, glse = torch.randn(B, H, S, D, generator=g).float(), torch.randn(B, H, S, generator=g).float()
    scale = 30.0 / D**0.5
    leaves = [x.to(DEV).requires_grad_() for x in (q, k, v)]
    with fd.use_backend("triton"):
        o, to, lse, dlse = fd.jvp_attention(*leaves, tq.to(DEV), tk.to(DEV), tv.to(DEV), causal=True, scale=scale,
                                            layout="bhsd", return_lse=True)
        dq, dk, dv = torch.autograd.grad([o, lse], leaves, [go.to(DEV), glse.to(DEV)])
    kw = dict(causal=True, scale=scale, go=go.to(DEV), glse=glse.to(DEV))
    vals = [x.to(DEV) for x in (q, k, v, tq, tk, tv)]
    exact, plain = oracle(*vals, **kw), oracle(*vals, dtype=F32, **kw)
    for name, x in dict(o=o, to=to, lse=lse, dlse=dlse, dq=dq, dk=dk, dv=dv).items():
        check(name, x, exact[name], plain[name], FLOOR)


# ----------------------------------------------------------------------------- determinism, transforms, graphs
@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
@pytest.mark.parametrize("case", [G(2048, D=128, Hq=8, Hkv=2, dtype=BF16, causal=True),
                                  G(1537, 3001, D=64, dtype=F32), G(1024, D=256, Dv=64, dtype=F16, causal=True)],
                         ids=lambda c: c.id)
def test_bitwise_deterministic_gpu(case):
    first = run(case, bwd=True)
    bits = lambda x: x.detach().reshape(-1).view(torch.uint8)
    for _ in range(2):
        again = run(case, bwd=True)
        for name in ("o", "to", "lse", "dlse", "dq", "dk", "dv"):
            assert torch.equal(bits(first[name]), bits(again[name])), name


@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_func_jvp_gpu():
    c = G(2048, D=128, Hq=8, Hkv=2, dtype=BF16, causal=True, rows=256)
    (q, k, v, tq, tk, tv), _ = inputs(c)
    with fd.use_backend("triton"):
        o, to = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True)
        f = lambda q, k, v: fd.jvp_attention(q, k, v, causal=True)[0]
        o2, to2 = torch.func.jvp(f, (q, k, v), (tq, tk, tv))
    assert torch.equal(o, o2) and torch.equal(to, to2)
    got = run(c)
    assert torch.equal(got["to"], bhsd(to, c.layout))
    compare(c, got)


@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_cuda_graph_capture_gpu():
    """The explicit call (forward + tangent, return_lse) captured in a CUDA graph: no host synchronisation;
    replays on new input values give the eager results bitwise."""
    c = G(2048, D=128, Hq=8, Hkv=2, dtype=BF16, causal=True)
    (q, k, v, tq, tk, tv), _ = inputs(c)
    static = [x.clone() for x in (q, k, v, tq, tk, tv)]
    call = lambda *xs: fd.jvp_attention(*xs, causal=True, return_lse=True)
    with fd.use_backend("triton"):
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up: compile the kernels outside the capture
                call(*static)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = call(*static)
        for seed in (5, 6):
            (q2, k2, v2, tq2, tk2, tv2), _ = inputs(dataclasses.replace(c, seed=seed))
            for dst, src in zip(static, (q2, k2, v2, tq2, tk2, tv2)):
                dst.copy_(src)
            graph.replay()
            ref = call(q2, k2, v2, tq2, tk2, tv2)
            for name, a, b in zip(("o", "to", "lse", "dlse"), outs, ref):
                assert torch.equal(a, b), name


@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_fp32_is_not_tf32_gpu():
    """fp32 inputs get full-precision products: the error is far below TF32's (~1e-3 of the output)."""
    c = G(1024, D=128, dtype=F32, rows=128)
    got = run(c)
    q, k, v, tq, tk, tv = got["vals"]
    rows = pick_rows(c)
    exact = oracle(q[:, :, rows], k, v, tq[:, :, rows], tk, tv, rows=rows, Sq=c.Sq)
    err = max((got[n][:, :, rows].double() - exact[n]).abs().max().item() / exact[n].abs().max().item()
              for n in ("o", "to"))
    assert err < 1e-5, f"fp32 relative error {err:.2e}: TF32 products?"


@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
def test_fp32_reference_fallback_gpu():
    """Where the Triton kernels do not serve fp32 (sm_86 / sm_89 / sm_120: no FP64 tensor cores), fp32 dispatches to
    the reference backend, which meets the same accuracy at PyTorch's default fp32 matmul precision (no TF32).
    Where they do (sm_80, sm_90), the dispatcher picks Triton."""
    from fastdistill.kernels import jvp_attention as kern

    c = G(1024, D=128, dtype=F32, rows=128, causal=True)
    (q, k, v, tq, tk, tv), vals = inputs(c)
    supported = kern.fp32_supported(kern.device_arch(q))
    assert fd.available_backends("jvp_attention", q, head_dims=(128, 128))["triton"] == [] if supported else \
        any("float32 on sm_" in r for r in fd.available_backends("jvp_attention", q, head_dims=(128, 128))["triton"])
    if supported:
        pytest.skip("the Triton kernels serve fp32 on this GPU (the other fp32 tests cover them)")
    o, to = fd.jvp_attention(q, k, v, tq, tk, tv, causal=True, layout=c.layout)
    q, k, v, tq, tk, tv = vals
    rows = pick_rows(c)
    exact = oracle(q[:, :, rows], k, v, tq[:, :, rows], tk, tv, rows=rows, Sq=c.Sq, causal=True)
    for name, x in (("o", bhsd(o, c.layout)), ("to", bhsd(to, c.layout))):
        err = (x[:, :, rows].double() - exact[name]).abs().max().item() / exact[name].abs().max().item()
        assert err < 1e-5, f"{name}: fp32 relative error {err:.2e}: TF32 products?"


@pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")
@pytest.mark.parametrize("D", [32, 64, 128, 165, 256])
def test_fp32_logits_gpu(D, monkeypatch):
    """fp32 logits come from float64 dots (the FP64 tensor cores), scaled and rounded once
    (kernels/jvp_attention.py, _logits): for a row's only key lse = S is within half an ulp of s·q·k, and the
    backward forms the same logit, so P = 1 there and dv = dO exactly. FASTDISTILL_ATTN_JVP=fused: fp32
    takes two_pass anyway (the fused pass with float64 logits crashes Triton 3.9's LLVM)."""
    need_triton(F32)
    monkeypatch.setenv("FASTDISTILL_ATTN_JVP", "fused")
    g = torch.Generator().manual_seed(D)
    q, tq = (torch.randn(2, 3, 256, D, generator=g).to(DEV) for _ in range(2))  # [B, H, Sq, D]
    k, tk, v = (torch.randn(2, 3, 1, D, generator=g).to(DEV) for _ in range(3))
    with fd.use_backend("triton"):
        lse = fd.jvp_attention(q, k, v, tq, tk, None, scale=1.25, layout="bhsd", return_lse=True)[2]
    exact = (q.double() @ k.double().transpose(-1, -2)).squeeze(-1) * 1.25
    ulp = (torch.nextafter(exact.float().abs(), torch.tensor(float("inf"), device=DEV)) - exact.float().abs()).double()
    err = (lse.double() - exact).abs()
    assert (err <= ulp / 2).all(), f"{(2 * err / ulp).max().item():.2f} half-ulps"
    qq, kk, vv = (x[:, :, :1].clone().requires_grad_() for x in (q, k, v))  # Sq = Sk = 1
    go = torch.randn(2, 3, 1, D, generator=g).to(DEV)
    with fd.use_backend("triton"):
        o = fd.jvp_attention(qq, kk, vv, scale=1.25, layout="bhsd")[0]
        dv = torch.autograd.grad(o, [vv], go)[0]
    assert torch.equal(o, vv) and torch.equal(dv, go), "a row's only key: o = v and dv = dO exactly"
