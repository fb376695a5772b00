"""Plain helpers and constants shared by the fault tests in tests/faults (one module per class of
docs/faults.md); their fixtures are in tests/faults/conftest.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from pyact_torch.cli import main

from helpers import tfrecord  # the same file builders as the converter tests


# --- commands ---------------------------------------------------------------------------------

CLI = [sys.executable, "-c", "import sys; from pyact_torch.cli import main; sys.exit(main(sys.argv[1:]))"]

TRAIN = [
    "--device",
    "cpu",
    "--model",
    "tiny",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--log-every",
    "1",
]

PRE = ["--workers", "1", "--image-size", "16", "--shard-size", "8"]


def one_line(err: str) -> str:
    """The single ``error:`` line a user-fixable failure must end with."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def run(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """The command in a subprocess (a hang fails the test instead of stopping the suite)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def write_manifest(dest: str, manifest: dict) -> None:
    with open(os.path.join(dest, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)


@contextmanager
def small_tmpfs(path, size: str):
    """A tmpfs of ``size`` at ``path`` (root only); yields a function that resizes it."""
    if os.geteuid() != 0:
        pytest.skip("disk-full cases mount a tmpfs, which needs root")
    os.makedirs(path, exist_ok=True)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _state(step: int) -> dict:
    from pyact_torch.training.checkpoint import make_checkpoint

    return make_checkpoint({"w": torch.full((3,), float(step))}, {"model": "tiny"}, ["a", "no-action"], {}, step=step)


# --- convert-keras and convert-tfrecords ------------------------------------------------------
# Self-contained on purpose: test_convert's module imports loader functions that are being
# reworked, and these tests must not depend on them. TFRecords and Examples are encoded by hand
# here (test_convert checks the reader against the protobuf library's own encoding).


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def example(feats: np.ndarray, label_feature: bytes) -> bytes:
    """A tf.train.Example: ``feats`` as a packed float_list, ``label`` the given encoded Feature."""
    entries = field(1, field(1, b"feats") + field(2, field(2, field(1, feats.astype("<f4").tobytes())))) + field(
        1, field(1, b"label") + field(2, label_feature)
    )
    return field(1, entries)


def int64_feature(value: int) -> bytes:
    return field(3, field(1, varint(value)))


def pyact_records(rng, count: int, shape=(6, 16, 16, 3)) -> list[tuple[np.ndarray, int, bytes]]:
    """pyACT's records: feats float32 in [0, 1] (uint8 / 255), label int64."""
    out = []
    for _ in range(count):
        clip = rng.integers(0, 256, shape, dtype=np.uint8)
        label = int(rng.integers(0, 17))
        out.append((clip, label, example(clip.astype(np.float32).ravel() / 255, int64_feature(label))))
    return out


def shard_labels(dest, split: str) -> list[int]:
    """The class of every window of a split, in manifest order (read with plain tarfile)."""
    manifest = json.loads((dest / "manifest.json").read_text())
    labels = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(dest / shard["name"]) as tar:
            labels += [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
    return labels


def one_error_line(capsys, *names: str) -> str:
    """The single stderr line of a refused command; it names every one of ``names``."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def write_records(folder, records, corrupt_at: int | None = None) -> str:
    """``records`` as one TFRecord file in ``folder``; record ``corrupt_at`` gets a flipped payload bit."""
    os.makedirs(folder, exist_ok=True)
    data = [bytearray(tfrecord(payload)) for _, _, payload in records]
    if corrupt_at is not None:
        data[corrupt_at][100] ^= 0x01
    path = os.path.join(folder, "train.tfrecords-00000")
    with open(path, "wb") as f:
        f.write(b"".join(data))
    return path
