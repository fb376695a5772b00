"""The window rule, balancing and splits, on small hand-computed cases."""

import random

import pytest

from pyact_torch.errors import UserError
from pyact_torch.data.labels import ACTIONS, NO_ACTION, Segment, Sequence, class_list
from pyact_torch.data.windows import balance, label_windows, plan_split, split_sequences, window_length


def seq(n, *segments, split="Train", subject="s1", action="asl-z"):
    return Sequence(split, subject, action, n, tuple(Segment(p, n) for p, n in segments))


def labels(windows):
    return [(w.start, w.stop, w.label != NO_ACTION) for w in windows]


def test_half_window_boundary():
    # segment frames 6..11; L=6 needs 3 frames inside
    got = labels(label_windows(seq(14, (6, 6)), 6))
    assert got == [
        (0, 5, False),
        (1, 6, False),
        (2, 7, False),
        (3, 8, True),
        (4, 9, True),
        (5, 10, True),
        (6, 11, True),
        (7, 12, True),
        (8, 13, True),
    ]


def test_odd_length_uses_floor_half():
    # L=5 needs 2 frames inside; segment frames 5..6 only
    got = [inside for _, _, inside in labels(label_windows(seq(12, (5, 2)), 5))]
    assert got == [False, False, True, True, True, True, False, False]  # stops 4..11


def test_several_segments():
    # inside: 2,3,4 and 12..17
    got = [w.label for w in label_windows(seq(20, (2, 3), (12, 6)), 6)]
    expected = ["asl-z"] * 3 + [NO_ACTION] * 6 + ["asl-z"] * 6  # stops 5-7, 8-13, 14-19
    assert got == expected


def test_segment_ending_on_last_frame():
    windows = label_windows(seq(10, (6, 4)), 6)
    assert [(w.stop, w.label) for w in windows] == [
        (5, NO_ACTION),
        (6, NO_ACTION),
        (7, NO_ACTION),
        (8, "asl-z"),
        (9, "asl-z"),
    ]


def test_sequence_shorter_than_window_gives_nothing():
    assert label_windows(seq(5, (0, 5)), 6) == []


def test_length_is_taken_across_splits():
    sequences = [
        seq(30, (1, 9), (15, 8)),
        seq(30, (3, 6), split="Test", subject="t1"),
        seq(30, (2, 7), split="Eval", subject="e1"),
    ]
    assert window_length(sequences) == 6
    with pytest.raises(UserError):
        window_length([seq(10)])


def test_class_order_is_sorted_actions_then_no_action():
    shuffled = list(ACTIONS)
    random.Random(3).shuffle(shuffled)
    assert class_list(shuffled) == [
        "asl-bathroom",
        "asl-blue",
        "asl-green",
        "asl-j",
        "asl-milk",
        "asl-scissors",
        "asl-where",
        "asl-yellow",
        "asl-you",
        "asl-z",
        "ui-circle",
        "ui-click",
        "ui-doubleclick",
        "ui-keyTap",
        "ui-screenTap",
        "ui-swipe",
        "no-action",
    ]


def test_balance_keeps_all_action_windows_and_floor_share_of_no_action():
    sequences = [seq(60, (10, 20), subject=f"s{i}") for i in range(3)]
    windows = [w for s in sequences for w in label_windows(s, 6)]
    n_action = sum(w.label != NO_ACTION for w in windows)
    n_idle = len(windows) - n_action
    assert (n_action, n_idle) == (63, 102)  # 21 action windows per sequence (stops 12..32)
    kept = balance(windows, 17, random.Random(0))
    assert sum(w.label != NO_ACTION for w in kept) == 63
    assert sum(w.label == NO_ACTION for w in kept) == 63 // 17 == 3
    again = balance(windows, 17, random.Random(0))
    assert kept == again
    others = {tuple(balance(windows, 17, random.Random(s))) for s in range(6)}
    assert len(others) > 1  # the draw depends on the seed


def test_balance_keeps_every_no_action_window_when_too_few():
    windows = label_windows(seq(40, (0, 40)), 6) + label_windows(seq(8), 6)
    kept = balance(windows, 2, random.Random(0))
    assert len(kept) == len(windows)


def test_test_split_keeps_every_window_and_order_is_seeded():
    sequences = [seq(30, (5, 8), subject="t1", split="Test"), seq(25, (2, 6), subject="t2", split="Test")]
    plan = plan_split("test", sequences, 6, 17, seed=4)
    assert len(plan) == (30 - 5) + (25 - 5)
    assert plan == plan_split("test", sequences, 6, 17, seed=4)
    assert plan != plan_split("test", sequences, 6, 17, seed=5)


def test_eval_split_from_eval_folder_flag_or_seed():
    train = [seq(20, (1, 6), subject=s) for s in ("a", "b", "c")]
    test = [seq(20, (1, 6), subject="t", split="Test")]
    evals = [seq(20, (1, 6), subject="e", split="Eval")]
    splits, source = split_sequences(train + evals + test, (), 0)
    assert [s.subject for s in splits["eval"]] == ["e"] and len(splits["train"]) == 3
    assert source == "Eval/ folder"
    splits, source = split_sequences(train + test, ("b",), 0)
    assert [s.subject for s in splits["eval"]] == ["b"]
    assert sorted(s.subject for s in splits["train"]) == ["a", "c"]
    # both: the folder's sequences and the named subject, and the printed source says both
    splits, source = split_sequences(train + evals + test, ("b",), 0)
    assert sorted(s.subject for s in splits["eval"]) == ["b", "e"] and source == "Eval/ folder + --eval-subjects b"
    chosen = {split_sequences(train + test, (), seed)[0]["eval"][0].subject for seed in range(20)}
    assert len(chosen) > 1 and chosen <= {"a", "b", "c"}
    splits, source = split_sequences(train + test, (), 7)
    assert splits["eval"][0].subject in source and "--seed 7" in source
    with pytest.raises(UserError, match="no Train subject named zz"):
        split_sequences(train + test, ("zz",), 0)


def test_a_segment_naming_its_own_action_labels_its_windows():
    # ui-swipe on frames 2..9 (named in the file), the folder's asl-z on 12..19; L=6 needs 3
    sequence = Sequence("Train", "s1", "asl-z", 30, (Segment(2, 8, "ui-swipe"), Segment(12, 8)))
    got = [w.label for w in label_windows(sequence, 6)]
    # stops 5..12: swipe; 13: 2 frames of each, neither has 3; 14..22: asl-z; 23..29: background
    assert got == ["ui-swipe"] * 8 + [NO_ACTION] + ["asl-z"] * 9 + [NO_ACTION] * 7
    # the same file without its own action: the folder's action throughout, as always
    plain = [w.label for w in label_windows(seq(30, (2, 8), (12, 8)), 6)]
    assert plain == ["asl-z"] * 8 + ["asl-z"] + ["asl-z"] * 9 + [NO_ACTION] * 7
