"""Teacher outputs made under ``torch.inference_mode()`` (a frozen teacher's usual context) are constants the
losses never differentiate: they must work as well as the same values made under ``no_grad``. Before, every
loss that keeps the teacher for its backward raised autograd's "Inference tensors cannot be saved for
backward". (Attention's k / v are differentiable inputs, not constants: there, as for stock SDPA, inference
tensors stay refused by PyTorch.)"""

from __future__ import annotations

import pytest
import torch

import fastdistill as fd

F64 = torch.float64


def _inference(*xs):
    with torch.inference_mode():
        out = tuple(x.clone() for x in xs)
    assert all(x.is_inference() for x in out)
    return out


def _same(call, student, consts):
    """``call(student, *consts)`` with inference-mode constants equals it with normal ones (loss and gradient)."""
    res = []
    for cs in (consts, _inference(*consts)):
        x = student.clone().requires_grad_()
        loss = call(x, *cs)
        loss.sum().backward()
        res.append((loss.detach(), x.grad))
    torch.testing.assert_close(res[1][0], res[0][0], rtol=0, atol=0)
    torch.testing.assert_close(res[1][1], res[0][1], rtol=0, atol=0)


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_kd_loss(use, reduction):
    s, t = torch.randn(2, 3, 11, generator=_g(0), dtype=F64), torch.randn(2, 3, 11, generator=_g(1), dtype=F64)
    w = torch.rand(2, 3, generator=_g(2), dtype=F64)
    _same(lambda x, t, w: fd.kd_loss(x, t, divergence="jsd", weights=w, reduction=reduction), s, (t, w))


def test_kd_loss_topk(use):
    s, t = torch.randn(4, 11, generator=_g(0), dtype=F64), torch.randn(4, 11, generator=_g(1), dtype=F64)
    lps, ids = torch.topk(t.log_softmax(-1), 3)
    _same(lambda x, ids, lps: fd.kd_loss(x, teacher_topk=(ids, lps), divergence="fkl"), s, (ids, lps))


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_fused_linear_kd_loss(use, reduction):
    h = torch.randn(5, 6, generator=_g(0), dtype=F64)
    W = torch.randn(13, 6, generator=_g(1), dtype=F64, requires_grad=True)
    ht, Wt = torch.randn(5, 4, generator=_g(2), dtype=F64), torch.randn(13, 4, generator=_g(3), dtype=F64)
    _same(lambda x, ht, Wt: fd.fused_linear_kd_loss(x, W, ht, Wt, divergence="rkl", reduction=reduction), h, (ht, Wt))


def test_score_ops(use):
    x = torch.randn(3, 2, 5, generator=_g(0), dtype=F64)
    a, b = torch.randn(3, 2, 5, generator=_g(1), dtype=F64), torch.randn(3, 2, 5, generator=_g(2), dtype=F64)
    _same(lambda x, a, b: fd.score_distill(x, [a, b], [1.0, -1.0], norm="mean_abs", norm_terms=[b],
                                           norm_coeffs=[1.0]), x, (a, b))
    _same(lambda x, a, b: fd.scm_tangent_loss(x, [a, b], [1.0, 0.5], c=0.1), x, (a, b))
    _same(lambda x, a: fd.denoise_regression_loss(x, [a], [-1.0], reduction="none"), x, (a,))


def test_inference_constants_released_after_backward(use):
    """The held inference tensors go with the backward (as autograd's saved tensors do: a training loop must not keep
    the last step's teacher logits alive through the next forward); a retain_graph second backward raises naming
    the cause instead of reading freed state."""
    import gc
    import weakref

    s = torch.randn(3, 11, generator=_g(0), dtype=F64, requires_grad=True)
    (t,) = _inference(torch.randn(3, 11, generator=_g(1), dtype=F64))
    ref = weakref.ref(t)
    loss = fd.kd_loss(s, t)
    del t
    loss.backward(retain_graph=True)
    gc.collect()
    assert ref() is None, "the inference-mode teacher outlived the backward"
    with pytest.raises(RuntimeError, match="inference_mode"):
        loss.backward()
