"""Run by tests/test_harness.py::test_dtensor_inputs in its own process (a one-rank gloo group): every public op
given a DTensor raises a TypeError naming the argument and the tool to use, or (jvp_sdpa) falls back to stock SDPA.
Prints one line per check; exits non-zero on the first failure."""

from __future__ import annotations

import os
import sys
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def expect(what, fn, *words):
    try:
        fn()
    except TypeError as e:
        msg = str(e)
        assert all(w in msg for w in words), f"{what}: {msg!r} lacks {words}"
        print(f"ok {what}: {msg[:90]}")
        return
    raise AssertionError(f"{what}: no TypeError")


def main():
    import fastdistill as fd
    from fastdistill.distributed import context_parallel_jvp_attention
    from fastdistill.integrations import jvp_sdpa

    tmp = tempfile.mkdtemp()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=0, world_size=1)
    mesh = init_device_mesh("cpu", (1,))
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    dt = lambda x, p: distribute_tensor(x, mesh, [p])
    expect("kd_loss Replicate", lambda: fd.kd_loss(dt(s, Replicate()), t), "student_logits: a DTensor",
           ".to_local()")
    expect("kd_loss vocab-sharded teacher", lambda: fd.kd_loss(s, dt(t, Shard(2))), "teacher_logits",
           "vocab_parallel_kd_loss")
    expect("kd_loss labels", lambda: fd.kd_loss(s, t, labels=dt(torch.zeros(2, 5, dtype=torch.long), Shard(0))),
           "labels: a DTensor")
    expect("KDLoss", lambda: fd.KDLoss()(dt(s, Shard(1)), t), "student_logits: a DTensor")
    x, a = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    expect("score_distill x", lambda: fd.score_distill(dt(x, Shard(0)), [a], [1.0], norm=None), "x: a DTensor")
    expect("sid_loss f_fake", lambda: fd.sid_loss(x, a, dt(a, Replicate())), "f_fake[0]: a DTensor")
    # the other tensor arguments of the score ops (before: internal errors, "invalid python storage")
    m = torch.ones(2, 8, dtype=torch.bool)
    expect("score_distill sample_weight", lambda: fd.score_distill(
        x, [a], [1.0], norm=None, sample_weight=dt(torch.rand(2), Replicate())), "sample_weight: a DTensor")
    expect("score_distill mask", lambda: fd.score_distill(x, [a], [1.0], norm=None, mask=dt(m, Replicate())),
           "mask: a DTensor")
    expect("score_distill per-sample coefficient", lambda: fd.score_distill(
        x, [a], [dt(torch.rand(2), Replicate())], norm=None), "coeffs[0]: a DTensor")
    expect("score_distill [B, k] coefficients", lambda: fd.score_distill(
        x, [a], dt(torch.rand(2, 1), Replicate()), norm=None), "coeffs: a DTensor")
    expect("scm_tangent_loss logvar", lambda: fd.scm_tangent_loss(
        x, [a], [1.0], logvar=dt(torch.zeros(2), Replicate())), "logvar: a DTensor")
    expect("scm_tangent_loss weight", lambda: fd.scm_tangent_loss(
        x, [a], [1.0], weight=dt(torch.rand(2), Replicate())), "weight: a DTensor")
    expect("sid_loss mask", lambda: fd.sid_loss(x, a, a + 1, mask=dt(m, Replicate())), "mask: a DTensor")
    q = torch.randn(1, 2, 6, 8, generator=g)
    expect("jvp_attention", lambda: fd.jvp_attention(dt(q, Shard(1)), q, q, layout="bhsd"), "q: a DTensor",
           "context_parallel_jvp_attention")
    expect("context_parallel_jvp_attention", lambda: context_parallel_jvp_attention(dt(q, Shard(2)), q, q),
           "q: a DTensor")  # (a one-rank group is the single-device op)
    W = torch.randn(16, 8, generator=g)
    expect("fused_linear_kd_loss weight", lambda: fd.fused_linear_kd_loss(
        torch.randn(4, 8), dt(W, Shard(0)), teacher_logits=torch.randn(4, 16)), "student_weight",
        "vocab_parallel_fused_linear_kd_loss", "FSDP2")
    expect("fused_linear_kd_loss teacher logits", lambda: fd.fused_linear_kd_loss(
        torch.randn(4, 8), W, teacher_logits=dt(torch.randn(4, 16), Shard(1))), "teacher_logits",
        "vocab_parallel_fused_linear_kd_loss")
    qd = dt(q, Shard(1))  # heads sharded: stock SDPA has the sharding rule (the math backend's: torch 2.11 has none
    # for the CPU flash op, aten._scaled_dot_product_flash_attention_for_cpu, that stock SDPA picks here by default)
    with warnings.catch_warnings(record=True) as w, jvp_sdpa(plain="fastdistill"), sdpa_kernel(SDPBackend.MATH):
        warnings.simplefilter("always")
        o = F.scaled_dot_product_attention(qd, qd, qd)
    assert type(o).__name__ == "DTensor" and any("DTensor inputs" in str(m.message) for m in w), [str(m.message)
                                                                                                    for m in w]
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q, q, q)
    assert (o.full_tensor() - ref).abs().max() < 1e-6
    print("ok jvp_sdpa: DTensor inputs fall back to stock SDPA")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main()
    sys.stdout.flush()
