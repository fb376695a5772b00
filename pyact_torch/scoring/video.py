"""Labelled pictures of windows: the prediction video, its contact sheet, and the grids of
``pyact inspect``.

Every window is shown as its frames with a banner: "truth: ..." in yellow (pyACT's colour)
and "prediction: ..." in green when right, red when wrong (pyACT swapped the two texts).
Frames come from the raw dataset (SRC) or, without it, from the shards themselves.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import cv2
import numpy as np

from ..io import storage
from ..config import VideoConfig
from ..errors import UserError
from ..io.outputs import publish, remove_empty_up_to, staging, topmost_missing
from ..io.resources import check_memory, duration
from ..data.frames import FrameError, load_png
from ..data.shards import clip_shape, load_npy, read_samples, split_shards, read_manifest

# A predictions row's ``sequence`` is a folder of the raw dataset, ``<Split>/<subject>/<action>``:
# data, never a path; ``path`` names the window's first frame file of one of the three kinds.
SEQUENCE = re.compile(r"(Train|Eval|Test)/[^/.][^/]{0,254}/[^/.][^/]{0,254}")
FRAME_KINDS = ("color", "depth", "confi")
MAX_WINDOW = 1000  # frames in one window; pyACT's are 6
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
        strip = np.hstack([cv2.resize(f, (thumb, thumb), interpolation=cv2.INTER_AREA if f.shape[0] > thumb
                                      else cv2.INTER_NEAREST) for f in window.frames])
        height = max(thumb, line * len(window.captions) + 8)
        caption = np.zeros((height, SHEET_CAPTION_WIDTH, 3), np.uint8)
        for i, (text, colour) in enumerate(window.captions):
            cv2.putText(caption, _fit(text, SHEET_CAPTION_WIDTH - 8, SHEET_TEXT), (4, line * (i + 1)),
                        cv2.FONT_HERSHEY_SIMPLEX, SHEET_TEXT, colour, 2, cv2.LINE_AA)
        strip = cv2.copyMakeBorder(strip, 0, height - strip.shape[0], 0, 0, cv2.BORDER_CONSTANT)
        rows.append(np.hstack([caption, strip]))
    width = max(r.shape[1] for r in rows)
    rows = [cv2.copyMakeBorder(r, 0, 6, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(40, 40, 40))
            for r in rows]
    image = np.vstack(rows)
    if title:
        banner = np.zeros((line + 12, width, 3), np.uint8)
        cv2.putText(banner, _fit(title, width - 8, SHEET_TEXT), (4, line + 2), cv2.FONT_HERSHEY_SIMPLEX, SHEET_TEXT,
                    WHITE, 2, cv2.LINE_AA)
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


def evenly(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are fewer)."""
    if n >= len(items):
        return list(items)
    return [items[round(i * (len(items) - 1) / max(n - 1, 1))] for i in range(n)]


def by_class(rows: list[dict], n: int) -> list[dict]:
    """``n`` rows shared out over their truth classes in turn (each class's spread evenly over
    it), so that a split of mostly one class still shows every class: in the rows' order."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["truth"], []).append(row)
    share = {label: 0 for label in groups}
    left = min(n, len(rows))
    while left:
        for label, group in groups.items():
            if left and share[label] < len(group):
                share[label] += 1
                left -= 1
    picked = {id(row) for label, group in groups.items() for row in evenly(group, share[label])}
    return [row for row in rows if id(row) in picked]


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


@dataclass
class Shot:
    """One frame of the video: a frame of a sequence and the window that ends at it (if any)."""

    sequence: str
    frame: int
    window: dict | None


def video_frames(rows: list[dict], sequences: tuple[str, ...] = (), wrong: bool = False,
                 max_windows: int = 0) -> tuple[list[Shot], list[dict]]:
    """The frames the video shows, sequence by sequence (sorted by name), in frame order, each
    frame once: the frames of the chosen windows (those of sequences matching one of the
    ``sequences`` patterns, only the wrong ones with ``wrong``, the first ``max_windows``),
    each with the window ending at it. A window spans several frames and its neighbours
    overlap it: shown window by window, every frame came back once per window holding it.
    Returns the frames and the chosen windows."""
    if sequences:
        rows = [r for r in rows if any(fnmatch.fnmatchcase(r["sequence"], p) for p in sequences)]
        if not rows:
            raise UserError(f"--sequences {' '.join(sequences)}: matches no sequence of the predictions "
                            f"(names look like Test/<subject>/<action>; patterns take * and ?)")
    ordered = sorted(rows, key=lambda r: (r["sequence"], r["stop"], r["start"]))
    chosen = [r for r in ordered if r["truth"] != r["prediction"]] if wrong else ordered
    if max_windows:
        chosen = chosen[:max_windows]
    ending = {}
    for row in ordered:
        ending.setdefault((row["sequence"], row["stop"]), row)
    spans: dict[str, list[list[int]]] = {}
    for row in sorted(chosen, key=lambda r: (r["sequence"], r["start"], r["stop"])):  # overlapping, touching: merged
        merged = spans.setdefault(row["sequence"], [])
        if merged and row["start"] <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], row["stop"])
        else:
            merged.append([row["start"], row["stop"]])
    frames = sum(last - first + 1 for merged in spans.values() for first, last in merged)
    check_memory(frames * 400, f"the plan of a video of {frames} frames",  # a Shot and its list slot
                 "limit it with --sequences, --wrong or --max-windows")
    shots = [Shot(sequence, frame, ending.get((sequence, frame)))
             for sequence in sorted(spans) for first, last in spans[sequence] for frame in range(first, last + 1)]
    return shots, chosen


def shot_captions(shot: Shot) -> list[tuple[str, tuple[int, int, int]]]:
    """The sequence and frame number, then the truth and prediction of the window ending here
    (three lines on every frame: a video's frames all have one size)."""
    head = (f"{shot.sequence}  frame {shot.frame}", WHITE)
    if shot.window is None:
        return [head, ("truth: -", YELLOW), ("prediction: - (no window ends at this frame)", GREY)]
    return [head, *prediction_captions(shot.window["truth"], shot.window["prediction"])]


def source_frame(src: str, shot: Shot, kind: str, size: int, source: str) -> np.ndarray:
    """One frame of a sequence read from the raw dataset; the sequence must name a sequence
    folder inside ``src``."""
    folder = storage.child(src, shot.sequence, SEQUENCE, source)
    try:
        return to_display(load_png(os.path.join(folder, f"{kind}_{shot.frame}.png")), size)
    except FrameError as exc:
        raise UserError(str(exc)) from None


def frame_kind(row: dict, source: str) -> str:
    """The kind of frame file (color, depth, confi) a predictions row's path names."""
    kind = os.path.basename(str(row["path"])).split("_")[0]
    if kind not in FRAME_KINDS:
        raise UserError(f"{source}: {row['key'][:80]}: path {str(row['path'])[:80]!r} names no frame kind")
    return kind


def shard_frames(samples: Iterable[dict], rows: list[dict], shots: list[Shot]) -> dict[tuple[str, int], np.ndarray]:
    """The shots' frames (as stored, uint8 H x W x C) taken from the windows of ``rows`` found in
    a stream of shard samples; each frame is kept once, from the first window holding it."""
    needed = {(shot.sequence, shot.frame) for shot in shots}
    by_key = {row["key"]: row for row in rows}
    found: dict[tuple[str, int], np.ndarray] = {}
    for sample in samples:
        row = by_key.get(sample["__key__"])
        if row is None:
            continue
        wanted = [(i, (row["sequence"], f)) for i, f in enumerate(range(row["start"], row["stop"] + 1))
                  if (row["sequence"], f) in needed and (row["sequence"], f) not in found]
        if wanted:
            clip = load_npy(sample["clip.npy"])
            for i, key in wanted:
                if i < len(clip):
                    found[key] = np.ascontiguousarray(clip[i])
        if len(found) == len(needed):
            break
    return found


def _display(frame: np.ndarray, size: int) -> np.ndarray:
    return clip_frames(frame[None], size)[0]


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
    shots, in_video = video_frames(rows, config.sequences, config.wrong, config.max_windows)
    if not shots:
        raise UserError(f"{config.predictions}: no wrong window to show" if config.wrong else "no windows to show")
    picked = by_class(in_video, config.sheet_windows)
    frames = max((row["stop"] - row["start"] + 1 for row in picked), default=1)
    check_memory(len(picked) * frames * 2 * 3 * (config.size + SHEET_THUMB) ** 2,
                 f"a contact sheet of --sheet-windows {config.sheet_windows} at --size {config.size}",
                 "lower --sheet-windows or --size")  # its frames (RGB) and their PNG encoding
    if config.src:
        if not os.path.isdir(config.src):
            raise UserError(f"--src {config.src}: no such folder")
        kinds = {row["sequence"]: frame_kind(row, config.predictions) for row in rows}
        frame_of = lambda shot: source_frame(config.src, shot, kinds[shot.sequence], config.size, config.predictions)
    elif config.data:
        manifest = read_manifest(config.data)
        check_memory(len(shots) * math.prod(clip_shape(manifest)[1:]),
                     f"the {len(shots)} frames of the video, as stored in the shards", "limit the video with "
                     "--sequences, --wrong or --max-windows, or give --src")
        stored = shard_frames(_split_samples(config.data, config.split), rows, shots)
        missing = sorted({shot.sequence for shot in shots if (shot.sequence, shot.frame) not in stored})
        if missing:
            raise UserError(f"{config.data} ({config.split} split) lacks frames of {len(missing)} sequence(s) of "
                            f"{config.predictions}, e.g. {missing[0][:120]}: were they scored on these shards?")
        frame_of = lambda shot: _display(stored[(shot.sequence, shot.frame)], config.size)
    else:
        raise UserError("give --src (the raw dataset) or --data (the shards) to take the frames from")
    bar = tqdm(total=len(shots), unit="frame", desc="video", disable=None if progress else True)
    cache: dict[tuple[str, int], np.ndarray] = {}
    wanted = {(row["sequence"], f) for row in picked for f in range(row["start"], row["stop"] + 1)}

    def panels() -> Iterator[Panel]:
        for shot in shots:
            image = frame_of(shot)
            if (shot.sequence, shot.frame) in wanted:
                cache[(shot.sequence, shot.frame)] = image
            bar.update(1)
            yield Panel([image], shot_captions(shot))

    with staging(folder, "video", False) as stage:  # the video and its sheet replace the earlier ones together
        staged, count = write_video(panels(), os.path.join(stage, os.path.basename(config.out)), config.fps)
        bar.close()
        sheet_rows = [Panel([cache[(row["sequence"], f)] for f in range(row["start"], row["stop"] + 1)],
                            [(row["sequence"], WHITE), (f"frames {row['start']}-{row['stop']}", WHITE),
                             *prediction_captions(row["truth"], row["prediction"])]) for row in picked]
        right = sum(row["truth"] == row["prediction"] for row in in_video)
        name = os.path.basename(staged)  # .avi where OpenCV cannot write mp4
        sheet_name = os.path.splitext(name)[0] + "-sheet.png"
        title = f"{right}/{len(in_video)} windows right; one row per class in turn"
        publish(folder, {sheet_name: sheet(sheet_rows, title)}, {name: staged}, stage)
    path, sheet_path = os.path.join(folder, name), os.path.join(folder, sheet_name)
    sequences = len({shot.sequence for shot in shots})
    print_fn(f"wrote {path}: {count} frames of {sequences} sequence{'s' if sequences > 1 else ''} "
             f"({len(in_video)} windows), {duration(count / config.fps)} at {config.fps:g} fps; and {sheet_path}")
    return path, count


def _split_samples(data: str, split: str) -> Iterator[dict]:
    manifest = read_manifest(data)
    for url, count in split_shards(data, manifest, split):
        yield from read_samples(url, count)
