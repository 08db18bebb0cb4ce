"""Independent float64 transcriptions of how public codebases compute logit-KD losses.

Each function takes plain logits (student first, teacher second) and labels / masks as the
codebase receives them and returns the loss tensor with its autograd graph intact: pass a
float64 leaf as the student logits and call ``backward`` to get the codebase's gradient.
Everything runs in float64: the sources' casts (``dtype=torch.float32`` in softmax,
``.float()``, ``.to(out_dtype)``) are dropped and marked "(dtype cast dropped)"; nothing else
is changed, including each codebase's quirks (what it omits, how it normalises, how it masks).
Written from the source files cited above each function (snapshots read via their GitHub
repositories: commit and date given); no fastdistill import here on purpose.

Conventions of the sources, as relevant to fastdistill's ``kd_loss`` (P teacher, Q student):
- TRL ``generalized_jsd_loss``: β=0 is KL(P‖Q), β=1 is KL(Q‖P), otherwise
  β·KL(P‖M) + (1−β)·KL(Q‖M) with M = βP + (1−β)Q built in probability space (via logsumexp);
  temperature divides both models' logits; no T²; ``batchmean`` divides by the count of
  labels != −100 (clamped to ≥ 1), or by ``size(0)`` (the *batch* size, not B·T) without
  labels; ``mean`` is an element mean over [n_valid, V]; ``none`` is elementwise [n_valid, V];
  ``num_items_in_batch`` overrides every reduction with sum / num_items_in_batch.
- torchtune ``ForwardKLLoss`` returns the cross-entropy −Σ p log q (teacher entropy omitted:
  value = true KL + H(P), same gradient); ``ReverseKLLoss`` is the true KL(Q‖P). No temperature.
- DistiLLM ``skewed_forward_kl`` returns −Σ p log(λp + (1−λ)q) (teacher entropy omitted again);
  ``skewed_reverse_kl`` is the true KL(Q ‖ (1−λ)P + λQ); ``tv_distance`` is ½Σ|p − q|. All
  divide by the count of labels != −100 (0/0 = NaN when none is valid; not guarded).
- DistillKit dense KL: KL(P_T‖Q_T) at temperature T on both models, masked, summed, then
  × T² / num_items_in_batch (default: mask.sum(), or B·T without a mask).
- DistillKit sparse KL (offline top-k): student log-softmax over the full vocabulary at T,
  gathered at the ids; missing=ZERO renormalises the stored teacher log-probs over the k ids;
  SYMMETRIC_UNIFORM (no re-tempering) keeps them and adds the tail bucket
  (1−Σp)·log((1−Σp)/(1−Σq)) with both sums clamped to [1e-8, 1−1e-8]; same T² / num_items.
"""
import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------
# huggingface/trl  trl/experimental/gkd/gkd_trainer.py  GKDTrainer.generalized_jsd_loss
# (staticmethod; snapshot f2cd577, 2026-07-24, file last changed in 707a717). The file
# path trl/trainer/gkd_trainer.py no longer exists at that snapshot; the older version there
# had the same body without num_items_in_batch and without the clamp_min(1).
# ----------------------------------------------------------------------------------------
def trl_generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean", num_items_in_batch=None):
    # Apply temperature scaling
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature

    # Compute log probabilities for student and probabilities for teacher
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)

    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        # Compute the log of the mixture distribution
        beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]),
            dim=0,
        )
        # F.kl_div(input, target) = target * (log target - input): the order is swapped vs the paper
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)
        jsd = beta * kl_teacher + (1 - beta) * kl_student

    # Masking
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]

    # Apply reduction
    if num_items_in_batch is not None:
        # Normalize by the global number of valid tokens (gradient accumulation, TRL issue #4719)
        jsd_sum = jsd.sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(jsd_sum.device)
        return jsd_sum / num_items_in_batch
    if reduction == "batchmean":
        denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    elif reduction == "sum":
        return jsd.sum()
    elif reduction == "mean":
        return jsd.mean()
    else:
        return jsd


# ----------------------------------------------------------------------------------------
# pytorch/torchtune  torchtune/modules/loss/kd_losses.py  ForwardKLLoss.forward,
# ReverseKLLoss.forward (snapshot bd2a0fc, 2026-04-23; file last changed in 0a08c2f).
# Inputs are (batch_size*num_tokens, vocab_size) logits and labels of matching leading size;
# the recipe (recipes/knowledge_distillation_single_device.py) adds (1−kd_ratio)·CE itself.
# ----------------------------------------------------------------------------------------
def torchtune_forward_kl(student_logits, teacher_logits, labels, ignore_index=-100, normalize=True):
    teacher_prob = F.softmax(teacher_logits, dim=-1)  # (dtype=torch.float32 cast dropped)
    inf_mask = torch.isinf(student_logits)
    student_logprob = F.log_softmax(student_logits, dim=-1)  # (dtype cast dropped)
    prod_probs = torch.masked_fill(teacher_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != ignore_index).int()
    if not normalize:
        return -torch.sum(x * mask.view(-1), dim=0)

    sum_masks = torch.sum(mask.view(-1), dim=0)
    if sum_masks == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


def torchtune_reverse_kl(student_logits, teacher_logits, labels, ignore_index=-100, normalize=True):
    student_prob = F.softmax(student_logits, dim=-1)  # (dtype cast dropped)

    student_logprob = F.log_softmax(student_logits, dim=-1)  # (dtype cast dropped)
    teacher_logprob = F.log_softmax(teacher_logits, dim=-1)  # (dtype cast dropped)

    inf_mask = torch.isinf(student_logits) | torch.isinf(teacher_logits)

    prod_probs = torch.masked_fill(student_prob * teacher_logprob, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_prob * student_logprob, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)

    mask = (labels != ignore_index).int()
    if not normalize:
        return -torch.sum(x * mask.view(-1), dim=0)
    if torch.sum(mask.view(-1), dim=0) == 0:
        return torch.tensor(0.0, device=x.device)
    return -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)


# pytorch/torchtune  recipes/knowledge_distillation_single_device.py  KDRecipeSingleDevice._loss_step
# and train(): current_loss = (1 − kd_ratio)·class_loss + kd_ratio·kd_loss, with the configs'
# CEWithChunkedOutputLoss (torchtune/modules/loss/ce_chunked_output_loss.py; one chunk here:
# Σ F.cross_entropy(reduction="sum") / #(labels != ignore_index)) and ForwardKLLoss as kd_loss.
def torchtune_kd_recipe_loss(logits, teacher_logits, labels, kd_ratio=0.5, ignore_index=-100):
    labels = labels.reshape(-1)
    logits = logits.reshape(-1, logits.size(-1))
    teacher_logits = teacher_logits.reshape(-1, teacher_logits.size(-1))
    kd_loss = torchtune_forward_kl(logits, teacher_logits, labels, ignore_index=ignore_index)
    total_elements = (labels != ignore_index).sum()
    class_loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / total_elements
    return (1 - kd_ratio) * class_loss + kd_ratio * kd_loss  # (logits.float() dropped)


# ----------------------------------------------------------------------------------------
# jongwooko/distillm  distillm/losses.py  forward_kl, reverse_kl, skewed_forward_kl,
# skewed_reverse_kl, tv_distance (commit 17c0f98). ``no_model_batch["label"]`` is passed here
# as ``labels`` ([B, T], −100 = ignored); logits are [B, T, V].
# ----------------------------------------------------------------------------------------
def distillm_forward_kl(logits, teacher_logits, labels):
    teacher_probs = F.softmax(teacher_logits, dim=-1)  # (dtype cast dropped)
    inf_mask = torch.isinf(logits)
    student_logprobs = F.log_softmax(logits, dim=-1)  # (dtype cast dropped)
    prod_probs = torch.masked_fill(teacher_probs * student_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != -100).int()
    distil_loss = -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
    return distil_loss


def distillm_reverse_kl(logits, teacher_logits, labels):
    student_probs = F.softmax(logits, dim=-1)  # (dtype cast dropped)
    student_logprobs = F.log_softmax(logits, dim=-1)
    teacher_logprobs = F.log_softmax(teacher_logits, dim=-1)
    inf_mask = torch.isinf(teacher_logits) | torch.isinf(logits)
    prod_probs = torch.masked_fill(student_probs * teacher_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    mask = (labels != -100).int()
    distil_loss = -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
    return distil_loss


def distillm_tv_distance(logits, teacher_logits, labels):
    teacher_probs = F.softmax(teacher_logits, dim=-1)  # (dtype cast dropped)
    student_probs = F.softmax(logits, dim=-1)

    mask = (labels != -100).int()
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)
    prod_probs = 0.5 * torch.masked_fill(torch.abs(teacher_probs - student_probs), inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    distil_loss = torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
    return distil_loss


def distillm_skewed_forward_kl(logits, teacher_logits, labels, lam=0.1):
    teacher_probs = F.softmax(teacher_logits, dim=-1)  # (dtype cast dropped)
    student_probs = F.softmax(logits, dim=-1)
    mixed_probs = lam * teacher_probs + (1 - lam) * student_probs
    mixed_logprobs = torch.log(mixed_probs)

    mask = (labels != -100).int()
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)

    prod_probs = torch.masked_fill(teacher_probs * mixed_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    distil_loss = -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
    return distil_loss


def distillm_skewed_reverse_kl(logits, teacher_logits, labels, lam=0.1):
    teacher_probs = F.softmax(teacher_logits, dim=-1)  # (dtype cast dropped)
    student_probs = F.softmax(logits, dim=-1)
    mixed_probs = (1 - lam) * teacher_probs + lam * student_probs

    student_logprobs = F.log_softmax(logits, dim=-1)
    mixed_logprobs = torch.log(mixed_probs)

    mask = (labels != -100).int()
    inf_mask = torch.isinf(logits) | torch.isinf(teacher_logits)

    prod_probs = torch.masked_fill(student_probs * mixed_logprobs, inf_mask, 0)
    prod_probs -= torch.masked_fill(student_probs * student_logprobs, inf_mask, 0)
    x = torch.sum(prod_probs, dim=-1).view(-1)
    distil_loss = -torch.sum(x * mask.view(-1), dim=0) / torch.sum(mask.view(-1), dim=0)
    return distil_loss


# ----------------------------------------------------------------------------------------
# arcee-ai/DistillKit  distillkit/lossfuncs/kl.py  dense_kl_div + KLDLoss.__call__ on a
# DenseSignal (snapshot a61c2e7, 2026-03-14; file from 87a72f6 "Distillkit V2").
# ``student_logits`` / ``teacher_logits`` are the CausalLMOutput.logits / DenseSignal.logits,
# [B, T, V]; ``mask`` is [B, T] or [B, T, 1].
# ----------------------------------------------------------------------------------------
def distillkit_dense_kl_div(logits, target_logits, mask=None, temperature=1.0):
    student_logprobs = torch.log_softmax(logits / temperature, dim=-1)  # (.float() dropped)
    teacher_logprobs = torch.log_softmax(target_logits / temperature, dim=-1)  # (.float() dropped)

    kl_per_element = torch.nn.functional.kl_div(
        input=student_logprobs,
        target=teacher_logprobs,
        reduction="none",
        log_target=True,
    )
    # Sum over the vocabulary dimension (dim=-1) to get KL per token
    kl_per_token = torch.sum(kl_per_element, dim=-1)

    if mask is not None:
        if mask.dim() == 3:
            mask = mask.squeeze(-1)
        kl_per_token = kl_per_token * mask.float()  # (.float() kept: it only turns the bool mask numeric)

    return torch.sum(kl_per_token)  # (.to(out_dtype) dropped)


def distillkit_kld_loss(student_logits, teacher_logits, temperature, mask=None, num_items_in_batch=None):
    """KLDLoss(temperature)(student_outputs, DenseSignal(logits=teacher_logits), mask, num_items_in_batch)."""
    if num_items_in_batch is None:
        if mask is not None:
            num_items_in_batch = mask.float().sum()
        else:
            num_items_in_batch = student_logits.shape[0] * student_logits.shape[1]
    res = distillkit_dense_kl_div(student_logits, teacher_logits, mask=mask, temperature=temperature)
    return res * (temperature**2) / num_items_in_batch


# ----------------------------------------------------------------------------------------
# arcee-ai/DistillKit  sparse (offline top-k) KL, snapshot a61c2e7 (2026-03-14):
#   distillkit/missing_probability.py  MissingProbabilityHandling
#   distillkit/lossfuncs/common.py     get_target_logprobs, get_logprobs, accumulate_over_chunks
#                                      (file last changed in a61c2e7 "Fix circular import")
#   distillkit/lossfuncs/kl.py         sparse_kl_div_inner, sparse_kl_div, KLDLoss.__call__ on a
#                                      SparseSignal (file from 87a72f6 "Distillkit V2")
# ``logits`` [B, T, V] (CausalLMOutput.logits); ``target_ids`` / ``target_values`` [B, T, k]
# (SparseSignal.sparse_ids / sparse_values); ``log_target`` = SparseSignal.log_values;
# ``target_generation_temperature`` = SparseSignal.generation_temperature. KLDLoss does not pass
# student_generation_temperature (default 1.0).
# What the source does, as relevant to fastdistill's top-k modes:
# - student: log_softmax of logits·(1/T) over the full vocabulary, gathered at the ids (never
#   renormalised over the k);
# - ZERO with log-prob targets ALWAYS renormalises the teacher over the k ids (the early return
#   is taken only for SYMMETRIC_UNIFORM without a temperature change; otherwise alpha = 1 and
#   final_lse = logsumexp(values)): p̃_b = p_b / Σ p. Row KL = Σ p̃ (log p̃ − log q_ids).
# - SYMMETRIC_UNIFORM without a temperature change takes the log-probs as given and adds
#   (1−Σp)·(log(1−Σp) − log(1−Σq_ids)), both sums clamped to [eps, 1−eps] (eps = 1e-8).
# - re-tempering (T ≠ generation temperature): p_b^α renormalised, α = T_gen / T, with the
#   leftover mass (1−Σp)^α as a (k+1)-th bucket for SYMMETRIC_UNIFORM.
# - masked rows multiply by the mask; sum; KLDLoss × T² / num_items_in_batch (default
#   mask.float().sum(), or B·T without a mask).
# ----------------------------------------------------------------------------------------
import math  # noqa: E402
from enum import Enum  # noqa: E402


class MissingProbabilityHandling(Enum):
    ZERO = "zero"
    SYMMETRIC_UNIFORM = "symmetric_uniform"


def distillkit_get_target_logprobs(values_in, log_target, distillation_temperature, target_generation_temperature,
                                   missing):
    temperature_change = not math.isclose(
        distillation_temperature, target_generation_temperature
    )
    if log_target:
        if (
            not temperature_change
            and missing == MissingProbabilityHandling.SYMMETRIC_UNIFORM
        ):
            # if we are not changing the temperature and don't need to
            # renormalize to sum to 1 as in the ZERO case, we can just
            # return the input values
            return values_in
        # general approach: convert to probs, apply temperature, renormalize
        alpha = target_generation_temperature / distillation_temperature

        # compute total mass of unscaled target probs
        max_in, _ = values_in.max(dim=-1, keepdim=True)
        lse_in = torch.logsumexp(values_in - max_in, dim=-1, keepdim=True) + max_in
        target_sum = lse_in.exp()
        leftover = (1.0 - target_sum).clamp(0, 1)

        alpha_values_in = alpha * values_in
        # We need sum( p_i^alpha ). In log space: sum( exp(alpha * log p_i) ).
        max_alpha, _ = alpha_values_in.max(dim=-1, keepdim=True)
        alpha_lse = (
            torch.logsumexp(alpha_values_in - max_alpha, dim=-1, keepdim=True)
            + max_alpha
        )
        alpha_sum = alpha_lse.exp()

        if missing == MissingProbabilityHandling.SYMMETRIC_UNIFORM:
            # remaining mass as a (k+1)-th bucket, symmetric in teacher and student
            leftover_alpha = leftover.pow(alpha)
            divisor = alpha_sum + leftover_alpha
            final_lse = divisor.log()
        else:
            # assume the missing tokens have zero probability
            final_lse = alpha_lse
        # final log-probabilities are alpha * log p_i - log(Z)
        return alpha_values_in - final_lse
    else:
        # we have logits, praise be
        if temperature_change:
            logits = values_in * (
                target_generation_temperature / distillation_temperature
            )
        else:
            logits = values_in
        sparse_max = torch.max(logits, dim=-1, keepdim=True).values
        sparse_lse = (
            torch.logsumexp(logits - sparse_max, dim=-1, keepdim=True)  # (.to(torch.float32) dropped)
            + sparse_max
        )  # (.to(values_in.dtype) dropped)
        return logits - sparse_lse


def distillkit_get_logprobs(logits, target_ids, target_values, eps=1e-8, missing=MissingProbabilityHandling.ZERO,
                            log_target=True, distillation_temperature=1.0, target_generation_temperature=1.0,
                            student_generation_temperature=1.0):
    batch_size, seq_len, vocab_size = logits.shape
    assert target_ids.shape[:-1] == (batch_size, seq_len)
    assert target_values.shape == target_ids.shape
    assert distillation_temperature > eps

    if (not log_target) and (missing != MissingProbabilityHandling.ZERO):
        raise ValueError("For log_target=False (teacher inputs are logits), "
                         "MissingProbabilityHandling.SYMMETRIC_UNIFORM is ill-defined.")

    if not math.isclose(distillation_temperature, student_generation_temperature):
        logits = logits * (student_generation_temperature / distillation_temperature)
    student_lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (dtype casts dropped)
    sparse_student_logprobs = logits.gather(-1, target_ids) - student_lse
    del student_lse, logits

    with torch.no_grad():
        sparse_target_logprobs = distillkit_get_target_logprobs(
            target_values,  # (.to(torch.float32) dropped)
            log_target=log_target,
            distillation_temperature=distillation_temperature,
            target_generation_temperature=target_generation_temperature,
            missing=missing,
        )  # (.to(out_dtype) dropped)
    del target_values

    return sparse_student_logprobs, sparse_target_logprobs


def distillkit_sparse_kl_div_inner(logits, target_ids, target_values, mask=None, eps=1e-8,
                                   missing=MissingProbabilityHandling.ZERO, log_target=True, temperature=1.0,
                                   target_generation_temperature=1.0, student_generation_temperature=1.0):
    sparse_student_logprobs, sparse_target_logprobs = distillkit_get_logprobs(
        logits,
        target_ids,
        target_values,
        eps=eps,
        missing=missing,
        log_target=log_target,
        distillation_temperature=temperature,
        target_generation_temperature=target_generation_temperature,
        student_generation_temperature=student_generation_temperature,
    )

    # Terms for non-zero target probabilities
    teacher_sparse_probs = torch.exp(sparse_target_logprobs)
    teacher_prob_sum = teacher_sparse_probs.sum(dim=-1)  # (.to(torch.float32) dropped)
    inner_sum = torch.sum(
        teacher_sparse_probs * (sparse_target_logprobs - sparse_student_logprobs),
        dim=-1,
    )
    del sparse_target_logprobs, teacher_sparse_probs

    # Compute the contribution of missing logits to KL divergence
    if missing == MissingProbabilityHandling.SYMMETRIC_UNIFORM:
        log_teacher_missing = torch.log1p(-teacher_prob_sum.clamp(min=eps, max=1 - eps))
        # (.to(torch.float32) dropped; out-of-place exp instead of exp_: the source's exp_ acts on
        # the cast copy, or for fp32 logits in place on the no-longer-used sparse_student_logprobs)
        student_probs = sparse_student_logprobs.exp()
        student_prob_sum = student_probs.sum(dim=-1)
        del student_probs
        log_student_missing = torch.log1p(-student_prob_sum.clamp(min=eps, max=1 - eps))
        del student_prob_sum
        missing_kl = torch.exp(log_teacher_missing) * (
            log_teacher_missing - log_student_missing
        )
    else:
        # zero probability mass for missing tokens in the teacher: zero contribution
        missing_kl = None
    del sparse_student_logprobs

    if mask is not None:
        if mask.dim() == 3:
            mask = mask.squeeze(-1)
        inner_sum *= mask
        if missing_kl is not None:
            missing_kl *= mask
        del mask

    if missing_kl is not None:
        inner_sum += missing_kl

    return torch.sum(inner_sum)  # (.to(out_dtype) dropped)


def distillkit_accumulate_over_chunks(logits, target_ids, target_values, mask, chunk_length, fn, *args, **kwargs):
    seq_len = logits.shape[1]
    if chunk_length is None:
        chunk_length = seq_len

    total = 0.0

    for start_idx in range(0, seq_len, chunk_length):
        if mask is not None:
            cur_mask = mask[:, start_idx : start_idx + chunk_length]
        else:
            cur_mask = None
        end_idx = min(start_idx + chunk_length, seq_len)
        total += fn(
            logits[:, start_idx:end_idx],
            target_ids[:, start_idx:end_idx],
            target_values[:, start_idx:end_idx],
            cur_mask,
            *args,
            **kwargs,
        )
    return total


def distillkit_sparse_kl_div(logits, target_ids, target_values, mask=None, eps=1e-8,
                             missing=MissingProbabilityHandling.ZERO, log_target=True, temperature=1.0,
                             target_generation_temperature=1.0, student_generation_temperature=1.0,
                             chunk_length=None):
    return distillkit_accumulate_over_chunks(
        logits,
        target_ids,
        target_values,
        mask,
        chunk_length,
        distillkit_sparse_kl_div_inner,
        eps=eps,
        missing=missing,
        log_target=log_target,
        temperature=temperature,
        target_generation_temperature=target_generation_temperature,
        student_generation_temperature=student_generation_temperature,
    )


def distillkit_sparse_kl(logits, target_ids, target_values, mask=None, missing=MissingProbabilityHandling.ZERO,
                         temperature=1.0, target_generation_temperature=1.0, log_target=True, num_items_in_batch=None,
                         chunk_length=None):
    """KLDLoss(temperature, missing, chunk_length)(student_outputs, SparseSignal(...), mask, num_items_in_batch).

    ``missing``: a MissingProbabilityHandling or its value ("zero" / "symmetric_uniform")."""
    missing = MissingProbabilityHandling(missing)
    if num_items_in_batch is None:
        if mask is not None:
            num_items_in_batch = mask.float().sum()
        else:
            num_items_in_batch = logits.shape[0] * logits.shape[1]
    res = distillkit_sparse_kl_div(
        logits=logits,
        target_ids=target_ids,
        target_values=target_values,
        mask=mask,
        missing=missing,
        log_target=log_target,
        temperature=temperature,
        target_generation_temperature=target_generation_temperature,
        chunk_length=chunk_length,
    )
    return res * (temperature**2) / num_items_in_batch
