"""evaluate(model, batches, backend) -> loss, accuracy and confusion matrix; used by training
(validation every epoch) and by scoring. Padded windows (mask False) count nowhere, and sums
are reduced over replicas, so the numbers do not depend on the replica count."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, backend, num_classes: int) -> dict:
    """Mean cross-entropy, accuracy and the ``num_classes x num_classes`` confusion matrix
    (rows: truth, columns: prediction) over the masked windows of ``batches``."""
    model.eval()
    device = backend.device
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes, num_classes, device=device)
    for clips, labels, mask in batches:
        logits = model(clips).float()
        weight = mask.float()
        loss_sum += (F.cross_entropy(logits, labels, reduction="none") * weight).sum()
        # one-hot products keep shapes static (boolean indexing would recompile on XLA)
        truth = F.one_hot(labels, num_classes).float() * weight[:, None]
        predicted = F.one_hot(logits.argmax(dim=1), num_classes).float()
        confusion += truth.T @ predicted
    loss_sum = backend.all_reduce_sum(loss_sum)
    confusion = backend.all_reduce_sum(confusion)
    confusion = confusion.cpu().round().long()
    total = int(confusion.sum())
    model.train()
    return {
        "loss": float(loss_sum.cpu()) / max(total, 1),
        "accuracy": float(confusion.diag().sum()) / max(total, 1),
        "windows": total,
        "confusion": confusion.tolist(),
    }
