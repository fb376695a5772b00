"""``pyact inspect``: read every shard of a split once, check it against the manifest (sample
count, size, sha256, class counts) and draw a seeded sample of windows with their labels
(pyACT's debug "CHECK" mode, done properly)."""

from __future__ import annotations

import math
import os
import random
from collections import Counter
from typing import Callable

from ..io import storage
from ..config import InspectConfig
from ..errors import UserError
from ..io.resources import check_memory
from .shards import (
    MANIFEST,
    ShardError,
    decode_sample,
    load_npy,
    read_manifest,
    shard_url,
    stream_samples,
)
from ..draw.panels import Panel, clip_frames, sheet


def inspect_split(config: InspectConfig, progress: bool = True, print_fn: Callable[[str], None] = print) -> dict:
    """Check the split's shards, write the sample grid; raises UserError (after writing the
    grid and the report) when a shard disagrees with the manifest."""
    from tqdm import tqdm

    storage.check_output_file(config.out, "sample grid")
    if not config.out.lower().endswith(".png"):
        raise UserError(f"--out {config.out}: the sample grid is a PNG; give a name ending in .png")
    manifest = read_manifest(config.data)
    entry = manifest.splits.get(config.split)
    if entry is None:
        raise UserError(f"{config.data}: the manifest has no {config.split!r} split")
    if not storage.is_gcs(config.data) and os.path.abspath(config.out) == os.path.abspath(
        storage.join(config.data, MANIFEST)
    ):
        raise UserError(f"--out {config.out}: that is the dataset's manifest")
    classes = manifest.classes
    shape, limit = manifest.clip_shape, manifest.max_member
    # the grid (RGB, and its PNG encoding) plus the chosen windows' bytes
    check_memory(
        config.n * shape[0] * (2 * 3 * (config.size + 8) ** 2 + math.prod(shape[1:])),
        f"a grid of --n {config.n} windows at --size {config.size}",
        "lower --n or --size",
    )
    rng = random.Random(config.seed)
    chosen: list[tuple[str, str, bytes]] = []  # reservoir of (key, label, clip bytes)
    counts: Counter = Counter()
    problems: list[str] = []
    report = []
    seen = 0
    bar = tqdm(total=entry.count, unit="window", desc=f"inspecting {config.split}", disable=None if progress else True)
    for shard in entry.shards:
        url = shard_url(config.data, shard["name"])
        found = 0
        try:
            with storage.open_read(url) as handle:
                reader = storage.HashingReader(handle)
                for sample in stream_samples(reader, url, limit):
                    found += 1
                    seen += 1
                    bar.update(1)
                    label = classes[decode_sample(sample, url, shape, len(classes))[1]]
                    counts[label] += 1
                    if len(chosen) < config.n:
                        chosen.append((sample["__key__"], label, sample["clip.npy"]))
                    elif (slot := rng.randrange(seen)) < config.n:
                        chosen[slot] = (sample["__key__"], label, sample["clip.npy"])
                while reader.read(1 << 20):
                    pass
        except FileNotFoundError:
            problems.append(f"{shard['name']}: missing")
            report.append((shard["name"], 0, 0, "MISSING"))
            continue
        except ShardError as exc:
            problems.append(f"{shard['name']}: unreadable ({str(exc).split(': ', 1)[-1]})")
            report.append((shard["name"], found, 0, "UNREADABLE"))
            continue
        wrong = [
            what
            for what, ok in (
                ("count", found == shard["count"]),
                ("size", reader.size == shard["bytes"]),
                ("sha256", reader.digest.hexdigest() == shard["sha256"]),
            )
            if not ok
        ]
        if wrong:
            problems.append(
                f"{shard['name']}: {', '.join(wrong)} differ from the manifest "
                f"({found} windows, {reader.size} bytes; manifest: {shard['count']}, {shard['bytes']})"
            )
        report.append((shard["name"], found, reader.size, "ok" if not wrong else "MISMATCH " + ",".join(wrong)))
    bar.close()
    expected = {k: v for k, v in entry.class_counts.items() if v}
    if dict((k, v) for k, v in counts.items() if v) != expected:
        problems.append(f"class counts differ from the manifest: read {dict(counts)}, manifest {expected}")

    if chosen:
        windows = [
            Panel(clip_frames(load_npy(clip), config.size), [(f"{key}   {label}", (0, 255, 255))])
            for key, label, clip in sorted(chosen)
        ]
        title = f"{config.data} {config.split}: {len(chosen)} of {seen} windows"
        storage.write_bytes(config.out, sheet(windows, title, thumb=config.size))

    width = max(len(name) for name, *_ in report) if report else 10
    lines = [f"{'shard':<{width}}  windows        bytes  status"]
    lines += [f"{name:<{width}}  {count:7d}  {size:11d}  {status}" for name, count, size, status in report]
    lines += ["", "class counts:"] + [f"  {name:<16} {counts.get(name, 0):7d}" for name in classes]
    if chosen:
        lines.append(f"\nwrote {config.out} ({len(chosen)} windows)")
    print_fn("\n".join(lines))
    if problems:
        raise UserError(f"{len(problems)} problem(s) in {config.data} ({config.split}): " + "; ".join(problems))
    return {"windows": seen, "class_counts": dict(counts), "shards": len(report)}
