#!/usr/bin/env python3
"""Generalisation benchmark: what augmentation and regularisation buy on people the network never
saw (figures go to docs/benchmarks.md).

One synthetic dataset with few training subjects and held-out Test subjects (every synthetic
subject has its own room light, skin tone, hand size and offset), ``tiny`` at 32x32, the same
epochs and learning rate for every arm. Each arm trains with ``--seed`` 0, 1, 2 ... through the
real CLI (eager CPU) and is scored with ``pyact evaluate`` on the Test split: the held-out
accuracy's mean and spread per arm. In the same run, the training loader's windows/s with each
``--augment`` preset against the fastest consumer measured here (eager ``tiny`` training).

    .venv/bin/python bench/generalise.py --out /tmp/bench-generalise [--seeds 3] [--epochs 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

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


def make_data(out: str, train_subjects: int, test_subjects: int) -> str:
    """Few Train subjects, one Eval, several held-out Test subjects, preprocessed at 32x32."""
    from pyact_torch.config import PreprocessConfig, SynthConfig
    from pyact_torch.preprocess import preprocess
    from pyact_torch.synthetic import make_dataset

    raw, dest = os.path.join(out, "raw"), os.path.join(out, "shards")
    if not os.path.exists(os.path.join(raw, "Train")):
        make_dataset(SynthConfig(raw, subjects=(train_subjects, 1, test_subjects), frames=(40, 60), size=(96, 72),
                                 seed=11), progress=False)
    if not os.path.exists(os.path.join(dest, "manifest.json")):
        preprocess(PreprocessConfig(raw, dest, image_size=32, shard_size=64), progress=False,
                   print_fn=lambda *a: None)
    return dest


def pyact(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-m", "pyact_torch", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def held_out_accuracy(data: str, run_dir: str, flags: list[str], seed: int, epochs: int, lr: float) -> float:
    pyact("train", "--data", data, "--run-dir", run_dir, "--model", "tiny", "--device", "cpu", "--epochs",
          str(epochs), "--lr", str(lr), "--lr-schedule", "cosine", "--log-every", "1000", "--workers", "2",
          "--seed", str(seed), *flags)
    out = run_dir + "-test"
    pyact("evaluate", "--checkpoint", os.path.join(run_dir, "final.pt"), "--data", data, "--out", out,
          "--split", "test", "--device", "cpu")
    with open(os.path.join(out, "metrics.json")) as handle:
        return json.load(handle)["accuracy"]


def loader_rate(data: str, augment: str, workers: int = 2, batch: int = 32, epochs: int = 3) -> float:
    """Windows/s of the training loader alone (no model), ``epochs`` passes, workers included."""
    from pyact_torch.loader import Part, WindowDataset, make_loader
    from pyact_torch.shards import read_manifest

    manifest = read_manifest(data)
    dataset = WindowDataset(data, manifest, "train", batch, Part(), train=True, workers=workers, augment=augment)
    started, windows = time.perf_counter(), 0
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        windows += sum(clips.shape[0] for clips, _, _ in make_loader(dataset, workers))
    return windows / (time.perf_counter() - started)


def consumer_rate(data: str, batch: int = 32, steps: int = 60) -> float:
    """Windows/s of eager ``tiny`` training steps on one batch held in memory (no loader): the
    fastest consumer this machine has."""
    import torch

    from pyact_torch.devices import Backend
    from pyact_torch.loader import Part, WindowDataset
    from pyact_torch.model import build_model, model_input
    from pyact_torch.shards import read_manifest
    from pyact_torch.train import make_optimizer, train_step

    manifest = read_manifest(data)
    clips, labels, _ = next(iter(WindowDataset(data, manifest, "train", batch, Part(), train=True)))
    model = build_model("tiny", len(manifest["channels"]), manifest["seq_len"], 32, len(manifest["classes"]))
    optimizer, backend = make_optimizer(model, 1e-3, 0.0), Backend("cpu")
    for _ in range(5):
        train_step(model, optimizer, model_input(clips), labels, backend)
    started = time.perf_counter()
    for _ in range(steps):
        train_step(model, optimizer, model_input(clips), labels, backend)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/bench-generalise", help="scratch folder (data and runs)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per arm")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of every run")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--train-subjects", type=int, default=3, help="Train subjects of the dataset")
    parser.add_argument("--test-subjects", type=int, default=4, help="held-out Test subjects")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names to run")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    data = make_data(args.out, args.train_subjects, args.test_subjects)
    with open(os.path.join(data, "manifest.json")) as handle:
        splits = json.load(handle)["splits"]
    print(f"data: {args.train_subjects} Train subjects ({splits['train']['count']} windows), "
          f"{args.test_subjects} held-out Test subjects ({splits['test']['count']} windows); tiny at 32x32, "
          f"{args.epochs} epochs, lr {args.lr:g} cosine, batch 32, eager CPU", flush=True)

    consumer = consumer_rate(data)
    print(f"fastest consumer (eager tiny training steps, batch in memory): {consumer:,.0f} windows/s", flush=True)
    for preset in ("none", "pyact", "standard"):
        rate = loader_rate(data, preset)
        print(f"loader --augment {preset:8s}: {rate:7,.0f} windows/s = {rate / consumer:5.1f}x the consumer", flush=True)

    results = {}
    for arm in args.arms.split(","):
        accuracies = []
        for seed in range(args.seeds):
            run_dir = os.path.join(args.out, "runs", f"{arm.replace(' ', '_')}-seed{seed}")
            if os.path.exists(run_dir):
                subprocess.run(["rm", "-rf", run_dir, run_dir + "-test"], check=True)
            accuracies.append(held_out_accuracy(data, run_dir, ARMS[arm], seed, args.epochs, args.lr))
        results[arm] = accuracies
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        print(f"{arm:26s} held-out accuracy {statistics.mean(accuracies):.3f} +- {spread:.3f} "
              f"(seeds: {', '.join(f'{a:.3f}' for a in accuracies)}); "
              f"{statistics.mean(accuracies) - statistics.mean(results.get('none', accuracies)):+.3f} vs none",
              flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
