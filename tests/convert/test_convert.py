"""Migration from pyACT: Keras HDF5 weights and TFRecords, built here in their own formats."""

from __future__ import annotations

import io
import json
import os
import struct

import numpy as np
import pytest
import torch

from helpers import keras_weights, tfrecord, write_keras_h5
from pyact_torch.io import storage
from pyact_torch.cli import main
from pyact_torch.errors import UserError
from pyact_torch.data.labels import PYACT_CLASSES as PYACT_CLASS_ORDER
from pyact_torch.data.loader import tar_samples
from pyact_torch.model import build_model

# --- Keras ------------------------------------------------------------------------------------


def keras_weights_v1(rng, channels=3, seq_len=2, size=32, classes=17, first_norm=0):
    """pyACT 1.x's convNet3D (commit 1306798) as Keras names its layers, random weights: the
    BatchNorm layers have Keras' own names, counted from ``first_norm`` (a second model built in
    one Keras session numbers on)."""
    layers, cin, norm = [("input_1", [])], channels, first_norm

    def conv(name, width):
        nonlocal cin
        kernel = rng.normal(0, np.sqrt(2 / (27 * cin)), (3, 3, 3, cin, width)).astype(np.float32)
        layers.append((name, [("kernel", kernel), ("bias", rng.normal(0, 0.05, width).astype(np.float32))]))
        cin = width

    def pool_relu_norm(pool):
        nonlocal norm
        layers.append((pool, []))
        layers.append((f"activation{'_' + str(norm) if norm else ''}", []))
        layers.append(
            (
                f"batch_normalization{'_' + str(norm) if norm else ''}",
                [
                    ("gamma", rng.uniform(0.5, 1.5, cin).astype(np.float32)),
                    ("beta", rng.normal(0, 0.1, cin).astype(np.float32)),
                    ("moving_mean", rng.normal(0, 0.1, cin).astype(np.float32)),
                    ("moving_variance", rng.uniform(0.5, 2, cin).astype(np.float32)),
                ],
            )
        )
        norm += 1

    conv("INITIAL_CONV3D", 64)
    pool_relu_norm("INITIAL_POOL3D")
    for n, width in enumerate([128, 256, 512, 512], 1):
        conv(f"CONV3D_{n}_C1", width)
        conv(f"CONV3D_{n}_c2", width)
        pool_relu_norm(f"POOL3D_{n}")
    layers.append(("FLATTEN", []))
    fan_in = seq_len * (size // 32) ** 2 * cin
    for name, width in (
        ("DENSE_1", 4096),
        ("DROP_OUT_D-1", 0),
        ("DENSE_2", 4096),
        ("DROP_OUT_D-2", 0),
        ("DENSE_CLASS", classes),
    ):
        if not width:
            layers.append((name, []))
            continue
        layers.append(
            (
                name,
                [
                    ("kernel", rng.normal(0, np.sqrt(2 / fan_in), (fan_in, width)).astype(np.float32)),
                    ("bias", rng.normal(0, 0.05, width).astype(np.float32)),
                ],
            )
        )
        fan_in = width
    return layers


def keras_forward(layers, clips: np.ndarray, conv_relu: bool = False) -> np.ndarray:
    """pyACT's ConvNet3D in numpy, channels-last (N, T, H, W, C), Keras semantics, layer by layer
    in file order: Conv3D 'same' (with its ReLU in 1.x: ``conv_relu``), MaxPooling3D (1, 2, 2)
    then Activation('relu'), BatchNormalization (inference: moving statistics, epsilon 1e-3);
    Dense ReLU twice (Dropout is the identity when predicting), softmax."""
    weights = [(name, dict(w)) for name, w in layers]
    x = clips.astype(np.float64)
    for name, w in weights:
        if "kernel" in w and w["kernel"].ndim == 5:
            kernel = w["kernel"]
            n, t, h, wd, _ = x.shape
            padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
            out = np.zeros((n, t, h, wd, kernel.shape[4]))
            for dt in range(3):
                for dh in range(3):
                    for dw in range(3):
                        out += padded[:, dt : dt + t, dh : dh + h, dw : dw + wd, :] @ kernel[dt, dh, dw]
            x = np.maximum(out + w["bias"], 0) if conv_relu else out + w["bias"]
        elif "POOL3D" in name:
            n, t, h, wd, c = x.shape
            x = np.maximum(x.reshape(n, t, h // 2, 2, wd // 2, 2, c).max(axis=(3, 5)), 0)
        elif "gamma" in w:
            x = w["gamma"] * (x - w["moving_mean"]) / np.sqrt(w["moving_variance"] + 1e-3) + w["beta"]
    x = x.reshape(x.shape[0], -1)
    dense = dict(weights)
    x = np.maximum(x @ dense["DENSE_1"]["kernel"] + dense["DENSE_1"]["bias"], 0)
    x = np.maximum(x @ dense["DENSE_2"]["kernel"] + dense["DENSE_2"]["bias"], 0)
    logits = x @ dense["DENSE_CLASS"]["kernel"] + dense["DENSE_CLASS"]["bias"]
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def keras_layers():
    return keras_weights(np.random.default_rng(7))


def assert_keras_softmax(out: str, layers, seq_len: int, conv_relu: bool) -> dict:
    """The converted checkpoint ``out`` gives Keras' softmax within 1e-4 on random clips."""
    state = torch.load(out, weights_only=True)
    model = build_model(state["config"]["model"], 3, seq_len, 32, 17)
    model.load_state_dict(state["model"])
    model.eval()
    clips = np.random.default_rng(1).random((3, seq_len, 32, 32, 3), dtype=np.float32)
    expected = keras_forward(layers, clips, conv_relu)
    with torch.no_grad():
        got = torch.softmax(model(torch.from_numpy(clips).permute(0, 4, 1, 2, 3)), dim=1).double().numpy()
    assert np.abs(got - expected).max() < 1e-4
    assert expected.max(axis=1).min() < 0.99  # a real comparison, not two saturated one-hots
    return state


@pytest.mark.parametrize("whole_model", [False, True], ids=["save_weights", "ModelCheckpoint"])
def test_keras_weights_give_the_same_softmax_as_keras(keras_layers, whole_model, tmp_path, capsys):
    h5, out = str(tmp_path / "weights.h5"), str(tmp_path / "converted.pt")
    write_keras_h5(h5, keras_layers, whole_model)
    assert main(["convert-keras", h5, out]) == 0
    state = assert_keras_softmax(out, keras_layers, 6, conv_relu=False)
    assert state["classes"] == list(PYACT_CLASS_ORDER)
    assert state["data_shape"] == {"channels": 3, "seq_len": 6, "image_size": 32, "modality": "color"}


@pytest.mark.parametrize("whole_model", [False, True], ids=["save_weights", "ModelCheckpoint"])
def test_pyact_1x_weights_give_the_same_softmax_as_keras(whole_model, tmp_path, capsys):
    layers = keras_weights_v1(np.random.default_rng(11), first_norm=5 if whole_model else 0)
    h5, out = str(tmp_path / "v1.h5"), str(tmp_path / "converted.pt")
    write_keras_h5(h5, layers, whole_model, input_shape=(2, 32, 32, 3), functional=True)
    assert main(["convert-keras", h5, out, "--seq-len", "2"]) == 0
    assert "pyACT 1.x's network as --model c3d-v1" in capsys.readouterr().out
    state = assert_keras_softmax(out, layers, 2, conv_relu=True)
    assert state["config"]["model"] == "c3d-v1"
    assert state["data_shape"] == {"channels": 3, "seq_len": 2, "image_size": 32, "modality": "color"}


def test_a_file_of_the_other_network_is_refused_in_one_line(keras_layers, tmp_path, capsys):
    h5 = str(tmp_path / "v007.h5")
    write_keras_h5(h5, keras_layers, whole_model=False)
    assert main(["convert-keras", h5, str(tmp_path / "out.pt"), "--model", "c3d-v1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and h5 in error[0] and "pyACT 0.0.7" in error[0] and "--model c3d" in error[0]
    assert not (tmp_path / "out.pt").exists()
    assert main(["convert-keras", h5, str(tmp_path / "out.pt"), "--model", "c3d"]) == 0  # the control: it converts


def test_keras_class_order_can_be_given(keras_layers, tmp_path):
    h5, out = str(tmp_path / "weights.h5"), str(tmp_path / "converted.pt")
    write_keras_h5(h5, keras_layers, whole_model=False)
    order = sorted(PYACT_CLASS_ORDER)
    assert main(["convert-keras", h5, out, "--classes", ",".join(order)]) == 0
    assert torch.load(out, weights_only=True)["classes"] == order
    assert main(["convert-keras", h5, out, "--classes", "a,b,c", "--overwrite"]) == 2


@pytest.mark.parametrize("case", ["not-hdf5", "other-model"])
def test_keras_conversion_refuses_other_files(case, tmp_path, capsys):
    h5 = tmp_path / "model.h5"
    if case == "not-hdf5":
        h5.write_bytes(b"not an hdf5 file at all")
    else:
        rng = np.random.default_rng(0)
        write_keras_h5(
            str(h5),
            [("dense_1", [("kernel", rng.random((4, 2), dtype=np.float32)), ("bias", np.zeros(2, np.float32))])],
            whole_model=False,
        )
    assert main(["convert-keras", str(h5), str(tmp_path / "out.pt")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(h5) in error[0]
    assert not (tmp_path / "out.pt").exists()


# --- TFRecords --------------------------------------------------------------------------------


def example_class():
    """tf.train.Example built from its .proto definition with the protobuf library."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="pyact_test_example.proto", package="pyacttest", syntax="proto3")

    def message(name, *fields, nested=()):
        m = proto.message_type.add(name=name)
        for number, fname, ftype, label, type_name, oneof in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if oneof is not None:
                f.oneof_index = oneof
        for n in nested:
            m.nested_type.add().CopyFrom(n)
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", (1, "value", F.TYPE_BYTES, rep, None, None))
    message("FloatList", (1, "value", F.TYPE_FLOAT, rep, None, None))
    message("Int64List", (1, "value", F.TYPE_INT64, rep, None, None))
    feature = message(
        "Feature",
        (1, "bytes_list", F.TYPE_MESSAGE, opt, ".pyacttest.BytesList", 0),
        (2, "float_list", F.TYPE_MESSAGE, opt, ".pyacttest.FloatList", 0),
        (3, "int64_list", F.TYPE_MESSAGE, opt, ".pyacttest.Int64List", 0),
    )
    feature.oneof_decl.add(name="kind")
    entry = descriptor_pb2.DescriptorProto(name="FeatureEntry")
    entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=opt)
    entry.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=opt, type_name=".pyacttest.Feature")
    entry.options.map_entry = True
    message("Features", (1, "feature", F.TYPE_MESSAGE, rep, ".pyacttest.Features.FeatureEntry", None), nested=[entry])
    message("Example", (1, "features", F.TYPE_MESSAGE, opt, ".pyacttest.Features", None))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("pyacttest.Example"))


def pyact_records(rng, count: int, shape=(6, 16, 16, 3)) -> list[tuple[np.ndarray, int, bytes]]:
    """pyACT's records: feats float32 in [0, 1] (uint8 / 255), label int64."""
    Example = example_class()
    out = []
    for _ in range(count):
        clip = rng.integers(0, 256, shape, dtype=np.uint8)
        label = int(rng.integers(0, 17))
        example = Example()
        example.features.feature["feats"].float_list.value.extend((clip.astype(np.float32) / 255).ravel().tolist())
        example.features.feature["label"].int64_list.value.append(label)
        out.append((clip, label, example.SerializeToString()))
    return out


@pytest.fixture
def record_folder(tmp_path):
    rng = np.random.default_rng(3)
    records = pyact_records(rng, 30)
    folder = tmp_path / "tfrecords-train"
    folder.mkdir()
    for part, chunk in enumerate((records[:18], records[18:])):
        (folder / f"train.tfrecords-{part:05d}").write_bytes(b"".join(tfrecord(p) for _, _, p in chunk))
    return folder, records


def read_shards(dest, split):
    manifest = json.loads(storage.read_bytes(storage.join(dest, "manifest.json")))
    urls = [storage.join(dest, s["name"]) for s in manifest["splits"][split]["shards"]]
    samples = list(tar_samples(urls))
    return manifest, [(np.load(io.BytesIO(s["clip.npy"])), int(s["cls"]), s["__key__"]) for s in samples]


def test_tfrecords_round_trip_into_shards(record_folder, tmp_path, capsys):
    folder, records = record_folder
    dest = str(tmp_path / "shards")
    assert main(["convert-tfrecords", str(folder), dest, "--shard-size", "8"]) == 0  # split guessed: train
    manifest, samples = read_shards(dest, "train")
    assert manifest["classes"] == list(PYACT_CLASS_ORDER)
    assert (manifest["seq_len"], manifest["image_size"], manifest["channels"]) == (6, 16, ["R", "G", "B"])
    assert [s["count"] for s in manifest["splits"]["train"]["shards"]] == [8, 8, 8, 6]
    assert len(samples) == len(records) and len({key for _, _, key in samples}) == len(records)
    for (clip, label, _), (expected, expected_label, _) in zip(samples, records):
        assert np.array_equal(clip, expected) and label == expected_label
    counts = manifest["splits"]["train"]["class_counts"]
    assert sum(counts.values()) == 30 and counts[PYACT_CLASS_ORDER[records[0][1]]] >= 1
    # a second split goes into the same manifest
    test_folder = tmp_path / "test-records"
    test_folder.mkdir()
    (test_folder / "part-0").write_bytes(b"".join(tfrecord(p) for _, _, p in records[:5]))
    assert main(["convert-tfrecords", str(test_folder), dest]) == 0
    manifest, samples = read_shards(dest, "test")
    assert set(manifest["splits"]) == {"train", "test"} and len(samples) == 5
    assert main(["inspect", dest, "--split", "train", "--out", str(tmp_path / "grid.png")]) == 0


def test_tfrecords_from_gcs(record_folder, tmp_path, gcs):
    folder, records = record_folder
    for name in os.listdir(folder):
        storage.write_bytes(f"gs://pyact-test/tfrecords/train/{name}", (folder / name).read_bytes())
    dest = "gs://pyact-test/converted"
    assert main(["convert-tfrecords", "gs://pyact-test/tfrecords/train", dest]) == 0
    _, samples = read_shards(dest, "train")
    assert [label for _, label, _ in samples] == [label for _, label, _ in records]


@pytest.mark.parametrize("damage", ["bit flip", "truncated"])
def test_corrupt_records_are_named_or_skipped(damage, record_folder, tmp_path, capsys):
    folder, records = record_folder
    victim = folder / "train.tfrecords-00000"
    data = bytearray(victim.read_bytes())
    record_size = len(tfrecord(records[0][2]))
    if damage == "bit flip":  # inside the payload of the fourth record
        data[3 * record_size + 100] ^= 0x01
    else:  # cut in the middle of the sixth record
        data = data[: 5 * record_size + 50]
    victim.write_bytes(bytes(data))
    dest = str(tmp_path / "shards")
    assert main(["convert-tfrecords", str(folder), dest]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and str(victim) in error[0]
    assert f"byte {3 * record_size if damage == 'bit flip' else 5 * record_size}" in error[0]
    assert not os.path.exists(os.path.join(dest, "manifest.json"))

    assert main(["convert-tfrecords", str(folder), dest, "--skip-corrupt"]) == 0
    assert "skipped 1 corrupt record" in capsys.readouterr().out
    manifest, samples = read_shards(dest, "train")
    kept = records[:3] + records[4:] if damage == "bit flip" else records[:5] + records[18:]
    assert [label for _, label, _ in samples] == [label for _, label, _ in kept]
    assert manifest["splits"]["train"]["corrupt_records_skipped"] == 1


def test_example_decoding_reads_hand_assembled_wire_bytes():
    """An Example assembled byte by byte from the protobuf wire format, independently of the
    protobuf library the converter decodes with: packed floats, an unpacked int64, bytes."""
    from pyact_torch.convert.tfrecords import parse_example

    def varint(value: int) -> bytes:
        out = b""
        while True:
            out += bytes([(value & 0x7F) | (0x80 if value > 0x7F else 0)])
            value >>= 7
            if not value:
                return out

    def field(number: int, wire: int, payload: bytes) -> bytes:
        return varint(number << 3 | wire) + (varint(len(payload)) if wire == 2 else b"") + payload

    def entry(name: str, feature: bytes) -> bytes:  # one map<string, Feature> entry
        return field(1, 2, field(1, 2, name.encode()) + field(2, 2, feature))

    feats = field(2, 2, field(1, 2, struct.pack("<3f", 0.0, 0.5, 1.0)))  # Feature.float_list, packed
    label = field(3, 2, field(1, 0, varint(7)))  # Feature.int64_list, one unpacked value
    name = field(1, 2, field(1, 2, b"alvin/asl-z"))  # Feature.bytes_list
    example = field(1, 2, entry("feats", feats) + entry("label", label) + entry("name", name))
    parsed = parse_example(example)
    assert parsed["feats"].dtype == np.float32 and parsed["feats"].tolist() == [0.0, 0.5, 1.0]
    assert parsed["label"].dtype == np.int64 and parsed["label"].tolist() == [7]
    assert parsed["name"] == [b"alvin/asl-z"]
    with pytest.raises(ValueError, match="not a tf.train.Example"):
        parse_example(example[:-3])  # cut inside the last entry


@pytest.mark.parametrize(
    "case",
    [
        "onto its input",
        "onto a user's file",
        "onto a checkpoint without --overwrite",
        "onto a checkpoint with --overwrite",
    ],
)
def test_convert_keras_replaces_only_its_own_checkpoints(case, keras_layers, tmp_path, capsys):
    """On main before the fix, the first three replaced the file (exit 0), the input included."""
    h5 = str(tmp_path / "weights.h5")
    write_keras_h5(h5, keras_layers, whole_model=False)
    out = {"onto its input": h5, "onto a user's file": str(tmp_path / "notes.txt")}.get(case, str(tmp_path / "c.pt"))
    if case == "onto a user's file":
        open(out, "w").write("my notes")
    elif case != "onto its input":
        assert main(["convert-keras", h5, out]) == 0
    before = open(out, "rb").read()
    capsys.readouterr()
    code = main(["convert-keras", h5, out] + (["--overwrite"] if case.endswith("with --overwrite") else []))
    err = capsys.readouterr().err
    if case == "onto a checkpoint with --overwrite":
        assert code == 0 and torch.load(out, weights_only=True)["classes"] == list(PYACT_CLASS_ORDER)
        return
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert open(out, "rb").read() == before
    assert {
        "onto its input": "is the input file itself",
        "onto a user's file": "exists; add --overwrite",
        "onto a checkpoint without --overwrite": "exists; add --overwrite",
    }[case] in err
    if case == "onto a user's file":  # --overwrite does not make a user's file ours
        assert main(["convert-keras", h5, out, "--overwrite"]) == 2
        assert "not a pyact-torch checkpoint" in capsys.readouterr().err and open(out, "rb").read() == before


@pytest.mark.parametrize("layout", [("Train", "Eval"), ("train", "test"), ("", "TEST")])
def test_a_folder_holding_several_splits_is_refused_naming_them(layout, tmp_path, capsys):
    """pyACT writes TFRECORD/Train/ and TFRECORD/Eval/ side by side; on main before the fix the
    folder's records were all written as one split (train)."""
    records = pyact_records(np.random.default_rng(5), 8)
    src = tmp_path / "TFRECORD"
    for name, chunk in zip(layout, (records[:4], records[4:])):
        (src / name).mkdir(parents=True, exist_ok=True)
        (src / name / "data.tfrecords").write_bytes(b"".join(tfrecord(p) for _, _, p in chunk))
    dest = str(tmp_path / "shards")
    assert main(["convert-tfrecords", str(src), dest]) == 2
    err = capsys.readouterr().err
    assert "holds records of several splits" in err and err.count("\n") == 1
    assert all(name in err for name in layout if name)
    assert not os.path.exists(dest)
    if "" in layout:  # records beside a split's folder: move them into one of their own
        return
    for name in layout:  # each split's folder on its own is the way
        assert main(["convert-tfrecords", str(src / name), dest]) == 0
    manifest = json.loads(storage.read_bytes(storage.join(dest, "manifest.json")))
    named = {"train": "train", "eval": "eval", "test": "test", "": "train"}
    assert sorted(manifest["splits"]) == sorted(named[n.lower()] for n in layout)
    assert all(manifest["splits"][s]["count"] == 4 for s in manifest["splits"])


def test_the_split_rule():
    from pyact_torch.convert.tfrecords import named_split, split_of

    assert [
        named_split(n)
        for n in ("Train", "TFRECORD-Eval", "val", "test_records", "contest", "TestRecords", "val2017", "part-00000")
    ] == ["train", "eval", "eval", "test", None, "test", "eval", None]
    for ambiguous in ("train_test", "Train_and_Test", "pyACT_train_val"):
        with pytest.raises(UserError, match="names several splits"):
            named_split(ambiguous)
    assert split_of("/r/flat", ["/r/flat/train.tfrecords", "/r/flat/b"], "") == "train"
    with pytest.raises(UserError, match="several splits"):  # file names count: a flat folder of two splits
        split_of("/r/flat", ["/r/flat/train.tfrecords", "/r/flat/test.tfrecords"], "")
    assert split_of("/r/TFRECORD/Test/part-00000", ["/r/TFRECORD/Test/part-00000"], "") == "test"  # its folder
    assert split_of("/r/Eval", ["/r/Eval/a.tfrecords"], "") == "eval"
    assert split_of("/r/x", ["/r/x/Test/a", "/r/x/Test/b"], "") == "test"  # the nearest folder
    assert split_of("/r/pyact-test-0.tfrecords", ["/r/pyact-test-0.tfrecords"], "") == "test"  # one file: its name
    assert split_of("/r/records", ["/r/records/a"], "eval") == "eval"  # --split where no folder names one
    assert split_of("/r/records", ["/r/records/a"], "") == "train"
    with pytest.raises(UserError, match="another split"):
        split_of("/r/Test", ["/r/Test/a"], "train")  # --split against the folder's own name


def test_more_keras_named_batchnorms_than_pyact_1x_has_are_refused(tmp_path, capsys):
    """The reader takes at most five layers by Keras' own BatchNorm names: a file listing more
    (thousands would each be read) is no pyACT network."""
    layers = keras_weights_v1(np.random.default_rng(1), seq_len=1)
    extra = [
        (
            f"batch_normalization_{k}",
            [(kind, np.ones(4, np.float32)) for kind in ("gamma", "beta", "moving_mean", "moving_variance")],
        )
        for k in range(10, 12)
    ]
    h5 = str(tmp_path / "many.h5")
    write_keras_h5(h5, extra + layers, whole_model=False)
    assert main(["convert-keras", h5, str(tmp_path / "out.pt"), "--seq-len", "1"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "BatchNormalization" in error[0]
    write_keras_h5(h5, layers, whole_model=False)  # the control: without the extra layers it converts
    assert main(["convert-keras", h5, str(tmp_path / "out.pt"), "--seq-len", "1"]) == 0
