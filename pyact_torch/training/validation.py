"""evaluate(model, batches, backend) -> loss, accuracy and confusion matrix: the validation
loop training runs every epoch, reused by ``pyact evaluate`` (``scoring/evaluate.py``). Padded windows
(mask False) count nowhere, and sums are reduced over replicas, so the numbers do not depend on
the replica count. Imports only torch and numpy: training never loads the scoring stack."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..model import model_input


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, batches: Iterable, backend: Any, num_classes: int, keep_outputs: bool = False
) -> dict:
    """Mean cross-entropy, accuracy and the ``num_classes x num_classes`` confusion matrix
    (rows: truth, columns: prediction) over the masked windows of ``batches`` (the loader's
    uint8 clips). With
    ``keep_outputs`` (scoring, one replica) also ``labels`` and softmax ``probabilities`` of
    every real window, in order, as numpy arrays."""
    model.eval()
    device = backend.device
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes, num_classes, device=device)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for clips, labels, mask in batches:
        backend.check_peers()  # before this batch's work queues behind a collective with a lost peer
        logits = model(model_input(clips)).float()
        if keep_outputs:  # read after the step's graph ran: no extra compile on XLA
            backend.add_step_closure(_keep, (kept, F.softmax(logits, dim=1), labels, mask))
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
    result = {
        "loss": float(loss_sum.cpu()) / max(total, 1),
        "accuracy": float(confusion.diag().sum()) / max(total, 1),
        "windows": total,
        "confusion": confusion.tolist(),
    }
    if keep_outputs:
        result["labels"] = np.concatenate([labels for labels, _ in kept]) if kept else np.zeros(0, np.int64)
        result["probabilities"] = (
            np.concatenate([probs for _, probs in kept]) if kept else np.zeros((0, num_classes), np.float32)
        )
    return result


def _keep(kept: list, probabilities: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
    real = mask.cpu().numpy()
    kept.append((labels.cpu().numpy()[real], probabilities.cpu().numpy()[real]))
