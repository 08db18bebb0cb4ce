"""``torch.nn.Module`` forms of the losses, for training code that wants a loss object."""

from __future__ import annotations

import torch

from fastdistill._backend import use_backend
from fastdistill.ops.kd_softmax import kd_loss


class KDLoss(torch.nn.Module):
    """``kd_loss`` with its options fixed at construction.

    ``KDLoss(divergence="jsd", beta=0.5, temperature=2.0, t2_scale=True)(student_logits, teacher_logits,
    labels=labels)``. Per-call keyword arguments (``labels``, ``mask``, ``weights``, ``num_items``,
    ``teacher_topk``, ...) are passed through and override the stored options. Options are validated
    at construction, with the same errors ``kd_loss`` raises.
    """

    def __init__(self, divergence: str = "fkl", **options):
        super().__init__()
        self.options = dict(divergence=divergence, **options)
        self._validate()

    _PER_CALL = ("teacher_logits", "labels", "mask", "weights", "teacher_topk", "num_items")

    def _validate(self) -> None:
        for k in self._PER_CALL:
            if k in self.options:
                raise TypeError(f"{k}: a per-batch argument; pass it when calling the loss, not to KDLoss()")
        probe = torch.zeros(1, 2)  # the options are checked on the CPU, whatever backend the calls are forced to
        opts = dict(self.options)
        with use_backend("reference"):
            if "topk_semantics" in opts:  # a top-k loss: probe it with a top-k teacher (its own option checks)
                kd_loss(probe, teacher_topk=(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1)),
                        labels=torch.zeros(1, dtype=torch.long), **opts)
            else:
                kd_loss(probe, probe, labels=torch.zeros(1, dtype=torch.long), **opts)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None = None, **kwargs):
        return kd_loss(student_logits, teacher_logits, **{**self.options, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
