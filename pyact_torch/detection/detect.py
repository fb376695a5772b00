"""``pyact detect``: hand actions found in whole sequences, video files and live cameras.

Each source is read frame by frame (``stream``), each window ending at a frame is classified
(``runners``), and the probabilities become segments online (``segments``). With a single
source (a camera, a video, a folder) a segment is printed once when it starts and once when it
ends; all of them are written to ``detections.json`` and, against the label files, scored by
``detection.metrics``. With ``--model FILE.onnx`` nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import signal
import zipfile
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np

from ..io import storage
from ..config import DetectConfig
from .metrics import SequenceResult, Truth, detection_metrics, format_table
from ..errors import UserError
from ..io.outputs import publish, staging
from ..data.frames import FrameSpec
from ..data.labels import NO_ACTION, LabelFileError, Segment, parse_label_file, scan_dataset, scan_detection
from ..draw.plots import timeline_png
from .runners import ModelInfo, Runner, choose_threads, load_checkpoint_runner, load_exported
from .segments import Detection, Segmenter
from .stream import Frame, batched, capture_frames, count_frames, folder_frames, open_capture, streamed
from ..draw.panels import GREEN, WHITE, YELLOW, Panel, to_display, write_video

FRAME_PERIOD_MS = 1000 / 30  # a 30 fps camera
FOLDER_FPS = 15.0  # the annotated video of frame folders


@dataclass
class Source:
    """One stream to run over: ``frames(keep_raw)`` yields its frames; ``truths`` are its label
    file's segments (None: no labels); ``live`` sources go one frame at a time."""

    name: str
    frames: Callable[[bool], Iterator[Frame]]
    truths: tuple[Truth, ...] | None
    fps: float
    live: bool
    n_frames: int | None = None  # known before reading (folders)


def run_detect(config: DetectConfig, progress: bool = True, print_fn: Callable[[str], None] = print) -> dict:
    """Run ``pyact detect``; returns what metrics.json holds. The sources, the model and
    ``--out`` are checked before any frame is classified; the outputs are written to a
    staging folder and published together when all of them are complete."""
    runner = (
        load_exported(config.model)
        if config.model
        else load_checkpoint_runner(config.checkpoint, log=print_fn, device=config.device)
    )
    if config.depth_range:
        if runner.info.modality == "color":
            print_fn("note: --depth-range is not used: this model takes colour frames only")
        runner.info = replace(runner.info, depth_range=tuple(config.depth_range))
    stopped = [False]
    sources = plan_sources(config, runner.info, print_fn, stop=lambda: stopped[0])
    created = bool(config.out) and not storage.is_gcs(config.out) and not os.path.exists(config.out)
    if config.out:
        storage.check_writable(config.out)
    _set_threads(runner, config, sources[0].live or config.streaming, print_fn)  # after the checks: ~1 s
    previous = signal.signal(signal.SIGINT, _stop_once(stopped, print_fn)) if sources[0].live else None
    try:
        with staging(config.out, "detect", created) if config.out else contextlib.nullcontext("") as folder:
            run = DetectionRun(runner, config, print_fn)
            run.announce = len(sources) == 1
            staged = _run_sources(run, sources, config, folder, progress)
            if previous is not None:  # a Ctrl-C from here on interrupts, as anywhere else
                signal.signal(signal.SIGINT, previous)
                previous = None
            report, files = run.finish()
            if config.out:
                publish(config.out, files, staged, folder)
                print_fn(f"outputs in {config.out}: {', '.join(sorted(files) + sorted(staged.keys() - files.keys()))}")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return report


def _run_sources(
    run: "DetectionRun", sources: list[Source], config: DetectConfig, folder: str, progress: bool
) -> dict[str, str]:
    """Every source through ``run``; the annotated video goes to the staging ``folder``. Returns the
    staged files (name -> path)."""
    from tqdm import tqdm

    live = sources[0].live
    bar = tqdm(
        total=None if live else sum(s.n_frames or 0 for s in sources),
        unit="frame",
        desc="detect",
        disable=None if progress and not live else True,
    )
    run.on_frame = lambda: bar.update(1)
    keep_raw = bool(folder) and not config.no_video
    panels = (panel for source in sources for panel in run.source(source, keep_raw))
    staged = {}
    if keep_raw:
        path, _ = write_video(panels, os.path.join(folder, "detections.mp4"), sources[0].fps)
        staged[os.path.basename(path)] = path  # detections.avi where OpenCV cannot write mp4
    else:
        for _ in panels:
            pass
    bar.close()
    return staged


def _set_threads(runner: Runner, config: DetectConfig, one_at_a_time: bool, print_fn: Callable[[str], None]) -> None:
    """--threads, or for one window at a time on the CPU the count measured fastest, said."""
    if config.threads:
        runner.set_threads(config.threads)
    elif one_at_a_time and not (config.checkpoint and config.device == "cuda"):
        best, seconds = choose_threads(runner)
        tried = ", ".join(f"{count}: {s * 1000:.1f} ms" for count, s in seconds.items())
        print_fn(
            f"one window at a time: {best} intra-op thread{'s' if best > 1 else ''}, the fastest measured "
            f"here now (per window, {tried}); --threads N sets it"
        )


def _stop_once(stopped: list[bool], print_fn: Callable[[str], None]) -> Callable:
    """A SIGINT handler for live sources: the first Ctrl-C ends the stream after the current
    frame (what was found is written), a second one interrupts."""

    def handler(signum: int, frame: object) -> None:
        if stopped[0]:
            raise KeyboardInterrupt
        stopped[0] = True
        print_fn("stopping after this frame (Ctrl-C again to abandon the run)")

    return handler


def plan_sources(
    config: DetectConfig, info: ModelInfo, print_fn: Callable[[str], None], stop: Callable[[], bool] = lambda: False
) -> list[Source]:
    """The sources named by the flags, checked before any frame is classified; a video or
    camera ends early when ``stop()`` says so."""
    where = config.model or config.checkpoint
    if (config.video or config.camera >= 0) and info.modality != "color":
        raise UserError(
            f"{where}: takes {info.modality} frames; a video or camera gives colour only "
            f"(use a color model, or --src with the dataset's depth frames)"
        )
    spec = info.spec(where)
    if config.max_frames and config.max_frames < info.seq_len:
        raise UserError(f"--max-frames {config.max_frames}: fewer than the model's window of {info.seq_len} frames")
    if config.video or config.camera >= 0:
        capture = open_capture(config.video, config.camera)
        name = os.path.basename(config.video) if config.video else f"camera {config.camera}"
        fps = float(capture.get(5) or 0) or FOLDER_FPS  # cv2.CAP_PROP_FPS
        return [
            Source(name, lambda keep: capture_frames(capture, spec, name, config.max_frames, stop), None, fps, True)
        ]
    src = os.path.normpath(config.src)
    labelled = not config.labels  # a segment list replaces the label files: they are not read
    if config.split == "testdetection":
        sources = _detection_sources(src, info, spec, print_fn, labelled)
    elif os.path.isdir(os.path.join(src, "Train")) or os.path.isdir(os.path.join(src, "Test")):
        sources = _split_sources(src, config.split, info, spec, print_fn, labelled)
    else:
        sources = [_folder_source(src, info, spec, print_fn, labelled)]
    return with_segment_list(sources, config.labels, info, print_fn) if config.labels else sources


def _folder_source(
    src: str, info: ModelInfo, spec: FrameSpec, print_fn: Callable[[str], None], labelled: bool = True
) -> Source:
    """One sequence folder, scored against its ``<folder>.xml`` when there is one (and
    ``labelled``)."""
    n_frames = count_frames(src, info.modality)
    if n_frames < info.seq_len:
        raise UserError(f"{src}: {n_frames} frames, fewer than the model's window of {info.seq_len}")
    truths = _folder_truths(src, n_frames, info, print_fn) if labelled else None
    name = "/".join(src.split(os.sep)[-3:])
    return Source(name, lambda keep: folder_frames(src, n_frames, spec, keep), truths, FOLDER_FPS, False, n_frames)


def _folder_truths(
    folder: str, n_frames: int, info: ModelInfo, print_fn: Callable[[str], None]
) -> tuple[Truth, ...] | None:
    """The segments of a sequence folder's label file (``<folder>.xml``), each labelled with
    the action it names, else with the folder's name, as in a dataset; None without a label
    file, or when a segment without its own action is in a folder named for no class."""
    label_file, action = folder + ".xml", os.path.basename(folder)
    if not os.path.isfile(label_file):
        return None
    try:
        segments = parse_label_file(label_file)
    except LabelFileError as exc:
        raise UserError(f"{label_file}: {exc}") from None
    if action not in info.classes and any(s.action is None for s in segments):
        print_fn(f"note: {label_file} is not scored: {action!r} is not one of the model's classes")
        return None
    for segment in segments:
        if segment.pos + segment.len > n_frames:
            raise UserError(
                f"{label_file}: segment pos={segment.pos} len={segment.len} ends beyond the last frame ({n_frames - 1})"
            )
    return _truths(segments, action, info, label_file)


def _unknown_actions(labels: set[str], info: ModelInfo) -> list[str]:
    """The names among ``labels`` that are no action the model knows (background is none)."""
    return sorted(labels - set(info.classes) | (labels & {NO_ACTION}))


def _truths(segments: tuple[Segment, ...], action: str, info: ModelInfo, label_file: str) -> tuple[Truth, ...]:
    """True segments labelled by their own action, else ``action``; an action the model does
    not know is refused naming the label file (it could never be found)."""
    truths = tuple(Truth(s.action or action, s.pos, s.pos + s.len - 1) for s in segments)
    unknown = _unknown_actions({t.label for t in truths}, info)
    if unknown:
        raise UserError(
            f"{label_file}: names the action {unknown[0]!r}, which is not one of the model's classes "
            f"({', '.join(c for c in info.classes if c != NO_ACTION)[:200]})"
        )
    return truths


def _detection_sources(
    src: str, info: ModelInfo, spec: FrameSpec, print_fn: Callable[[str], None], labelled: bool = True
) -> list[Source]:
    """The long recordings of ``src/TestDetection``, each segment labelled with its own action
    (without ``labelled``, found by their frames alone: a segment list scores them)."""
    recordings, bad = scan_detection(src, info.modality, labelled)
    if bad:
        print_fn(f"warning: skipping {len(bad)} broken recording(s) of TestDetection; first: {bad[0].message()}")
    short = [r for r in recordings if r.n_frames < info.seq_len]
    if short:
        print_fn(
            f"warning: skipping {len(short)} recording(s) shorter than the model's window of {info.seq_len} "
            f"frames; first: {short[0].path}"
        )
    recordings = [r for r in recordings if r.n_frames >= info.seq_len]
    if not recordings:
        raise UserError(f"{os.path.join(src, 'TestDetection')}: no usable recording")
    return [
        Source(
            r.path,
            functools.partial(folder_frames, os.path.join(src, r.path), r.n_frames, spec),
            _truths(r.segments, "", info, os.path.join(src, r.path) + ".xml") if labelled else None,
            FOLDER_FPS,
            False,
            r.n_frames,
        )
        for r in recordings
    ]


def _split_sources(
    src: str, split: str, info: ModelInfo, spec: FrameSpec, print_fn: Callable[[str], None], labelled: bool = True
) -> list[Source]:
    sequences, bad = scan_dataset(src, info.modality)
    moved = set(info.eval_subjects or ())
    if split != "test" and info.eval_subjects is None and not any(s.split_dir == "Eval" for s in sequences):
        raise UserError("the model does not record which Train subjects were its eval split; use --split test")

    def in_split(split_dir: str, subject: str) -> bool:
        if split == "test":
            return split_dir == "Test"
        is_eval = split_dir == "Eval" or (split_dir == "Train" and subject in moved)
        return is_eval if split == "eval" else split_dir == "Train" and not is_eval

    chosen = [s for s in sequences if in_split(s.split_dir, s.subject)]
    short = [s for s in chosen if s.n_frames < info.seq_len]
    if short:
        print_fn(
            f"warning: skipping {len(short)} sequence(s) shorter than the model's window of {info.seq_len} "
            f"frames; first: {short[0].path}"
        )
        chosen = [s for s in chosen if s.n_frames >= info.seq_len]
    broken = [b for b in bad if in_split(*b.path.split("/")[:2])]
    if broken:
        print_fn(
            f"warning: skipping {len(broken)} broken sequence(s) of the {split} split; first: {broken[0].message()}"
        )
    if not chosen:
        raise UserError(f"{src}: no usable sequence in the {split} split")
    unknown = [s for s in chosen if s.action not in info.classes or s.action == NO_ACTION]
    if unknown:
        print_fn(
            f"note: {len(unknown)} sequence(s) are not scored: their action is not one of the model's "
            f"classes; first: {unknown[0].path}"
        )
    sources = []
    for seq in chosen:
        folder = os.path.join(src, seq.path)
        truths = (
            None
            if seq in unknown or not labelled
            else _truths(seq.segments, seq.action, info, os.path.join(src, seq.path) + ".xml")
        )
        sources.append(
            Source(
                seq.path,
                functools.partial(folder_frames, folder, seq.n_frames, spec),
                truths,
                FOLDER_FPS,
                False,
                seq.n_frames,
            )
        )
    return sources


SEGMENT_LIST_LIMIT = 16 << 20  # bytes: the real TestDetection's list is a few kB
SEGMENT_LIST_ROWS = 1_000_000  # the real TestDetection has 139 segments


def read_segment_list(path: str) -> list[tuple[str, Truth]]:
    """``(sequence, Truth)`` rows of a user's segment list: CSV with the header
    ``sequence,action,first,last`` or JSON, a list of objects with those keys (frames inclusive,
    integers). Bounded: at most ``SEGMENT_LIST_LIMIT`` bytes and ``SEGMENT_LIST_ROWS`` rows."""
    import csv
    import json

    if not os.path.isfile(path):
        raise UserError(f"--labels {path}: no such file")
    if os.path.getsize(path) > SEGMENT_LIST_LIMIT:
        raise UserError(f"--labels {path}: larger than {SEGMENT_LIST_LIMIT >> 20} MB; not a segment list")
    out: list[tuple[str, Truth]] = []

    def add(place: str, sequence: Any, action: Any, first: Any, last: Any) -> None:  # as read from the file
        if not (isinstance(sequence, str) and isinstance(action, str) and type(first) is int and type(last) is int):
            raise UserError(
                f"--labels {path}: {place}: needs sequence and action (text) and first and last (whole frame numbers)"
            )
        if not sequence.strip() or first < 0 or last < first:
            raise UserError(f"--labels {path}: {place}: frames {first}..{last} of {sequence[:80]!r} are no segment")
        if len(out) == SEGMENT_LIST_ROWS:
            raise UserError(f"--labels {path}: more than {SEGMENT_LIST_ROWS} segments; not a segment list")
        out.append((sequence.strip(), Truth(action.strip(), first, last)))

    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:  # -sig: a spreadsheet's byte-order mark
            if path.lower().endswith(".json"):
                rows = json.load(handle)
                if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
                    raise UserError(
                        f"--labels {path}: expected a list of objects with sequence, action, first and last"
                    )
                for number, row in enumerate(rows, 1):
                    add(f"item {number}", *(row.get(key) for key in ("sequence", "action", "first", "last")))
                return out
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"sequence", "action", "first", "last"} <= set(reader.fieldnames):
                raise UserError(f"--labels {path}: the first line must be the header sequence,action,first,last")
            for row in reader:
                try:
                    first, last = int(row["first"]), int(row["last"])
                except (TypeError, ValueError):
                    raise UserError(
                        f"--labels {path}: line {reader.line_num}: first and last must be whole frame numbers"
                    ) from None
                add(f"line {reader.line_num}", row["sequence"], row["action"], first, last)
    except (ValueError, RecursionError, csv.Error) as exc:  # JSON, text and CSV errors (UnicodeDecodeError too)
        raise UserError(f"--labels {path}: cannot be read as a segment list ({str(exc)[:120]})") from None
    return out


def with_segment_list(
    sources: list[Source], path: str, info: ModelInfo, print_fn: Callable[[str], None] = print
) -> list[Source]:
    """``sources`` scored against a user's segment list instead of their label files: a row
    belongs to the source whose name is its sequence, or whose name's last part is. Sources the
    list does not name are not scored."""
    rows = read_segment_list(path)
    unknown = _unknown_actions({t.label for _, t in rows}, info)
    if unknown:
        raise UserError(
            f"--labels {path}: names the action {unknown[0][:60]!r}, which is not one of the model's classes"
        )
    owners: dict[str, list[Source]] = {}
    for source in sources:
        owners.setdefault(source.name, []).append(source)
        if "/" in source.name:
            owners.setdefault(source.name.rsplit("/", 1)[1], []).append(source)
    claimed: dict[str, list[Truth]] = {}
    for sequence, truth in rows:
        found = owners.get(sequence, [])
        if len(found) != 1:
            raise UserError(
                f"--labels {path}: the sequence {sequence[:80]!r} names {len(found)} of the sources "
                f"({', '.join(s.name for s in sources[:3])}{', ...' if len(sources) > 3 else ''}); "
                f"give its name as detect prints it"
            )
        if found[0].n_frames is not None and truth.last >= found[0].n_frames:
            raise UserError(
                f"--labels {path}: {sequence[:80]!r} frames {truth.first}..{truth.last} end beyond its "
                f"last frame ({found[0].n_frames - 1})"
            )
        claimed.setdefault(found[0].name, []).append(truth)
    left = [s.name for s in sources if s.name not in claimed]
    if left:
        print_fn(f"note: {len(left)} source(s) are not scored: --labels names none of their segments; first: {left[0]}")
    return [replace(s, truths=tuple(claimed[s.name]) if s.name in claimed else None) for s in sources]


class DetectionRun:
    """What one ``pyact detect`` run collects across its sources."""

    def __init__(self, runner: Runner, config: DetectConfig, print_fn: Callable[[str], None]):
        self.runner, self.config, self.print = runner, config, print_fn
        self.info = runner.info
        self.classes = list(runner.info.classes)
        self.results: list[SequenceResult] = []
        self.probabilities: list[np.ndarray] = []  # per source, in order
        self.latencies: list[float] = []
        self.scored: list[bool] = []  # per source: has labels to score against
        self.announce = False  # print segments as they start and end (a single source)
        self.on_frame: Callable[[], None] = lambda: None

    def source(self, source: Source, keep_raw: bool) -> Iterator[Panel]:
        """Run over one source, yielding its annotated frames when ``keep_raw``."""
        one_at_a_time = source.live or self.config.streaming
        segmenter = Segmenter(self.classes, NO_ACTION, self.info.seq_len, self.config.smooth, self.config.min_length)
        frames = source.frames(keep_raw)
        pairs = (
            streamed(frames, self.runner, self.info.seq_len)
            if one_at_a_time
            else batched(frames, self.runner, self.info.seq_len, self.config.batch_size)
        )
        found: list[Detection] = []
        rows: list[np.ndarray] = []
        last = -1
        for frame, probabilities, seconds in pairs:
            last = frame.index
            self.on_frame()
            if probabilities is not None:
                rows.append(probabilities.astype(np.float32))
                if one_at_a_time:
                    self.latencies.append(seconds)
                found += self._events(segmenter.push(frame.index, probabilities))
            if keep_raw:
                yield self._panel(source, frame, segmenter)
        if last >= 0:
            found += self._events(segmenter.finish(last))
        if last + 1 < self.info.seq_len:
            raise UserError(f"{source.name}: {last + 1} frames, fewer than the model's window of {self.info.seq_len}")
        self.results.append(SequenceResult(source.name, last + 1, source.truths or (), tuple(found)))
        self.probabilities.append(np.stack(rows))
        self.scored.append(source.truths is not None)

    def _events(self, events: list[tuple[str, Detection]]) -> list[Detection]:
        for kind, det in events:
            if not self.announce:
                break
            if kind == "start":
                self.print(f"[frame {det.seen_at}] {det.label} started at frame {det.first}")
            else:
                self.print(
                    f"[frame {det.decided_at}] {det.label}: frames {det.first}-{det.last} (score {det.score:.2f})"
                )
        return [det for kind, det in events if kind == "end"]

    def _panel(self, source: Source, frame: Frame, segmenter: Segmenter) -> Panel:
        captions = []
        if segmenter.now is None:
            captions.append((f"frame {frame.index}: filling the first window", WHITE))
        else:
            label, probability = segmenter.now
            captions.append((f"frame {frame.index}: {label} {probability:.2f}", WHITE if label == NO_ACTION else GREEN))
        active = segmenter.active
        captions.append((f"segment: {active.label} from frame {active.first}" if active else "segment: -", GREEN))
        if source.truths is not None:
            truth = next((t.label for t in source.truths if t.first <= frame.index <= t.last), NO_ACTION)
            captions.append((f"truth: {truth}", YELLOW))
        assert frame.raw is not None  # sources keep the raw frame when a video is drawn
        return Panel([to_display(frame.raw, self.config.video_size)], captions)

    def finish(self) -> tuple[dict, dict[str, bytes]]:
        """Print the summary; returns metrics.json's content and every output file's bytes."""
        config = self.config
        latency = None
        if self.latencies:
            p50, p99 = (float(np.percentile(self.latencies, q) * 1000) for q in (50, 99))
            latency = {
                "p50_ms": p50,
                "p99_ms": p99,
                "frames": len(self.latencies),
                "p50_frame_periods_30fps": p50 / FRAME_PERIOD_MS,
                "p99_frame_periods_30fps": p99 / FRAME_PERIOD_MS,
            }
        scored = [r for r, labelled in zip(self.results, self.scored) if labelled]
        detection = detection_metrics(scored, NO_ACTION) if scored else None
        report = {
            "model": self.runner.name,
            "smooth": config.smooth,
            "min_length": config.min_length,
            "latency": latency,
            "detection": detection,
        }
        files = {}
        if config.out:
            detections = {
                "model": self.runner.name,
                "classes": self.classes,
                "seq_len": self.info.seq_len,
                "smooth": config.smooth,
                "min_length": config.min_length,
                "sequences": [
                    {
                        "name": r.name,
                        "frames": r.n_frames,
                        "probabilities": str(i),
                        "segments": [d.as_dict() for d in r.detections],
                    }
                    for i, r in enumerate(self.results)
                ],
            }
            rows = [
                (
                    r.name,
                    r.n_frames,
                    [(t.label, t.first, t.last) for t in r.truths] if labelled else None,
                    [(d.label, d.first, d.last) for d in r.detections],
                )
                for r, labelled in zip(self.results, self.scored)
            ]
            files = {
                "detections.json": storage.json_bytes(detections),
                "probabilities.npz": npz_bytes(self.probabilities),
                "metrics.json": storage.json_bytes(report),
                "timeline.png": timeline_png(rows, self.classes, NO_ACTION),
            }
        segments = sum(len(r.detections) for r in self.results)
        lines = [
            f"{segments} segments in {len(self.results)} sequence(s), {sum(r.n_frames for r in self.results)} frames"
        ]
        if detection is not None:
            lines.append(format_table(detection).rstrip())
        if latency is not None:
            lines.append(
                f"latency per frame (prepare + model): p50 {latency['p50_ms']:.1f} ms, p99 {latency['p99_ms']:.1f} ms "
                f"over {latency['frames']} frames = {latency['p99_frame_periods_30fps']:.2f}x a 30 fps frame "
                f"period at p99"
            )
        self.print("\n".join(lines))
        return report, files


def npz_bytes(arrays: list[np.ndarray]) -> bytes:
    """An ``.npz`` (what ``np.load`` reads) of ``arrays`` named "0", "1", ...: sequence names
    are data and never become member names or keyword arguments."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for index, array in enumerate(arrays):
            with archive.open(f"{index}.npy", "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array))
    return buffer.getvalue()
