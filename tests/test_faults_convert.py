"""convert-keras and convert-tfrecords on bad input and bad output locations: one line naming the
file (and byte offset), exit status 2, and nothing half-written or deleted in the output."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tarfile
import tracemalloc

import h5py
import numpy as np
import pytest

from pyact_torch.cli import main
from pyact_torch.io import storage
from pyact_torch.io.records import CorruptRecord, tfrecords
from pyact_torch.errors import UserError
from helpers import read_only, tree_bytes
from helpers import masked_crc, tfrecord, write_keras_h5  # the same file builders as the converter tests

# --- helpers ----------------------------------------------------------------------------------
# Self-contained on purpose: test_convert's module imports loader functions that are being
# reworked, and these tests must not depend on them. TFRecords and Examples are encoded by hand
# here (test_convert checks the reader against the protobuf library's own encoding).


def record_header(length: int) -> bytes:
    head = struct.pack("<Q", length)
    return head + struct.pack("<I", masked_crc(head))


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


# --- Keras ------------------------------------------------------------------------------------

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
    ],
)
def test_malformed_keras_file_is_one_line(case, tmp_path, capsys):
    h5, out = str(tmp_path / "model.h5"), str(tmp_path / "out.pt")
    extra = _damage_h5(h5, case)
    assert main(["convert-keras", h5, out, *extra]) == 2
    one_error_line(capsys, h5)
    assert not os.path.exists(out)


# --- output locations are checked before any input is read -----------------------------------


def test_keras_output_under_a_file_fails_before_reading(tmp_path, capsys):
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"not an hdf5 file: reading it would be the first error")
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert main(["convert-keras", str(h5), str(blocker / "out.pt")]) == 2
    line = one_error_line(capsys, str(blocker))
    assert str(h5) not in line


def test_keras_output_that_is_a_folder_fails_before_reading(tmp_path, capsys):
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"not an hdf5 file: reading it would be the first error")
    out = tmp_path / "checkpoints"
    out.mkdir()
    assert main(["convert-keras", str(h5), str(out)]) == 2
    line = one_error_line(capsys, str(out))
    assert str(h5) not in line and os.listdir(out) == []


def test_tfrecords_into_a_dest_of_other_files_is_refused(tmp_path, capsys):
    """Files but no manifest (another tool's output, an unfinished preprocessing run): never
    written over or deleted."""
    write_records(tmp_path / "records", pyact_records(np.random.default_rng(3), 4))
    dest = tmp_path / "dest"
    (dest / "train").mkdir(parents=True)
    (dest / "train" / "train-000000.tar").write_bytes(b"someone else's shard")
    assert main(["convert-tfrecords", str(tmp_path / "records"), str(dest), "--split", "train"]) == 2
    one_error_line(capsys, str(dest))
    assert (dest / "train" / "train-000000.tar").read_bytes() == b"someone else's shard"


def test_tfrecords_dest_under_a_file_fails_before_reading(tmp_path, capsys):
    path = write_records(tmp_path / "records", pyact_records(np.random.default_rng(3), 4), corrupt_at=0)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert main(["convert-tfrecords", str(tmp_path / "records"), str(blocker / "shards")]) == 2
    line = one_error_line(capsys, str(blocker))
    assert path not in line


def test_read_only_outputs_fail_before_reading(tmp_path, capsys):
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"not an hdf5 file")
    write_records(tmp_path / "records", pyact_records(np.random.default_rng(3), 4), corrupt_at=0)
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        assert main(["convert-keras", str(h5), str(locked / "out.pt")]) == 2
        one_error_line(capsys, str(locked))
        assert main(["convert-tfrecords", str(tmp_path / "records"), str(locked / "shards")]) == 2
        one_error_line(capsys, str(locked))


# --- TFRecords: bounded reading ---------------------------------------------------------------


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
    assert not os.path.exists(os.path.join(dest, "manifest.json"))
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


def test_failed_first_conversion_leaves_no_shards(tmp_path, capsys):
    path = write_records(tmp_path / "records", pyact_records(np.random.default_rng(3), 30), corrupt_at=20)
    dest = tmp_path / "shards"
    assert main(["convert-tfrecords", str(tmp_path / "records"), str(dest), "--shard-size", "8"]) == 2
    one_error_line(capsys, path)
    assert tree_bytes(dest) == {}


# --- re-conversion into an existing DEST --------------------------------------------------------


@pytest.fixture
def converted(tmp_path):
    """DEST (two levels below tmp_path) after converting 30 records into train, 8 per shard."""
    records = pyact_records(np.random.default_rng(3), 30)
    write_records(tmp_path / "first", records)
    dest = tmp_path / "out" / "shards"
    assert main(["convert-tfrecords", str(tmp_path / "first"), str(dest), "--shard-size", "8"]) == 0
    return dest, records


@pytest.mark.parametrize("case", ["absolute", "parent", "other split", "not a string"])
def test_manifest_shard_names_are_not_paths(case, converted, tmp_path, capsys):
    dest, _ = converted
    victim = tmp_path / "x" / "victim"
    victim.parent.mkdir()
    victim.write_text("not ours")
    name = {"absolute": str(victim), "parent": "../../x/victim", "other split": str(victim), "not a string": 7}[case]
    manifest_path = dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    split = "test" if case == "other split" else "train"
    entry = manifest["splits"].setdefault(split, {"count": 0, "class_counts": {}, "shards": []})
    entry["shards"].append({"name": name, "count": 1, "bytes": 8, "sha256": "0" * 64})
    manifest_path.write_text(json.dumps(manifest))
    before = tree_bytes(dest)
    assert main(["convert-tfrecords", str(tmp_path / "first"), str(dest), "--shard-size", "8"]) == 2
    one_error_line(capsys, str(manifest_path))
    assert victim.read_text() == "not ours"
    assert tree_bytes(dest) == before


def test_failed_reconversion_leaves_dest_as_it_was(converted, tmp_path, capsys):
    dest, _ = converted
    before = tree_bytes(dest)
    path = write_records(tmp_path / "second", pyact_records(np.random.default_rng(11), 30), corrupt_at=20)
    assert main(["convert-tfrecords", str(tmp_path / "second"), str(dest), "--shard-size", "8"]) == 2
    one_error_line(capsys, path)
    assert tree_bytes(dest) == before


def test_reconversion_of_another_shape_leaves_dest_as_it_was(converted, tmp_path, capsys):
    dest, _ = converted
    before = tree_bytes(dest)
    path = write_records(tmp_path / "bigger", pyact_records(np.random.default_rng(11), 10, shape=(6, 32, 32, 3)))
    os.rename(path, os.path.join(tmp_path / "bigger", "part-00000"))  # a file name naming no split: --split says
    assert main(["convert-tfrecords", str(tmp_path / "bigger"), str(dest), "--split", "test"]) == 2
    one_error_line(capsys, str(dest))
    assert tree_bytes(dest) == before


def test_failure_at_the_commit_point_leaves_dest_as_it_was(converted, tmp_path, capsys, monkeypatch):
    """The manifest cannot be written (say the disk filled up): the new shards are removed and
    the split's index.json is put back."""
    dest, _ = converted
    before = tree_bytes(dest)
    write_records(tmp_path / "second", pyact_records(np.random.default_rng(11), 20))
    write_json = storage.write_json

    def full_disk(url, value):
        if url.endswith("manifest.json"):
            raise UserError(f"{url}: cannot write (No space left on device)")
        write_json(url, value)

    monkeypatch.setattr(storage, "write_json", full_disk)
    assert main(["convert-tfrecords", str(tmp_path / "second"), str(dest), "--shard-size", "8"]) == 2
    one_error_line(capsys, str(dest / "manifest.json"))
    assert tree_bytes(dest) == before


def check_dest(dest) -> dict:
    """What ``pyact inspect`` checks: DEST holds exactly the manifest's shards (+ index files),
    each with the manifest's size and sha256."""
    manifest = json.loads((dest / "manifest.json").read_text())
    listed = {s["name"]: s for entry in manifest["splits"].values() for s in entry["shards"]}
    indexes = {f"{s}/index.json" for s in manifest["splits"]}
    assert set(tree_bytes(dest)) == set(listed) | indexes | {"manifest.json"}
    for name, shard in listed.items():
        data = (dest / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
    return manifest


def test_reconversion_replaces_the_split_under_new_names(converted, tmp_path, monkeypatch):
    dest, first = converted
    old = [s["name"] for s in check_dest(dest)["splits"]["train"]["shards"]]
    assert old == [f"train/train-{i:06d}.tar" for i in range(4)]  # a fresh DEST: plain names
    second = pyact_records(np.random.default_rng(11), 20)
    write_records(tmp_path / "second", second)
    # the third draw repeats the tag the shards then published use: it must be drawn again
    tags = iter(["0badc0de", "0badc0de", "feedbeef"])
    monkeypatch.setattr("secrets.token_hex", lambda _: next(tags))
    for tag, folder, records in (("0badc0de", "second", second), ("feedbeef", "first", first)):
        assert main(["convert-tfrecords", str(tmp_path / folder), str(dest), "--shard-size", "8"]) == 0
        names = [s["name"] for s in check_dest(dest)["splits"]["train"]["shards"]]
        assert names == [f"train/train-{tag}-{i:06d}.tar" for i in range(len(names))]
        assert not any((dest / name).exists() for name in old)
        assert shard_labels(dest, "train") == [label for _, label, _ in records]
        old = names
    assert main(["inspect", str(dest), "--split", "train", "--out", str(tmp_path / "grid.png")]) == 0
