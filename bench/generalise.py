#!/usr/bin/env python3
"""Generalisation benchmark: what augmentation and regularisation buy on people the network never
saw (figures go to docs/benchmarks.md).

One synthetic dataset with few training subjects and held-out Test subjects (every synthetic
subject has its own room light, skin tone, hand size and offset), ``tiny`` at 32x32, the same
epochs and learning rate for every arm. Each arm trains with ``--seed`` 0, 1, 2 ... through the
real CLI (eager CPU) and is scored with ``pyact evaluate`` on the Test split: the held-out
accuracy's mean and spread per arm. In the same run, the training loader's windows/s with each
``--augment`` preset against the fastest consumer measured here (eager ``tiny`` training, as in
bench/train.py), and XLA:CPU's compilation and CPU-fallback counts of a run with and without
augmentation, dropout and weight decay (they must be equal: nothing new compiles per step).

    .venv/bin/python bench/generalise.py --out /tmp/bench-generalise [--seeds 3] [--epochs 12]

``--detection`` measures instead what each arm gives ``pyact detect`` on the demo's dataset
(6 Train subjects, 2 held-out Test subjects, 10 TestDetection recordings) with the demo's
training settings (10 epochs, one loader worker): segment F1 at IoU 0.5, mAP at tIoU 0.5, frame
accuracy and false alarms on the Test split's 32 sequences and on the TestDetection
recordings, per training seed (1, 2, ...).

    .venv/bin/python bench/generalise.py --detection --out /tmp/bench-detection [--seeds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARMS = {
    "none": [],
    "pyact": ["--augment", "pyact"],
    "standard": ["--augment", "standard"],
    "dropout 0.2 + L2 1e-4": ["--dropout", "0.2", "--weight-decay", "1e-4"],
    "standard + dropout + L2": ["--augment", "standard", "--dropout", "0.2", "--weight-decay", "1e-4"],
}


def make_data(out: str, train_subjects: int, test_subjects: int, seed: int = 11) -> str:
    """Few Train subjects, one Eval, several held-out Test subjects, preprocessed at 32x32."""
    from pyact_torch.config import PreprocessConfig, SynthConfig
    from pyact_torch.data.preprocess import preprocess
    from pyact_torch.data.synthetic import make_dataset

    raw, dest = os.path.join(out, "raw"), os.path.join(out, "shards")
    if not os.path.exists(os.path.join(raw, "Train")):
        make_dataset(
            SynthConfig(raw, subjects=(train_subjects, 1, test_subjects), frames=(40, 60), size=(96, 72), seed=seed),
            progress=False,
        )
    if not os.path.exists(os.path.join(dest, "manifest.json")):
        preprocess(PreprocessConfig(raw, dest, image_size=32, shard_size=64), progress=False, print_fn=lambda *a: None)
    return dest


def pyact(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "pyact_torch", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def train_tiny(data: str, run_dir: str, seed: int, epochs: int, lr: float, workers: int, flags: list[str]) -> None:
    """``tiny`` at the data's size through the real CLI, eager CPU, cosine schedule."""
    pyact(
        "train",
        "--data",
        data,
        "--run-dir",
        run_dir,
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--epochs",
        str(epochs),
        "--lr",
        str(lr),
        "--lr-schedule",
        "cosine",
        "--log-every",
        "1000",
        "--workers",
        str(workers),
        "--seed",
        str(seed),
        *flags,
    )


def held_out_accuracy(data: str, run_dir: str, flags: list[str], seed: int, epochs: int, lr: float) -> float:
    train_tiny(data, run_dir, seed, epochs, lr, 2, flags)
    out = run_dir + "-test"
    pyact(
        "evaluate",
        "--checkpoint",
        os.path.join(run_dir, "final.pt"),
        "--data",
        data,
        "--out",
        out,
        "--split",
        "test",
        "--device",
        "cpu",
    )
    with open(os.path.join(out, "metrics.json")) as handle:
        return json.load(handle)["accuracy"]


DETECT_SPLITS = ("test", "testdetection")


def detection_scores(data: str, run_dir: str, flags: list[str], seed: int) -> dict[str, dict[str, float]]:
    """Train with the demo's settings, then ``pyact detect`` on the Test split's sequences and on
    the TestDetection recordings (several actions each); each split's figures."""
    train_tiny(data, run_dir, seed, 10, 2e-3, 1, ["--ckpt-every", "0", *flags])
    raw = os.path.join(os.path.dirname(data), "raw")
    scores = {}
    for split in DETECT_SPLITS:
        out = f"{run_dir}-{split}"
        pyact("detect", "--checkpoint", run_dir, "--src", raw, "--split", split, "--no-video", "--out", out)
        with open(os.path.join(out, "metrics.json")) as handle:
            metrics = json.load(handle)["detection"]
        scores[split] = {
            "f1": metrics["segments"]["0.5"]["f1"],
            "mAP": metrics["mAP"]["thresholds"]["0.5"]["mAP"],
            "frame_accuracy": metrics["frame_accuracy"],
            "false_alarms": metrics["false_alarms_per_1000_background_frames"],
        }
    return scores


def detection_bench(out: str, arms: list[str], seeds: int) -> dict[str, list[dict[str, dict[str, float]]]]:
    """Each arm's detection figures on the demo's dataset, seeds 1..``seeds``; prints a line per
    arm and split."""
    # the demo's dataset (pyact demo's default --seed 3), in a folder of its own: an --out that
    # also holds the held-out-accuracy measure's dataset (seed 11) must not stand in for it
    data = make_data(os.path.join(out, "demo-dataset"), 6, 2, seed=3)
    results: dict[str, list[dict[str, dict[str, float]]]] = {}
    for arm in arms:
        rows = []
        for seed in range(1, seeds + 1):
            run_dir = os.path.join(out, "runs", f"{arm.replace(' ', '_')}-seed{seed}")
            subprocess.run(["rm", "-rf", run_dir, *(f"{run_dir}-{split}" for split in DETECT_SPLITS)], check=True)
            rows.append(detection_scores(data, run_dir, ARMS[arm], seed))
        results[arm] = rows
        for split in DETECT_SPLITS:
            f1 = [r[split]["f1"] for r in rows]
            spread = statistics.stdev(f1) if len(f1) > 1 else 0.0
            maps = ", ".join(f"{r[split]['mAP']:.3f}" for r in rows)
            frames = ", ".join(f"{r[split]['frame_accuracy']:.3f}" for r in rows)
            alarms = ", ".join(f"{r[split]['false_alarms']:.1f}" for r in rows)
            print(
                f"{arm:10s} {split:13s} segment F1@0.5 {statistics.mean(f1):.3f} +- {spread:.3f}, lowest "
                f"{min(f1):.3f} (seeds: {', '.join(f'{v:.3f}' for v in f1)}); mAP@0.5 {maps}; frame accuracy "
                f"{frames}; false alarms per 1000 background frames {alarms}",
                flush=True,
            )
    return results


def xla_compiles(data: str, run_dir: str, flags: list[str]) -> str:
    """The closing line's XLA compilation and fallback counts of a 2-epoch XLA:CPU run."""
    env = {**os.environ, "PYTHONPATH": ROOT, "PJRT_DEVICE": "CPU"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyact_torch",
            "train",
            "--data",
            data,
            "--run-dir",
            run_dir,
            "--model",
            "tiny",
            "--device",
            "xla",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--workers",
            "1",
            "--log-every",
            "1000",
            "--resume",
            "none",
            *flags,
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    return next(line for line in done.stdout.splitlines() if "training finished" in line).split("(XLA: ")[1].rstrip(")")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bench-generalise", help="scratch folder (data and runs)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per arm")
    parser.add_argument("--epochs", type=int, default=12, help="epochs of every run")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--train-subjects", type=int, default=4, help="Train subjects of the dataset")
    parser.add_argument("--test-subjects", type=int, default=4, help="held-out Test subjects")
    parser.add_argument(
        "--arms",
        help="comma-separated arm names to run ('' for none; default: all, or none,standard with --detection)",
    )
    parser.add_argument("--no-loader", dest="loader", action="store_false", help="skip the loader and XLA measurements")
    parser.add_argument(
        "--detection",
        action="store_true",
        help="measure pyact detect on the demo's dataset per arm instead (default arms: none, standard)",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    default_arms = ["none", "standard"] if args.detection else list(ARMS)
    arms = default_arms if args.arms is None else list(filter(None, args.arms.split(",")))
    if set(arms) - set(ARMS):
        parser.error(f"--arms: unknown {', '.join(sorted(set(arms) - set(ARMS)))}; choose from {', '.join(ARMS)}")
    if args.detection:
        found = detection_bench(args.out, arms, args.seeds)
        with open(os.path.join(args.out, "results.json"), "w") as handle:
            json.dump(found, handle, indent=1)
        return
    data = make_data(args.out, args.train_subjects, args.test_subjects)
    with open(os.path.join(data, "manifest.json")) as handle:
        splits = json.load(handle)["splits"]
    print(
        f"data: {args.train_subjects} Train subjects ({splits['train']['count']} windows), "
        f"{args.test_subjects} held-out Test subjects ({splits['test']['count']} windows); tiny at 32x32, "
        f"{args.epochs} epochs, lr {args.lr:g} cosine, batch 32, eager CPU",
        flush=True,
    )

    if args.loader:
        # bench/train.py's measures: eager tiny through the real loader (the fastest consumer
        # here), and the loader alone over epochs of the real Train split's size
        from train import loader_rate, real_size_copy, throughput  # bench/train.py

        real = real_size_copy(data, os.path.join(args.out, "shards-real-size"))
        consumer = throughput(real, "tiny", "cpu", 32, 5, 40)["windows_per_s"]
        print(f"fastest consumer (eager tiny training, 32x32): {consumer:,.0f} windows/s", flush=True)
        for preset in ("none", "pyact", "standard"):
            rate = loader_rate(real, workers=2, augment=preset)["windows_per_s"]
            print(
                f"loader --augment {preset:8s} (2 workers, real-size epochs): {rate:7,.0f} windows/s = "
                f"{rate / consumer:5.1f}x the consumer",
                flush=True,
            )
        for flags in ([], ["--augment", "standard", "--dropout", "0.2", "--weight-decay", "1e-4"]):
            counts = xla_compiles(data, os.path.join(args.out, "xla"), flags)
            print(f"XLA:CPU tiny, 2 epochs{' with ' + ' '.join(flags) if flags else ''}: {counts}", flush=True)

    results = {}
    for arm in arms:
        accuracies = []
        for seed in range(args.seeds):
            run_dir = os.path.join(args.out, "runs", f"{arm.replace(' ', '_')}-seed{seed}")
            if os.path.exists(run_dir):
                subprocess.run(["rm", "-rf", run_dir, run_dir + "-test"], check=True)
            accuracies.append(held_out_accuracy(data, run_dir, ARMS[arm], seed, args.epochs, args.lr))
        results[arm] = accuracies
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        print(
            f"{arm:26s} held-out accuracy {statistics.mean(accuracies):.3f} +- {spread:.3f} "
            f"(seeds: {', '.join(f'{a:.3f}' for a in accuracies)}); "
            f"{statistics.mean(accuracies) - statistics.mean(results.get('none', accuracies)):+.3f} vs none",
            flush=True,
        )
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
