"""A synthetic Hand Action dataset in exactly the real layout, learnable per class.

``Train/``, ``Eval/`` and ``Test/`` hold one sequence per subject and action; ``TestDetection/``
holds long recordings by subjects of their own (``TestDetection/detect03/`` beside
``detect03.xml``), each with several actions of different classes separated by background of
varying length, every segment naming its action in a ``<label>`` child.

Each of the 16 actions is a shape (circle, square, triangle, cross) moving in one of four
directions during its labelled segments; outside the segments a frame shows only background
(a gradient whose brightness drifts, plus sensor noise). Subjects differ in background,
skin tone, shape size, start offset, speed and noise, so a held-out subject is a fair test. Depth is a
16-bit plane in millimetres with the shape nearer to the camera; confidence is 16-bit IR
amplitude. Depth and confidence frames are half the colour size, as on the real camera.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from ..config import SynthConfig
from ..io import storage
from ..errors import UserError
from .labels import ACTIONS
from ..io.lifecycle import uninterrupted
from ..io.outputs import remove_empty_up_to, topmost_missing
from ..io.processes import map_unordered

SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0))  # right, left, down, up


@dataclass(frozen=True)
class _Job:
    out: str
    split_dir: str
    subject: str
    subject_index: int
    action_index: int
    config: SynthConfig


def subject_names(config: SynthConfig) -> dict[str, list[str]]:
    """Subject folder names per split folder."""
    n_train, n_eval, n_test = config.subjects
    names = {"Train": [f"train{i:02d}" for i in range(n_train)], "Test": [f"test{i:02d}" for i in range(n_test)]}
    if n_eval:
        names["Eval"] = [f"eval{i:02d}" for i in range(n_eval)]
    return names


def make_segments(rng: np.random.Generator, n_frames: int, min_len: int, exact_first: bool) -> list[tuple[int, int]]:
    """One or two non-overlapping ``(pos, len)`` segments, each at least ``min_len`` long."""
    count = 1 if n_frames < 4 * min_len + 4 else int(rng.integers(1, 3))
    slot = n_frames // count
    segments = []
    for k in range(count):
        longest = min(slot - 2, 3 * min_len)
        length = min_len if (exact_first and k == 0) else int(rng.integers(min_len, longest + 1))
        pos = k * slot + 1 + int(rng.integers(0, slot - length - 1))
        segments.append((pos, length))
    return segments


def _style(seed: int, split_index: int, subject_index: int) -> dict:
    """Per-subject look: background, colours, size, offset, noise, speed."""
    rng = np.random.default_rng([seed, split_index, subject_index, 7919])
    return {
        # a dim room with a slight tint, and a skin-toned hand: subjects differ, as people and
        # rooms do, without one subject's colours being unlike everyone else's
        "background": rng.uniform(40, 100) + rng.uniform(-10, 10, size=3),
        "gradient": rng.uniform(-30, 30, size=2),
        "colour": np.array([225.0, 175.0, 145.0]) * rng.uniform(0.8, 1.1) + rng.uniform(-12, 12, size=3),
        "radius": rng.uniform(0.10, 0.15),
        "offset": rng.uniform(-0.08, 0.08, size=2),
        "noise": int(rng.integers(4, 12)),
        "travel": rng.uniform(0.40, 0.55),
        "depth": rng.uniform(650, 900),
    }


def _draw_shape(image: np.ndarray, shape: str, centre: tuple[float, float], radius: float, value: Any) -> None:
    x, y = int(round(centre[0])), int(round(centre[1]))
    r = max(2, int(round(radius)))
    if shape == "circle":
        cv2.circle(image, (x, y), r, value, -1)
    elif shape == "square":
        cv2.rectangle(image, (x - r, y - r), (x + r, y + r), value, -1)
    elif shape == "triangle":
        points = np.array([[x, y - r], [x - r, y + r], [x + r, y + r]], np.int32)
        cv2.fillPoly(image, [points], value)
    else:
        w = max(1, r // 3)
        cv2.rectangle(image, (x - r, y - w), (x + r, y + w), value, -1)
        cv2.rectangle(image, (x - w, y - r), (x + w, y + r), value, -1)


def render_frame(
    style: dict,
    action_index: int,
    progress: float | None,
    width: int,
    height: int,
    frame: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour (RGB uint8), depth and confidence (uint16, half size) of one frame.
    ``progress`` in [0, 1) is how far into its segment the action is; None = no action."""
    drift = 12.0 * np.sin(frame / 9.0)
    shade = (
        style["gradient"][0] * np.linspace(0, 1, width, dtype=np.float32)[None, :]
        + style["gradient"][1] * np.linspace(0, 1, height, dtype=np.float32)[:, None]
        + drift
    )
    colour = (style["background"].astype(np.float32)[None, None, :] + shade[..., None]).astype(np.int16)
    colour += rng.integers(-style["noise"], style["noise"] + 1, size=colour.shape, dtype=np.int16)
    colour = np.clip(colour, 0, 255).astype(np.uint8)
    dw, dh = width // 2, height // 2
    depth = np.repeat((style["depth"] + np.linspace(0, 60, dh))[:, None], dw, axis=1).astype(np.uint16)
    depth += rng.integers(0, 6, size=depth.shape, dtype=np.uint16)
    depth[rng.random(depth.shape) < 0.01] = 0  # pixels without a reading, as on a real sensor
    confi = np.full((dh, dw), 300, np.uint16) + rng.integers(0, 40, size=(dh, dw), dtype=np.uint16)
    if progress is not None:
        shape = SHAPES[action_index % 4]
        dx, dy = DIRECTIONS[action_index // 4]
        travel = style["travel"]
        cx = 0.5 + style["offset"][0] + dx * travel * (progress - 0.5)
        cy = 0.5 + style["offset"][1] + dy * travel * (progress - 0.5)
        radius = style["radius"] * min(width, height)
        _draw_shape(colour, shape, (cx * width, cy * height), radius, tuple(float(c) for c in style["colour"]))
        _draw_shape(depth, shape, (cx * dw, cy * dh), radius / 2, 380)
        _draw_shape(confi, shape, (cx * dw, cy * dh), radius / 2, 2500)
    return colour, depth, confi


def write_label_file(
    path: str, action: str, segments: list[tuple[int, int]], n_frames: int, labels: list[str] | None = None
) -> None:
    """An OpenCV FileStorage XML like the real dataset's: a sequence of ``{pos, len}`` maps,
    each with its own ``label`` when ``labels`` are given."""
    storage = cv2.FileStorage(path, cv2.FILE_STORAGE_WRITE)
    storage.write("action", action)
    storage.startWriteStruct("segments", cv2.FileNode_SEQ)
    for index, (pos, length) in enumerate(segments):
        storage.startWriteStruct("", cv2.FileNode_MAP)
        storage.write("pos", pos)
        storage.write("len", length)
        if labels is not None:
            storage.write("label", labels[index])
        storage.endWriteStruct()
    storage.endWriteStruct()
    storage.write("frameCount", n_frames)
    storage.release()


def recording_plan(config: SynthConfig, index: int) -> tuple[int, list[tuple[int, int, int]]]:
    """One TestDetection recording: its frame count and ``(pos, len, action index)`` segments,
    4 to 7 actions of different classes, each as long as a Train segment can be, between
    background runs of 2 to half of ``--frames MIN`` frames."""
    rng = np.random.default_rng([config.seed, 3, index, 104729])
    chosen = rng.choice(len(ACTIONS), size=int(rng.integers(4, 8)), replace=False)
    segments, frame = [], 0
    for action in chosen:
        frame += int(rng.integers(2, max(3, config.frames[0] // 2) + 1))
        length = int(rng.integers(config.min_segment, 3 * config.min_segment + 1))
        segments.append((frame, length, int(action)))
        frame += length
    return frame + int(rng.integers(2, max(3, config.frames[0] // 2) + 1)), segments


def _write_recording(job: _Job) -> int:
    config = job.config
    n_frames, plan = recording_plan(config, job.subject_index)
    rng = np.random.default_rng([config.seed, 3, job.subject_index, 7])
    style = _style(config.seed, 3, job.subject_index)
    folder = os.path.join(job.out, job.split_dir, job.subject)
    os.makedirs(folder, exist_ok=True)
    width, height = config.size
    for frame in range(n_frames):
        now = next(
            ((action, (frame - pos) / length) for pos, length, action in plan if pos <= frame < pos + length), (0, None)
        )
        colour, depth, confi = render_frame(style, now[0], now[1], width, height, frame, rng)
        _write_frames(folder, frame, colour, depth, confi)
    write_label_file(
        folder + ".xml",
        job.subject,
        [(pos, length) for pos, length, _ in plan],
        n_frames,
        labels=[ACTIONS[action] for _, _, action in plan],
    )
    return n_frames


def _write_frames(folder: str, frame: int, colour: np.ndarray, depth: np.ndarray, confi: np.ndarray) -> None:
    for kind, image in (("color", cv2.cvtColor(colour, cv2.COLOR_RGB2BGR)), ("depth", depth), ("confi", confi)):
        path = os.path.join(folder, f"{kind}_{frame}.png")
        if not cv2.imwrite(path, image):  # OpenCV says False, not why: a full disk is the usual cause
            raise UserError(f"{path}: could not be written (is the disk full?)")


def _write_sequence(job: _Job) -> int:
    config = job.config
    if job.split_dir == "TestDetection":
        return _write_recording(job)
    split_index = ("Train", "Eval", "Test").index(job.split_dir)
    rng = np.random.default_rng([config.seed, split_index, job.subject_index, job.action_index])
    style = _style(config.seed, split_index, job.subject_index)
    n_frames = int(rng.integers(config.frames[0], config.frames[1] + 1))
    segments = make_segments(rng, n_frames, config.min_segment, exact_first=job.action_index == 0)
    action = ACTIONS[job.action_index]
    folder = os.path.join(job.out, job.split_dir, job.subject, action)
    os.makedirs(folder, exist_ok=True)
    width, height = config.size
    for frame in range(n_frames):
        progress = next(((frame - pos) / length for pos, length in segments if pos <= frame < pos + length), None)
        colour, depth, confi = render_frame(style, job.action_index, progress, width, height, frame, rng)
        _write_frames(folder, frame, colour, depth, confi)
    write_label_file(folder + ".xml", action, segments, n_frames)
    return n_frames


def make_dataset(config: SynthConfig, progress: bool = True) -> int:
    """Write the dataset to ``config.out``; returns the number of frames written. It is made
    in a hidden folder inside ``config.out`` whose contents are moved up when complete, so a
    stop leaves nothing behind and a rerun starts clean."""
    if os.path.exists(config.out) and (not os.path.isdir(config.out) or os.listdir(config.out)):
        raise UserError(f"{config.out}: already exists and is not an empty folder")
    created = topmost_missing(config.out)
    storage.check_writable(config.out)
    staging = tempfile.mkdtemp(prefix=".pyact-synth-", dir=config.out)
    try:
        jobs = [
            _Job(staging, split_dir, subject, subject_index, action_index, config)
            for split_dir, subjects in subject_names(config).items()
            for subject_index, subject in enumerate(subjects)
            for action_index in range(len(ACTIONS))
        ]
        jobs += [
            _Job(staging, "TestDetection", f"detect{index:02d}", index, -1, config) for index in range(config.detection)
        ]
        total = 0
        with (
            tqdm(total=len(jobs), unit="seq", desc="synthetic", disable=None if progress else True) as bar,
            contextlib.closing(map_unordered(_write_sequence, jobs, config.processes)) as written,
        ):
            for n in written:
                total += n
                bar.update()
        with uninterrupted("the dataset is in place"):
            for name in sorted(os.listdir(staging)):
                os.rename(os.path.join(staging, name), os.path.join(config.out, name))
            os.rmdir(staging)
            staging = ""
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)  # made by mkdtemp above: ours
            remove_empty_up_to(config.out, created)
    return total
