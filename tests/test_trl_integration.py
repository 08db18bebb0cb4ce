"""fastdistill.integrations.trl.generalized_jsd_loss against the fp64 transcription of TRL's
GKDTrainer.generalized_jsd_loss (tests/kd_transcriptions.py), and the KDLoss module."""

from __future__ import annotations

import pytest
import torch

import fastdistill as fd
import kd_transcriptions as T
from fastdistill.integrations.trl import KDLoss, generalized_jsd_loss

F64 = torch.float64


def _draw(lead=(2, 5), V=37, seed=0, labels=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, V, generator=g, dtype=F64) * 2
    t = torch.randn(*lead, V, generator=g, dtype=F64) * 2
    lab = torch.randint(0, V, lead, generator=g)
    lab[..., :2] = -100
    return s, t, (lab if labels else None)


def _check(kw, lead=(2, 5), labels=True, seed=0):
    s, t, lab = _draw(lead, labels=labels, seed=seed)
    xr, x = s.clone().requires_grad_(), s.clone().requires_grad_()
    ref = T.trl_generalized_jsd_loss(xr, t, lab, **kw)
    with fd.use_backend("reference"):
        got = generalized_jsd_loss(x, t, lab, **kw)
    assert got.shape == ref.shape and got.dtype == ref.dtype == F64  # fp64 logits: fp64 statistics and loss
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)
    ref.backward()
    got.backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-9, atol=1e-12 * xr.grad.abs().max().item())


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
def test_matches_trl(beta, reduction, labels):
    _check(dict(beta=beta, temperature=0.9, reduction=reduction), labels=labels)


def test_labels_are_a_mask_as_in_trl():
    """TRL reads labels only as ``labels != -100``: a label of -1 (or >= V) counts its token (before: a
    ValueError on the CPU, a NaN row on a GPU)."""
    s, t, lab = _draw(seed=3)
    lab[1, 3], lab[0, 4] = -1, 10 ** 6
    ref = T.trl_generalized_jsd_loss(s, t, lab, beta=0.5)
    with fd.use_backend("reference"):
        got = generalized_jsd_loss(s, t, lab, beta=0.5)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("num_items", [13, torch.tensor(13)], ids=["int", "tensor"])
def test_num_items_in_batch(num_items):
    _check(dict(beta=0.5, temperature=2.0, num_items_in_batch=num_items))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_num_items_in_batch_overrides_reduction(reduction):
    """As in TRL: with ``num_items_in_batch`` the result is Σ / num_items whatever ``reduction`` says, "none"
    included (it used to raise)."""
    _check(dict(beta=0.3, num_items_in_batch=11, reduction=reduction))


def test_two_dim_logits_without_labels():
    _check(dict(beta=0.5), lead=(7,), labels=False)


def test_reduction_none_refused():
    s, t, lab = _draw()
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(s, t, lab, reduction="none")
    with pytest.raises(ValueError, match="reduction"):
        generalized_jsd_loss(s, t, lab, reduction="avg")
    # a misspelt reduction is refused even where num_items_in_batch makes TRL ignore the reduction
    with pytest.raises(ValueError, match="^reduction: expected one of"):
        generalized_jsd_loss(s, t, lab, reduction="avg", num_items_in_batch=3)


def test_kdloss_module():
    s, t, lab = _draw()
    m = KDLoss(divergence="skl", skew=0.2, temperature=1.5, t2_scale=True)
    assert "skl" in repr(m)
    torch.testing.assert_close(m(s, t, labels=lab),
                               fd.kd_loss(s, t, divergence="skl", skew=0.2, temperature=1.5, t2_scale=True, labels=lab))
    # per-call options override the stored ones
    torch.testing.assert_close(m(s, t, temperature=1.0), fd.kd_loss(s, t, divergence="skl", skew=0.2, t2_scale=True))
    assert KDLoss(hard_label_alpha=0.5)(s, t, labels=lab).isfinite()
    with pytest.raises(ValueError, match="divergence"):
        KDLoss(divergence="kl")
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0.0)
    with pytest.raises(TypeError, match="labels"):
        KDLoss(labels=lab)
    with pytest.raises(TypeError, match="teacher_logits: a per-batch argument"):  # was "got multiple values"
        KDLoss(teacher_logits=t)
    with pytest.raises(TypeError, match="ignore_index: expected an int"):  # was int("x")'s bare ValueError
        KDLoss(ignore_index="x")
    # top-k options are probed with a top-k teacher at construction (before: they raised on the first call)
    with pytest.raises(ValueError, match="zero_tail' defines forward KL only"):
        KDLoss(divergence="rkl", topk_semantics="zero_tail")
    with pytest.raises(ValueError, match="teacher_temperature: only topk_semantics='renorm'"):
        KDLoss(teacher_temperature=2.0, topk_semantics="tail_bucket")
    KDLoss(teacher_temperature=2.0, topk_semantics="renorm")
    # the options are checked on the CPU probe whatever backend is forced (before: a forced triton / cuda backend,
    # which cannot run the CPU probe outside the interpreter, made KDLoss() raise BackendUnavailableError)
    with fd.use_backend("cuda"):
        KDLoss(divergence="jsd")


@pytest.mark.parametrize("lead", [(2, 5), (10,)], ids=["3d", "2d"])
@pytest.mark.parametrize("bad", ["shape", "device", "list"])
def test_bad_labels_named(bad, lead):
    """Labels become kd_loss's mask here: a bad one is refused naming ``labels``, the argument the caller passed
    (before: "mask: expected shape ..." / "mask: expected device ...", and a list raised AttributeError), for
    ``[n, V]`` logits as for ``[B, T, V]``."""
    s, t, lab = _draw(lead)
    lab = {"shape": lab[..., :4], "device": lab.to("meta"), "list": lab.tolist()}[bad]
    with pytest.raises((ValueError, TypeError), match="^labels: "):
        generalized_jsd_loss(s, t, lab)


def test_flat_labels_with_three_dim_logits():
    """``[B·T]`` labels for ``[B, T, V]`` logits (kd_loss's flat mask) give what the ``[B, T]`` labels give."""
    s, t, lab = _draw(seed=5)
    with fd.use_backend("reference"):
        want = generalized_jsd_loss(s, t, lab, beta=0.4)
        got = generalized_jsd_loss(s, t, lab.reshape(-1), beta=0.4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("labels", [True, False], ids=["labels", "no-labels"])
def test_empty_batch_is_zero(labels):
    """No rows at all: batchmean is 0 with or without labels (Σ / max(n, 1); TRL divides 0 by 0), and its gradient
    is empty, not NaN."""
    s = torch.zeros(0, 37, dtype=F64, requires_grad=True)
    t = torch.zeros(0, 37, dtype=F64)
    lab = torch.zeros(0, dtype=torch.long) if labels else None
    with fd.use_backend("reference"):
        loss = generalized_jsd_loss(s, t, lab)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad.shape == (0, 37)
