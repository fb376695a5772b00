"""Labelled pictures of windows: the prediction video, its contact sheet, and the grids of
``pyact inspect``.

Every window is shown as its frames with a banner: "truth: ..." in yellow (pyACT's colour)
and "prediction: ..." in green when right, red when wrong (pyACT swapped the two texts).
Frames come from the raw dataset (SRC) or, without it, from the shards themselves.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from . import storage
from .config import VideoConfig
from .errors import UserError
from .outputs import publish, remove_empty_up_to, staging, topmost_missing
from .resources import check_memory
from .frames import FrameError, load_png
from .shards import load_npy, read_samples, split_shards, read_manifest

# A predictions row's ``sequence`` is a folder of the raw dataset, ``<Split>/<subject>/<action>``:
# data, never a path; ``path`` names the window's first frame file of one of the three kinds.
SEQUENCE = re.compile(r"(Train|Eval|Test)/[^/.][^/]{0,254}/[^/.][^/]{0,254}")
FRAME_KINDS = ("color", "depth", "confi")
MAX_WINDOW = 1000  # frames in one window; pyACT's are 6
YELLOW, GREEN, RED, WHITE = (0, 255, 255), (0, 200, 0), (0, 0, 255), (255, 255, 255)  # BGR
LINE = 22  # banner line height in pixels at scale 1


@dataclass
class Panel:
    """What is drawn for one window: its frames (BGR uint8, square) and the caption lines over them."""

    frames: list[np.ndarray]
    captions: list[tuple[str, tuple[int, int, int]]]


def prediction_captions(truth: str, prediction: str | None) -> list[tuple[str, tuple[int, int, int]]]:
    """'truth: ...' (yellow) and 'prediction: ...' (green when right, red when wrong)."""
    lines = [(f"truth: {truth}", YELLOW)]
    if prediction is not None:
        lines.append((f"prediction: {prediction}", GREEN if prediction == truth else RED))
    return lines


def to_display(image: np.ndarray, size: int) -> np.ndarray:
    """Any frame (RGB[D] uint8 from a shard, BGR colour or 16-bit depth from a PNG) padded to a
    square and resized to ``size`` x ``size`` BGR."""
    if image.dtype == np.uint16:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    image = np.ascontiguousarray(image[..., :3])
    height, width = image.shape[:2]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    image = cv2.copyMakeBorder(image, top, side - height - top, left, side - width - left, cv2.BORDER_CONSTANT)
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_NEAREST
    return cv2.resize(image, (size, size), interpolation=interpolation)


def clip_frames(clip: np.ndarray, size: int) -> list[np.ndarray]:
    """A shard's uint8 ``(T, H, W, C)`` clip (channels RGB[D]) as displayable BGR frames."""
    frames = []
    for frame in clip:
        if frame.shape[2] >= 3:
            frame = frame[..., 2::-1]  # RGB -> BGR
        frames.append(to_display(frame, size))
    return frames


def source_frames(src: str, row: dict, size: int, source: str = "predictions") -> list[np.ndarray]:
    """The window's frames read from the raw dataset (the kind of its first frame's path);
    the row's sequence must name a sequence folder inside ``src``."""
    folder = storage.child(src, row["sequence"], SEQUENCE, source)
    kind = os.path.basename(str(row["path"])).split("_")[0]
    if kind not in FRAME_KINDS:
        raise UserError(f"{source}: {row['key']}: path {str(row['path'])[:80]!r} names no frame kind")
    frames = []
    for index in range(row["start"], row["stop"] + 1):
        path = os.path.join(folder, f"{kind}_{index}.png")
        try:
            frames.append(to_display(load_png(path), size))
        except FrameError as exc:
            raise UserError(str(exc)) from None
    return frames


def with_banner(frame: np.ndarray, captions: list[tuple[str, tuple[int, int, int]]]) -> np.ndarray:
    """The frame below a black banner holding one caption per line."""
    scale = min(1.0, max(0.4, frame.shape[0] / 512))  # by height: a strip of frames keeps the frames' text size
    line = int(LINE * scale * 1.6)
    banner = np.zeros((line * len(captions) + 4, frame.shape[1], 3), np.uint8)
    for i, (text, colour) in enumerate(captions):
        cv2.putText(banner, text, (4, line * (i + 1) - 4), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)
    return np.vstack([banner, frame])


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi")  # the containers of the codecs written here (mp4v, MJPG)


def quiet_ffmpeg() -> None:
    """Keep FFmpeg's own messages ("moov atom not found", ...) off stderr: ours are one line.
    Read by OpenCV when FFmpeg is first used, so call it before any VideoCapture/VideoWriter."""
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def write_video(windows: Iterable[Panel], out: str, fps: float) -> tuple[str, int]:
    """Every window's frames with their banner, in order, as an mp4 (MJPG AVI where the mp4
    codec is missing). Written under a temporary name, read back to count its frames (a full
    disk makes OpenCV drop frames silently) and renamed when complete; returns the path
    written (its suffix tells the container) and the number of frames."""
    if storage.is_gcs(out):
        raise UserError(f"{out}: the video is written to a local path")
    quiet_ffmpeg()
    writer, path, partial, count = None, out, "", 0
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # a failed write warns once per frame
    try:
        for window in windows:
            for frame in window.frames:
                image = with_banner(frame, window.captions)
                if writer is None:
                    writer, path, partial = _open_writer(out, fps, (image.shape[1], image.shape[0]))
                writer.write(image)
                count += 1
        if writer is None:
            raise UserError("no windows to put in the video")
        writer.release()
        written = int(cv2.VideoCapture(partial).get(cv2.CAP_PROP_FRAME_COUNT))
        if written != count:
            raise UserError(f"{path}: only {written} of its {count} frames could be written (is the disk full?)")
        os.replace(partial, path)
    finally:
        cv2.utils.logging.setLogLevel(level)
        if writer is not None and os.path.exists(partial):
            writer.release()
            os.remove(partial)
    return path, count


def _open_writer(out: str, fps: float, size: tuple[int, int]):
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(out))[0]
    for suffix, codec in ((os.path.splitext(out)[1] or ".mp4", "mp4v"), (".avi", "MJPG")):
        path = os.path.join(folder, stem + (suffix if codec == "mp4v" else ".avi"))
        partial = os.path.join(folder, f".{stem}.{os.getpid()}.partial{os.path.splitext(path)[1]}")
        writer = cv2.VideoWriter(partial, cv2.VideoWriter_fourcc(*codec), fps, size)
        if writer.isOpened():
            return writer, path, partial
        writer.release()
    raise UserError(f"{out}: OpenCV can write neither mp4 (mp4v) nor AVI (MJPG) here")


def sheet(windows: list[Panel], title: str = "") -> bytes:
    """A PNG with one row per window: its captions, then its frames side by side."""
    if not windows:
        raise UserError("no windows to draw")
    rows = []
    for window in windows:
        strip = np.hstack(window.frames)
        rows.append(with_banner(strip, window.captions))
    width = max(r.shape[1] for r in rows)
    rows = [cv2.copyMakeBorder(r, 0, 6, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(40, 40, 40))
            for r in rows]
    image = np.vstack(rows)
    if title:
        image = with_banner(image, [(title, WHITE)])
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def evenly(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def read_predictions(path: str) -> list[dict]:
    """Rows written by ``pyact evaluate`` (predictions.json)."""
    try:
        rows = storage.read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    needed = {"key": str, "path": str, "sequence": str, "start": int, "stop": int, "truth": str, "prediction": str}
    if not isinstance(rows, list) or not rows or not all(
            isinstance(r, dict) and all(isinstance(r.get(k), kind) for k, kind in needed.items()) for r in rows):
        raise UserError(f"{path}: not a predictions file of pyact evaluate (rows need {', '.join(needed)})")
    for row in rows:
        if not 0 <= row["start"] <= row["stop"] < row["start"] + MAX_WINDOW:
            raise UserError(f"{path}: {row['key'][:80]}: frames {row['start']}..{row['stop']} are no window")
    return rows


def shard_windows(samples: Iterable[dict], rows: list[dict], size: int) -> Iterator[tuple[dict, Panel]]:
    """The windows of ``rows`` found in a stream of shard samples, in stream order."""
    by_key = {row["key"]: row for row in rows}
    for sample in samples:
        row = by_key.get(sample["__key__"])
        if row is None:
            continue
        clip = load_npy(sample["clip.npy"])
        yield row, Panel(clip_frames(clip, size), prediction_captions(row["truth"], row["prediction"]))


def make_video(config: VideoConfig, progress: bool = True, print_fn: Callable[[str], None] = print) -> tuple[str, int]:
    """``pyact video``: the prediction video and its contact sheet."""
    if storage.is_gcs(config.out):
        raise UserError(f"{config.out}: the video is written to a local path")
    suffix = os.path.splitext(config.out)[1].lower()
    if suffix not in VIDEO_SUFFIXES:
        raise UserError(f"{config.out}: OpenCV writes videos as {', '.join(VIDEO_SUFFIXES)} (mp4 falls back to .avi "
                        f"where its encoder is missing); give a name ending in one of them")
    folder = os.path.dirname(os.path.abspath(config.out))
    created = topmost_missing(folder)
    storage.check_output_file(config.out, "video")
    try:
        return _make_video(config, folder, progress, print_fn)
    except BaseException:
        remove_empty_up_to(folder, created)  # a failure before the video: no empty folder of ours left
        raise


def _make_video(config: VideoConfig, folder: str, progress: bool,
                print_fn: Callable[[str], None]) -> tuple[str, int]:
    from tqdm import tqdm

    rows = read_predictions(config.predictions)
    if config.max_windows:
        rows = rows[:config.max_windows]
    if config.src:
        if not os.path.isdir(config.src):
            raise UserError(f"--src {config.src}: no such folder")
        stream = ((row, Panel(source_frames(config.src, row, config.size, config.predictions),
                               prediction_captions(row["truth"], row["prediction"]))) for row in rows)
    elif config.data:
        stream = shard_windows(_split_samples(config.data, config.split), rows, config.size)
    else:
        raise UserError("give --src (the raw dataset) or --data (the shards) to take the frames from")
    frames = max((row["stop"] - row["start"] + 1 for row in rows[:1000]), default=1)
    check_memory(min(config.sheet_windows, len(rows)) * frames * 2 * 3 * (config.size + 8) ** 2,
                 f"a contact sheet of --sheet-windows {config.sheet_windows} at --size {config.size}",
                 "lower --sheet-windows or --size")  # its frames (RGB) and their PNG encoding
    picked = {row["key"] for row in evenly(rows, config.sheet_windows)}
    sampled: list[Panel] = []
    seen = 0
    bar = tqdm(total=len(rows), unit="window", desc="video", disable=None if progress else True)

    def windows() -> Iterator[Panel]:
        nonlocal seen
        for row, window in stream:
            seen += 1
            bar.update(1)
            if row["key"] in picked:
                sampled.append(window)
            yield window

    with staging(folder, "video", False) as stage:  # the video and its sheet replace the earlier ones together
        staged, frames = write_video(windows(), os.path.join(stage, os.path.basename(config.out)), config.fps)
        bar.close()
        if seen != len(rows):
            raise UserError(f"only {seen} of the {len(rows)} windows of {config.predictions} are in "
                            f"{config.data} ({config.split} split)")
        right = sum(row["truth"] == row["prediction"] for row in rows)
        name = os.path.basename(staged)  # .avi where OpenCV cannot write mp4
        sheet_name = os.path.splitext(name)[0] + "-sheet.png"
        publish(folder, {sheet_name: sheet(sampled, f"{right}/{len(rows)} windows right")}, {name: staged}, stage)
    path, sheet_path = os.path.join(folder, name), os.path.join(folder, sheet_name)
    print_fn(f"wrote {path} ({frames} frames, {len(rows)} windows at {config.fps:g} fps) and {sheet_path}")
    return path, frames


def _split_samples(data: str, split: str) -> Iterator[dict]:
    manifest = read_manifest(data)
    for url, count in split_shards(data, manifest, split):
        yield from read_samples(url, count)
