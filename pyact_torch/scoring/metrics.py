"""Scoring metrics from per-window truths and probabilities (scikit-learn), the per-class
table, the confusion-matrix plot and the prediction rows.

The confusion matrix always has every class of the manifest as a row and a column, in the
manifest's order, so classes that never occur still have their place.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from ..draw.plots import figure_png, pyplot


def score(truth: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Accuracy (= pyACT's micro-F1), macro-F1 and mean class accuracy over the classes that
    occur in ``truth``, top-3 accuracy, per-class precision/recall/F1/support and the
    confusion matrix (rows: truth, columns: prediction)."""
    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if truth.size == 0:
        raise ValueError("no windows to score")
    every = list(range(len(classes)))
    present = sorted(set(truth.tolist()))
    predicted = probabilities.argmax(axis=1)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        truth, predicted, labels=every, zero_division=0
    )
    confusion = skm.confusion_matrix(truth, predicted, labels=every)
    k = min(3, len(classes) - 1)
    top3 = skm.top_k_accuracy_score(truth, probabilities, k=k, labels=every) if k >= 1 else 1.0
    return {
        "windows": int(truth.size),
        "accuracy": float(skm.accuracy_score(truth, predicted)),
        "micro_f1": float(skm.f1_score(truth, predicted, labels=every, average="micro", zero_division=0)),
        "macro_f1": float(skm.f1_score(truth, predicted, labels=present, average="macro", zero_division=0)),
        "mean_class_accuracy": float(np.mean([recall[i] for i in present])),
        "top3_accuracy": float(top3),
        "per_class": [
            {
                "class": name,
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        ],
        "classes": list(classes),
        "confusion": confusion.tolist(),
    }


def format_table(result: dict) -> str:
    """The per-class table and the summary figures as fixed-width text."""
    summary = ("accuracy", "macro_f1", "mean_class_accuracy", "top3_accuracy")
    width = max(len(name) for name in ("class", *summary, *(row["class"] for row in result["per_class"])))
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for row in result["per_class"]:
        lines.append(
            f"{row['class']:<{width}}  {row['precision']:9.3f}  {row['recall']:6.3f}  "
            f"{row['f1']:5.3f}  {row['support']:7d}"
        )
    lines.append("")
    for name in summary:
        lines.append(f"{name:<{width}}  {result[name]:9.4f}")
    lines.append(f"{'windows':<{width}}  {result['windows']:9d}")
    return "\n".join(lines) + "\n"


def confusion_png(confusion: list[list[int]], classes: list[str]) -> bytes:
    """The confusion matrix as PNG: rows normalised to 1 (colour), counts written in the cells."""
    plt = pyplot()
    counts = np.asarray(confusion, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    size = max(6.0, 0.5 * len(classes) + 2)
    figure, axis = plt.subplots(figsize=(size, size), dpi=100)
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="fraction of the true class")
    ticks = range(len(classes))
    axis.set_xticks(ticks, classes, rotation=60, ha="right", fontsize=8)
    axis.set_yticks(ticks, classes, fontsize=8)
    axis.set_xlabel("prediction")
    axis.set_ylabel("truth")
    for row in range(counts.shape[0]):
        for column in range(counts.shape[1]):
            if counts[row, column]:
                colour = "white" if normalised[row, column] > 0.5 else "black"
                axis.text(column, row, str(counts[row, column]), ha="center", va="center", fontsize=7, color=colour)
    axis.set_title("confusion matrix (rows normalised, cells are counts)")
    figure.tight_layout()
    return figure_png(figure)


def prediction_rows(
    metas: list[dict], truth: np.ndarray, probabilities: np.ndarray, classes: list[str], modality: str
) -> list[dict]:
    """One row per window (pyACT's ``video_sec`` rows, extended): first frame path, start,
    stop, truth, prediction and the predicted class's probability."""
    kind = "depth" if modality == "depth" else "color"
    rows = []
    for meta, label, probs in zip(metas, truth, probabilities):
        best = int(np.argmax(probs))
        rows.append(
            {
                "key": meta["key"],
                "path": f"{meta['path']}/{kind}_{meta['start']}.png",
                "sequence": meta["path"],
                "start": meta["start"],
                "stop": meta["stop"],
                "truth": classes[int(label)],
                "prediction": classes[best],
                "probability": round(float(probs[best]), 6),
            }
        )
    return rows
