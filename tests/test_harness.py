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
