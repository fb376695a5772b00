"""Mean average precision (ActivityNet / THUMOS protocol): hand-worked cases with known answers,
and agreement with an implementation written here from the protocol's definition."""

from __future__ import annotations

import random

import pytest

from pyact_torch.detection.metrics import (
    SequenceResult,
    Truth,
    average_precision,
    detection_metrics,
    mean_average_precision,
)
from pyact_torch.detection.segments import Detection


def det(label, first, last, score):
    return Detection(label, first, last, score, first, last)


def result(truths, detections, name="s", n_frames=200):
    return SequenceResult(name, n_frames, tuple(Truth(*t) for t in truths), tuple(det(*d) for d in detections))


def ap_at(results, label, threshold=0.5):
    return mean_average_precision(results, (threshold,))["thresholds"][str(threshold)]["per_class"][label]


def test_a_perfect_detector_scores_1():
    results = [
        result([("a", 10, 19), ("b", 40, 59)], [("a", 10, 19, 0.9), ("b", 40, 59, 0.8)]),
        result([("a", 5, 25)], [("a", 5, 25, 0.7)], name="t"),
    ]
    report = mean_average_precision(results)
    assert all(row["mAP"] == 1.0 for row in report["thresholds"].values()) and report["average"] == 1.0


def test_one_false_positive_ranked_first():
    # ranked: FP, TP, TP of 2 positives: precision 0, 1/2, 2/3 at recall 0, 1/2, 1
    # envelope from the right: 2/3 at both recall steps -> AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3
    results = [result([("a", 10, 19), ("a", 50, 59)], [("a", 100, 110, 0.95), ("a", 10, 19, 0.9), ("a", 50, 59, 0.8)])]
    assert ap_at(results, "a") == pytest.approx(2 / 3, abs=1e-12)
    # ranked last it costs nothing: TP, TP, FP -> AP 1
    results = [result([("a", 10, 19), ("a", 50, 59)], [("a", 100, 110, 0.5), ("a", 10, 19, 0.9), ("a", 50, 59, 0.8)])]
    assert ap_at(results, "a") == 1.0


def test_a_class_without_detections_scores_0_and_counts_in_the_mean():
    results = [result([("a", 10, 19), ("b", 40, 59)], [("a", 10, 19, 0.9)])]
    report = mean_average_precision(results, (0.5,))["thresholds"]["0.5"]
    assert report["per_class"] == {"a": 1.0, "b": 0.0} and report["mAP"] == 0.5
    # a class with detections but no true segment does not count
    results = [result([("a", 10, 19)], [("a", 10, 19, 0.9), ("c", 80, 90, 0.99)])]
    assert mean_average_precision(results, (0.5,))["thresholds"]["0.5"] == {"mAP": 1.0, "per_class": {"a": 1.0}}


def test_ties_rank_by_sequence_then_first_frame():
    # two detections of score 0.8: the first sequence's (a FP) ranks before the second's (a TP)
    results = [
        result([("a", 10, 19)], [("a", 150, 160, 0.8)], name="s1"),
        result([("a", 10, 19)], [("a", 10, 19, 0.8)], name="s2"),
    ]
    assert ap_at(results, "a") == pytest.approx(0.5 * 0.5, abs=1e-12)  # FP, TP: precision 1/2 at recall 1/2
    assert ap_at(list(reversed(results)), "a") == pytest.approx(0.5, abs=1e-12)  # TP first: precision 1 at 1/2


def test_a_duplicate_detection_is_a_false_positive_and_thresholds_matter():
    # truth 10..19; detection 10..24 has tIoU 10/15 = 0.667: a TP at 0.5 and 0.6, not at 0.7
    results = [result([("a", 10, 19)], [("a", 10, 24, 0.9), ("a", 10, 19, 0.8)])]
    report = mean_average_precision(results)["thresholds"]
    assert report["0.5"]["mAP"] == 1.0  # the first matches; the duplicate is a FP ranked after
    assert report["0.7"]["mAP"] == pytest.approx(0.5, abs=1e-12)  # FP then TP


def reference_map(results, threshold):
    """The protocol from its definition, written independently: for each class, detections in
    descending score (ties: sequence, first frame); a detection is a TP when some unmatched true
    segment of its class in its sequence has tIoU >= threshold (the one of highest tIoU, the
    earliest listed on a tie); AP = (1/P) * sum over TPs of the highest precision at any rank
    at or after it (all-point interpolation); mAP over classes with P > 0."""

    def overlap(a, b):
        inter = len(set(range(a[0], a[1] + 1)) & set(range(b[0], b[1] + 1)))
        union = len(set(range(a[0], a[1] + 1)) | set(range(b[0], b[1] + 1)))
        return inter / union

    labels = sorted({t.label for r in results for t in r.truths})
    aps = []
    for label in labels:
        ranked = sorted(
            [(d, s) for s, r in enumerate(results) for d in r.detections if d.label == label],
            key=lambda pair: (-pair[0].score, pair[1], pair[0].first),
        )
        used, flags = set(), []
        for d, s in ranked:
            candidates = [
                (overlap((d.first, d.last), (t.first, t.last)), -i, i)
                for i, t in enumerate(results[s].truths)
                if t.label == label and (s, i) not in used
            ]
            candidates = [c for c in candidates if c[0] >= threshold]
            if candidates:
                used.add((s, max(candidates)[2]))
            flags.append(bool(candidates))
        positives = sum(t.label == label for r in results for t in r.truths)
        precisions = [sum(flags[: k + 1]) / (k + 1) for k in range(len(flags))]
        total = sum(max(precisions[k:]) for k in range(len(flags)) if flags[k])
        aps.append(total / positives)
    return sum(aps) / len(aps)


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_an_independent_implementation_on_random_detections(seed):
    rng = random.Random(seed)
    labels = ["a", "b", "c", "d"]
    results = []
    for s in range(5):
        truths, start = [], rng.randrange(0, 20)
        while start < 400:
            length = rng.randrange(8, 40)
            truths.append((rng.choice(labels[:3]), start, min(start + length, 499)))  # "d" never true
            start += length + rng.randrange(5, 60)
        detections = []
        for label, first, last in truths:
            for _ in range(rng.randrange(0, 3)):  # misses, hits, near misses, duplicates
                shift = rng.randrange(-12, 13)
                detections.append(
                    (
                        rng.choice(labels) if rng.random() < 0.2 else label,
                        max(0, first + shift),
                        max(0, first + shift) + (last - first) + rng.randrange(-6, 7),
                        round(rng.random(), 1),
                    )
                )  # rounded: many ties
        for _ in range(rng.randrange(0, 6)):
            first = rng.randrange(0, 480)
            detections.append((rng.choice(labels), first, first + rng.randrange(3, 30), round(rng.random(), 1)))
        results.append(result(truths, [d for d in detections if d[2] >= d[1]], name=f"s{s}", n_frames=500))
    for threshold in (0.3, 0.5, 0.7):
        ours = mean_average_precision(results, (threshold,))["thresholds"][str(threshold)]["mAP"]
        assert ours == pytest.approx(reference_map(results, threshold), abs=1e-9)
    assert 0.05 < ours < 0.95  # a real comparison, neither all hits nor all misses


def test_average_precision_edge_cases_and_metrics_carry_map():
    assert average_precision([], 3) == 0.0 and average_precision([True], 0) == 0.0
    assert average_precision([True, False, True], 2) == pytest.approx(0.5 + 0.5 * 2 / 3)
    metrics = detection_metrics([result([("a", 10, 19)], [("a", 10, 19, 0.9)])], "no-action")
    assert metrics["mAP"]["thresholds"]["0.5"]["mAP"] == 1.0 and metrics["mAP"]["average"] == 1.0
