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
    x = torch.randn(1024)
    y = torch.empty(1024, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, y, N=1024)
    assert torch.equal(y, x.to(torch.bfloat16))


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
