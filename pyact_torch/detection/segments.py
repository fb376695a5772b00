"""Per-window class probabilities -> smoothed labels -> action segments, online (numpy only).

The window ending at frame ``i`` (frames ``i-L+1 .. i``) is classified when frame ``i``
arrives. Its probabilities are averaged with those of the ``k - 1`` windows before it (causal:
a live stream has no future), the smoothed label is their argmax, and a run of windows with
the same label is one candidate segment. An action run shorter than the minimum length is
dropped (background); ``no-action`` is background.

A run of action windows ending at frames ``a .. b`` is reported as frames
``a - (need - 1) .. b - (L - need)`` (``need = L // 2``), moved back by the smoothing lag
``(k - 1) // 2``: this inverts pyACT's window rule (a window is an action when at least
``need`` of its frames are), so a perfect classifier reports exactly the labelled frames. A run
that begins at the stream's first window starts at frame 0, and one still going when the
stream ends lasts to its last frame (the windows that would have ended it do not exist).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Detection:
    """An action segment found in a stream: frames ``first .. last`` (inclusive), its mean
    smoothed probability, the stream frame at which it was first announced (its run reached
    the minimum length) and the frame at which it was decided (its run ended)."""

    label: str
    first: int
    last: int
    score: float
    seen_at: int
    decided_at: int

    def as_dict(self) -> dict:
        return asdict(self)


class Segmenter:
    """Smooths each window's probabilities and cuts the stream into :class:`Detection` s."""

    def __init__(self, classes: list[str], background: str, seq_len: int, smooth: int, min_length: int):
        if smooth < 1 or smooth % 2 == 0 or min_length < 1:
            raise ValueError(
                "the smoothing window must be odd (its lag whole frames) and the minimum length at least 1"
            )
        self.classes, self.background = list(classes), classes.index(background)
        self.need, self.seq_len = seq_len // 2, seq_len
        self.lag, self.min_length = (smooth - 1) // 2, min_length
        self._recent: deque[np.ndarray] = deque(maxlen=smooth)
        self._label, self._first_stop, self._last_stop = -1, -1, -1  # the current run
        self._scores: list[float] = []
        self._seen_at = -1
        self._stream_start = -1
        self.now: tuple[str, float] | None = None  # the latest smoothed label and its probability

    def push(self, stop: int, probabilities: np.ndarray) -> list[tuple[str, Detection]]:
        """Add the window ending at frame ``stop``; returns what was decided there:
        ``("end", d)`` for a segment that just ended, ``("start", d)`` for one that just
        reached the minimum length (``d.last`` and ``d.decided_at`` are then provisional)."""
        if self._stream_start < 0:
            self._stream_start = stop
        self._recent.append(np.asarray(probabilities, np.float64))
        smoothed = np.mean(self._recent, axis=0)
        label = int(np.argmax(smoothed))
        self.now = (self.classes[label], float(smoothed[label]))
        events = []
        if label != self._label:
            events += self._close(stop)
            self._label, self._first_stop, self._scores, self._seen_at = label, stop, [], -1
        self._last_stop = stop
        self._scores.append(float(smoothed[label]))
        if self._seen_at < 0 and label != self.background and len(self._scores) >= self.min_length:
            self._seen_at = stop
            events.append(("start", self._detection(stop)))
        return events

    def finish(self, stop: int) -> list[tuple[str, Detection]]:
        """The end of the stream after frame ``stop``: closes the run in progress."""
        events = self._close(stop, at_end=True)
        self._label, self._stream_start, self.now = -1, -1, None
        self._recent.clear()
        return events

    @property
    def active(self) -> Detection | None:
        """The action segment in progress (announced, not yet ended), if any."""
        return self._detection(self._last_stop) if self._seen_at >= 0 else None

    def _close(self, stop: int, at_end: bool = False) -> list[tuple[str, Detection]]:
        if self._seen_at < 0:
            return []
        detection = self._detection(stop, at_end)
        self._seen_at = -1
        return [("end", detection)]

    def _detection(self, decided_at: int, at_end: bool = False) -> Detection:
        first = 0 if self._first_stop == self._stream_start else max(0, self._first_stop - (self.need - 1) - self.lag)
        last = self._last_stop if at_end else max(first, self._last_stop - (self.seq_len - self.need) - self.lag)
        return Detection(
            self.classes[self._label], first, last, float(np.mean(self._scores)), self._seen_at, decided_at
        )


def detect_segments(
    probabilities: np.ndarray,
    first_stop: int,
    classes: list[str],
    background: str,
    seq_len: int,
    smooth: int,
    min_length: int,
) -> list[Detection]:
    """Every segment of one sequence from its windows' probabilities (row ``j`` is the window
    ending at frame ``first_stop + j``), as the online :class:`Segmenter` reports them."""
    segmenter = Segmenter(classes, background, seq_len, smooth, min_length)
    found = []
    stop = first_stop - 1
    for stop, row in enumerate(probabilities, start=first_stop):
        found += [d for kind, d in segmenter.push(stop, row) if kind == "end"]
    return found + [d for kind, d in segmenter.finish(stop) if kind == "end"]


def frame_labels(n_frames: int, spans: list[tuple[str, int, int]], background: str) -> list[str]:
    """One label per frame: the label of the span ``(label, first, last)`` holding it, else
    background."""
    labels = [background] * n_frames
    for label, first, last in spans:
        for frame in range(max(first, 0), min(last, n_frames - 1) + 1):
            labels[frame] = label
    return labels
