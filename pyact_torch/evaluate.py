"""evaluate(model, batches, backend) -> loss, accuracy and confusion matrix; used by training
(validation every epoch) and by scoring (``score_checkpoint``, ``pyact evaluate``). Padded
windows (mask False) count nowhere, and sums are reduced over replicas, so the numbers do not
depend on the replica count."""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import metrics, storage
from .checkpoint import check_compatible, load_checkpoint
from .config import ScoreConfig
from .errors import UserError
from .loader import HostBatches, Part, WindowDataset, on_device
from .model import build_model, reorder_outputs
from .shards import data_shape, read_manifest, split_shards
from .tpu import Backend


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, backend: Backend, num_classes: int,
             keep_outputs: bool = False) -> dict:
    """Mean cross-entropy, accuracy and the ``num_classes x num_classes`` confusion matrix
    (rows: truth, columns: prediction) over the masked windows of ``batches``. With
    ``keep_outputs`` (scoring, one replica) also ``labels`` and softmax ``probabilities`` of
    every real window, in order, as numpy arrays."""
    model.eval()
    device = backend.device
    loss_sum = torch.zeros((), device=device)
    confusion = torch.zeros(num_classes, num_classes, device=device)
    kept: list[tuple[np.ndarray, np.ndarray]] = []
    for clips, labels, mask in batches:
        logits = model(clips).float()
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
        result["probabilities"] = (np.concatenate([probs for _, probs in kept]) if kept
                                   else np.zeros((0, num_classes), np.float32))
    return result


def _keep(kept: list, probabilities: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
    real = mask.cpu().numpy()
    kept.append((labels.cpu().numpy()[real], probabilities.cpu().numpy()[real]))


def score_checkpoint(config: ScoreConfig, progress: bool = True, print_fn: Callable[[str], None] = print) -> dict:
    """``pyact evaluate``: score a checkpoint on one split with the training's ``evaluate()``
    (one replica, XLA or eager CPU) and write metrics.json, per_class.txt,
    confusion_matrix.png and predictions.json to ``config.out``; returns the metrics."""
    manifest = read_manifest(config.data)
    split_shards(config.data, manifest, config.split)
    storage.check_writable(config.out)
    state, url = load_checkpoint(config.checkpoint, log=print_fn)
    classes = manifest["classes"]
    if list(state["classes"]) != classes and sorted(state["classes"]) == sorted(classes):
        print_fn("note: the checkpoint lists the classes in another order; its outputs are reordered "
                 "to the manifest's")
        state = {**state, "model": reorder_outputs(state["model"], list(state["classes"]), classes), "classes": classes}
    check_compatible(state, classes, data_shape(manifest), what="score this data with it")
    try:
        model = build_model(state["config"].get("model"), len(manifest["channels"]), manifest["seq_len"],
                            manifest["image_size"], len(classes))
    except ValueError as exc:
        raise UserError(f"{url}: {exc}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{url}: its weights do not fit a {state['config']['model']} model on this data") from None
    backend = Backend(config.device)
    model.to(backend.device)
    dataset = WindowDataset(config.data, manifest, config.split, config.batch_size, Part(), train=False)
    metas: list[dict] = []
    dataset.meta_sink = metas
    windows = manifest["splits"][config.split]["count"]
    bar = tqdm(total=windows, unit="window", desc=f"scoring {config.split}", disable=None if progress else True)
    host = HostBatches(dataset, 0, len(dataset), on_batch=lambda batch: bar.update(int(batch[2].sum())))
    result = evaluate(model, on_device(host, backend), backend, len(classes), keep_outputs=True)
    bar.close()
    if len(metas) != len(result["labels"]) or result["windows"] != windows:
        raise RuntimeError(f"scored {result['windows']} windows, the manifest lists {windows}")
    scores = metrics.score(result["labels"], result["probabilities"], classes)
    scores.update(loss=result["loss"], split=config.split, checkpoint=url, step=state.get("step"))
    rows = metrics.prediction_rows(metas, result["labels"], result["probabilities"], classes, manifest["modality"])
    table = metrics.format_table(scores)
    storage.write_json(storage.join(config.out, "metrics.json"), scores)
    storage.write_bytes(storage.join(config.out, "per_class.txt"), table.encode())
    storage.write_bytes(storage.join(config.out, "confusion_matrix.png"),
                        metrics.confusion_png(scores["confusion"], classes))
    storage.write_json(storage.join(config.out, "predictions.json"), rows)
    print_fn(table + f"outputs in {config.out}: metrics.json, per_class.txt, confusion_matrix.png, predictions.json")
    return scores
