#!/usr/bin/env python3
"""Detection benchmark (figures go to docs/benchmarks.md), on the demo's dataset and its
trained ``tiny`` (``pyact demo`` is run first, into a temporary folder):

- the smoothing and minimum-length defaults: segment F1 at IoU 0.5 on the eval split for a
  grid of both (the test split is not looked at);
- streaming latency per frame (prepare + model), p50/p99, of ``tiny`` (32x32, trained) and
  ``c3d`` (64x64, pyACT's size; untrained weights cost the same), as a ratio to a 30 fps
  camera's frame period (33.3 ms);
- offline detection over the test split (batched, and one frame at a time) in windows/s, as a
  ratio to scoring the same windows from the shards (the loop of ``pyact evaluate --device cpu``);
- ONNX Runtime vs eager PyTorch on the same windows: windows/s ratio;
- the same model on the single-action Test split and on the long TestDetection recordings:
  frame accuracy, segment F1 and mAP at tIoU 0.5, and how often a true segment is found with
  another action nearer than one window and without.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from common import best_seconds  # noqa: E402  (bench/common.py)

PERIOD_MS = 1000 / 30


def quiet(run, *args, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run(*args, **kwargs)


def tune(demo: str, smooths: list[int], lengths: list[int]) -> list[tuple[int, int, float]]:
    """Segment F1@0.5 on the eval split for every (smooth, min_length)."""
    from pyact_torch.config import DetectConfig
    from pyact_torch.detection.detect import run_detect
    from pyact_torch.detection.metrics import SequenceResult, Truth, detection_metrics
    from pyact_torch.data.labels import NO_ACTION, scan_dataset
    from pyact_torch.detection.runners import load_checkpoint_runner
    from pyact_torch.detection.segments import detect_segments

    out = os.path.join(demo, "bench-eval")
    quiet(
        run_detect,
        DetectConfig(
            checkpoint=os.path.join(demo, "run"),
            src=os.path.join(demo, "raw"),
            split="eval",
            out=out,
            smooth=1,
            min_length=1,
            no_video=True,
        ),
        progress=False,
    )
    probabilities = np.load(os.path.join(out, "probabilities.npz"))
    names = {s["probabilities"]: s["name"] for s in json.load(open(os.path.join(out, "detections.json")))["sequences"]}
    classes = list(quiet(load_checkpoint_runner, os.path.join(demo, "run")).info.classes)
    sequences = {s.path: s for s in scan_dataset(os.path.join(demo, "raw"))[0]}
    grid = []
    for smooth in smooths:
        for length in lengths:
            results = []
            for key in probabilities.files:
                name = names[key]
                seq = sequences[name]
                found = detect_segments(probabilities[key], 5, classes, NO_ACTION, 6, smooth, length)
                truths = tuple(Truth(seq.action, s.pos, s.pos + s.len - 1) for s in seq.segments)
                results.append(SequenceResult(name, seq.n_frames, truths, tuple(found)))
            grid.append((smooth, length, detection_metrics(results, NO_ACTION)["segments"]["0.5"]["f1"]))
    return grid


def eager_runner(demo: str, preset: str, size: int):
    """The demo's trained ``tiny``, or an untrained ``preset`` network at ``size`` (same cost)."""
    import torch

    from pyact_torch.model import Deployed, build_model
    from pyact_torch.detection.runners import ModelInfo, TorchRunner, load_checkpoint_runner

    if preset == "tiny":
        return quiet(load_checkpoint_runner, os.path.join(demo, "run"))
    torch.manual_seed(0)
    info = ModelInfo(tuple(f"c{i}" for i in range(16)) + ("no-action",), 6, size, "color", None)
    return TorchRunner(Deployed(build_model(preset, 3, 6, size, 17)), info, preset)


def latency(demo: str, preset: str, size: int, frames: int) -> dict:
    """Per-frame streaming latency over the test sequences' frames."""
    from pyact_torch.data.frames import FrameSpec
    from pyact_torch.data.labels import scan_dataset
    from pyact_torch.detection.stream import folder_frames, streamed

    runner = eager_runner(demo, preset, size)
    spec = FrameSpec("color", size, (150, 1000))
    raw = os.path.join(demo, "raw")
    sequences = [s for s in scan_dataset(raw)[0] if s.split_dir == "Test"]
    seconds: list[float] = []
    for seq in sequences:
        stream = streamed(folder_frames(os.path.join(raw, seq.path), seq.n_frames, spec, False), runner, 6)
        seconds += [s for _, p, s in stream if p is not None][2:]  # the first windows warm up
        if len(seconds) >= frames:
            break
    p50, p99 = (float(np.percentile(seconds, q)) * 1000 for q in (50, 99))
    return {"preset": preset, "size": size, "frames": len(seconds), "p50_ms": p50, "p99_ms": p99}


def throughput(demo: str) -> dict:
    """Windows/s over the test split of the detection loop (read frames, prepare, classify,
    segment; batched and one frame at a time) and of the scoring loop (read shards, classify:
    ``evaluate()`` on eager CPU, as ``pyact evaluate --device cpu``), the same windows and
    weights; neither writes its outputs (timeline.png alone takes 0.5 s)."""
    import torch

    from pyact_torch.config import DetectConfig
    from pyact_torch.detection.detect import DetectionRun, plan_sources
    from pyact_torch.training.devices import make_backend
    from pyact_torch.training.validation import evaluate
    from pyact_torch.data.loader import HostBatches, Part, WindowDataset, on_device
    from pyact_torch.detection.runners import load_checkpoint_runner
    from pyact_torch.data.shards import read_manifest

    run, raw, shards = (os.path.join(demo, name) for name in ("run", "raw", "shards"))
    runner = quiet(load_checkpoint_runner, run)
    manifest = read_manifest(shards)
    windows = manifest.splits["test"].count
    backend = make_backend("cpu")
    network = runner.module.network
    torch.set_grad_enabled(False)

    def score() -> None:
        dataset = WindowDataset(shards, manifest, "test", 32, Part(), train=False)
        result = evaluate(
            network,
            on_device(HostBatches(dataset, 0, len(dataset)), backend),
            backend,
            len(manifest.classes),
            keep_outputs=True,
        )
        assert result["windows"] == windows

    figures = {"scoring": windows / best_seconds(score, 3), "windows": windows}
    for name, streaming in (("detect batched", False), ("detect streamed", True)):
        config = DetectConfig(checkpoint=run, src=raw, split="test", out=demo, no_video=True, streaming=streaming)
        sources = plan_sources(config, runner.info, print)

        def detect(config: DetectConfig = config, sources=sources) -> None:
            detection = DetectionRun(runner, config, print)
            for source in sources:
                for _ in detection.source(source, False):
                    pass
            assert sum(r.n_frames - 5 for r in detection.results) == windows

        figures[name] = windows / best_seconds(detect, 3)

    def read_frames() -> None:  # what detection does that scoring does not: PNG decoding and resizing
        for source in sources:
            for _ in source.frames(False):
                pass

    figures["frames alone"] = windows / best_seconds(read_frames, 3)
    # what is left of detection's time after reading frames and classifying as scoring does
    rest = 1 / figures["detect batched"] - 1 / figures["frames alone"] - 1 / figures["scoring"]
    figures["bookkeeping share"] = rest * figures["detect batched"]
    return figures


def onnx_vs_eager(demo: str, preset: str, size: int, count: int, batch: int) -> dict:
    """Windows/s of ONNX Runtime and eager PyTorch on the same windows."""
    from pyact_torch.detection.export import write_export
    from pyact_torch.detection.runners import OnnxRunner

    eager = eager_runner(demo, preset, size)
    windows = np.random.default_rng(0).integers(0, 256, (count,) + eager.info.clip_shape, dtype=np.uint8)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.onnx")
        write_export(eager.module, eager.info, windows[:2], path)
        onnx = OnnxRunner(path)

        def run_all(runner):
            for first in range(0, count, batch):
                runner.logits(windows[first : first + batch])

        run_all(onnx), run_all(eager)  # warm-up
        figures = {
            name: count / best_seconds(lambda r=r: run_all(r), 3) for name, r in (("onnx", onnx), ("eager", eager))
        }
        figures["max_difference"] = float(np.abs(onnx.logits(windows[:batch]) - eager.logits(windows[:batch])).max())
    return {"preset": preset, "batch": batch, **figures}


def test_vs_testdetection(demo: str) -> dict:
    """The demo's model on the single-action Test split and on the long TestDetection recordings:
    frame accuracy, segment F1 and mAP at tIoU 0.5; on TestDetection also how often a true
    segment is found (a detection of its class at tIoU >= 0.5) when another action is nearer
    than one window (windows there straddle two actions) and when none is."""
    from pyact_torch.config import DetectConfig
    from pyact_torch.detection.detect import run_detect
    from pyact_torch.detection.metrics import tiou
    from pyact_torch.data.labels import scan_detection

    rows = {}
    for split in ("test", "testdetection"):
        out = tempfile.mkdtemp(prefix=f"bench-{split}-")
        report = quiet(
            run_detect,
            DetectConfig(
                checkpoint=os.path.join(demo, "run"),
                src=os.path.join(demo, "raw"),
                split=split,
                out=os.path.join(out, "d"),
                no_video=True,
            ),
        )["detection"]
        rows[split] = {
            "sequences": report["sequences"],
            "frames": report["frames"],
            "frame_accuracy": report["frame_accuracy"],
            "f1": report["segments"]["0.5"]["f1"],
            "mAP": report["mAP"]["thresholds"]["0.5"]["mAP"],
            "mAP_average": report["mAP"]["average"],
        }
        if split == "testdetection":
            found = {
                s["name"]: s["segments"]
                for s in json.load(open(os.path.join(out, "d", "detections.json")))["sequences"]
            }
            seq_len = json.load(open(os.path.join(out, "d", "detections.json")))["seq_len"]
            near, far = [], []
            for recording in scan_detection(os.path.join(demo, "raw"))[0]:
                spans = [(g.pos, g.pos + g.len - 1, g.action) for g in recording.segments]
                for i, (first, last, action) in enumerate(spans):
                    gaps = [first - spans[i - 1][1] - 1] if i else []
                    gaps += [spans[i + 1][0] - last - 1] if i + 1 < len(spans) else []
                    hit = any(
                        d["label"] == action and tiou(d["first"], d["last"], first, last) >= 0.5
                        for d in found[recording.path]
                    )
                    (near if gaps and min(gaps) < seq_len else far).append(hit)
            rows[split]["found_near"] = (sum(near), len(near))
            rows[split]["found_far"] = (sum(far), len(far))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="", help="an existing pyact demo output to reuse (default: run one)")
    parser.add_argument("--no-c3d", action="store_true", help="skip the c3d figures (minutes on 2 cores)")
    parser.add_argument("--splits-only", action="store_true", help="only the Test vs TestDetection figures")
    args = parser.parse_args()
    demo = args.demo
    if not demo:
        from pyact_torch.cli import main as pyact

        demo = os.path.join(tempfile.mkdtemp(prefix="bench-detect-"), "demo")
        print(f"running pyact demo into {demo} ...", flush=True)
        quiet(pyact, ["demo", "--out", demo])

    print("the demo's tiny on the Test split and on the TestDetection recordings, tIoU 0.5")
    for split, row in test_vs_testdetection(demo).items():
        print(
            f"  {split:<13} {row['sequences']:3d} sequences, {row['frames']:6d} frames: frame accuracy "
            f"{row['frame_accuracy']:.3f}, segment F1 {row['f1']:.3f}, mAP {row['mAP']:.3f} "
            f"(average over tIoU 0.3-0.7: {row['mAP_average']:.3f})"
        )
        if "found_near" in row:
            (hit_near, near), (hit_far, far) = row["found_near"], row["found_far"]
            print(
                f"  {'':<13} true segments found: {hit_near}/{near} with another action nearer than one window, "
                f"{hit_far}/{far} without"
            )
    if args.splits_only:
        return

    grid = tune(demo, [1, 3, 5, 7], [1, 2, 3, 4, 6])
    best = max(grid, key=lambda row: (row[2], -row[0], -row[1]))
    print("segment F1 at IoU 0.5 on the eval split (rows: --smooth, columns: --min-length 1 2 3 4 6)")
    for smooth in sorted({row[0] for row in grid}):
        print(f"  smooth {smooth}: " + "  ".join(f"{f1:.3f}" for s, _, f1 in grid if s == smooth))
    print(f"  best: --smooth {best[0]} --min-length {best[1]} (F1 {best[2]:.3f})")

    print("\nstreaming latency per frame (prepare + model), eager CPU")
    for preset, size, frames in (("tiny", 32, 600), ("c3d", 64, 120))[: 1 if args.no_c3d else 2]:
        row = latency(demo, preset, size, frames)
        print(
            f"  {preset} {size}x{size}: p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms "
            f"over {row['frames']} frames"
            f" = {row['p50_ms'] / PERIOD_MS:.3f} / {row['p99_ms'] / PERIOD_MS:.3f} of a 30 fps frame period"
        )

    figures = throughput(demo)
    print(f"\noffline over the test split ({figures['windows']} windows, outputs not written), windows/s, best of 3")
    for name in ("scoring", "detect batched", "detect streamed", "frames alone"):
        print(f"  {name:<16} {figures[name]:8.0f}  = {figures[name] / figures['scoring']:.2f}x scoring")
    print(
        f"  batched detection time left after reading frames and scoring's classification: "
        f"{figures['bookkeeping share']:.0%}"
    )

    print("\nONNX Runtime vs eager PyTorch, same windows, windows/s, best of 3")
    runs = [("tiny", 32, 512, 32), ("tiny", 32, 128, 1)] + ([] if args.no_c3d else [("c3d", 64, 32, 8)])
    for preset, size, count, batch in runs:
        row = onnx_vs_eager(demo, preset, size, count, batch)
        print(
            f"  {preset} batch {batch}: onnx {row['onnx']:.1f}, eager {row['eager']:.1f} "
            f"= {row['onnx'] / row['eager']:.2f}x "
            f"(largest logit difference {row['max_difference']:.1e})"
        )


if __name__ == "__main__":
    main()
