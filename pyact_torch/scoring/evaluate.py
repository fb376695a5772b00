"""``pyact evaluate``: score a checkpoint on one split and write what a person reads — metrics
(scikit-learn), the per-class table, the confusion matrix picture and one prediction row per
window. The numbers come from the same ``evaluate()`` that validates during training."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Callable

from tqdm import tqdm

from . import metrics
from ..io import storage
from ..training.checkpoint import check_compatible, load_checkpoint
from ..config import EvaluateConfig
from ..errors import UserError
from ..training.validation import evaluate
from ..data.loader import HostBatches, Part, WindowDataset, on_device
from ..model import build_model, reorder_outputs
from ..io.outputs import publish, remove_if_empty, staging
from ..io.resources import check_memory
from ..data.shards import MANIFEST, Manifest, read_manifest, split_shards
from ..training.devices import check_device, chosen_device, device_memory_errors, make_backend


def evaluate_checkpoint(config: EvaluateConfig, progress: bool = True, print_fn: Callable[[str], None] = print) -> dict:
    """``pyact evaluate``: score a checkpoint on one split with the training's ``evaluate()``
    (one replica, XLA or eager CPU) and write metrics.json, per_class.txt,
    confusion_matrix.png and predictions.json to ``config.out``; returns the metrics."""
    config = replace(config, device=chosen_device(config.device, say=print_fn))
    check_device(config.device)
    manifest = read_manifest(config.data)
    split_shards(config.data, manifest, config.split)
    if not manifest.splits[config.split].count:
        raise UserError(
            f"{storage.join(config.data, MANIFEST)}: the {config.split} split has no windows to score; "
            f"choose another --split"
        )
    shape = manifest.clip_shape
    check_memory(
        config.batch_size * math.prod(shape) * (1 + 4),  # the batch as read (uint8) and as input (float32)
        f"--batch-size {config.batch_size} (windows of {'x'.join(map(str, shape))})",
        "lower --batch-size",
    )
    created = not storage.is_gcs(config.out) and not os.path.exists(config.out)
    storage.check_writable(config.out)
    try:
        return _score(config, manifest, created, progress, print_fn)
    except BaseException:
        remove_if_empty(config.out, created)  # a failure before the outputs: no empty folder of ours left
        raise


def _score(
    config: EvaluateConfig, manifest: Manifest, created: bool, progress: bool, print_fn: Callable[[str], None]
) -> dict:
    state, url = load_checkpoint(config.checkpoint, log=print_fn)
    step = state.get("step")
    print_fn(f"checkpoint: {url}" + (f" (step {step})" if isinstance(step, int) else ""))
    classes = manifest.classes
    if list(state["classes"]) != classes and sorted(state["classes"]) == sorted(classes):
        print_fn("note: the checkpoint lists the classes in another order; its outputs are reordered to the manifest's")
        try:
            state = {
                **state,
                "model": reorder_outputs(state["model"], list(state["classes"]), classes),
                "classes": classes,
            }
        except ValueError as exc:
            raise UserError(f"{url}: {exc}") from None
    check_compatible(state, classes, manifest.data_shape, what="score this data with it")
    try:
        model = build_model(
            state["config"].get("model"),
            len(manifest.channels),
            manifest.seq_len,
            manifest.image_size,
            len(classes),
        )
    except ValueError as exc:
        raise UserError(f"{url}: {exc}") from None
    try:
        model.load_state_dict(state["model"])
    except RuntimeError:
        raise UserError(f"{url}: its weights do not fit a {state['config']['model']} model on this data") from None
    backend = make_backend(config.device)
    model.to(backend.device)
    dataset = WindowDataset(config.data, manifest, config.split, config.batch_size, Part(), train=False)
    metas: list[dict] = []
    dataset.meta_sink = metas
    windows = manifest.splits[config.split].count
    bar = tqdm(total=windows, unit="window", desc=f"scoring {config.split}", disable=None if progress else True)
    host = HostBatches(dataset, 0, len(dataset), on_batch=lambda batch: bar.update(int(batch[2].sum())))
    with device_memory_errors(config.batch_size):
        result = evaluate(model, on_device(host, backend), backend, len(classes), keep_outputs=True)
    bar.close()
    if len(metas) != len(result["labels"]) or result["windows"] != windows:
        raise UserError(
            f"{config.data}: scored {result['windows']} windows of the {config.split} split, its manifest "
            f"lists {windows}; check the shards with pyact inspect"
        )
    scores = metrics.score(result["labels"], result["probabilities"], classes)
    scores.update(loss=result["loss"], split=config.split, checkpoint=url, step=state.get("step"))
    rows = metrics.prediction_rows(metas, result["labels"], result["probabilities"], classes, manifest.modality)
    table = metrics.format_table(scores)
    files = {
        "metrics.json": storage.json_bytes(scores),
        "per_class.txt": table.encode(),
        "confusion_matrix.png": metrics.confusion_png(scores["confusion"], classes),
        "predictions.json": storage.json_bytes(rows),
    }
    with staging(config.out, "evaluate", created) as folder:
        publish(config.out, files, {}, folder)
    print_fn(table + f"outputs in {config.out}: {', '.join(files)}")
    return scores
