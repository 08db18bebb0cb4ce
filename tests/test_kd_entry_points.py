"""The KD entry points agree with each other on what they refuse.

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
