"""Detection metrics against the label files (pure Python).

A true segment is a label file's ``_`` element, labelled with its sequence's action; frames
outside every segment are background. Predicted segments are matched per sequence and class,
highest score first, each to the unmatched true segment it overlaps most, when their temporal
IoU (shared frames / frames in either, both inclusive) reaches the threshold. Precision,
recall and F1 are 0 when their denominator is (nothing detected, nothing to detect).

Mean average precision follows the ActivityNet / THUMOS protocol with those same matching
rules: per class, every detection of every sequence ranked by score (ties: sequence order, then
first frame), each a true positive when it matches a still unmatched true segment of its
sequence at the tIoU threshold; average precision by ActivityNet's all-point interpolation
(the area under the precision-recall curve made monotone from the right); the mean over the
classes that have a true segment (a class with detections but no true segment does not count;
one with true segments and no detection counts 0).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from .segments import Detection, frame_labels

THRESHOLDS = (0.3, 0.5, 0.7)
MAP_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)  # THUMOS'14's; their mean is reported too


@dataclass(frozen=True)
class Truth:
    """One labelled action segment: frames ``first .. last`` (inclusive)."""

    label: str
    first: int
    last: int


@dataclass(frozen=True)
class SequenceResult:
    """What detection found in one sequence, beside what its label file says."""

    name: str
    n_frames: int
    truths: tuple[Truth, ...]
    detections: tuple[Detection, ...]


def tiou(a_first: int, a_last: int, b_first: int, b_last: int) -> float:
    """Temporal IoU of two inclusive frame ranges."""
    shared = min(a_last, b_last) - max(a_first, b_first) + 1
    if shared <= 0:
        return 0.0
    return shared / ((a_last - a_first + 1) + (b_last - b_first + 1) - shared)


def _ratios(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def match(truths: tuple[Truth, ...], detections: tuple[Detection, ...], threshold: float) -> list[tuple[str, bool]]:
    """Each detection's label and whether it matched a true segment; unmatched truths are
    returned as ``(label, None)`` rows (``fn``)."""
    taken: set[int] = set()
    rows: list[tuple[str, bool | None]] = []
    for det in sorted(detections, key=lambda d: (-d.score, d.first)):
        best, best_iou = -1, threshold
        for i, truth in enumerate(truths):
            if i in taken or truth.label != det.label:
                continue
            overlap = tiou(det.first, det.last, truth.first, truth.last)
            if overlap >= best_iou and (best < 0 or overlap > best_iou):
                best, best_iou = i, overlap
        if best >= 0:
            taken.add(best)
        rows.append((det.label, best >= 0))
    rows += [(truth.label, None) for i, truth in enumerate(truths) if i not in taken]
    return rows  # type: ignore[return-value]


def average_precision(hits: list[bool], positives: int) -> float:
    """ActivityNet's all-point interpolated average precision of a ranked list of detections
    (``hits``: true positive or not, best first) against ``positives`` true segments."""
    if not positives:
        return 0.0
    precision, recall, tp = [], [], 0
    for rank, hit in enumerate(hits, 1):
        tp += hit
        precision.append(tp / rank)
        recall.append(tp / positives)
    envelope = [0.0] + precision + [0.0]
    levels = [0.0] + recall + [1.0]
    for i in range(len(envelope) - 2, -1, -1):
        envelope[i] = max(envelope[i], envelope[i + 1])
    return sum((levels[i] - levels[i - 1]) * envelope[i] for i in range(1, len(levels)) if levels[i] != levels[i - 1])


def mean_average_precision(results: list[SequenceResult], thresholds: tuple[float, ...] = MAP_THRESHOLDS) -> dict:
    """Per tIoU threshold: each class's average precision and their mean over the classes with
    a true segment; and the mean of those means (``average``)."""
    classes = sorted({t.label for r in results for t in r.truths})
    by_threshold: dict[str, dict[str, Any]] = {}
    for threshold in thresholds:
        per_class = {}
        for label in classes:
            ranked = sorted(
                (
                    (d.score, index, d.first, d)
                    for index, r in enumerate(results)
                    for d in r.detections
                    if d.label == label
                ),
                key=lambda item: (-item[0], item[1], item[2]),
            )
            taken: set[tuple[int, int]] = set()
            hits = []
            for _, index, _, det in ranked:
                truths = results[index].truths
                best, best_iou = -1, threshold
                for i, truth in enumerate(truths):
                    if (index, i) in taken or truth.label != label:
                        continue
                    overlap = tiou(det.first, det.last, truth.first, truth.last)
                    if overlap >= best_iou and (best < 0 or overlap > best_iou):
                        best, best_iou = i, overlap
                if best >= 0:
                    taken.add((index, best))
                hits.append(best >= 0)
            positives = sum(t.label == label for r in results for t in r.truths)
            per_class[label] = average_precision(hits, positives)
        by_threshold[str(threshold)] = {
            "mAP": statistics.fmean(per_class.values()) if per_class else 0.0,
            "per_class": per_class,
        }
    return {
        "thresholds": by_threshold,
        "interpolation": "all-point (ActivityNet)",
        "average": statistics.fmean(row["mAP"] for row in by_threshold.values()) if by_threshold else 0.0,
    }


def detection_metrics(results: list[SequenceResult], background: str) -> dict:
    """Frame accuracy, segment P/R/F1 per IoU threshold (overall and per class), detection
    delay and false alarms per 1,000 background frames over every sequence."""
    right = frames = background_frames = false_alarms = 0
    delays: list[int] = []
    missed = 0
    counts: dict[float, dict[str, list[int]]] = {t: {} for t in THRESHOLDS}  # label -> [tp, fp, fn]
    for result in results:
        truth_frames = frame_labels(result.n_frames, [(t.label, t.first, t.last) for t in result.truths], background)
        predicted = frame_labels(result.n_frames, [(d.label, d.first, d.last) for d in result.detections], background)
        right += sum(a == b for a, b in zip(truth_frames, predicted))
        frames += result.n_frames
        background_frames += truth_frames.count(background)
        for det in result.detections:
            if not any(t.label == det.label and tiou(det.first, det.last, t.first, t.last) > 0 for t in result.truths):
                false_alarms += 1
        for truth in result.truths:
            seen = [
                d.seen_at
                for d in result.detections
                if d.label == truth.label and tiou(d.first, d.last, truth.first, truth.last) > 0
            ]
            if seen:
                delays.append(min(seen) - truth.first)
            else:
                missed += 1
        for threshold in THRESHOLDS:
            for label, matched in match(result.truths, result.detections, threshold):
                row = counts[threshold].setdefault(label, [0, 0, 0])
                row[0 if matched else 1 if matched is False else 2] += 1
    segments: dict[str, Any] = {}
    per_class: dict[str, Any] = {}
    for threshold, by_label in counts.items():
        totals = [sum(row[i] for row in by_label.values()) for i in range(3)]
        segments[str(threshold)] = _ratios(*totals)
        for label in sorted(by_label):
            per_class.setdefault(label, {})[str(threshold)] = _ratios(*by_label[label])
    return {
        "sequences": len(results),
        "frames": frames,
        "frame_accuracy": right / frames if frames else 0.0,
        "segments": segments,
        "per_class": per_class,
        "delay_frames": {
            "mean": statistics.fmean(delays) if delays else None,
            "median": statistics.median(delays) if delays else None,
            "detected": len(delays),
            "missed": missed,
        },
        "mAP": mean_average_precision(results),
        "false_alarms": false_alarms,
        "background_frames": background_frames,
        "false_alarms_per_1000_background_frames": 1000 * false_alarms / background_frames
        if background_frames
        else None,
    }


def format_table(metrics: dict) -> str:
    """The metrics as a printed table: overall lines, then per class at IoU 0.5."""
    seg = metrics["segments"]
    delay = metrics["delay_frames"]
    rate = metrics["false_alarms_per_1000_background_frames"]
    lines = [
        f"{metrics['sequences']} sequences, {metrics['frames']} frames: frame accuracy {metrics['frame_accuracy']:.3f}",
        "segments      "
        + "   ".join(
            f"IoU {t}: P {seg[t]['precision']:.3f} R {seg[t]['recall']:.3f} F1 {seg[t]['f1']:.3f}" for t in seg
        ),
        f"delay         {'-' if delay['mean'] is None else format(delay['mean'], '.1f')} frames mean, "
        f"{'-' if delay['median'] is None else format(delay['median'], '.1f')} median "
        f"({delay['detected']} detected, {delay['missed']} missed)",
        "mAP           "
        + "   ".join(f"tIoU {t}: {row['mAP']:.3f}" for t, row in metrics["mAP"]["thresholds"].items())
        + f"   average {metrics['mAP']['average']:.3f}",
        f"false alarms  {metrics['false_alarms']} ({'-' if rate is None else format(rate, '.2f')} per "
        f"1000 background frames)",
        "",
        f"{'class':<16} {'P@0.5':>6} {'R@0.5':>6} {'F1@0.5':>6} {'AP@0.5':>6} {'true':>5} {'found':>5}",
    ]
    average = metrics["mAP"]["thresholds"].get("0.5", {}).get("per_class", {})
    for label, rows in metrics["per_class"].items():
        row = rows["0.5"]
        ap = f"{average[label]:>6.3f}" if label in average else f"{'-':>6}"
        lines.append(
            f"{label:<16} {row['precision']:>6.3f} {row['recall']:>6.3f} {row['f1']:>6.3f} {ap} "
            f"{row['tp'] + row['fn']:>5} {row['tp'] + row['fp']:>5}"
        )
    return "\n".join(lines) + "\n"
