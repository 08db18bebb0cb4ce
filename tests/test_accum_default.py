"""``accum_dtype=None`` (the default of the kd and score ops): float64 inputs give float64 statistics and a
float64 loss, as PyTorch's own losses do; fp32/bf16/fp16 inputs give fp32. (The vocab-parallel losses: the
``*default-accum`` cases of test_vocab_parallel.py.)

The close-teacher cases check the value against an independent fp64 formula: the divergence there is ~1e-7 of
each term, so fp32 statistics would be wrong in the first digits.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastdistill as fd
from fastdistill.integrations.trl import generalized_jsd_loss

F64 = torch.float64


def _close_pair(N=5, V=37, eps=1e-3, dtype=F64):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g, dtype=F64) * 2
    t = s + eps * torch.randn(N, V, generator=g, dtype=F64)
    return s.to(dtype), t.to(dtype)


def _jsd_oracle(s, t, beta):
    """Generalised JSD(β) in fp64, M = β·P + (1−β)·Q, mean over rows."""
    lq, lp = s.double().log_softmax(-1), t.double().log_softmax(-1)
    lm = torch.logsumexp(torch.stack([lp + math.log(beta), lq + math.log1p(-beta)]), 0)
    return (beta * (lp.exp() * (lp - lm)).sum(-1) + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)).mean()


def _fkl_oracle(s, t):
    lq, lp = s.double().log_softmax(-1), t.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean()


def _rel(a, b):
    return abs(a.item() - b.item()) / abs(b.item())


def test_kd_loss_fp64_close_teacher(use):
    s, t = _close_pair()
    loss = fd.kd_loss(s, t, divergence="jsd", beta=0.3)
    assert loss.dtype == F64
    assert _rel(loss, _jsd_oracle(s, t, 0.3)) < 1e-8


def test_trl_generalized_jsd_fp64(use):
    s, t = _close_pair()
    labels = torch.zeros(s.shape[0], dtype=torch.long)
    loss = generalized_jsd_loss(s, t, labels=labels, beta=0.5)
    assert loss.dtype == F64
    assert _rel(loss, _jsd_oracle(s, t, 0.5)) < 1e-8


def test_fused_linear_fp64_close_teacher(use):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 8, generator=g, dtype=F64)
    W = torch.randn(29, 8, generator=g, dtype=F64)
    t = h @ W.T + 1e-3 * torch.randn(6, 29, generator=g, dtype=F64)
    loss = fd.fused_linear_kd_loss(h, W, teacher_logits=t, divergence="fkl")
    assert loss.dtype == F64
    assert _rel(loss, _fkl_oracle(h @ W.T, t)) < 1e-8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_ops_fp32_statistics_below_fp64(use, dtype):
    s, t = _close_pair(dtype=dtype)
    assert fd.kd_loss(s, t, divergence="fkl").dtype == torch.float32
    h, W = s[:, :8].contiguous(), t[:, :8].contiguous()
    assert fd.fused_linear_kd_loss(h, W, teacher_logits=s, divergence="fkl").dtype == torch.float32


def _score_calls(x, B):
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(x.shape, generator=g, dtype=F64).to(x.dtype) for _ in range(2))
    c2 = torch.tensor([[1.0, -0.7]] * B, dtype=F64)
    c1 = torch.tensor([[0.5]] * B, dtype=F64)
    return {
        "score_distill": lambda **kw: fd.score_distill(x, [a, b], c2, norm="mean_abs", norm_terms=[b],
                                                       norm_coeffs=c1, **kw),
        "sid_loss": lambda **kw: fd.sid_loss(x, a, b, alpha=1.2, **kw),
        "scm_tangent_loss": lambda **kw: fd.scm_tangent_loss(x, [a, b], c2, c=0.1, **kw),
        "denoise_regression_loss": lambda **kw: fd.denoise_regression_loss(x, [a], c1, **kw),
    }


@pytest.mark.parametrize("op", ["score_distill", "sid_loss", "scm_tangent_loss", "denoise_regression_loss"])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_score_ops_follow_the_input(use, op, dtype):
    """The default is the explicit accumulation dtype of the input's precision: same loss, same gradient."""
    B = 3
    x0 = torch.randn(B, 2, 5, generator=torch.Generator().manual_seed(3), dtype=F64).to(dtype)
    acc = F64 if dtype == F64 else torch.float32
    out = []
    for kw in ({}, {"accum_dtype": acc}):
        x = x0.clone().requires_grad_()
        loss = _score_calls(x, B)[op](**kw)
        loss.backward()
        out.append((loss.detach(), x.grad))
    assert out[0][0].dtype == acc
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
