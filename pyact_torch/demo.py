"""``pyact demo``: the whole pipeline on a small synthetic dataset, on CPU, in a few minutes.

synthetic raw dataset -> shards -> train ``tiny`` -> score the test split -> video -> detect the
actions in the long TestDetection recordings (several actions each), with every
output in one folder (or shards and checkpoints in a local fake-gcs-server bucket), and a short
summary at the end. It calls the same functions as the other subcommands.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Callable

from .io import storage
from .config import DemoConfig, DetectConfig, PreprocessConfig, EvaluateConfig, SynthConfig, TrainConfig, VideoConfig
from .io.lifecycle import preempted
from .errors import UserError, installed

BUCKET = "pyact-demo"
# the record of what a demo wrote in its folder: a new run deletes exactly those files, and
# refuses to start while the folder holds anything else
MARKER = ".pyact-demo"
RECORD_FORMAT = "pyact-demo-files/1"
RECORD_LIMIT = 16 << 20


def _check_needs(config: DemoConfig) -> None:
    """The packages the settings need, before anything in ``--out`` is touched (a bare GPU
    box's Python has neither torch_xla nor google-cloud-storage)."""
    from .io.emulator import require_emulator
    from .training.xla import require_torch_xla

    if config.device == "xla":
        require_torch_xla(instead="the demo runs with --device cpu")
    if config.gcs_emulator:
        require_emulator()
        if not installed("google.cloud.storage"):
            raise UserError(
                "--gcs-emulator needs the google-cloud-storage package (pip install google-cloud-storage), "
                "or leave --gcs-emulator out"
            )


def run_demo(config: DemoConfig, print_fn: Callable[[str], None] = print) -> dict:
    """Run the demo; returns the scoring metrics plus where each output is."""
    from .detection.detect import run_detect
    from .io.emulator import GCSEmulator
    from .scoring.evaluate import evaluate_checkpoint
    from .data.preprocess import format_summary, preprocess
    from .data.synthetic import make_dataset
    from .training.train import fit
    from .scoring.video import make_video

    started = time.perf_counter()
    _check_needs(config)
    out = os.path.realpath(config.out)  # a link to an earlier demo's folder: that folder
    clear_earlier_demo(out, config.out)
    os.makedirs(out, exist_ok=True)
    _write_record(out, complete=False)
    emulator = None
    base = f"gs://{BUCKET}" if config.gcs_emulator else out
    raw, shards, run = os.path.join(out, "raw"), storage.join(base, "shards"), storage.join(base, "run")
    try:
        if config.gcs_emulator:
            emulator = GCSEmulator(os.path.join(out, "gcs"), log=os.path.join(out, "gcs-server.log")).start()
            emulator.create_bucket(BUCKET)
        print_fn(f"[1/6] synthetic dataset (6 Train, 1 Eval, 2 Test subjects, 10 TestDetection recordings) -> {raw}")
        make_dataset(SynthConfig(raw, subjects=(6, 1, 2), frames=(40, 60), size=(96, 72), seed=config.seed))
        _write_record(out, complete=False)  # after each step: a kill -9 leaves at most one step unrecorded
        print_fn(f"[2/6] preprocessing -> {shards}")
        print_fn(
            format_summary(preprocess(PreprocessConfig(raw, shards, image_size=32, shard_size=64), print_fn=print_fn))
        )
        _write_record(out, complete=False)
        print_fn(f"[3/6] training tiny for {config.epochs} epochs (--augment standard) on {config.device} -> {run}")
        handler = signal.getsignal(signal.SIGTERM)
        try:  # training turns SIGTERM into a checkpoint and a clean stop; the demo then stops too
            fit(
                TrainConfig(
                    data=shards,
                    run_dir=run,
                    model="tiny",
                    epochs=config.epochs,
                    lr=2e-3,
                    lr_schedule="cosine",
                    # detection on new people depends on it: docs/benchmarks.md, "Detection and augmentation"
                    augment="standard",
                    device=config.device,
                    ckpt_every=0,
                    log_every=20,
                    workers=1,
                    seed=config.seed,
                )
            )
        finally:
            signal.signal(signal.SIGTERM, handler)
        if preempted():
            from .io.lifecycle import Terminated

            raise Terminated()
        _write_record(out, complete=False)
        print_fn(f"[4/6] scoring the test split -> {out}")
        metrics = evaluate_checkpoint(
            EvaluateConfig(checkpoint=run, data=shards, out=out, device=config.device), print_fn=print_fn
        )
        print_fn("[5/6] prediction video")
        video, frames = make_video(
            VideoConfig(
                predictions=os.path.join(out, "predictions.json"), out=os.path.join(out, "predictions.mp4"), src=raw
            ),
            print_fn=print_fn,
        )
        storage.write_bytes(os.path.join(out, "loss.png"), storage.read_bytes(storage.join(run, "loss.png")))
        detection = os.path.join(out, "detection")
        print_fn(f"[6/6] detecting actions in the TestDetection recordings -> {detection}")
        found = run_detect(
            DetectConfig(checkpoint=run, src=raw, split="testdetection", out=detection), print_fn=print_fn
        )
    finally:
        if emulator is not None:
            emulator.stop()
        _write_record(out, complete=True)  # also after a failure or Ctrl-C: the next run removes what this one wrote
    where = {
        "metrics": os.path.join(out, "metrics.json"),
        "per-class table": os.path.join(out, "per_class.txt"),
        "confusion matrix": os.path.join(out, "confusion_matrix.png"),
        "predictions": os.path.join(out, "predictions.json"),
        "video": video,
        "contact sheet": os.path.splitext(video)[0] + "-sheet.png",
        "loss plot": os.path.join(out, "loss.png"),
        "detections": os.path.join(detection, "detections.json") + " (timeline.png, detections.mp4 beside it)",
        "checkpoints": run + (f" (fake-gcs-server files under {os.path.join(out, 'gcs')})" if emulator else ""),
        "shards": shards,
    }
    width = max(map(len, where))
    lines = [
        "",
        f"demo finished in {time.perf_counter() - started:.0f} s: test accuracy {metrics['accuracy']:.3f} "
        f"(macro-F1 {metrics['macro_f1']:.3f}) over {metrics['windows']} windows; detection in "
        f"TestDetection at tIoU 0.5: segment F1 {found['detection']['segments']['0.5']['f1']:.3f}, "
        f"mAP {found['detection']['mAP']['thresholds']['0.5']['mAP']:.3f}",
    ]
    lines += [f"  {name:<{width}}  {path}" for name, path in where.items()]
    print_fn("\n".join(lines))
    return {**metrics, "outputs": where, "video_frames": frames, "detection": found["detection"]}


def _files_under(folder: str) -> set[str]:
    """Every file and link below ``folder`` (links not followed), relative to it."""
    found: set[str] = set()
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        dirs[:] = [d for d in dirs if d not in links]
        found.update(os.path.relpath(os.path.join(root, name), folder) for name in files + links)
    return found


def _write_record(out: str, complete: bool = True) -> None:
    """Record every file now in ``out`` (the demo's, since it started from an empty folder);
    ``complete=False`` while the demo still runs (a kill -9 leaves it so)."""
    files = sorted(_files_under(out) - {MARKER})
    storage.write_json(os.path.join(out, MARKER), {"format": RECORD_FORMAT, "files": files, "complete": complete})


def _recorded(out: str, shown: str) -> tuple[set[str], bool]:
    """The files an earlier demo recorded, as names inside ``out`` (never a path outside it)."""
    marker = os.path.join(out, MARKER)
    if os.path.islink(marker) or not os.path.isfile(marker):
        raise UserError(f"--out {shown}: not empty and not an earlier demo's output; choose another folder")
    try:
        record = storage.read_json(marker, RECORD_LIMIT)
    except UserError:
        record = None
    if not (
        isinstance(record, dict)
        and record.get("format") == RECORD_FORMAT
        and isinstance(record.get("files"), list)
        and all(isinstance(f, str) for f in record["files"])
    ):
        raise UserError(
            f"--out {shown}: an earlier demo's output without a readable record of its files (made by an "
            f"older pyact-torch, or edited); delete it yourself or choose another --out"
        )
    names = set()
    for name in record["files"]:
        parts = name.split(os.sep)
        if os.path.isabs(name) or "\0" in name or any(p in ("", ".", "..") for p in parts):
            raise UserError(
                f"--out {shown}: its record names {name[:80]!r}, not a file inside it; delete the folder "
                f"yourself or choose another --out"
            )
        names.add(os.path.normpath(name))
    return names - {MARKER}, record.get("complete", True) is not False


def clear_earlier_demo(out: str, shown: str) -> None:
    """Make ``out`` ready for a demo: absent or empty as it is, or an earlier demo's folder
    holding nothing but what that demo recorded, whose files are then deleted (and the folders
    they leave empty). A folder holding anything else is refused before anything is deleted."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"--out {shown}: exists and is not a folder")
    if not os.path.isdir(out) or not os.listdir(out):
        return
    recorded, complete = _recorded(out, shown)
    present = _files_under(out)  # never through a link: a recorded name behind one is not deleted
    foreign = sorted(present - recorded - {MARKER})
    if foreign:
        listed = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        if not complete:
            raise UserError(
                f"--out {shown}: an earlier demo was killed before it recorded all its files ({listed} are "
                f"not in its record, and may be yours); delete the folder yourself, or choose another --out"
            )
        raise UserError(
            f"--out {shown}: holds files no demo wrote ({listed}); a new demo deletes only its own "
            f"files, so move them, or choose another --out"
        )
    for name in sorted(recorded & present):
        path = os.path.join(out, name)
        if os.path.islink(path) or os.path.isfile(path):
            os.remove(path)
    parents = set()  # the folders holding recorded files, and theirs: the demo made them
    for name in recorded:
        folder = os.path.dirname(name)
        while folder:
            parents.add(folder)
            folder = os.path.dirname(folder)
    for folder in sorted(parents, key=lambda p: p.count(os.sep), reverse=True):
        path = os.path.join(out, folder)
        if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
            os.rmdir(path)
    os.remove(os.path.join(out, MARKER))
