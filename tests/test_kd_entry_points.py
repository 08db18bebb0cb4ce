"""The KD entry points agree with each other on what they refuse, and on an empty vocabulary.

Every input that ``kd_loss`` refuses (``test_kd.BAD``) is refused by ``fused_linear_kd_loss`` (the same logits
through an identity lm_head, ``student_hidden = logits``, ``student_weight = I``) and by the ``KDLoss`` module,
with an error of the same type naming the same argument; the vocab-parallel losses are held to the same list in
tests/test_vocab_parallel.py (``test_kd_bad_inputs_refused_alike``, one spawn). The values of the entry points
against ``kd_loss`` are checked elsewhere (test_fused_linear_kd.py, test_property_fused_linear_kd.py,
test_vocab_parallel.py, test_trl_integration.py).
"""

from __future__ import annotations

import re

import pytest
import torch
from test_kd import BAD, make

import fastdistill as fd
from fastdistill.integrations.trl import generalized_jsd_loss

F64 = torch.float64
_PER_CALL = ("labels", "mask", "weights", "teacher_topk", "num_items")


def _kd_error(kw: dict) -> BaseException:
    s, t, _ = make((5,), 37)
    kw = dict(kw)
    student, teacher = kw.pop("student_logits", s), kw.pop("teacher_logits", t)
    with pytest.raises((ValueError, TypeError)) as e:
        fd.kd_loss(student, teacher, accum_dtype=F64, **kw)
    return e.value


def _fused(kw: dict):
    s, t, _ = make((5,), 37)
    kw = dict(kw)
    student, teacher = kw.pop("student_logits", s), kw.pop("teacher_logits", t)
    V = student.shape[-1] if isinstance(student, torch.Tensor) and student.dim() else 37
    return fd.fused_linear_kd_loss(student, torch.eye(V, dtype=F64), teacher_logits=teacher, accum_dtype=F64, **kw)


def _module(kw: dict):
    s, t, _ = make((5,), 37)
    kw = dict(kw)
    student, teacher = kw.pop("student_logits", s), kw.pop("teacher_logits", t)
    per_call = {k: kw.pop(k) for k in _PER_CALL if k in kw}
    return fd.KDLoss(accum_dtype=F64, **kw)(student, teacher, **per_call)


# fused_linear_kd_loss's student comes as hidden states (the logits through an identity lm_head); it has no
# inplace_grad (its gradient is always written in place into its own chunk)
ENTRY = {"fused_linear_kd_loss": (_fused, {"student_logits": "student_hidden"}, "inplace"),
         "KDLoss": (_module, {}, None)}


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("entry", list(ENTRY))
def test_bad_inputs_refused_alike(entry, name):
    fn, rename, skip = ENTRY[entry]
    if skip and skip in name:
        pytest.skip(f"{entry} has no such option")
    kw, arg = BAD[name]
    want = _kd_error(kw)
    for old, new in rename.items():
        arg = arg.replace(old, new)
    with fd.use_backend("reference"), pytest.raises((ValueError, TypeError), match=re.compile(arg)) as e:
        fn(kw)
    assert type(e.value) is type(want), f"{entry}: {type(e.value).__name__}, kd_loss: {type(want).__name__} ({want})"


@pytest.mark.parametrize("reduction,num_items", [("mean", None), ("mean", 4), ("mean", torch.tensor(4.0)),
                                                 ("batchmean", 4), ("sum", None), ("none", None)])
def test_empty_vocabulary(use, reduction, num_items):
    """V = 0: every row is invalid (no logit has mass), so the loss is 0 with a zero gradient, as for N = 0, also
    where the "mean" denominator n·V is 0 (before: kd_loss raised ZeroDivisionError with num_items, and
    fused_linear_kd_loss's dh was NaN)."""
    s, t = torch.zeros(3, 0, dtype=F64), torch.zeros(3, 0, dtype=F64)
    kw = dict(reduction=reduction, num_items=num_items)
    x = s.clone().requires_grad_()
    h, W = torch.randn(3, 4, dtype=F64, requires_grad=True), torch.randn(0, 4, dtype=F64, requires_grad=True)
    outs = {"kd_loss": (fd.kd_loss(x, t, **kw), [x]),
            "KDLoss": (fd.KDLoss(reduction=reduction)(x, t, num_items=num_items), [x]),
            "fused_linear_kd_loss": (fd.fused_linear_kd_loss(h, W, teacher_logits=t, **kw), [h, W])}
    if reduction != "none":
        outs["generalized_jsd_loss"] = (generalized_jsd_loss(x, t, reduction=reduction,
                                                             num_items_in_batch=num_items), [x])
    for name, (loss, inputs) in outs.items():
        assert loss.shape == ((3,) if reduction == "none" else ()), (name, loss.shape)
        assert (loss == 0).all(), f"{name}: loss {loss}"
        grads = torch.autograd.grad(loss.sum(), inputs)
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads), f"{name}: gradients {grads}"
