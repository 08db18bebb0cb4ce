"""Parity of fastdistill.kd_loss with offline top-k teachers against DistillKit's sparse KL
(float64 transcription in tests/kd_transcriptions.py: KLDLoss on a SparseSignal).

Teacher data: full teacher logits are drawn, the teacher log-probs at the distillation temperature
T are taken, and their top-k (ids, log-probs) are stored, generation temperature = T, so DistillKit
does not re-temper. Loss and student gradient are compared in fp64 to ~1e-10 relative under a
non-unit upstream gradient, with T² scaling (t2_scale=True), a mask and num_items.

What matches, and how:
- missing=SYMMETRIC_UNIFORM ↔ topk_semantics="tail_bucket": identical on the stored log-probs
  (DistillKit returns them unchanged and adds (1−Σp)·(log(1−Σp) − log(1−Σq_ids)); its clamps of
  both sums to [1e-8, 1 − 1e-8] are inactive on these data).
- missing=ZERO is NOT "zero_tail" on the stored log-probs: DistillKit renormalises the teacher
  over the k ids (p̃ = p / Σp; get_target_logprobs takes the alpha = 1 branch with
  final_lse = logsumexp(values)), while "zero_tail" uses p = exp(log-probs) as given. Hence
  * ZERO(log-probs) = zero_tail(log-probs − logsumexp_k(log-probs)), exactly (test_zero_*);
  * per row, ZERO_i = zero_tail_i / Σp_i − log Σp_i, so with weights = 1/Σp_i
    ZERO = kd_loss(zero_tail, raw log-probs, weights) − c·Σ_valid log Σp_i / n, same gradient
    (test_zero_raw_logprobs; c = T², n = num_items).
- Re-tempering (generation temperature ≠ T) is rejected by kd_loss for these two modes
  (teacher_temperature); feeding kd_loss DistillKit's own re-tempered log-probs reproduces it.
"""
import os
import sys

import pytest
import torch

import fastdistill as fd

sys.path.insert(0, os.path.dirname(__file__))
import kd_transcriptions as T  # noqa: E402
from test_kd_parity import compare  # noqa: E402  (shared fp64 comparison helpers)

F64 = torch.float64
K, V = 8, 97
LEADS = {"BTV": (2, 3), "NV": (5,)}


def draw(seed, lead, temperature):
    """Student logits [*lead, V]; teacher top-k (ids, log-probs at T) [*lead, K]; a bool mask [*lead]."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, V, generator=g, dtype=F64) * 2
    t = torch.randn(*lead, V, generator=g, dtype=F64) * 2
    lp, ids = torch.log_softmax(t / temperature, -1).topk(K, dim=-1)
    perm = torch.rand(*lead, K, generator=g).argsort(-1)  # ids in no particular order
    ids, lp = ids.gather(-1, perm), lp.gather(-1, perm)
    mask = torch.rand(lead, generator=g) < 0.7
    mask.view(-1)[0], mask.view(-1)[-1] = False, True
    return s, ids, lp, mask


def wrapper(lead):
    """DistillKit wants [B, T, ·] logits and [B, T] masks: [N, ·] rows become one sequence of N tokens."""
    return (lambda x: x) if len(LEADS[lead]) == 2 else (lambda x: x.unsqueeze(0))


def settings(masking, mask, dk):
    """(DistillKit kwargs, kd_loss kwargs) for a masking variant."""
    if masking == "none":
        return {}, {}
    if masking == "mask":
        return dict(mask=dk(mask)), dict(mask=mask)
    if masking == "mask3d-chunked":  # [B, T, 1] mask and DistillKit's chunked accumulation
        return dict(mask=dk(mask)[..., None], chunk_length=2), dict(mask=mask)
    return dict(mask=dk(mask), num_items_in_batch=11), dict(mask=mask, num_items=11)


MASKINGS = ["none", "mask", "mask3d-chunked", "num_items"]


@pytest.mark.parametrize("lead", list(LEADS), ids=list(LEADS))
@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=lambda v: f"T={v}")
def test_symmetric_uniform_is_tail_bucket(backend, temperature, masking, lead):
    s, ids, lp, mask = draw(21, LEADS[lead], temperature)
    dk = wrapper(lead)
    assert float(lp.exp().sum(-1).max()) < 1 - 1e-6  # DistillKit's clamps inactive
    dk_kw, op = settings(masking, mask, dk)
    compare(backend, s,
            lambda x: T.distillkit_sparse_kl(dk(x), dk(ids), dk(lp), missing="symmetric_uniform",
                                             temperature=temperature, target_generation_temperature=temperature,
                                             **dk_kw),
            dict(teacher_topk=(ids, lp), topk_semantics="tail_bucket", divergence="fkl", temperature=temperature,
                 t2_scale=True, **op))


@pytest.mark.parametrize("lead", list(LEADS), ids=list(LEADS))
@pytest.mark.parametrize("masking", MASKINGS)
@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=lambda v: f"T={v}")
def test_zero_is_zero_tail_on_renormalised_logprobs(backend, temperature, masking, lead):
    """DistillKit ZERO renormalises the top-k teacher: zero_tail on log-probs − logsumexp_k matches."""
    s, ids, lp, mask = draw(22, LEADS[lead], temperature)
    dk = wrapper(lead)
    dk_kw, op = settings(masking, mask, dk)
    lp_k = lp - lp.logsumexp(-1, keepdim=True)
    compare(backend, s,
            lambda x: T.distillkit_sparse_kl(dk(x), dk(ids), dk(lp), missing="zero",
                                             temperature=temperature, target_generation_temperature=temperature,
                                             **dk_kw),
            dict(teacher_topk=(ids, lp_k), topk_semantics="zero_tail", divergence="fkl", temperature=temperature,
                 t2_scale=True, **op))


@pytest.mark.parametrize("temperature", [1.0, 2.0], ids=lambda v: f"T={v}")
def test_zero_raw_logprobs(backend, temperature):
    """On the stored (unnormalised) log-probs: ZERO_i = zero_tail_i / Σp_i − log Σp_i per row."""
    s, ids, lp, mask = draw(23, LEADS["BTV"], temperature)
    mass = lp.exp().sum(-1)
    n, c = 11, temperature**2
    offset = c * mass.log()[mask].sum() / n
    compare(backend, s,
            lambda x: T.distillkit_sparse_kl(x, ids, lp, mask=mask, missing="zero", temperature=temperature,
                                             target_generation_temperature=temperature, num_items_in_batch=n),
            dict(teacher_topk=(ids, lp), topk_semantics="zero_tail", divergence="fkl", temperature=temperature,
                 t2_scale=True, mask=mask, num_items=n, weights=1.0 / mass),
            offset=-offset)
    # and the plain comparison does differ (the doc's "zero_tail = DistillKit ZERO" needs Σp = 1)
    with fd.use_backend(backend):
        plain = fd.kd_loss(s, teacher_topk=(ids, lp), topk_semantics="zero_tail", temperature=temperature,
                           t2_scale=True, mask=mask, num_items=n, accum_dtype=F64)
    ref = T.distillkit_sparse_kl(s, ids, lp, mask=mask, missing="zero", temperature=temperature,
                                 target_generation_temperature=temperature, num_items_in_batch=n)
    assert abs(float(plain) - float(ref)) > 1e-3 * abs(float(ref))


@pytest.mark.parametrize("missing,semantics", [("zero", "zero_tail"), ("symmetric_uniform", "tail_bucket")])
def test_retempered_teacher(backend, missing, semantics):
    """Generation temperature 1, distillation T = 2: kd_loss refuses teacher_temperature for these modes;
    fed DistillKit's own re-tempered log-probs (a no-grad constant there) it reproduces the loss."""
    temperature, t_gen = 2.0, 1.0
    s, ids, lp, mask = draw(24, LEADS["BTV"], t_gen)
    kind = T.MissingProbabilityHandling(missing)
    lp_re = T.distillkit_get_target_logprobs(lp, True, temperature, t_gen, kind)
    with fd.use_backend(backend), pytest.raises(ValueError, match="teacher_temperature"):
        fd.kd_loss(s, teacher_topk=(ids, lp), topk_semantics=semantics, temperature=temperature,
                   teacher_temperature=temperature / t_gen)
    compare(backend, s,
            lambda x: T.distillkit_sparse_kl(x, ids, lp, mask=mask, missing=missing, temperature=temperature,
                                             target_generation_temperature=t_gen),
            dict(teacher_topk=(ids, lp_re), topk_semantics=semantics, divergence="fkl", temperature=temperature,
                 t2_scale=True, mask=mask))
