#!/usr/bin/env python3
"""SPMD benchmark (figures go to docs/benchmarks.md).

Measures on this machine, every figure against a baseline from the same run:
- ``tiny`` (32x32, global batch 32) under SPMD on 4 XLA:CPU devices against SPMD on 1 device,
  through the real device loader (batch sharded over the devices) and ``train_step``:
  steps/s ratio, new compilations and ``aten::`` CPU fallbacks per step after warm-up, and the
  all-reduce ops in the compiled step (from XLA's dump of the partitioned program);
- the loader's transfer format: bytes per window that cross from loader workers to the device
  as uint8 clips (now) against float32 (before), and the loader alone (2 workers, real-size
  epochs) as a multiple of the fastest training consumption measured here (eager ``tiny``).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train import loader_rate, make_shards, real_size_copy, throughput  # noqa: E402  (bench/train.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def spmd_throughput(data: str, devices: int, dump: str, warmup: int = 5, steps: int = 30) -> dict:
    """tiny under SPMD over ``devices`` XLA:CPU devices; the partitioned programs dumped to ``dump``."""
    shutil.rmtree(dump, ignore_errors=True)
    saved = {k: os.environ.get(k) for k in ("CPU_NUM_DEVICES", "XLA_FLAGS")}
    os.environ.update(CPU_NUM_DEVICES=str(devices), XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
    try:
        row = throughput(data, "tiny", "spmd", 32, warmup, steps)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    counts = [open(p).read().count(" all-reduce(") for p in glob.glob(f"{dump}/*after_optimizations.txt")]
    row.update(devices=devices, all_reduce_in_step=max(counts, default=0))
    return row


def transfer_bytes(data: str) -> dict:
    """Bytes per window of one loader batch as sent now (uint8) and as float32 (what it was)."""
    from pyact_torch.data.loader import Part, WindowDataset, make_loader
    from pyact_torch.model import model_input
    from pyact_torch.data.shards import read_manifest

    dataset = WindowDataset(data, read_manifest(data), "train", 32, Part(), train=True)
    clips, _, _ = next(iter(make_loader(dataset, 0)))
    return {"uint8": clips.nbytes / len(clips), "float32": model_input(clips).nbytes / len(clips)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--out",
        default=os.path.join(ROOT, "bench-output", "train"),
        help="scratch folder (shared with bench/train.py: the same shards)",
    )
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    shards = make_shards(args.out)[32]
    report = {"spmd": [spmd_throughput(shards, n, os.path.join(args.out, f"hlo-{n}")) for n in (1, 4)]}
    report["eager_tiny"] = throughput(shards, "tiny", "cpu", 32, 5, 40)
    report["transfer"] = transfer_bytes(shards)
    report["loader"] = loader_rate(real_size_copy(shards, os.path.join(args.out, "shards-32-real-size")), workers=2)
    print(json.dumps(report), flush=True)

    one, four = report["spmd"]
    for row in (one, four):
        print(
            f"tiny 32x32, global batch 32, SPMD on {row['devices']} XLA:CPU device(s): {row['windows_per_s'] / 32:.2f} "
            f"steps/s; after warm-up {row['new_compiles'] / row['steps']:.2f} compilations/step, "
            f"{row['new_fallbacks'] / row['steps']:.2f} aten fallbacks/step; {row['all_reduce_in_step']} "
            f"all-reduce ops in the compiled step"
        )
    print(f"4 devices / 1 device: {four['windows_per_s'] / one['windows_per_s']:.2f}x steps/s (the same 2 cores)")
    transfer = report["transfer"]
    print(
        f"loader -> device per window: {transfer['uint8']:.0f} bytes as uint8 (now), {transfer['float32']:.0f} as "
        f"float32 (before): {transfer['float32'] / transfer['uint8']:.1f}x less host traffic"
    )
    fastest, loader = report["eager_tiny"]["windows_per_s"], report["loader"]
    print(
        f"loader alone (local, real-size epochs, 2 workers): {loader['windows_per_s']:.1f} windows/s = "
        f"{loader['windows_per_s'] / fastest:.1f}x the fastest training consumption ({fastest:.1f} windows/s, "
        f"eager tiny)"
    )
    with open(os.path.join(args.out, "spmd-report.json"), "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
