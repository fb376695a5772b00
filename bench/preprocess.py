#!/usr/bin/env python3
"""Preprocessing benchmark (figures go to docs/benchmarks.md).

On a synthetic 640x480 dataset of at least 20,000 frames, with all cores, measures:
- decodes per frame (pyACT: up to 6);
- throughput as a ratio of the decode limit measured in the same run: a bare
  imread + cvtColor + resize loop over the same frames with the same number of processes
  (measured before and after, averaged, so page-cache warm-up favours neither side);
- peak RSS of the whole process tree, on the dataset and on the dataset doubled (every subject
  linked in twice, so the work doubles without another hour of generation);
- shard bytes per window against the uint8 payload and against pyACT's float32 TFRecords for
  the same windows (the exact size of a tf.train.Example record, computed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

import cv2
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyact_torch.config import SynthConfig, default_workers, parse_size  # noqa: E402
from pyact_torch.data.labels import ACTIONS  # noqa: E402
from pyact_torch.io.processes import map_unordered  # noqa: E402
from pyact_torch.data.synthetic import make_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bare_decode(paths: list[str]) -> int:
    for path in paths:
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)
    return len(paths)


def decode_limit(src: str, workers: int) -> tuple[int, float]:
    """Seconds for the bare decode loop over every colour frame, ``workers`` processes."""
    paths = sorted(
        os.path.join(d, f) for d, _, files in os.walk(src, followlinks=True) for f in files if f.startswith("color_")
    )
    chunks = [paths[i : i + 64] for i in range(0, len(paths), 64)]
    started = time.perf_counter()
    total = sum(map_unordered(_bare_decode, chunks, workers))
    return total, time.perf_counter() - started


def run_preprocess(src: str, dest: str, workers: int) -> dict:
    """Run ``pyact preprocess`` as a process; wall time, peak RSS of its tree, its summary."""
    shutil.rmtree(dest, ignore_errors=True)
    command = [sys.executable, os.path.join(ROOT, "scripts", "preprocess.py"), src, dest, "--workers", str(workers)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    parent = psutil.Process(process.pid)
    peak_tree = peak_main = 0
    while process.poll() is None:
        try:
            tree = [parent] + parent.children(recursive=True)
            rss = [p.memory_info().rss for p in tree]
            peak_tree, peak_main = max(peak_tree, sum(rss)), max(peak_main, rss[0])
        except psutil.Error:
            pass
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    out = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"preprocess failed:\n{out}")
    match = re.search(r"frames: (\d+) in the dataset, (\d+) decoded", out)
    manifest = json.load(open(os.path.join(dest, "manifest.json")))
    return {
        "seconds": seconds,
        "peak_tree_rss": peak_tree,
        "peak_main_rss": peak_main,
        "frames": int(match.group(1)),
        "decoded": int(match.group(2)),
        "manifest": manifest,
    }


def tfrecord_bytes(n_floats: int) -> int:
    """Bytes of one pyACT TFRecord: a tf.train.Example {"feats": FloatList(n), "label":
    Int64List(1)} in TFRecord framing (8-byte length, 4-byte CRC, data, 4-byte CRC). Label
    values below 128 take one varint byte."""

    def varint(n: int) -> int:
        size = 1
        while n >= 128:
            n >>= 7
            size += 1
        return size

    def field(payload: int) -> int:  # tag + length + payload (length-delimited)
        return 1 + varint(payload) + payload

    float_list = field(4 * n_floats)  # FloatList.value, packed
    int64_list = field(1)  # Int64List.value, packed, one small value
    feats_entry = field(len("feats")) + field(field(float_list))  # key + Feature{float_list}
    label_entry = field(len("label")) + field(field(int64_list))  # key + Feature{int64_list}
    features = field(feats_entry) + field(label_entry)  # Features.feature map entries
    example = field(features)  # Example.features
    return 8 + 4 + example + 4


def make_double(src: str, double: str) -> None:
    """``double``: every subject of ``src`` twice (symlinks), same layout."""
    if os.path.isdir(double):
        return
    for split in os.listdir(src):
        os.makedirs(os.path.join(double, split))
        for subject in os.listdir(os.path.join(src, split)):
            for copy in ("a", "b"):
                os.symlink(os.path.join(src, split, subject), os.path.join(double, split, f"{subject}{copy}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        default=os.path.join(ROOT, "bench-output"),
        help="scratch folder (kept between runs: the dataset is reused)",
    )
    parser.add_argument("--frames", type=int, default=20000, help="at least this many frames")
    parser.add_argument("--size", type=parse_size, default=(640, 480), help="colour frame size WxH")
    parser.add_argument("--workers", type=int, default=0, help="processes; 0 = all cores")
    parser.add_argument("--no-double", action="store_true", help="skip the doubled-dataset run")
    args = parser.parse_args()
    workers = args.workers or default_workers()
    per_subject = len(ACTIONS) * 80
    subjects = -(-args.frames // per_subject)
    n_test = max(1, subjects // 5)
    src = os.path.join(args.out, f"raw-{args.size[0]}x{args.size[1]}-{subjects}")
    if not os.path.exists(os.path.join(src, "Test")):
        shutil.rmtree(src, ignore_errors=True)
        print(f"generating {subjects} subjects x 16 sequences x ~80 frames at {args.size[0]}x{args.size[1]} ...")
        make_dataset(SynthConfig(src, subjects=(subjects - n_test, 0, n_test), frames=(70, 90), size=args.size))

    frames, before = decode_limit(src, workers)
    result = run_preprocess(src, os.path.join(args.out, "shards"), workers)
    _, after = decode_limit(src, workers)
    limit = (before + after) / 2
    manifest = result["manifest"]
    windows = sum(s["count"] for s in manifest["splits"].values())
    shard_bytes = sum(sh["bytes"] for s in manifest["splits"].values() for sh in s["shards"])
    payload = manifest["seq_len"] * manifest["image_size"] ** 2 * len(manifest["channels"])
    per_window = shard_bytes / windows
    figures = {
        "frames": frames,
        "workers": workers,
        "decodes_per_frame": result["decoded"] / result["frames"],
        "decode_limit_s": round(limit, 1),
        "decode_limit_s_before_after": [round(before, 1), round(after, 1)],
        "preprocess_s": round(result["seconds"], 1),
        "throughput_ratio": round(limit / result["seconds"], 3),
        "frames_per_s": round(frames / result["seconds"], 1),
        "peak_rss_tree_mb": round(result["peak_tree_rss"] / 2**20),
        "peak_rss_main_mb": round(result["peak_main_rss"] / 2**20),
        "windows": windows,
        "shard_bytes_per_window": round(per_window),
        "payload_bytes_per_window": payload,
        "bytes_over_payload": round(per_window / payload, 4),
        "pyact_tfrecord_bytes_per_window": tfrecord_bytes(payload),
        "smaller_than_pyact_tfrecords": round(tfrecord_bytes(payload) / per_window, 3),
    }
    if not args.no_double:
        double = os.path.join(args.out, f"double-{args.size[0]}x{args.size[1]}-{subjects}")
        make_double(src, double)
        doubled = run_preprocess(double, os.path.join(args.out, "shards-double"), workers)
        figures["double_frames"] = doubled["frames"]
        figures["double_preprocess_s"] = round(doubled["seconds"], 1)
        figures["double_peak_rss_tree_mb"] = round(doubled["peak_tree_rss"] / 2**20)
        figures["double_peak_rss_main_mb"] = round(doubled["peak_main_rss"] / 2**20)
        figures["rss_growth_when_doubled"] = round(doubled["peak_tree_rss"] / result["peak_tree_rss"], 3)
        shutil.rmtree(os.path.join(args.out, "shards-double"), ignore_errors=True)
    for key, value in figures.items():
        print(f"{key:34} {value}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
