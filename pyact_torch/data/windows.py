"""pyACT's window rule, no-action balancing and the train/eval/test splits (pure Python).

A sequence of ``n`` frames gives one window per end frame ``i = L-1 .. n-1`` covering frames
``i-L+1 .. i``. Its label is the sequence's action when at least ``L // 2`` of those frames lie
inside an action segment, otherwise ``no-action`` (a segment naming its own action counts for
that action; the one with most frames in the window wins).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from ..errors import UserError
from .labels import NO_ACTION, Sequence

SPLITS = ("train", "eval", "test")


@dataclass(frozen=True)
class Window:
    """Frames ``start .. stop`` (both inclusive) of ``seq``, with its label."""

    seq: Sequence
    start: int
    stop: int
    label: str

    @property
    def key(self) -> str:
        """Unique, stable sample key ``<subject>/<action>/<stop, 6 digits>``, without dots
        (WebDataset splits key from extension at the first dot)."""
        subject = self.seq.subject.replace(".", "_")
        action = self.seq.action.replace(".", "_")
        return f"{subject}/{action}/{self.stop:06d}"


def window_length(sequences: list[Sequence]) -> int:
    """``L``: the smallest segment length over every label file (all splits)."""
    lengths = [segment.len for seq in sequences for segment in seq.segments]
    if not lengths:
        raise UserError("no label file holds an action segment: cannot derive the window length (give --seq-len)")
    return min(lengths)


def label_windows(seq: Sequence, length: int) -> list[Window]:
    """Every window of one sequence, labelled by the ``length // 2`` overlap rule: the action
    with the most frames in the window (a segment's own, else the sequence's) when it has at
    least ``length // 2`` of them."""
    action_at: list[str | None] = [None] * seq.n_frames
    for segment in seq.segments:
        for frame in range(segment.pos, min(segment.pos + segment.len, seq.n_frames)):
            action_at[frame] = seq.action_of(segment)
    need = length // 2
    windows = []
    for stop in range(length - 1, seq.n_frames):
        start = stop - length + 1
        counts = Counter(a for a in action_at[start : stop + 1] if a is not None)
        action, in_action = counts.most_common(1)[0] if counts else (NO_ACTION, 0)
        windows.append(Window(seq, start, stop, action if in_action >= need else NO_ACTION))
    return windows


def balance(windows: list[Window], n_classes: int, rng: random.Random) -> list[Window]:
    """Every action window plus ``floor(action_windows / n_classes)`` no-action windows drawn
    with ``rng`` across all sequences; input order is kept."""
    action = [w for w in windows if w.label != NO_ACTION]
    idle = [i for i, w in enumerate(windows) if w.label == NO_ACTION]
    keep = set(rng.sample(idle, min(len(idle), len(action) // n_classes)))
    return [w for i, w in enumerate(windows) if w.label != NO_ACTION or i in keep]


def split_sequences(
    sequences: list[Sequence], eval_subjects: tuple[str, ...], seed: int
) -> tuple[dict[str, list[Sequence]], str]:
    """Sequences per split, and how the eval split was chosen.

    Eval holds the ``Eval/`` folder's sequences plus the Train subjects named in
    ``eval_subjects``; with neither, one Train subject chosen by ``seed``.
    """
    train_subjects = sorted({s.subject for s in sequences if s.split_dir == "Train"})
    has_eval_dir = any(s.split_dir == "Eval" for s in sequences)
    unknown = [name for name in eval_subjects if name not in train_subjects]
    if unknown:
        raise UserError(
            f"--eval-subjects: no Train subject named {', '.join(unknown)} (Train has: {', '.join(train_subjects)})"
        )
    moved = set(eval_subjects)
    if eval_subjects:
        source = ("Eval/ folder + " if has_eval_dir else "") + f"--eval-subjects {','.join(eval_subjects)}"
    elif has_eval_dir:
        source = "Eval/ folder"
    else:
        if len(train_subjects) < 2:
            raise UserError(
                "cannot choose an eval subject: Train has fewer than 2 subjects and there is no Eval/ folder"
            )
        chosen = random.Random(f"{seed}:eval-subject").choice(train_subjects)
        moved = {chosen}
        source = f"Train subject {chosen}, chosen by --seed {seed}"
    splits: dict[str, list[Sequence]] = {name: [] for name in SPLITS}
    for seq in sequences:
        if seq.split_dir == "Test":
            splits["test"].append(seq)
        elif seq.split_dir == "Eval" or seq.subject in moved:
            splits["eval"].append(seq)
        else:
            splits["train"].append(seq)
    for name in ("train", "test"):
        if not splits[name]:
            raise UserError(f"the {name} split has no usable sequences")
    return splits, source


def plan_split(split: str, sequences: list[Sequence], length: int, n_classes: int, seed: int) -> list[Window]:
    """The windows of one split in their seeded shuffled shard order; train and eval are
    balanced, test keeps every window."""
    windows = [w for seq in sequences for w in label_windows(seq, length)]
    if split != "test":
        windows = balance(windows, n_classes, random.Random(f"{seed}:{split}:no-action"))
    random.Random(f"{seed}:{split}:order").shuffle(windows)
    return windows


def class_counts(windows: list[Window], classes: list[str]) -> dict[str, int]:
    """Windows per class, every class listed (zeros included), in class order."""
    counts = Counter(w.label for w in windows)
    return {name: counts.get(name, 0) for name in classes}
