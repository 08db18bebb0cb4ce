"""The test harness itself: the interpreter's bf16 tl.dot patch (conftest) must give the right
product, so that later kernels using tl.dot can be tested in bf16 on the CPU."""

import pytest
import torch

from conftest import INTERPRET


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_interpreter_dot(dtype):
    import triton
    import triton.language as tl

    @triton.jit
    def _dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        b = tl.load(b_ptr + r[:, None] * N + r[None, :])
        tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))

    torch.manual_seed(0)
    a = torch.randn(16, 16).to(dtype)
    b = torch.randn(16, 16).to(dtype)
    c = torch.empty(16, 16)
    _dot_kernel[(1,)](a, b, c, N=16)
    expected = a.double() @ b.double()
    assert (c.double() - expected).abs().max().item() < 1e-3 * expected.abs().max().item()


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
def test_interpreter_bf16_cast_rounds_to_nearest():
    import triton
    import triton.language as tl

    @triton.jit
    def _cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(y_ptr + r, tl.load(x_ptr + r).to(tl.bfloat16))

    torch.manual_seed(0)
    for dt in (torch.float32, torch.float64):  # fp64 -> bf16: garbage in the unpatched interpreter
        x = torch.randn(1024, dtype=dt)
        y = torch.empty(1024, dtype=torch.bfloat16)
        _cast_kernel[(1,)](x, y, N=1024)
        assert torch.equal(y, x.to(torch.bfloat16)), dt


def test_device_constant_cached_and_traceable():
    """Per-call scalars (temperatures, float coefficients) become cached device constants: the same values give
    the same tensor, other values or dtypes another; under torch.compile they are constants of the graph.
    (Uploads without a host sync and CUDA-graph capture: the GPU tier, tests/gpu/test_score_gpu.py.)"""
    from fastdistill._backend import device_constant

    a = device_constant((1.0, 2.5), torch.device("cpu"), torch.float32)
    assert device_constant((1.0, 2.5), "cpu", torch.float32) is a and a.tolist() == [1.0, 2.5]
    b = device_constant((1.0, 2.5), "cpu", torch.float64)
    assert b is not a and b.dtype == torch.float64
    assert device_constant((1.0, 2.75), "cpu", torch.float32).tolist() == [1.0, 2.75]
    f = torch.compile(lambda x, v: x * device_constant((v,), x.device, x.dtype), fullgraph=True, backend="eager")
    assert f(torch.ones(2), 3.0).tolist() == [3.0, 3.0]


def test_device_constant_cache_is_an_lru(monkeypatch):
    """At most _EAGER_MAX constants are kept: the least recently used goes first (a hit renews an entry)."""
    import collections

    from fastdistill import _backend

    monkeypatch.setattr(_backend, "_EAGER_MAX", 3)
    monkeypatch.setattr(_backend, "_EAGER_CONSTANTS", collections.OrderedDict())
    get = lambda v: _backend.device_constant((v,), "cpu", torch.float32)  # noqa: E731
    a, b, c = get(1.0), get(2.0), get(3.0)
    assert get(1.0) is a  # a hit: 1.0 is now the most recent
    get(4.0)  # evicts 2.0, the least recently used
    assert get(1.0) is a and get(3.0) is c and get(2.0) is not b
    assert len(_backend._EAGER_CONSTANTS) == 3


def test_backend_names_checked(monkeypatch):
    """An unknown backend name is refused where it enters: register(), use_backend(), FASTDISTILL_BACKEND; a forced
    backend is per thread and restored after the block."""
    import threading

    from fastdistill import _backend

    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        _backend.register("kd_loss", "gpu", lambda *a, **k: [])
    assert "gpu" not in _backend._REGISTRY["kd_loss"]
    with pytest.raises(ValueError, match="^use_backend: unknown backend 'triton2'"):
        with _backend.use_backend("triton2"):
            pass
    monkeypatch.setenv("FASTDISTILL_BACKEND", "cuda_")
    with pytest.raises(ValueError, match="^FASTDISTILL_BACKEND / use_backend: unknown backend 'cuda_'"):
        _backend.forced_backend()
    monkeypatch.setenv("FASTDISTILL_BACKEND", "triton")
    assert _backend.forced_backend() == "triton"
    with _backend.use_backend("reference"):  # the block wins over the environment
        assert _backend.forced_backend() == "reference"
        with _backend.use_backend("cuda"):
            assert _backend.forced_backend() == "cuda"
        assert _backend.forced_backend() == "reference"  # the outer block's, not None
        seen = []
        t = threading.Thread(target=lambda: seen.append(_backend.forced_backend()))
        t.start()
        t.join()
        assert seen == ["triton"]  # another thread: the environment's
    assert _backend.forced_backend() == "triton"


def test_select_order_and_missing_backends(monkeypatch):
    """select() takes the first backend with no reason in the fixed order cuda > triton > reference; a backend an
    op does not register is "not implemented"; a forced backend that cannot run raises with every reason."""
    from fastdistill import _backend

    table = {"triton": lambda x: [], "reference": lambda x: []}
    monkeypatch.setitem(_backend._REGISTRY, "toy_op", table)
    monkeypatch.delenv("FASTDISTILL_BACKEND", raising=False)
    assert _backend.reasons("toy_op", 0)["cuda"] == ["not implemented for this op"]
    assert _backend.select("toy_op", 0) == "triton"
    table["triton"] = lambda x: ["no"]
    assert _backend.select("toy_op", 0) == "reference"
    with _backend.use_backend("triton"), pytest.raises(_backend.BackendUnavailableError,
                                                       match="forced backend 'triton' cannot run .*triton: no"):
        _backend.select("toy_op", 0)
    table["reference"] = lambda x: ["nope"]
    with pytest.raises(_backend.BackendUnavailableError, match="no backend can run .*reference: nope"):
        _backend.select("toy_op", 0)


def test_available_backends_bad_arguments():
    """An unknown op names the known ones (was a bare KeyError, also for the public fused_linear_kd_loss, whose
    chunks run kd_loss's backends); a non-tensor input is a TypeError naming it (was an AttributeError)."""
    import pytest
    import torch

    import fastdistill as fd

    x = torch.zeros(2, 3)
    assert fd.available_backends("fused_linear_kd_loss", x) == fd.available_backends("kd_loss", x)
    with pytest.raises(ValueError, match="op: expected one of .*'kd_loss'"):
        fd.available_backends("kd", x)
    with pytest.raises(TypeError, match="x: expected a tensor"):
        fd.available_backends("kd_loss", [1, 2])


def test_torch_func_transforms_refused_with_the_op_name():
    """kd / score / fused-linear ops under torch.func.grad or vmap: a TransformLimitError naming the op and what
    works (before: PyTorch's internal "must override the setup_context staticmethod")."""
    import pytest
    import torch

    import fastdistill as fd
    from fastdistill.ops._common import TransformLimitError

    s, t = torch.randn(3, 5), torch.randn(3, 5)
    x, a = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    W = torch.randn(5, 4)
    calls = {
        "kd_loss": (lambda z: fd.kd_loss(z, t), s),
        "fused_linear_kd_loss": (lambda h: fd.fused_linear_kd_loss(h, W, teacher_logits=t), torch.randn(3, 4)),
        "score_distill": (lambda z: fd.score_distill(z, [a], [1.0], norm=None), x),
        "sid_loss": (lambda z: fd.sid_loss(z, a, a + 1), x),
        "scm_tangent_loss": (lambda z: fd.scm_tangent_loss(z, [a], [1.0]), x),
        "denoise_regression_loss": (lambda z: fd.denoise_regression_loss(z, [a], [1.0]), x),
    }
    with fd.use_backend("reference"):
        for op, (f, arg) in calls.items():
            with pytest.raises(TransformLimitError, match=f"^{op}: torch.func transforms"):
                torch.func.grad(f)(arg)
            with pytest.raises(TransformLimitError, match=f"^{op}: torch.func transforms"):
                torch.func.vmap(f)(arg[None])
            f(arg)  # outside a transform: fine


@pytest.mark.parametrize("value", ["1", "0", "true", "false", "yes", "no", "on", "off", "TRUE", "", " 1", "on "])
def test_interpreting_reads_triton_interpret_as_triton(monkeypatch, value):
    """fastdistill's TRITON_INTERPRET reading agrees with Triton's own (before: any value but "" and "0" was on,
    so TRITON_INTERPRET=false sent CPU tensors to a Triton that was not interpreting: '0 active drivers')."""
    triton = pytest.importorskip("triton")
    from fastdistill._backend import interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreting() == (value.lower() in ("1", "true", "yes", "on"))  # (padded: off, as in Triton)
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        assert interpreting() == bool(knobs.runtime.interpret), value


@pytest.mark.parametrize("device,cap,interp,want", [
    ("cuda", (9, 0), "0", None), ("cuda", (8, 0), "0", None),
    ("cuda", (7, 5), "0", "GPU compute capability 7.x < 8.0 (Ampere) is not supported"),
    ("cuda", (9, 0), "1", "TRITON_INTERPRET=1 is set: Triton would run on the CPU interpreter, not the GPU"),
    ("cpu", None, "1", None), ("cpu", None, "0", "tensors are on the CPU: Triton runs there only under"),
    ("meta", None, "1", "device type 'meta' is not supported by the Triton kernels"),
])
def test_triton_why_not(monkeypatch, device, cap, interp, want):
    """The dispatcher's reasons for the Triton backend per device (a GPU's capability faked: no GPU needed)."""
    from fastdistill import _backend

    if _backend._TRITON is None:
        pytest.skip("triton is not importable")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: cap)
    monkeypatch.setenv("TRITON_INTERPRET", interp)
    why = _backend.triton_why_not(torch.device(device))
    assert (why == []) if want is None else (len(why) == 1 and why[0].startswith(want)), why


@pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dt", [torch.bfloat16, torch.float16])
def test_fp64_accumulation_with_low_precision_tensors(dt):
    """accum_dtype=float64 with bf16/fp16 tensors on the Triton kernels (fp64 statistics, a gradient rounded once
    to the input dtype) equals the reference backend: kd_loss, denoise_regression_loss, and sid_loss with an fp64
    y next to a bf16/fp16 f_fake. Untested before: the interpreter's fp64 -> bf16 cast was garbage (now patched to
    round like the GPU), so these paths had no CPU check."""
    import fastdistill as fd

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 40, generator=g).to(dt), torch.randn(4, 40, generator=g)
    x, a = torch.randn(2, 30, generator=g).to(dt), torch.randn(2, 30, generator=g)
    y = torch.randn(2, 30, generator=g, dtype=torch.float64)
    fr, ff = torch.randn(2, 30, generator=g, dtype=torch.float64), torch.randn(2, 30, generator=g).to(dt)
    runs = {}
    for b in ("reference", "triton"):
        with fd.use_backend(b):
            leaves = [u.clone().requires_grad_() for u in (s, x, ff)]
            l1 = fd.kd_loss(leaves[0], t, accum_dtype=torch.float64)
            l2 = fd.denoise_regression_loss(leaves[1], [a], [-1.0], accum_dtype=torch.float64)
            l3 = fd.sid_loss(y, fr, leaves[2], alpha=1.2)
            (l1 + l2 + l3).backward()
            runs[b] = (l1, l2, l3, *(u.grad for u in leaves))
    for name, u, v in zip(("kd", "denoise", "sid", "kd grad", "denoise grad", "sid grad"), *runs.values()):
        assert u.dtype == v.dtype and torch.isfinite(u).all(), name
        tol = 1e-12 if u.dtype == torch.float64 else 0.0  # a gradient rounded once: equal in the input dtype
        assert (u.double() - v.double()).abs().max() <= tol * v.double().abs().max(), name


def test_triton_probe_names_numpy_for_the_interpreter(monkeypatch):
    """Triton's interpreter imports numpy: without it the reason said only "No module named 'numpy'" under
    "triton is not importable", with triton installed; it now says what to install."""
    import builtins

    from fastdistill import _backend

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "triton":
            raise ModuleNotFoundError("No module named 'numpy'", name="numpy")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    mod, why = _backend._probe_triton()
    assert mod is None and "needs numpy" in why and "pip install numpy" in why


def test_dtensor_inputs():
    """DTensor arguments (tensor / sequence parallelism, FSDP2) raise a TypeError naming the argument and the tool
    (vocab_parallel_kd_loss for vocabulary-sharded logits, .to_local(), context_parallel_jvp_attention, FSDP2's
    forward for a sharded weight), and jvp_sdpa falls back to stock SDPA for them. Before: internal errors ("invalid
    python storage", "no sharding strategy"), and on a GPU a kernel launch on address 0 (a DTensor's data_ptr).
    Found by a DTensor audit (the score ops' masks, weights, logvar and coefficients by a review). Runs in its own
    process (a one-rank gloo group)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("torch.distributed.tensor")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, os.path.join(here, "dtensor_inputs_check.py")], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, PYTHONPATH=here + os.pathsep +
                                                        os.environ.get("PYTHONPATH", "")))
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.count("\nok ") + r.stdout.startswith("ok ") == 18, r.stdout
