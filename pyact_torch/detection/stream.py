"""Frames as a camera delivers them, and the windows ending at each one.

A source yields :class:`Frame` s in order: a sequence folder of the raw dataset (its PNG
files), a video file or a camera (OpenCV ``VideoCapture``, colour only). Each frame is prepared
once (``frames.prepare``: the resize and modality of ``pyact preprocess``) and pushed into a
:class:`Ring` of the last ``L`` frames; the window ending at that frame is classified.
:func:`streamed` does this one window at a time, :func:`batched` classifies a whole sequence's
windows in batches; both give the probabilities of the same windows in the same order.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from ..errors import UserError
from ..data.frames import FrameError, FrameSpec, frame_files, load_png, prepare
from ..data.labels import frame_indices, needed_kinds
from ..draw.panels import quiet_ffmpeg


@dataclass
class Frame:
    """One frame: its index in the stream, the raw image to draw (BGR colour or 16-bit depth;
    None when nothing is drawn), the model's uint8 ``(S, S, C)`` frame, and the seconds its
    preparation took."""

    index: int
    raw: np.ndarray | None
    model: np.ndarray
    prepare_seconds: float


def _hint(folder: str) -> str:
    """Where ``folder`` is a split or subject folder of the dataset, the flags that read it."""
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    splits = {"train": "train", "test": "test", "eval": "eval"}
    for depth in (1, 2):  # SRC/Test, or SRC/Test/subject
        if len(parts) > depth and parts[-depth].lower() in splits:
            src = os.sep.join(parts[:-depth]) or os.sep
            return f"; for every sequence of that split give --src {src} --split {splits[parts[-depth].lower()]}"
    return ""


def count_frames(folder: str, modality: str) -> int:
    """Frames of a sequence folder (its ``color_<i>.png``), checked for the files ``modality``
    reads; a folder without them is a one-line error."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such sequence folder")
    found = frame_indices(folder)
    n_frames = len(found["color"])
    if n_frames == 0:
        raise UserError(f"{folder}: no color_<i>.png frames: not a sequence folder{_hint(folder)}")
    for kind in ("color",) + needed_kinds(modality):
        missing = sorted(set(range(n_frames)) - found[kind])
        if missing:
            what = (
                "frame missing"
                if kind == "color" or found[kind]
                else f"this model takes {modality} frames and the folder has no {kind}_<i>.png"
            )
            raise UserError(f"{os.path.join(folder, f'{kind}_{missing[0]}.png')}: {what}")
    return n_frames


def folder_frames(folder: str, n_frames: int, spec: FrameSpec, keep_raw: bool) -> Iterator[Frame]:
    """The frames of a sequence folder, read one at a time."""
    for index in range(n_frames):
        files = frame_files(folder, index, spec.modality)
        try:
            raw = {kind: load_png(path) for kind, path in files.items()}
            started = time.perf_counter()
            model = prepare(raw, spec, files)
        except FrameError as exc:
            raise UserError(str(exc)) from None
        shown = raw.get("color", raw.get("depth")) if keep_raw else None
        yield Frame(index, shown, model, time.perf_counter() - started)


def open_capture(video: str = "", camera: int = -1) -> cv2.VideoCapture:
    """An opened ``VideoCapture`` of a video file or a camera index (one-line errors)."""
    quiet_ffmpeg()
    if video:
        if not os.path.isfile(video):
            raise UserError(f"--video {video}: no such file")
        capture = cv2.VideoCapture(video)
        if not capture.isOpened():
            capture.release()
            raise UserError(f"--video {video}: OpenCV cannot open it as a video")
        return capture
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # "can't open camera by index" is our one line
    try:
        capture = cv2.VideoCapture(camera)
    finally:
        cv2.utils.logging.setLogLevel(level)
    if not capture.isOpened():
        capture.release()
        raise UserError(f"--camera {camera}: no camera with this index can be opened")
    return capture


def capture_frames(
    capture: cv2.VideoCapture, spec: FrameSpec, name: str, max_frames: int = 0, stop: Callable[[], bool] = lambda: False
) -> Iterator[Frame]:
    """Frames of a video or camera until it ends, ``max_frames`` or ``stop()``; colour only."""
    index = 0
    try:
        while (not max_frames or index < max_frames) and not stop():
            ok, image = capture.read()
            if not ok:
                break
            started = time.perf_counter()
            try:
                model = prepare({"color": image}, spec, {"color": f"{name} frame {index}"})
            except FrameError as exc:
                raise UserError(str(exc)) from None
            yield Frame(index, image, model, time.perf_counter() - started)
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise UserError(f"{name}: no frame could be read")


class Ring:
    """The last ``length`` frames, oldest first, without moving frames already held."""

    def __init__(self, length: int, frame_shape: tuple[int, ...]):
        self._frames = np.zeros((length,) + tuple(frame_shape), np.uint8)
        self._next, self.count = 0, 0

    def push(self, frame: np.ndarray) -> None:
        self._frames[self._next] = frame
        self._next = (self._next + 1) % len(self._frames)
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count >= len(self._frames)

    def window(self) -> np.ndarray:
        """``(length, S, S, C)``: the window ending at the newest frame."""
        return np.concatenate([self._frames[self._next :], self._frames[: self._next]])


Probabilities = Callable[[np.ndarray], np.ndarray]


def streamed(
    frames: Iterable[Frame], classify: Probabilities, seq_len: int
) -> Iterator[tuple[Frame, np.ndarray | None, float]]:
    """Each frame with the probabilities of the window ending at it (None for the first
    ``L - 1`` frames) and the seconds preparing and classifying it took (its latency)."""
    ring: Ring | None = None
    for frame in frames:
        started = time.perf_counter()
        if ring is None:
            ring = Ring(seq_len, frame.model.shape)
        ring.push(frame.model)
        probabilities = classify(ring.window()[None])[0] if ring.full else None
        yield frame, probabilities, frame.prepare_seconds + time.perf_counter() - started


def batched(
    frames: Iterable[Frame], classify: Probabilities, seq_len: int, batch_size: int
) -> Iterator[tuple[Frame, np.ndarray | None, float]]:
    """What :func:`streamed` yields, for a finite sequence, with its windows classified
    ``batch_size`` at a time (latency is then not measured: 0). At most a batch of frames is
    held: a long recording's raw images are drawn and dropped as it goes."""
    recent: deque[np.ndarray] = deque(maxlen=seq_len)
    waiting: list[Frame] = []  # frames whose window is in the next batch, in order
    windows: list[np.ndarray] = []
    for frame in frames:
        recent.append(frame.model)
        if len(recent) < seq_len:
            yield frame, None, 0.0
            continue
        waiting.append(frame)
        windows.append(np.stack(recent))
        if len(windows) == batch_size:
            yield from zip(waiting, classify(np.stack(windows)), [0.0] * len(waiting))
            waiting, windows = [], []
    if windows:
        yield from zip(waiting, classify(np.stack(windows)), [0.0] * len(waiting))
