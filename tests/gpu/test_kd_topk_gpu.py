"""GPU tier: kd_loss with a top-k teacher on the Triton kernels at Llama-3's vocabulary, k from 17 to 4096 (the
kernels walk the ids in chunks of 128, kernels/kd_softmax.py K_CHUNK), every semantics, with and without
inplace_grad. In place, the gradient kernel copies the logits at the ids to a stash before the row is overwritten
and reads it back after a CTA barrier: on a GPU the copy, the overwrite and the fix-up run in many threads at once,
which the CPU tier's interpreter (one thread) cannot show. Rows 0 and 1 are confident (the ids hold all but ~1e-10 of
the student's mass): tail_bucket's exact tail sum.

Tolerance (as tests/gpu/test_kd_cuda.py): the normwise error against the reference backend on the inputs in
float64 at most 4x that of the reference backend in fp32, plus, for the gradient, the error of merely storing the
exact gradient in the logits' dtype, plus 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import fastdistill as fd

GPU = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not GPU, reason="GPU tier: no CUDA device visible")]
F64 = torch.float64
CASES = [("tail_bucket", "fkl"), ("tail_bucket", "jsd"), ("tail_bucket", "tvd"), ("renorm", "fkl"),
         ("renorm", "rkl"), ("renorm", "jsd"), ("zero_tail", "fkl")]


def topk_case(N, V, k, dtype, device, seed=0):
    """Student logits (``dtype``) ~ N(0, 2), rows 0 and 1 boosted by 40 at the ids; the ids and log-probs (fp32) of a
    teacher correlated with the student; labels inside the ids (row 0, past the first chunk), off them (row 2)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    base = 2 * torch.randn(N, V, generator=g, dtype=F64)
    lps, ids = torch.log_softmax(base + torch.randn(N, V, generator=g, dtype=F64), -1).topk(k, -1)
    boost = torch.zeros(N, 1, dtype=F64)
    boost[:2] = 40.0
    s = base.scatter_add(1, ids, boost.expand(N, k))
    labels = ids[:, min(k - 1, 200)].clone()
    labels[2] = int(torch.ones(V, dtype=torch.bool).scatter(0, ids[2], False).nonzero()[0])
    up = torch.linspace(0.5, 2.0, N, dtype=torch.float32)
    return (s.to(dtype).to(device), ids.to(device), lps.float().to(device), labels.to(device), up.to(device))


def run_topk(backend, s, ids, lps, labels, up, mode, div, inplace, fp64=False):
    """(per-row losses, the gradient) of kd_loss with every option; ``fp64``: on the inputs in float64."""
    x = (s.double() if fp64 else s).clone().requires_grad_()
    buf = x * 1.0 if inplace else x  # a non-leaf buffer the gradient may overwrite
    with fd.use_backend(backend):
        loss = fd.kd_loss(buf, teacher_topk=(ids, lps.double() if fp64 else lps), topk_semantics=mode,
                          divergence=div, temperature=1.5, teacher_temperature=1.25 if mode == "renorm" else None,
                          labels=labels, hard_label_alpha=0.2, reduction="none", inplace_grad=inplace)
    (loss * up.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def check_topk(device, V, k, mode, div, inplace, dtype=torch.bfloat16, backend="triton"):
    s, ids, lps, labels, up = topk_case(6, V, k, dtype, device)
    got = run_topk(backend, s, ids, lps, labels, up, mode, div, inplace)
    r32 = run_topk("reference", s, ids, lps, labels, up, mode, div, False)
    r64 = run_topk("reference", s, ids, lps, labels, up, mode, div, False, fp64=True)
    rel = lambda a, b: float((a.double() - b).norm() / b.norm().clamp_min(1e-300))
    for i, name in enumerate(("loss", "grad")):
        assert torch.isfinite(got[i]).all(), name
        store = rel(r64[i].to(got[i].dtype), r64[i]) if name == "grad" else 0.0
        err, ref_err = rel(got[i], r64[i]), rel(r32[i], r64[i])
        assert err <= 4 * ref_err + store + 1e-5, (name, err, ref_err, store)


@pytest.mark.parametrize("inplace", [False, True], ids=["out", "inplace"])
@pytest.mark.parametrize("mode,div", CASES, ids=[f"{m}-{d}" for m, d in CASES])
@pytest.mark.parametrize("k", [17, 128, 1000, 4096])
def test_topk_large_k_gpu(k, mode, div, inplace):
    why = fd.available_backends("kd_loss", torch.zeros(1, device="cuda"))["triton"]
    if why:
        pytest.skip(f"the triton backend cannot run here: {'; '.join(why)}")
    check_topk("cuda", 128256, k, mode, div, inplace)


def check_inplace_matches_out(device, V, k, mode, div, dtype=torch.bfloat16):
    """In place, the gradient kernel reads the logits at the ids from its stash, an exact copy: the same arithmetic
    on the same numbers as out of place (launched without fp fusion), so the two gradients are bitwise equal. A
    race on the stash (a thread reading an entry before it is written, or a logit already overwritten by the row's
    gradient) shows here at any id, where test_topk_large_k_gpu's normwise bound may miss an id of small mass."""
    s, ids, lps, labels, up = topk_case(6, V, k, dtype, device, seed=1)
    out = run_topk("triton", s, ids, lps, labels, up, mode, div, False)
    inp = run_topk("triton", s, ids, lps, labels, up, mode, div, True)
    assert torch.equal(out[0], inp[0]), "loss"
    bad = (out[1] != inp[1]).nonzero()
    assert bad.numel() == 0, f"{len(bad)} gradient entries differ in place, first at {bad[:4].tolist()}"


@pytest.mark.parametrize("mode,div", CASES, ids=[f"{m}-{d}" for m, d in CASES])
@pytest.mark.parametrize("k", [1000, 4096])
def test_topk_inplace_matches_out_gpu(k, mode, div):
    why = fd.available_backends("kd_loss", torch.zeros(1, device="cuda"))["triton"]
    if why:
        pytest.skip(f"the triton backend cannot run here: {'; '.join(why)}")
    check_inplace_matches_out("cuda", 128256, k, mode, div)
