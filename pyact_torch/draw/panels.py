"""Labelled pictures of windows, shared by ``pyact video``, ``pyact inspect`` and ``pyact detect``:
a window's frames under a banner of caption lines, written as a video or a contact sheet.

Colours are pyACT's: "truth: ..." in yellow, "prediction: ..." in green when right and red
when wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable

import cv2
import numpy as np

from ..errors import UserError
from ..io import storage

YELLOW, GREEN, RED, WHITE, GREY = (0, 255, 255), (0, 200, 0), (0, 0, 255), (255, 255, 255), (150, 150, 150)  # BGR
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


def _open_writer(out: str, fps: float, size: tuple[int, int]) -> tuple[cv2.VideoWriter, str, str]:
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


SHEET_THUMB = 128  # pixels per frame on the contact sheet
SHEET_TEXT = 0.8  # caption font scale: ~17 px capitals, readable with the sheet fitted to a 1080p screen
SHEET_CAPTION_WIDTH = 460


def sheet(windows: list[Panel], title: str = "", thumb: int = SHEET_THUMB) -> bytes:
    """A PNG with one row per window: its caption lines in a column on the left (large enough
    to read with the sheet fitted to a screen), then its frames side by side, ``thumb`` pixels
    square."""
    if not windows:
        raise UserError("no windows to draw")
    line = int(30 * SHEET_TEXT)
    rows = []
    for window in windows:
        strip = np.hstack(
            [
                cv2.resize(f, (thumb, thumb), interpolation=cv2.INTER_AREA if f.shape[0] > thumb else cv2.INTER_NEAREST)
                for f in window.frames
            ]
        )
        height = max(thumb, line * len(window.captions) + 8)
        caption = np.zeros((height, SHEET_CAPTION_WIDTH, 3), np.uint8)
        for i, (text, colour) in enumerate(window.captions):
            cv2.putText(
                caption,
                _fit(text, SHEET_CAPTION_WIDTH - 8, SHEET_TEXT),
                (4, line * (i + 1)),
                cv2.FONT_HERSHEY_SIMPLEX,
                SHEET_TEXT,
                colour,
                2,
                cv2.LINE_AA,
            )
        strip = cv2.copyMakeBorder(strip, 0, height - strip.shape[0], 0, 0, cv2.BORDER_CONSTANT)
        rows.append(np.hstack([caption, strip]))
    width = max(r.shape[1] for r in rows)
    rows = [cv2.copyMakeBorder(r, 0, 6, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(40, 40, 40)) for r in rows]
    image = np.vstack(rows)
    if title:
        banner = np.zeros((line + 12, width, 3), np.uint8)
        cv2.putText(
            banner,
            _fit(title, width - 8, SHEET_TEXT),
            (4, line + 2),
            cv2.FONT_HERSHEY_SIMPLEX,
            SHEET_TEXT,
            WHITE,
            2,
            cv2.LINE_AA,
        )
        image = np.vstack([banner, image])
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def _fit(text: str, width: int, scale: float) -> str:
    """``text`` shortened with "..." until it fits ``width`` pixels at ``scale``."""
    while len(text) > 4 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 2)[0][0] > width:
        text = text[:-4] + "..."
    return text
