"""``pyact demo``: the whole pipeline on a small synthetic dataset, on CPU, in a few minutes.

synthetic raw dataset -> shards -> train ``tiny`` -> score the test split -> video -> detect the
actions in the whole test sequences, with every
output in one folder (or shards and checkpoints in a local fake-gcs-server bucket), and a short
summary at the end. It calls the same functions as the other subcommands.
"""

from __future__ import annotations

import os
import shutil
import time
from typing import Callable

from . import storage
from .config import DemoConfig, DetectConfig, PreprocessConfig, EvaluateConfig, SynthConfig, TrainConfig, VideoConfig
from .errors import UserError

BUCKET = "pyact-demo"
MARKER = ".pyact-demo"  # only a folder holding this is emptied by a new demo run


def run_demo(config: DemoConfig, print_fn: Callable[[str], None] = print) -> dict:
    """Run the demo; returns the scoring metrics plus where each output is."""
    from .detect import run_detect
    from .emulator import GCSEmulator
    from .scoring import evaluate_checkpoint
    from .preprocess import format_summary, preprocess
    from .synthetic import make_dataset
    from .train import fit
    from .video import make_video

    started = time.perf_counter()
    out = os.path.abspath(config.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {config.out}: exists and is not a folder")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, MARKER)):
        raise UserError(f"--out {config.out}: not empty and not an earlier demo's output; choose another folder")
    shutil.rmtree(out, ignore_errors=True)  # an earlier demo's output (or an empty folder)
    os.makedirs(out)
    open(os.path.join(out, MARKER), "w").close()
    emulator = None
    if config.gcs_emulator:
        emulator = GCSEmulator(os.path.join(out, "gcs"), log=os.path.join(out, "gcs-server.log")).start()
        emulator.create_bucket(BUCKET)
    base = f"gs://{BUCKET}" if emulator else out
    raw, shards, run = os.path.join(out, "raw"), storage.join(base, "shards"), storage.join(base, "run")
    try:
        print_fn(f"[1/6] synthetic dataset (6 Train, 1 Eval, 2 Test subjects) -> {raw}")
        make_dataset(SynthConfig(raw, subjects=(6, 1, 2), frames=(40, 60), size=(96, 72), seed=config.seed))
        print_fn(f"[2/6] preprocessing -> {shards}")
        print_fn(format_summary(preprocess(PreprocessConfig(raw, shards, image_size=32, shard_size=64),
                                           print_fn=print_fn)))
        print_fn(f"[3/6] training tiny for {config.epochs} epochs on {config.device} -> {run}")
        fit(TrainConfig(data=shards, run_dir=run, model="tiny", epochs=config.epochs, lr=2e-3,
                        lr_schedule="cosine", device=config.device, ckpt_every=0, log_every=20, workers=1,
                        seed=config.seed))
        print_fn(f"[4/6] scoring the test split -> {out}")
        metrics = evaluate_checkpoint(EvaluateConfig(checkpoint=run, data=shards, out=out, device=config.device),
                                   print_fn=print_fn)
        print_fn("[5/6] prediction video")
        video, frames = make_video(VideoConfig(predictions=os.path.join(out, "predictions.json"),
                                               out=os.path.join(out, "predictions.mp4"), src=raw),
                                   print_fn=print_fn)
        storage.write_bytes(os.path.join(out, "loss.png"), storage.read_bytes(storage.join(run, "loss.png")))
        detection = os.path.join(out, "detection")
        print_fn(f"[6/6] detecting actions in the whole test sequences -> {detection}")
        found = run_detect(DetectConfig(checkpoint=run, src=raw, split="test", out=detection), print_fn=print_fn)
    finally:
        if emulator is not None:
            emulator.stop()
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
    lines = ["", f"demo finished in {time.perf_counter() - started:.0f} s: test accuracy {metrics['accuracy']:.3f} "
                 f"(macro-F1 {metrics['macro_f1']:.3f}) over {metrics['windows']} windows; detection segment F1 "
                 f"{found['detection']['segments']['0.5']['f1']:.3f} at IoU 0.5"]
    lines += [f"  {name:<{width}}  {path}" for name, path in where.items()]
    print_fn("\n".join(lines))
    return {**metrics, "outputs": where, "video_frames": frames, "detection": found["detection"]}
