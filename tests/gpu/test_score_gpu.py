"""GPU tier for the score ops on the Triton backend (the CUDA backend: test_score_cuda.py):
fp32/bf16/fp16 inputs against the fp64 oracles, bitwise determinism, CUDA-graph capture (no
host synchronisation), torch.compile with inductor. Skipped with a reason without a GPU."""

from __future__ import annotations

import pytest
import torch

import fastdistill as fd
from test_score import F64, assert_rel, oracle_scm, oracle_score, rel_err

pytestmark = pytest.mark.gpu
DEV = "cuda"
BACKENDS = ["triton", "cuda"]


def _inputs(B, S, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda: torch.randn(B, *S, generator=g).to(DEV, dtype)
    x = mk().requires_grad_()
    return x, [mk() for _ in range(4)], g


def _dmd(x, f, c, u, xt, co, nco, **kw):
    return fd.score_distill(x, [f, c, u], co, norm_terms=[c, u, xt], norm_coeffs=nco, **kw)


def _skip_unavailable(backend, x):
    why = fd.available_backends("score_distill", x)[backend]
    if why:
        pytest.skip(f"{backend} cannot run here: {'; '.join(why)}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, (16, 21, 60, 104)), (8, (4, 64, 64)), (3, (1001,)), (2, (7,))],
                         ids=["wan-B1", "sd-B8", "B3-1001", "B2-7"])
def test_score_distill_gpu(backend, dtype, shape):
    B, S = shape
    x, (f, c, u, xt), g = _inputs(B, S, dtype)
    _skip_unavailable(backend, x)
    co = torch.randn(B, 3, generator=g, dtype=F64)
    nco = torch.randn(B, 3, generator=g, dtype=F64)
    with fd.use_backend(backend):
        loss = _dmd(x, f, c, u, xt, co.float().to(DEV), nco.float().to(DEV))
        loss.backward()
    xc = x.detach().cpu().requires_grad_()
    ref, xr = oracle_score(xc, [t.cpu() for t in (f, c, u)], co, norm_terms=[c.cpu(), u.cpu(), xt.cpu()],
                           norm_coeffs=nco)
    ref.backward()
    # tolerance: fp32 math with one rounding to the output dtype
    tol = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    assert_rel(loss.detach().cpu(), ref.detach(), 1e-4, "loss")
    assert_rel(x.grad.cpu(), xr.grad, tol, "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scm_gpu(backend):
    x, terms, g = _inputs(2, (16, 8, 30, 52), torch.bfloat16, seed=2)
    _skip_unavailable(backend, x)
    co = torch.randn(2, 4, generator=g, dtype=F64)
    lv = torch.zeros(2, device=DEV, requires_grad=True)
    with fd.use_backend(backend):
        loss = fd.scm_tangent_loss(x, terms, co.float().to(DEV), f_coeff=0.5, logvar=lv, sample_reduction="mean")
        loss.backward()
    ref, Fr, lvr = oracle_scm(x.detach().cpu(), [t.cpu() for t in terms], co,
                              f_coeff=torch.full((2,), 0.5, dtype=F64), logvar=torch.zeros(2, dtype=F64),
                              sample_reduction="mean")
    ref.backward()
    assert_rel(loss.detach().cpu(), ref.detach(), 1e-4)
    assert rel_err(x.grad.cpu(), Fr.grad) < 8e-3
    assert_rel(lv.grad.cpu(), lvr.grad, 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic_gpu(backend):
    x, (f, c, u, xt), _ = _inputs(8, (16, 21, 60, 104), torch.bfloat16, seed=3)
    _skip_unavailable(backend, x)
    outs = []
    for _ in range(3):
        xx = x.detach().clone().requires_grad_()
        with fd.use_backend(backend):
            loss = _dmd(xx, f, c, u, xt, [1.0, -5.0, 4.0], [5.0, -4.0, 0.3])
            loss.backward()
        outs.append((loss.detach(), xx.grad))
    for o in outs[1:]:
        assert torch.equal(o[0], outs[0][0]) and torch.equal(o[1], outs[0][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture(backend):
    """No host synchronisation: forward + backward capture into a CUDA graph and replay correctly."""
    x, (f, c, u, xt), _ = _inputs(2, (4, 8, 32, 32), torch.bfloat16, seed=4)
    _skip_unavailable(backend, x)
    co, nco = torch.tensor([1.0, -3.0, 2.0], device=DEV), torch.tensor([3.0, -2.0, 0.5], device=DEV)
    xs = x.detach().clone().requires_grad_()

    def step():
        xs.grad = None
        with fd.use_backend(backend):
            loss = _dmd(xs, f, c, u, xt, co, nco)
            loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    xs.grad = None
    with torch.cuda.graph(graph):
        static_loss = step()
    f.mul_(1.5)  # new data in place, replay
    graph.replay()
    torch.cuda.synchronize()
    xe = x.detach().clone().requires_grad_()
    with fd.use_backend(backend):
        ref = _dmd(xe, f, c, u, xt, co, nco)
        ref.backward()
    assert torch.equal(static_loss, ref.detach()) and torch.equal(xs.grad, xe.grad)


def test_compile_inductor_gpu():
    x, (f, c, u, xt), _ = _inputs(2, (4, 16, 16), torch.bfloat16, seed=5)
    _skip_unavailable("triton", x)
    fn = torch.compile(lambda *a: _dmd(*a, [1.0, -3.0, 2.0], [3.0, -2.0, 0.5]) * 3, fullgraph=True)
    out = fn(x, f, c, u, xt)
    (gx,) = torch.autograd.grad(out, x)
    x2 = x.detach().clone().requires_grad_()
    ref = _dmd(x2, f, c, u, xt, [1.0, -3.0, 2.0], [3.0, -2.0, 0.5]) * 3
    (gr,) = torch.autograd.grad(ref, x2)
    assert torch.allclose(out, ref, rtol=1e-5) and torch.equal(gx, gr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_coefficients_no_host_sync_and_capture(backend):
    """Coefficients given as floats become cached device constants. New values (a CFG or time schedule) are
    uploaded without a host synchronisation (forward + backward under set_sync_debug_mode("error")), and values
    first seen during CUDA-graph capture are filled on the device there; the replay matches eager."""
    x, (f, c, u, xt), _ = _inputs(2, (4, 8, 32, 32), torch.bfloat16, seed=5)
    _skip_unavailable(backend, x)

    def step(xs, k):
        xs.grad = None
        with fd.use_backend(backend):
            loss = _dmd(xs, f, c, u, xt, [1.0, -3.0 - k, 2.0 + k], [3.0, -2.0 - k, 0.5])
            loss.backward()
        return loss

    xs = x.detach().clone().requires_grad_()
    step(xs, 0.0)  # compile / load
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            step(xs, 0.125 * i)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(xs, 0.0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(xs, 0.8125)  # values never seen before: a miss during capture
    # an eager call with those values before any replay: it must not read the graph's constant (filled only
    # when the graph runs) but upload its own
    xb = x.detach().clone().requires_grad_()
    before = step(xb, 0.8125).detach().clone()
    f0 = f.clone()
    f.mul_(1.5)
    graph.replay()
    torch.cuda.synchronize()
    xe = x.detach().clone().requires_grad_()
    ref = step(xe, 0.8125)
    assert torch.equal(static_loss, ref.detach()) and torch.equal(xs.grad, xe.grad)
    f.copy_(f0)
    xb2 = x.detach().clone().requires_grad_()
    assert torch.equal(before, step(xb2, 0.8125).detach()) and torch.equal(xb.grad, xb2.grad)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensors_on_another_gpu_than_the_current_one():
    """Every Triton launcher runs on its tensors' GPU (Triton launches on the current device): kd_loss, a score op and
    jvp_attention on cuda:1 while cuda:0 is current equal the same calls made with cuda:1 current."""
    torch.cuda.set_device(0)
    g = torch.Generator().manual_seed(3)
    s, t = (torch.randn(4, 1000, generator=g).to("cuda:1") for _ in range(2))
    x, f, r = (torch.randn(2, 3, 64, generator=g).to("cuda:1") for _ in range(3))
    q, k, v = (torch.randn(1, 64, 2, 32, generator=g).to("cuda:1", torch.bfloat16) for _ in range(3))

    def calls():
        with fd.use_backend("triton"):
            return (fd.kd_loss(s, t, divergence="jsd"), fd.sid_loss(x, f, r),
                    fd.jvp_attention(q, k, v, q, k, v)[1])

    got = calls()
    with torch.cuda.device(1):
        ref = calls()
    for a, b in zip(got, ref):
        assert a.device == b.device == torch.device("cuda:1") and torch.equal(a, b)
