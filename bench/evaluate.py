#!/usr/bin/env python3
"""Scoring and conversion benchmark (figures go to docs/benchmarks.md).

- scoring windows/s of ``tiny`` (32x32) and ``c3d`` (64x64) through the scoring path
  (``evaluate()`` with per-window outputs, the shard loader and the device loader), XLA:CPU and
  eager CPU, XLA as a ratio of eager;
- TFRecord conversion (pyACT records -> shards) in MB/s of input, as a ratio of reading the
  same bytes raw in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from common import add_child_arguments, run_child  # noqa: E402  (bench/common.py)


def _score_child(args: argparse.Namespace) -> None:
    import torch

    from pyact_torch.training.validation import evaluate
    from pyact_torch.data.loader import HostBatches, Part, WindowDataset, on_device
    from pyact_torch.model import build_model
    from pyact_torch.data.shards import read_manifest
    from pyact_torch.training.devices import make_backend

    backend = make_backend(args.device)
    manifest = read_manifest(args.data)
    torch.manual_seed(0)
    model = build_model(
        args.preset, len(manifest.channels), manifest.seq_len, manifest.image_size, len(manifest.classes)
    ).to(backend.device)
    dataset = WindowDataset(args.data, manifest, "test", args.batch, Part(), train=False)

    def batches(count: int):
        return on_device(HostBatches(dataset, 0, count), backend)

    evaluate(model, batches(2), backend, len(manifest.classes), keep_outputs=True)  # warm-up / compile
    started = time.perf_counter()
    result = evaluate(model, batches(args.steps), backend, len(manifest.classes), keep_outputs=True)
    elapsed = time.perf_counter() - started
    with open(args.result, "w") as handle:
        json.dump(
            {
                "preset": args.preset,
                "device": args.device,
                "windows": result["windows"],
                "seconds": elapsed,
                "windows_per_s": result["windows"] / elapsed,
                **backend.compile_counts(),
            },
            handle,
        )


def scoring(data: str, preset: str, device: str, batch: int, steps: int) -> dict:
    return run_child(__file__, data=data, preset=preset, device=device, batch=batch, steps=steps)


# --- TFRecords in pyACT's format (written here with a minimal protobuf encoder) ---------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def pyact_example(feats: np.ndarray, label: int) -> bytes:
    floats = _field(2, _field(1, feats.astype("<f4").tobytes()))  # Feature.float_list (packed)
    ints = _field(3, _field(1, _varint(label)))  # Feature.int64_list (packed)
    entries = _field(1, _field(1, b"feats") + _field(2, floats)) + _field(1, _field(1, b"label") + _field(2, ints))
    return _field(1, entries)


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def write_records(folder: str, count: int, files: int, shape=(6, 64, 64, 3)) -> int:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    total = 0
    for part in range(files):
        with open(os.path.join(folder, f"train-{part:05d}.tfrecords"), "wb") as handle:
            for _ in range(count // files):
                feats = rng.integers(0, 256, shape, dtype=np.uint8).astype(np.float32) / 255
                payload = pyact_example(feats.ravel(), int(rng.integers(0, 17)))
                length = struct.pack("<Q", len(payload))
                record = (
                    length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))
                )
                handle.write(record)
                total += len(record)
    return total


def raw_read(folder: str) -> float:
    started = time.perf_counter()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as handle:
            while handle.read(1 << 20):
                pass
    return time.perf_counter() - started


def conversion(out: str, records: int) -> dict:
    from pyact_torch.config import TFRecordConfig
    from pyact_torch.convert.tfrecords import convert_tfrecords

    folder = os.path.join(out, "tfrecords-train")
    if not os.path.isdir(folder):
        write_records(folder, records, files=4)
    size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder))
    raw_read(folder)  # page cache warm for both sides
    raw = [raw_read(folder)]
    dest = os.path.join(out, "converted")
    shutil.rmtree(dest, ignore_errors=True)
    started = time.perf_counter()
    convert_tfrecords(TFRecordConfig(folder, dest, split="train"), progress=False, print_fn=lambda *a: None)
    converted = time.perf_counter() - started
    raw.append(raw_read(folder))
    return {"bytes": size, "convert_s": converted, "raw_s": sum(raw) / len(raw)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench-output", "evaluate"), help="scratch folder")
    parser.add_argument("--records", type=int, default=2000, help="pyACT records to convert (~295 KB each)")
    add_child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        _score_child(args)
        return
    from train import make_shards  # bench/train.py: the same synthetic shards

    os.makedirs(args.out, exist_ok=True)
    shards = make_shards(os.path.join(os.path.dirname(args.out), "train"))
    rows = []
    for preset, size, batch, steps in (("tiny", 32, 32, 20), ("c3d", 64, 8, 4)):
        for device in ("cpu", "xla"):
            rows.append(scoring(shards[size], preset, device, batch, steps))
            print(json.dumps(rows[-1]), flush=True)
    convert = conversion(args.out, args.records)
    print(json.dumps(convert), flush=True)
    print()
    rates = {(r["preset"], r["device"]): r["windows_per_s"] for r in rows}
    for preset in ("tiny", "c3d"):
        eager, xla = rates[(preset, "cpu")], rates[(preset, "xla")]
        print(
            f"scoring {preset:5} eager CPU {eager:8.1f} windows/s   XLA:CPU {xla:8.1f} windows/s   "
            f"XLA/eager {xla / eager:.2f}"
        )
    mb = convert["bytes"] / 1e6
    print(
        f"TFRecord conversion: {mb / convert['convert_s']:.1f} MB/s vs raw read {mb / convert['raw_s']:.1f} MB/s "
        f"= {convert['raw_s'] / convert['convert_s']:.3f} ({mb:.0f} MB)"
    )
    with open(os.path.join(args.out, "report.json"), "w") as handle:
        json.dump({"scoring": rows, "conversion": convert}, handle, indent=1)


if __name__ == "__main__":
    main()
