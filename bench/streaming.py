#!/usr/bin/env python3
"""Streaming thread count benchmark (figures go to docs/benchmarks.md): the model's latency for
one window at a time (what ``pyact detect --streaming``, ``--video`` and ``--camera`` run), p50
and p99 over windows, of ``tiny`` (32x32) and ``c3d`` (64x64; untrained weights cost the same),
on eager PyTorch, with:

- the library's default intra-op threads (one per core: what ran before ``--threads``),
- one thread,
- the count ``choose_threads`` picks, measured at that moment (what ``--threads 0`` runs);

on an idle machine and on a loaded one (one busy-looping process per core running alongside).
The figure to read is each count's p50 as a ratio to the default's in the same condition.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _burn() -> None:
    while True:
        pass


def runner_of(preset: str, size: int):
    import torch

    from pyact_torch.model import Deployed, build_model
    from pyact_torch.detection.runners import ModelInfo, TorchRunner

    torch.manual_seed(0)
    info = ModelInfo(tuple(f"c{i}" for i in range(16)) + ("no-action",), 6, size, "color", None)
    return TorchRunner(Deployed(build_model(preset, 3, 6, size, 17)), info, preset)


def latency(runner, threads: int, windows: int) -> tuple[float, float]:
    """p50 and p99 milliseconds per window at ``threads``, after 3 warm-up windows."""
    runner.set_threads(threads)
    clips = np.random.default_rng(1).integers(0, 256, (windows + 3, 1, *runner.info.clip_shape), dtype=np.uint8)
    seconds = []
    for i, clip in enumerate(clips):
        begin = time.perf_counter()
        runner(clip)
        if i >= 3:
            seconds.append(time.perf_counter() - begin)
    return float(np.percentile(seconds, 50) * 1000), float(np.percentile(seconds, 99) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-c3d", action="store_true", help="skip c3d (slow on 2 cores)")
    args = parser.parse_args()
    import torch

    from pyact_torch.detection.runners import choose_threads, cores

    default = torch.get_num_threads()
    print(f"{cores()} cores; the library's default: {default} intra-op threads")
    models = [("tiny", 32, 400)] + ([] if args.no_c3d else [("c3d", 64, 40)])
    for condition in ("idle", "loaded"):
        burners = []
        if condition == "loaded":
            burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(cores())]
            for burner in burners:
                burner.start()
            time.sleep(1.0)
        try:
            for preset, size, windows in models:
                runner = runner_of(preset, size)
                chosen, _ = choose_threads(runner)
                rows = {
                    "default": (default, latency(runner, default, windows)),
                    "1 thread": (1, latency(runner, 1, windows)),
                    "chosen": (chosen, latency(runner, chosen, windows)),
                }
                base = rows["default"][1][0]
                print(f"{condition:6} {preset:4} {size}x{size}, {windows} windows, ms per window (p50 / p99):")
                for name, (threads, (p50, p99)) in rows.items():
                    print(
                        f"    {name:8} ({threads} threads): {p50:7.2f} / {p99:7.2f}   p50 = {p50 / base:.2f}x default"
                    )
        finally:
            for burner in burners:
                burner.terminate()


if __name__ == "__main__":
    main()
