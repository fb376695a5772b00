"""``pyact video``: the prediction video and its contact sheet (drawn by ``draw.panels``).

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

import numpy as np

from ..io import storage
from ..config import VideoConfig
from ..errors import UserError
from ..io.outputs import publish, remove_empty_up_to, staging, topmost_missing
from ..io.resources import check_memory, duration
from ..data.frames import FrameError, load_png
from ..data.shards import load_npy, read_manifest, read_samples, split_shards
from ..draw.panels import (
    GREY,
    SHEET_THUMB,
    VIDEO_SUFFIXES,
    WHITE,
    YELLOW,
    Panel,
    clip_frames,
    prediction_captions,
    sheet,
    to_display,
    write_video,
)

# A predictions row's ``sequence`` is a folder of the raw dataset, ``<Split>/<subject>/<action>``:
# data, never a path; ``path`` names the window's first frame file of one of the three kinds.
SEQUENCE = re.compile(r"(Train|Eval|Test)/[^/.][^/]{0,254}/[^/.][^/]{0,254}")
FRAME_KINDS = ("color", "depth", "confi")
MAX_WINDOW = 1000  # frames in one window; pyACT's are 6


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
    if (
        not isinstance(rows, list)
        or not rows
        or not all(isinstance(r, dict) and all(isinstance(r.get(k), kind) for k, kind in needed.items()) for r in rows)
    ):
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


def video_frames(
    rows: list[dict], sequences: tuple[str, ...] = (), wrong: bool = False, max_windows: int = 0
) -> tuple[list[Shot], list[dict]]:
    """The frames the video shows, sequence by sequence (sorted by name), in frame order, each
    frame once: the frames of the chosen windows (those of sequences matching one of the
    ``sequences`` patterns, only the wrong ones with ``wrong``, the first ``max_windows``),
    each with the window ending at it. A window spans several frames and its neighbours
    overlap it: shown window by window, every frame came back once per window holding it.
    Returns the frames and the chosen windows."""
    if sequences:
        rows = [r for r in rows if any(fnmatch.fnmatchcase(r["sequence"], p) for p in sequences)]
        if not rows:
            raise UserError(
                f"--sequences {' '.join(sequences)}: matches no sequence of the predictions "
                f"(names look like Test/<subject>/<action>; patterns take * and ?)"
            )
    ordered = sorted(rows, key=lambda r: (r["sequence"], r["stop"], r["start"]))
    chosen = [r for r in ordered if r["truth"] != r["prediction"]] if wrong else ordered
    if max_windows:
        chosen = chosen[:max_windows]
    ending: dict[tuple[str, int], dict] = {}
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
    check_memory(
        frames * 400,
        f"the plan of a video of {frames} frames",  # a Shot and its list slot
        "limit it with --sequences, --wrong or --max-windows",
    )
    shots = [
        Shot(sequence, frame, ending.get((sequence, frame)))
        for sequence in sorted(spans)
        for first, last in spans[sequence]
        for frame in range(first, last + 1)
    ]
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
        wanted = [
            (i, (row["sequence"], f))
            for i, f in enumerate(range(row["start"], row["stop"] + 1))
            if (row["sequence"], f) in needed and (row["sequence"], f) not in found
        ]
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
        raise UserError(
            f"{config.out}: OpenCV writes videos as {', '.join(VIDEO_SUFFIXES)} (mp4 falls back to .avi "
            f"where its encoder is missing); give a name ending in one of them"
        )
    folder = os.path.dirname(os.path.abspath(config.out))
    created = topmost_missing(folder)
    storage.check_output_file(config.out, "video")
    try:
        return _make_video(config, folder, progress, print_fn)
    except BaseException:
        remove_empty_up_to(folder, created)  # a failure before the video: no empty folder of ours left
        raise


def _make_video(config: VideoConfig, folder: str, progress: bool, print_fn: Callable[[str], None]) -> tuple[str, int]:
    from tqdm import tqdm

    rows = read_predictions(config.predictions)
    shots, in_video = video_frames(rows, config.sequences, config.wrong, config.max_windows)
    if not shots:
        raise UserError(f"{config.predictions}: no wrong window to show" if config.wrong else "no windows to show")
    picked = by_class(in_video, config.sheet_windows)
    frames = max((row["stop"] - row["start"] + 1 for row in picked), default=1)
    check_memory(
        len(picked) * frames * 2 * 3 * (config.size + SHEET_THUMB) ** 2,
        f"a contact sheet of --sheet-windows {config.sheet_windows} at --size {config.size}",
        "lower --sheet-windows or --size",
    )  # its frames (RGB) and their PNG encoding
    if config.src:
        if not os.path.isdir(config.src):
            raise UserError(f"--src {config.src}: no such folder")
        kinds = {row["sequence"]: frame_kind(row, config.predictions) for row in rows}

        def frame_of(shot: Shot) -> np.ndarray:
            return source_frame(config.src, shot, kinds[shot.sequence], config.size, config.predictions)

    elif config.data:
        manifest = read_manifest(config.data)
        check_memory(
            len(shots) * math.prod(manifest.clip_shape[1:]),
            f"the {len(shots)} frames of the video, as stored in the shards",
            "limit the video with --sequences, --wrong or --max-windows, or give --src",
        )
        stored = shard_frames(_split_samples(config.data, config.split), rows, shots)
        missing = sorted({shot.sequence for shot in shots if (shot.sequence, shot.frame) not in stored})
        if missing:
            raise UserError(
                f"{config.data} ({config.split} split) lacks frames of {len(missing)} sequence(s) of "
                f"{config.predictions}, e.g. {missing[0][:120]}: were they scored on these shards?"
            )

        def frame_of(shot: Shot) -> np.ndarray:
            return _display(stored[(shot.sequence, shot.frame)], config.size)

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
        sheet_rows = [
            Panel(
                [cache[(row["sequence"], f)] for f in range(row["start"], row["stop"] + 1)],
                [
                    (row["sequence"], WHITE),
                    (f"frames {row['start']}-{row['stop']}", WHITE),
                    *prediction_captions(row["truth"], row["prediction"]),
                ],
            )
            for row in picked
        ]
        right = sum(row["truth"] == row["prediction"] for row in in_video)
        name = os.path.basename(staged)  # .avi where OpenCV cannot write mp4
        sheet_name = os.path.splitext(name)[0] + "-sheet.png"
        title = f"{right}/{len(in_video)} windows right; one row per class in turn"
        publish(folder, {sheet_name: sheet(sheet_rows, title)}, {name: staged}, stage)
    path, sheet_path = os.path.join(folder, name), os.path.join(folder, sheet_name)
    sequences = len({shot.sequence for shot in shots})
    print_fn(
        f"wrote {path}: {count} frames of {sequences} sequence{'s' if sequences > 1 else ''} "
        f"({len(in_video)} windows), {duration(count / config.fps)} at {config.fps:g} fps; and {sheet_path}"
    )
    return path, count


def _split_samples(data: str, split: str) -> Iterator[dict]:
    manifest = read_manifest(data)
    for shard in split_shards(data, manifest, split):
        yield from read_samples(shard.url, shard.count)
