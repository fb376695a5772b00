"""Segments from per-window probabilities, and detection metrics, on hand-made sequences whose
answers are worked out by hand in the comments."""

from __future__ import annotations

import numpy as np
import pytest

from pyact_torch.detection.metrics import SequenceResult, Truth, detection_metrics, format_table, match, tiou
from pyact_torch.detection.segments import Detection, Segmenter, detect_segments, frame_labels

CLASSES = ["x", "y", "no-action"]
BG = "no-action"


def one_hot(labels: list[str]) -> np.ndarray:
    return np.array([[float(c == label) for c in CLASSES] for label in labels])


def windows_of(n_frames: int, spans: list[tuple[str, int, int]], seq_len: int = 6) -> list[str]:
    """Labels of the windows ending at frames L-1 .. n-1 by pyACT's rule, written out here
    (not taken from windows.py): an action when at least L // 2 of the window's frames are."""
    labels = []
    for stop in range(seq_len - 1, n_frames):
        label = BG
        for name, first, last in spans:
            if sum(first <= f <= last for f in range(stop - seq_len + 1, stop + 1)) >= seq_len // 2:
                label = name
        labels.append(label)
    return labels


def test_tiou_edge_cases():
    assert tiou(3, 9, 3, 9) == 1.0
    assert tiou(0, 4, 5, 9) == 0.0  # touching, no shared frame
    assert tiou(0, 4, 4, 8) == pytest.approx(1 / 9)  # one shared frame of nine
    assert tiou(2, 3, 0, 9) == pytest.approx(2 / 10)  # contained
    assert tiou(0, 5, 2, 7) == 0.5  # 4 shared of 8: exactly the threshold
    assert tiou(7, 7, 7, 7) == 1.0  # one-frame segments


def test_a_perfect_classifier_gives_back_the_labelled_frames():
    # truth x on frames 10..19 of 30: windows ending at 12..22 hold >= 3 of those frames
    labels = windows_of(30, [("x", 10, 19)])
    assert [i + 5 for i, label in enumerate(labels) if label == "x"] == list(range(12, 23))
    found = detect_segments(one_hot(labels), 5, CLASSES, BG, 6, smooth=1, min_length=1)
    assert found == [Detection("x", 10, 19, 1.0, seen_at=12, decided_at=23)]


def test_smoothing_delays_but_the_lag_is_taken_back():
    # k=3: the mean of windows 10,11,12 is 1/3 x -> background; x from stop 13 (2/3) to 23 (2/3);
    # the run 13..23 maps to 13-2-1 = 10 .. 23-3-1 = 19; min length 3 is reached at stop 15
    labels = windows_of(30, [("x", 10, 19)])
    found = detect_segments(one_hot(labels), 5, CLASSES, BG, 6, smooth=3, min_length=3)
    assert len(found) == 1
    assert (found[0].first, found[0].last, found[0].seen_at, found[0].decided_at) == (10, 19, 15, 24)
    assert found[0].score == pytest.approx((2 / 3 * 2 + 1 * 9) / 11)  # 2/3 at both ends, 1 inside


def test_two_segments_one_at_the_first_frame_one_at_the_last():
    # x on 0..7: windows ending 5..10 are x (stop 10 covers 5..10 -> 5,6,7); the run starts at the
    # stream's first window, so it starts at frame 0. y on 24..29: windows 26..29 are y and the
    # sequence ends inside it: it lasts to the last frame.
    labels = windows_of(30, [("x", 0, 7), ("y", 24, 29)])
    found = detect_segments(one_hot(labels), 5, CLASSES, BG, 6, smooth=1, min_length=1)
    assert [(d.label, d.first, d.last, d.decided_at) for d in found] == [("x", 0, 7, 11), ("y", 24, 29, 29)]


def test_short_runs_are_dropped_and_the_online_events_come_in_order():
    labels = [BG] * 3 + ["y"] * 2 + [BG] * 3 + ["x"] * 4 + [BG] * 2  # stops 5..18
    segmenter = Segmenter(CLASSES, BG, 6, smooth=1, min_length=3)
    events = []
    for stop, row in enumerate(one_hot(labels), start=5):
        events += [(stop, kind, d.label) for kind, d in segmenter.push(stop, row)]
        if stop == 16:  # x runs 13..16 and was announced at 15
            assert segmenter.active is not None and segmenter.active.label == "x"
    events += [(18, kind, d.label) for kind, d in segmenter.finish(18)]
    # the y run (stops 8,9) is 2 long: never announced; x (stops 13..16) starts at 15, ends at 17
    assert events == [(15, "start", "x"), (17, "end", "x")]
    assert segmenter.active is None


def test_nothing_detected_when_everything_is_background():
    assert detect_segments(one_hot([BG] * 20), 5, CLASSES, BG, 6, smooth=5, min_length=1) == []


def test_frame_labels():
    assert frame_labels(6, [("x", 1, 2), ("y", 4, 9)], BG) == [BG, "x", "x", BG, "y", "y"]


def det(label, first, last, score=1.0, seen_at=0):
    return Detection(label, first, last, score, seen_at, last)


def test_metrics_on_two_sequences_worked_out_by_hand():
    a = SequenceResult(
        "A",
        20,
        (Truth("x", 2, 7), Truth("x", 12, 17)),
        (det("x", 2, 7, 0.9, 5), det("x", 13, 19, 0.8, 15), det("y", 9, 10, 0.5, 10)),
    )
    b = SequenceResult("B", 10, (Truth("y", 0, 9),), (det("y", 0, 4, 0.7, 5),))
    m = detection_metrics([a, b], BG)
    # IoU: x1 1.0, x2 5/8 = 0.625, y in A matches nothing, B's y 5/10 = 0.5
    for t in ("0.3", "0.5"):  # TP 3, FP 1, FN 0
        assert m["segments"][t] == pytest.approx(
            {"precision": 0.75, "recall": 1.0, "f1": 6 / 7, "tp": 3, "fp": 1, "fn": 0}
        )
    # at 0.7 only x1 matches: TP 1, FP 3, FN 2 -> P 1/4, R 1/3, F1 2/7
    assert m["segments"]["0.7"] == pytest.approx(
        {"precision": 0.25, "recall": 1 / 3, "f1": 2 / 7, "tp": 1, "fp": 3, "fn": 2}
    )
    assert m["per_class"]["x"]["0.5"]["f1"] == 1.0
    assert m["per_class"]["y"]["0.5"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "tp": 1, "fp": 1, "fn": 0}
    )
    # frames: A right on 0,1,2-7,8,11,13-17 = 15 of 20; B right on 0-4 = 5 of 10
    assert m["frame_accuracy"] == pytest.approx(20 / 30)
    # delays: 5-2, 15-12, 5-0
    assert m["delay_frames"] == {"mean": pytest.approx(11 / 3), "median": 3, "detected": 3, "missed": 0}
    # one false alarm (y in A) over A's 8 background frames (B has none)
    assert (m["false_alarms"], m["background_frames"]) == (1, 8)
    assert m["false_alarms_per_1000_background_frames"] == pytest.approx(125.0)
    assert "F1 0.857" in format_table(m)


def test_higher_score_matches_first_and_a_duplicate_is_a_false_positive():
    truths = (Truth("x", 0, 9),)
    rows = match(truths, (det("x", 0, 9, 0.6), det("x", 0, 8, 0.9)), 0.5)
    assert rows == [("x", True), ("x", False)]  # the 0.9 one (IoU 0.9) takes the segment
    assert match(truths, (), 0.5) == [("x", None)]


def test_nothing_detected_and_everything_detected():
    truths = (Truth("x", 3, 8), Truth("x", 12, 15))
    none = detection_metrics([SequenceResult("A", 20, truths, ())], BG)
    assert none["segments"]["0.5"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 2}
    assert none["frame_accuracy"] == pytest.approx(10 / 20)  # the 10 background frames
    assert none["delay_frames"] == {"mean": None, "median": None, "detected": 0, "missed": 2}
    assert none["false_alarms_per_1000_background_frames"] == 0.0
    everything = detection_metrics(
        [SequenceResult("A", 20, truths, (det("x", 3, 8, seen_at=5), det("x", 12, 15, seen_at=14)))], BG
    )
    for t in ("0.3", "0.5", "0.7"):
        assert everything["segments"][t]["f1"] == 1.0
    assert everything["frame_accuracy"] == 1.0
    assert everything["delay_frames"]["mean"] == pytest.approx((2 + 2) / 2)
    # negative control: the same detections one class off score nothing
    wrong = detection_metrics([SequenceResult("A", 20, truths, (det("y", 3, 8), det("y", 12, 15)))], BG)
    assert wrong["segments"]["0.5"]["f1"] == 0.0 and wrong["false_alarms"] == 2
