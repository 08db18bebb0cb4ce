"""GPU tier: kd_loss in fp32 with a teacher close to the student, on the GPU kernels (Triton; CUDA for dense
teachers), held to DESIGN's tolerance rule as tests/test_kd_close_teacher.py holds the CPU paths: the relative L2
error of the per-row losses and of the gradient at most 2× plain fp32 PyTorch's (TVD's loss and the dense forward-KL
gradient 1.5×), against float64. On the GPU the kernels' exp is the hardware's approximate one (Triton's fp32 exp,
CUDA's __expf), which the CPU tier cannot see: this is where that shows. Also the large-magnitude rows and the NaN
teacher logit of tests/test_kd.py.
"""

from __future__ import annotations

import pytest
import torch
from test_kd import check_large_magnitude_rows, check_nan_teacher_logit
from test_kd_close_teacher import DIVS, check_close_teacher, close_teacher_case

import fastdistill as fd

GPU = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")]


def _backend_or_skip(backend: str) -> None:
    why = fd.available_backends("kd_loss", torch.zeros(1, device="cuda"))[backend]
    if why:
        pytest.skip(f"the {backend} backend cannot run here: {'; '.join(why)}")


@pytest.mark.parametrize("offset", [0.0, 60.0])
@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("mode,backend", [("dense", "triton"), ("renorm", "triton"), ("dense", "cuda")])
def test_close_teacher_fp32_gpu(backend, mode, div, offset):
    _backend_or_skip(backend)
    s, teacher = close_teacher_case(mode, offset)

    def call(x):  # x: the CPU leaf; the kernels run on the GPU, the gradient flows back through the copy
        with fd.use_backend(backend):
            if mode == "dense":
                return fd.kd_loss(x.cuda(), teacher.cuda(), divergence=div, reduction="none").cpu()
            ids, lps = teacher
            return fd.kd_loss(x.cuda(), teacher_topk=(ids.cuda(), lps.cuda()), topk_semantics="renorm",
                              divergence=div, reduction="none").cpu()

    check_close_teacher(mode, div, s, teacher, call)


@pytest.mark.parametrize("div", ["fkl", "rkl", "jsd-b0.3", "skl", "srkl-0.3", "tvd"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_large_magnitude_and_nan_rows_gpu(backend, div, monkeypatch):
    """tests/test_kd.py's checks with their tensors on the GPU (kd_loss is patched to move them there)."""
    _backend_or_skip(backend)
    orig = fd.kd_loss

    def on_gpu(s, t=None, **kw):
        return orig(s.cuda(), None if t is None else t.cuda(), **kw).cpu()

    monkeypatch.setattr(fd, "kd_loss", on_gpu)
    with fd.use_backend(backend):
        check_large_magnitude_rows(div)
        check_nan_teacher_logit(div)
