"""TRL-compatible KD losses on fastdistill's fused kernels.

``generalized_jsd_loss`` has the signature and semantics of TRL's
``GKDTrainer.generalized_jsd_loss`` (a staticmethod), so a GKD setup switches with one line::

    from trl.experimental.gkd import GKDTrainer          # (trl.GKDTrainer in older releases)
    from fastdistill.integrations.trl import generalized_jsd_loss
    GKDTrainer.generalized_jsd_loss = staticmethod(generalized_jsd_loss)

Differences, all deliberate: ``reduction="none"`` without ``num_items_in_batch`` is refused (TRL returns
per-vocabulary-entry terms, an ``[n, V]`` tensor that the fused kernel exists to avoid; use
``fastdistill.kd_loss(..., reduction="none")`` for per-token losses; with ``num_items_in_batch`` TRL ignores
``reduction``, and so does this function); ``reduction="mean"`` over zero valid tokens gives 0 where TRL
gives NaN; the teacher is a constant (no gradient reaches ``teacher_logits``: TRL's function differentiates
through both, which matters only if the teacher shares trainable weights with the student); the loss is
fp32 for bf16/fp16/fp32 logits (TRL's is in the logits' dtype) and fp64 for fp64 logits; logits are
``[n, V]`` or ``[B, T, V]`` (TRL also takes a single ``[V]`` row); a teacher vocabulary larger or smaller
than the student's is sliced / −inf-padded as in ``kd_loss`` (TRL raises).
As in TRL, ``labels`` only mark the tokens to ignore (``-100``): any other value, even outside the
vocabulary, counts the token. ``KDLoss`` is the module form of ``kd_loss`` for code that wants a loss object.
"""

from __future__ import annotations

import torch

from fastdistill.modules import KDLoss
from fastdistill.ops.kd_softmax import kd_loss

__all__ = ["KDLoss", "generalized_jsd_loss"]

_REDUCTIONS = ("batchmean", "sum", "mean")


def _label_mask(student_logits, labels) -> torch.Tensor | None:
    """``labels != -100``, kd_loss's mask; a bad ``labels`` is refused here, naming it (kd_loss would name the mask)."""
    if labels is None:
        return None
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels: expected a tensor or None, got {type(labels).__name__}")
    if isinstance(student_logits, torch.Tensor) and student_logits.dim() >= 2:
        lead = student_logits.shape[:-1]
        if labels.device != student_logits.device:
            raise ValueError(f"labels: expected device {student_logits.device} (the device of student_logits), "
                             f"got {labels.device}")
        if labels.shape != lead and labels.shape != (lead.numel(),):
            raise ValueError(f"labels: expected shape {tuple(lead)} (the leading dims of student_logits), "
                             f"got {tuple(labels.shape)}")
    return labels != -100


def generalized_jsd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor | None = None,
                         beta: float = 0.5, temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """TRL's generalised JSD(β) with M = β·P_teacher + (1−β)·Q_student (β = 0: KL(P‖Q), β = 1: KL(Q‖P)),
    both logits divided by ``temperature``; tokens with ``labels == -100`` are ignored.

    Reductions as in TRL: ``num_items_in_batch`` given → Σ / num_items_in_batch (whatever ``reduction``
    says; a tensor stays on its device, no host sync); ``"batchmean"`` → Σ / #valid tokens with labels
    (at least 1), else Σ / ``student_logits.size(0)`` (the batch size for ``[B, T, V]``, as in TRL);
    ``"sum"``; ``"mean"`` → Σ / (#valid tokens · V).
    """
    if reduction not in (*_REDUCTIONS, "none"):
        raise ValueError(f"reduction: expected one of {(*_REDUCTIONS, 'none')}, got {reduction!r}")
    if reduction == "none" and num_items_in_batch is None:
        raise ValueError("reduction: 'none' returns TRL's elementwise [n, V] terms, which the fused kernel never "
                         "materialises; use fastdistill.kd_loss(..., reduction='none') for per-token losses")
    # TRL uses labels as a mask only (labels != -100): the value of a counted label is never read
    mask = _label_mask(student_logits, labels)
    kw = dict(divergence="jsd", beta=beta, temperature=temperature, mask=mask)
    if num_items_in_batch is not None:
        loss = kd_loss(student_logits, teacher_logits, reduction="sum", **kw)
        if isinstance(num_items_in_batch, torch.Tensor):
            return loss / num_items_in_batch.to(loss.device)
        return loss / num_items_in_batch
    if reduction == "batchmean" and labels is None:
        return kd_loss(student_logits, teacher_logits, reduction="sum", **kw) / max(student_logits.size(0), 1)
    return kd_loss(student_logits, teacher_logits, reduction=reduction, **kw)
