"""Parity of fastdistill.kd_loss with float64 transcriptions of public KD codebases.

Each test draws fp64 logits, runs the codebase's loss as transcribed in tests/kd_transcriptions.py
(autograd through the code as written) and kd_loss configured to match, and checks loss and
student gradient to ~1e-10 relative under a non-unit upstream gradient. Where a codebase reports
cross-entropy instead of KL (torchtune ForwardKLLoss, DistiLLM forward_kl / skewed_forward_kl omit
the teacher entropy H(P)), the check is codebase = kd_loss + H̄(P) on the value (H̄: H(P) reduced
like the loss) and equal gradients, since H(P) does not depend on the student.
"""
import os
import sys

import pytest
import torch

import fastdistill as fd

sys.path.insert(0, os.path.dirname(__file__))
import kd_transcriptions as T  # noqa: E402

F64 = torch.float64
RTOL = 1e-10
B, S, V = 2, 3, 37  # [B, S, V] logits: B sequences of S tokens


# ------------------------------------------------------------------------------- helpers
def gen(seed):
    return torch.Generator().manual_seed(seed)


def draw(seed, lead=(B, S), vocab=V):
    g = gen(seed)
    s = torch.randn(*lead, vocab, generator=g, dtype=F64) * 2
    t = torch.randn(*lead, vocab, generator=g, dtype=F64) * 2
    labels = torch.randint(0, vocab, lead, generator=g)
    drop = torch.rand(lead, generator=g) < 0.35
    drop.view(-1)[0], drop.view(-1)[-1] = True, False  # some ignored, some valid
    return s, t, torch.where(drop, torch.full_like(labels, -100), labels)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def close(got, exp, what, rtol=RTOL):
    assert got.shape == exp.shape, (what, got.shape, exp.shape)
    scale = float(exp.abs().max()) if exp.numel() else 0.0
    torch.testing.assert_close(got.to(F64), exp, rtol=rtol, atol=rtol * scale + 1e-300, msg=lambda m: f"{what}: {m}")


def teacher_entropy_rows(t, temperature=1.0):
    """H(P) per row, 0·log 0 = 0."""
    lp = torch.log_softmax(t.reshape(-1, t.shape[-1]) / temperature, -1)
    return -torch.where(lp.exp() > 0, lp.exp() * lp, torch.zeros_like(lp)).sum(-1)


def compare(backend, s, ref_fn, op_kw, offset=0.0, upstream=1.7):
    """ref_fn(leaf) -> codebase loss; op_kw -> kd_loss kwargs. Checks ref = op + offset and the gradients."""
    xr = leaf(s)
    ref = ref_fn(xr)
    x = leaf(s)
    with fd.use_backend(backend):
        loss = fd.kd_loss(x, accum_dtype=F64, **op_kw)
        close(loss.detach() + offset, ref.detach(), "loss")
        up = torch.full_like(ref, upstream)
        loss.backward(up)
    ref.backward(up)
    close(x.grad, xr.grad, "grad")


# ------------------------------------------------------------------------------- TRL
# GKDTrainer.generalized_jsd_loss: P teacher, Q student; β=0 FKL, β=1 RKL, mixture in prob space.
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "num_items"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_generalized_jsd(backend, beta, reduction):
    s, t, labels = draw(1)
    kw = dict(beta=beta, temperature=0.9)  # GKDConfig's default temperature
    if reduction == "num_items":  # gradient accumulation: a global count over micro-batches
        ref_fn = lambda x: T.trl_generalized_jsd_loss(x, t, labels, num_items_in_batch=torch.tensor(13), **kw)
        op = dict(reduction="batchmean", num_items=13)
    else:
        ref_fn = lambda x: T.trl_generalized_jsd_loss(x, t, labels, reduction=reduction, **kw)
        op = dict(reduction=reduction)
    compare(backend, s, ref_fn, dict(teacher_logits=t, divergence="jsd", labels=labels, **kw, **op))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_generalized_jsd_none(backend, beta):
    """reduction='none' is elementwise [n_valid, V] in TRL: its row sums are kd_loss's per-token losses."""
    s, t, labels = draw(2)
    valid = labels != -100
    xr, x = leaf(s), leaf(s)
    ref = T.trl_generalized_jsd_loss(xr, t, labels, beta=beta, temperature=2.0, reduction="none").sum(-1)
    with fd.use_backend(backend):
        loss = fd.kd_loss(x, t, divergence="jsd", beta=beta, temperature=2.0, labels=labels, reduction="none",
                          accum_dtype=F64)
        assert loss.shape == (B, S)
        close(loss.detach()[valid], ref.detach(), "loss")
        assert (loss.detach()[~valid] == 0).all()
        up = torch.linspace(0.5, 2.0, B * S, dtype=F64).reshape(B, S)
        loss.backward(up)
    ref.backward(up[valid])
    close(x.grad, xr.grad, "grad")


@pytest.mark.parametrize("lead", [(B, S), (B * S,)], ids=["BSV", "NV"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_trl_generalized_jsd_without_labels(backend, beta, lead):
    """Without labels TRL's batchmean divides by size(0): B for [B, S, V] (not B·S), N for [N, V]."""
    s, t, _ = draw(3, lead=lead)
    compare(backend, s, lambda x: T.trl_generalized_jsd_loss(x, t, None, beta=beta, temperature=1.5),
            dict(teacher_logits=t, divergence="jsd", beta=beta, temperature=1.5, num_items=lead[0]))


# ------------------------------------------------------------------------------- torchtune
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "sum"])
@pytest.mark.parametrize("neg_inf", [False, True], ids=["finite", "shared-neg-inf-cols"])
def test_torchtune_forward_kl(backend, normalize, neg_inf):
    """torchtune's ForwardKLLoss is −Σ p log q = KL + H(P): value differs by the teacher entropy."""
    s, t, labels = draw(4, lead=(B * S,))
    if neg_inf:  # masked by its inf_mask; p = q = 0 there for kd_loss
        s[:, [2, 30]], t[:, [2, 30]] = -float("inf"), -float("inf")
    valid = labels != -100
    h = teacher_entropy_rows(t)[valid].sum()
    if normalize:
        h = h / valid.sum()
    compare(backend, s, lambda x: T.torchtune_forward_kl(x, t, labels, normalize=normalize),
            dict(teacher_logits=t, divergence="fkl", labels=labels, reduction="batchmean" if normalize else "sum"),
            offset=h)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "sum"])
def test_torchtune_reverse_kl(backend, normalize):
    """ReverseKLLoss is the true KL(Q‖P): equal values and gradients."""
    s, t, labels = draw(5, lead=(B * S,))
    compare(backend, s, lambda x: T.torchtune_reverse_kl(x, t, labels, normalize=normalize),
            dict(teacher_logits=t, divergence="rkl", labels=labels, reduction="batchmean" if normalize else "sum"))


def test_torchtune_kd_recipe(backend):
    """(1 − kd_ratio)·CE + kd_ratio·ForwardKL = kd_loss(hard_label_alpha = 1 − kd_ratio) + kd_ratio·H̄(P)."""
    s, t, labels = draw(6)
    kd_ratio = 0.3
    valid = labels.reshape(-1) != -100
    h = kd_ratio * teacher_entropy_rows(t)[valid].sum() / valid.sum()
    compare(backend, s, lambda x: T.torchtune_kd_recipe_loss(x, t, labels, kd_ratio=kd_ratio),
            dict(teacher_logits=t, divergence="fkl", labels=labels, hard_label_alpha=1 - kd_ratio), offset=h)


def test_torchtune_all_ignored(backend):
    s, t, _ = draw(7, lead=(B * S,))
    labels = torch.full((B * S,), -100)
    ref = T.torchtune_forward_kl(leaf(s), t, labels)
    x = leaf(s)
    with fd.use_backend(backend):
        loss = fd.kd_loss(x, t, labels=labels, accum_dtype=F64)
        loss.backward(torch.tensor(1.7, dtype=F64))
    assert float(loss.detach()) == float(ref) == 0.0
    assert (x.grad == 0).all()


# ------------------------------------------------------------------------------- DistiLLM
@pytest.mark.parametrize("lam", [0.1, 0.3])
def test_distillm_skewed_forward_kl(backend, lam):
    """skewed_forward_kl is −Σ p log(λp + (1−λ)q) = SKL + H(P)."""
    s, t, labels = draw(8)
    valid = labels.reshape(-1) != -100
    h = teacher_entropy_rows(t)[valid].sum() / valid.sum()
    compare(backend, s, lambda x: T.distillm_skewed_forward_kl(x, t, labels, lam=lam),
            dict(teacher_logits=t, divergence="skl", skew=lam, labels=labels), offset=h)


@pytest.mark.parametrize("lam", [0.1, 0.3])
def test_distillm_skewed_reverse_kl(backend, lam):
    s, t, labels = draw(9)
    compare(backend, s, lambda x: T.distillm_skewed_reverse_kl(x, t, labels, lam=lam),
            dict(teacher_logits=t, divergence="srkl", skew=lam, labels=labels))


def test_distillm_tv_distance(backend):
    s, t, labels = draw(10)
    compare(backend, s, lambda x: T.distillm_tv_distance(x, t, labels),
            dict(teacher_logits=t, divergence="tvd", labels=labels))


def test_distillm_forward_reverse_kl(backend):
    s, t, labels = draw(11)
    valid = labels.reshape(-1) != -100
    h = teacher_entropy_rows(t)[valid].sum() / valid.sum()
    compare(backend, s, lambda x: T.distillm_forward_kl(x, t, labels),
            dict(teacher_logits=t, divergence="fkl", labels=labels), offset=h)
    compare(backend, s, lambda x: T.distillm_reverse_kl(x, t, labels),
            dict(teacher_logits=t, divergence="rkl", labels=labels))


# ------------------------------------------------------------------------------- DistillKit
@pytest.mark.parametrize("masking", ["none", "mask", "mask3d", "num_items"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0], ids=lambda v: f"T={v}")
def test_distillkit_dense_kl(backend, temperature, masking):
    """KLDLoss on a DenseSignal: KL at temperature T on both models, × T², / num_items_in_batch."""
    s, t, labels = draw(12)
    mask = labels != -100
    if masking == "none":
        ref_fn = lambda x: T.distillkit_kld_loss(x, t, temperature)
        op = {}
    elif masking == "mask":
        ref_fn = lambda x: T.distillkit_kld_loss(x, t, temperature, mask=mask)
        op = dict(mask=mask)
    elif masking == "mask3d":
        ref_fn = lambda x: T.distillkit_kld_loss(x, t, temperature, mask=mask[..., None])
        op = dict(mask=mask)
    else:
        ref_fn = lambda x: T.distillkit_kld_loss(x, t, temperature, mask=mask, num_items_in_batch=20)
        op = dict(mask=mask, num_items=20)
    compare(backend, s, ref_fn, dict(teacher_logits=t, divergence="fkl", temperature=temperature, t2_scale=True, **op))
