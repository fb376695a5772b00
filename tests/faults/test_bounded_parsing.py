"""Faults of the class "bounded parsing and validation of what files hold" (docs/faults.md):
crafted tar headers, shard members, manifests, Keras files and TFRecords are refused in one line
naming the file (and the byte offset or shard), within bounded time and memory. Cases that could
hang run in a subprocess with a timeout.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tracemalloc

import h5py
import numpy as np
import pytest

from pyact_torch.io.records import CorruptRecord, tfrecords
from pyact_torch.cli import main
from pyact_torch.data.shards import TarFormatError, read_manifest, read_tar

from helpers import ROOT, tree_bytes
from helpers import masked_crc, tfrecord, write_keras_h5  # the same file builders as the converter tests
from faults_common import (
    TRAIN,
    one_line,
    cli,
    run,
    write_manifest,
    one_error_line,
    field,
    example,
    pyact_records,
    write_records,
    shard_labels,
)


# --- shards and manifests ---------------------------------------------------------------------


def crafted_tar(*members: tuple[bytes, bytes]) -> bytes:
    """A tar of raw (header, data) pairs, headers given as dicts of field -> bytes."""
    return b"".join(members) + bytes(1024)


def header(name: str, size: int, kind: bytes = b"0") -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = 0, kind
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    block[124:136] = f"{size:011o}\0".encode() if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    block[148:156] = b"        "
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


HANG_CHECK = """
import sys, tracemalloc
from pyact_torch.data.shards import read_tar, TarFormatError
tracemalloc.start()
try:
    with open(sys.argv[1], 'rb') as stream:  # a buffered file, as shards are read: read(n) allocates n
        list(read_tar(stream))
except TarFormatError as exc:
    print('refused:', exc)
print('peak', tracemalloc.get_traced_memory()[1])
"""


def _pax(record: bytes) -> bytes:
    return crafted_tar(header("././@PaxHeader", len(record), b"x") + pad(record), header("a.cls", 1) + pad(b"3"))


@pytest.mark.parametrize(
    "case",
    [
        "pax length 0",
        "pax length 1",
        "pax length past the end",
        "pax no newline",
        "1 GiB member in 4 KB",
        "2**40 member",
        "8 GiB base-256 member",
    ],
)
def test_tar_headers_cannot_hang_or_exhaust_memory(case, tmp_path):
    data = {
        "pax length 0": _pax(b"0 path=x\n"),
        "pax length 1": _pax(b"1 path=x\n"),
        "pax length past the end": _pax(b"99 path=x\n"),
        "pax no newline": _pax(b"10 path=xy"),
        "1 GiB member in 4 KB": crafted_tar(header("a.clip.npy", 1 << 30) + bytes(3000)),
        "2**40 member": crafted_tar(header("a.clip.npy", 1 << 40) + bytes(3000)),
        "8 GiB base-256 member": crafted_tar(header("a.clip.npy", 8 << 30) + bytes(3000)),
    }[case]
    path = tmp_path / "crafted.tar"
    path.write_bytes(data)
    result = subprocess.run([sys.executable, "-c", HANG_CHECK, str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("refused:")
    assert int(result.stdout.rsplit("peak ", 1)[1]) < 16 << 20  # bytes held at the most


def test_a_lying_member_size_never_allocates_more_than_the_file_holds(tmp_path):
    """A member within the size bound but cut short: read in pieces, never allocated whole."""
    import tracemalloc

    path = tmp_path / "cut.tar"
    path.write_bytes(crafted_tar(header("a.clip.npy", 900 << 20) + bytes(4096)))
    tracemalloc.start()
    with open(path, "rb") as stream, pytest.raises(TarFormatError, match="truncated"):
        list(read_tar(stream))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20


def _replace_member(shard: str, ext: str, content: bytes) -> None:
    """Rewrite a shard with the first window's ``ext`` member replaced."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    first_key = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{first_key}.{ext}":
                data = content
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


NPY = b"\x93NUMPY\x01\x00"


@pytest.mark.parametrize(
    "case",
    [
        "cls not a number",
        "cls out of range",
        "npy wrong shape",
        "npy huge header",
        "npy object dtype",
        "npy short data",
        "missing shard",
        "half shard",
        "count disagrees",
    ],
)
@pytest.mark.slow
def test_damaged_data_in_training_is_one_line_naming_the_shard(case, shards, tmp_path):
    manifest = read_manifest(shards).document
    entry = manifest["splits"]["train"]["shards"][0]
    shard = os.path.join(shards, entry["name"])
    if case == "cls not a number":
        _replace_member(shard, "cls", b"seven")
    elif case == "cls out of range":
        _replace_member(shard, "cls", b"99")
    elif case == "npy wrong shape":
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((2, 2), np.uint8))
        _replace_member(shard, "clip.npy", buffer.getvalue())
    elif case == "npy huge header":
        _replace_member(shard, "clip.npy", NPY + (60000).to_bytes(2, "little") + b"{" * 100)
    elif case == "npy object dtype":
        _replace_member(
            shard,
            "clip.npy",
            NPY + b"\x76\x00" + b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + b"\n",
        )
    elif case == "npy short data":
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((6, 16, 16, 3), np.uint8))
        _replace_member(shard, "clip.npy", buffer.getvalue()[:-100])
    elif case == "missing shard":
        os.remove(shard)
    elif case == "half shard":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[: len(data) // 2])
    else:
        entry["count"] += 1
        manifest["splits"]["train"]["count"] += 1
        write_manifest(shards, manifest)
    for workers in ("0", "2"):
        result = run(
            "train",
            "--data",
            shards,
            "--run-dir",
            str(tmp_path / f"run{workers}"),
            *TRAIN[:-4],
            "--workers",
            workers,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        line = one_line(result.stderr)
        assert entry["name"] in line or "inspect" in line, line


@pytest.mark.slow
def test_a_damaged_shard_under_xla_is_one_line_not_a_short_epoch(shards, tmp_path):
    """On XLA the device loader reads host batches in a thread whose exceptions never reach
    training: before, a damaged shard ended the epoch early, the run went on and exited 0."""
    entry = read_manifest(shards).document["splits"]["train"]["shards"][2]
    shard = os.path.join(shards, entry["name"])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "train_tpu.py"),
            "--data",
            shards,
            "--run-dir",
            str(tmp_path / "run"),
            "--device",
            "xla",
            "--model",
            "tiny",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PJRT_DEVICE="CPU"),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert entry["name"] in one_line(result.stderr)
    assert not (tmp_path / "run" / "final.pt").exists()


@pytest.mark.parametrize(
    "damage", ["count 0", "count missing", "count disagrees with the shards", "not a dict", "shard count not a number"]
)
@pytest.mark.parametrize("command", ["inspect", "train", "evaluate"])
def test_a_malformed_split_entry_is_one_line(damage, command, shards, small_run, tmp_path, capsys):
    manifest = read_manifest(shards).document
    split = "test" if command == "evaluate" else "train"
    entry = manifest["splits"][split]
    if damage == "count 0":
        entry["count"] = 0
    elif damage == "count missing":
        del entry["count"]
    elif damage == "count disagrees with the shards":
        entry["count"] += 5
    elif damage == "not a dict":
        manifest["splits"][split] = ["x"]
    else:
        entry["shards"][0]["count"] = "12"
    write_manifest(shards, manifest)
    args = {
        "inspect": ["inspect", shards, "--out", str(tmp_path / "g.png"), "--split", split],
        "train": ["train", "--data", shards, "--run-dir", str(tmp_path / "run"), *TRAIN],
        "evaluate": [
            "evaluate",
            "--checkpoint",
            small_run,
            "--data",
            shards,
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
        ],
    }[command]
    code, err = cli(capsys, *args)
    assert code == 2 and "malformed" in one_line(err)


def test_a_manifest_nested_too_deeply_is_one_line(shards, tmp_path, capsys):
    """A few hundred kB of brackets exhausts Python's recursion limit: it was a RecursionError
    traceback from every command that reads a manifest or a run's JSON."""
    with open(os.path.join(shards, "manifest.json"), "w") as handle:
        handle.write("[" * 100_000 + "]" * 100_000)
    code, err = cli(capsys, "inspect", shards, "--out", str(tmp_path / "g.png"), "--split", "train")
    assert code == 2 and "manifest.json: JSON nested too deeply" in one_line(err)


def test_a_json_member_that_is_not_the_metadata_is_one_line(shards, small_run, tmp_path, capsys):
    entry = read_manifest(shards).document["splits"]["test"]["shards"][0]
    _replace_member(os.path.join(shards, entry["name"]), "json", b"not json")
    code, err = cli(
        capsys, "evaluate", "--checkpoint", small_run, "--data", shards, "--out", str(tmp_path / "s"), "--device", "cpu"
    )
    line = one_line(err)
    assert code == 2 and entry["name"] in line and "json" in line
    assert not (tmp_path / "s" / "predictions.json").exists()


def test_evaluate_with_a_missing_split_or_folder_is_one_line(shards, small_run, tmp_path, capsys):
    shutil.rmtree(os.path.join(shards, "test"))
    code, err = cli(
        capsys, "evaluate", "--checkpoint", small_run, "--data", shards, "--out", str(tmp_path / "s"), "--device", "cpu"
    )
    assert code == 2 and "missing" in one_line(err)
    manifest = read_manifest(shards).document
    del manifest["splits"]["test"]
    write_manifest(shards, manifest)
    code, err = cli(
        capsys, "evaluate", "--checkpoint", small_run, "--data", shards, "--out", str(tmp_path / "s"), "--device", "cpu"
    )
    assert code == 2 and "no 'test' split" in one_line(err)


# --- Keras files ------------------------------------------------------------------------------

TINY_FILTERS, TINY_DENSE = (8, 16, 32, 64), (128, 32)  # the "tiny" preset: small files, fast tests


def tiny_layers(size=16, seq_len=6, channels=3, classes=17) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """A ConvNet3D of the tiny preset in Keras layouts (the layer list write_keras_h5 takes)."""
    rng = np.random.default_rng(5)
    layers, cin = [], channels
    for i, width in enumerate(TINY_FILTERS, 1):
        layers.append(
            (
                f"CONV3D_{i}",
                [
                    ("kernel", rng.normal(0, 0.1, (3, 3, 3, cin, width)).astype(np.float32)),
                    ("bias", np.zeros(width, np.float32)),
                ],
            )
        )
        layers.append((f"POOL3D_{i}", []))
        layers.append(
            (
                f"BATCH_NORM_{i}",
                [(kind, np.ones(width, np.float32)) for kind in ("gamma", "beta", "moving_mean", "moving_variance")],
            )
        )
        cin = width
    fan_in = seq_len * (size // 16) ** 2 * cin
    for name, width in (("DENSE_1", TINY_DENSE[0]), ("DENSE_2", TINY_DENSE[1]), ("DENSE_CLASS", classes)):
        layers.append(
            (
                name,
                [
                    ("kernel", rng.normal(0, 0.1, (fan_in, width)).astype(np.float32)),
                    ("bias", np.zeros(width, np.float32)),
                ],
            )
        )
        fan_in = width
    return layers


def replace_weight(layers, layer: str, kind: str, value) -> list:
    return [(name, [(k, value if (name, k) == (layer, kind) else v) for k, v in weights]) for name, weights in layers]


def test_tiny_keras_file_converts(tmp_path):
    """The fixture the fault cases break is itself a good file."""
    h5, out = str(tmp_path / "tiny.h5"), str(tmp_path / "out.pt")
    write_keras_h5(h5, tiny_layers(), whole_model=True, input_shape=(6, 16, 16, 3))
    assert main(["convert-keras", h5, out]) == 0 and os.path.isfile(out)


def _damage_h5(h5: str, case: str) -> list[str]:
    """Write a tiny Keras file damaged as ``case`` says; returns extra convert-keras arguments."""
    layers, shape, whole = tiny_layers(), (6, 16, 16, 3), True
    if case == "zero-size input shape":
        shape = (6, 0, 0, 3)
    elif case == "input not a multiple of 16":
        shape = (6, 24, 24, 3)  # DENSE_1 fits 24 // 16 = 1 cell: only the model refuses it
    elif case == "1-D conv kernel":
        layers = replace_weight(layers, "CONV3D_2", "kernel", dict(layers[3][1])["kernel"].ravel())
    elif case == "1-D dense kernel":
        layers = replace_weight(layers, "DENSE_2", "kernel", np.zeros(128 * 32, np.float32))
    elif case == "NaN weight":
        kernel = dict(dict(layers)["DENSE_1"])["kernel"].copy()
        kernel.flat[7] = np.nan
        layers = replace_weight(layers, "DENSE_1", "kernel", kernel)
    elif case in ("wrong --seq-len", "empty DENSE_1"):
        whole = False
        if case == "empty DENSE_1":
            layers = replace_weight(layers, "DENSE_1", "kernel", np.zeros((0, 128), np.float32))
    write_keras_h5(h5, layers, whole_model=whole, input_shape=shape)
    with h5py.File(h5, "a") as f:
        weights = f["model_weights"] if whole else f
        if case == "layer without a group":
            weights.attrs["layer_names"] = list(weights.attrs["layer_names"]) + ["GHOST"]
        elif case == "model_config not JSON":
            f.attrs["model_config"] = b'{"class_name": "Sequential", '
        elif case == "model_config not an object":
            f.attrs["model_config"] = b"[1, 2, 3]"
        elif case == "string weight":
            del weights["CONV3D_1/CONV3D_1/bias:0"]
            weights["CONV3D_1"].create_dataset("CONV3D_1/bias:0", data="zeros")
        elif case == "missing weight":
            del weights["CONV3D_1/CONV3D_1/bias:0"]
        elif case == "weight in another file":  # an HDF5 external link: never followed
            del weights["CONV3D_1/CONV3D_1/bias:0"]
            weights["CONV3D_1/CONV3D_1/bias:0"] = h5py.ExternalLink(os.path.abspath(h5) + ".other", "/bias")
    return ["--seq-len", "5"] if case == "wrong --seq-len" else []


@pytest.mark.parametrize(
    "case",
    [
        "layer without a group",
        "weight in another file",
        "model_config not JSON",
        "model_config not an object",
        "zero-size input shape",
        "input not a multiple of 16",
        "1-D conv kernel",
        "1-D dense kernel",
        "string weight",
        "missing weight",
        "wrong --seq-len",
        "empty DENSE_1",
        "NaN weight",
    ],
)
def test_malformed_keras_file_is_one_line(case, tmp_path, capsys):
    h5, out = str(tmp_path / "model.h5"), str(tmp_path / "out.pt")
    extra = _damage_h5(h5, case)
    assert main(["convert-keras", h5, out, *extra]) == 2
    one_error_line(capsys, h5)
    assert not os.path.exists(out)


# --- TFRecords: bounded reading ---------------------------------------------------------------


def record_header(length: int) -> bytes:
    head = struct.pack("<Q", length)
    return head + struct.pack("<I", masked_crc(head))


def test_huge_record_length_is_one_line(tmp_path, capsys):
    records = pyact_records(np.random.default_rng(3), 2)
    folder = tmp_path / "records"
    path = write_records(folder, records)
    good = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(record_header(2**40) + bytes(100))
    dest = str(tmp_path / "shards")
    assert main(["convert-tfrecords", str(folder), dest]) == 2
    one_error_line(capsys, path, f"byte {good}")
    assert not os.path.exists(dest)  # the failed first run created DEST: it is gone again (was left empty)
    assert main(["convert-tfrecords", str(folder), dest, "--skip-corrupt"]) == 0  # the rest of the file is dropped
    assert shard_labels(tmp_path / "shards", "train") == [label for _, label, _ in records]


def test_truncated_record_never_allocates_what_is_not_there(tmp_path):
    path = tmp_path / "short.tfrecords"
    path.write_bytes(record_header(60 * 1024 * 1024) + bytes(100))  # announces 60 MiB, holds 100 bytes
    tracemalloc.start()
    try:
        with open(path, "rb") as handle, pytest.raises(CorruptRecord, match="byte 0"):
            list(tfrecords(handle, str(path)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024


@pytest.mark.parametrize(
    "payload",
    [
        b"\x08\x01",  # Example.features as a varint, not a message
        example(np.zeros(24), field(3, b"")),  # label: an empty int64 list
        example(np.zeros(24), field(3, b"\x09" + bytes(8))),  # label: a fixed64 where a varint belongs
        example(np.zeros(24), field(3, b"\x08" + b"\xff" * 20 + b"\x01")),  # label: a 22-byte varint
        example(np.zeros(24), field(2, field(1, np.array([np.inf], "<f4").tobytes()))),  # label: an infinite float
    ],
    ids=["features-not-message", "empty-label", "fixed64-label", "long-varint", "infinite-label"],
)
def test_malformed_example_is_one_line(payload, tmp_path, capsys):
    folder = tmp_path / "records"
    folder.mkdir()
    path = folder / "train.tfrecords-00000"
    path.write_bytes(tfrecord(payload))
    dest = tmp_path / "shards"
    assert main(["convert-tfrecords", str(folder), str(dest)]) == 2
    one_error_line(capsys, str(path), "byte 0")
    assert tree_bytes(dest) == {}


def test_frames_not_a_multiple_of_16_are_refused_before_any_shard(tmp_path, capsys):
    path = write_records(tmp_path / "records", pyact_records(np.random.default_rng(3), 3, shape=(6, 20, 20, 3)))
    dest = tmp_path / "shards"
    assert main(["convert-tfrecords", str(tmp_path / "records"), str(dest)]) == 2
    assert "16" in one_error_line(capsys, path, "byte 0")
    assert tree_bytes(dest) == {}
