"""Bring what pyACT users already have: Keras HDF5 weights -> a pyact-torch checkpoint, and
pyACT's TFRecords -> shards + manifest. No TensorFlow: h5py for the weights, and a small
reader for TFRecord framing (CRC-32C checked) and the ``tf.train.Example`` message.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from . import storage
from .config import KerasConfig, TFRecordConfig
from .errors import UserError
from .frames import CHANNELS
from .labels import NO_ACTION

# The only class order pyACT ever wrote down (score.py); a pyACT model's real order is whatever
# its own preprocessing listed, hence --classes.
PYACT_CLASS_ORDER = ("ui-screenTap", "asl-you", "asl-blue", "ui-doubleclick", "asl-j", "asl-green", "asl-z",
                     "ui-keyTap", "asl-scissors", "asl-bathroom", "ui-swipe", "asl-where", "asl-yellow",
                     "ui-click", "asl-milk", "ui-circle", NO_ACTION)

MODALITY_OF = {len(channels): modality for modality, channels in CHANNELS.items()}  # channel count -> modality

# --- Keras weights ---------------------------------------------------------------------------

CONV_LAYERS = ("CONV3D_1", "CONV3D_2", "CONV3D_3", "CONV3D_4")
NORM_LAYERS = ("BATCH_NORM_1", "BATCH_NORM_2", "BATCH_NORM_3", "BATCH_NORM_4")
DENSE_LAYERS = ("DENSE_1", "DENSE_2", "DENSE_CLASS")
KERAS_TO_TORCH = {"kernel": "weight", "bias": "bias", "gamma": "weight", "beta": "bias",
                  "moving_mean": "running_mean", "moving_variance": "running_var"}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_keras_weights(path: str) -> tuple[dict[str, dict[str, np.ndarray]], dict | None]:
    """``{layer: {kernel|bias|gamma|...: array}}`` of a legacy Keras HDF5 file, following its
    own ``layer_names`` / ``weight_names`` attributes; a whole-model file (weights under
    ``model_weights``) also gives its ``model_config``."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: not an HDF5 file ({str(exc).splitlines()[0]})") from None
    with handle:
        config = None
        if "model_config" in handle.attrs:
            config = json.loads(_text(handle.attrs["model_config"]))
        group = handle["model_weights"] if "model_weights" in handle else handle
        if "layer_names" not in group.attrs:
            raise UserError(f"{path}: not a Keras weights file (no layer_names attribute)")
        layers: dict[str, dict[str, np.ndarray]] = {}
        for layer in map(_text, group.attrs["layer_names"]):
            weights = {}
            for name in map(_text, group[layer].attrs.get("weight_names", [])):
                kind = re.sub(r"(_\d+)?:\d+$", "", name.rsplit("/", 1)[-1])  # "CONV3D_1/kernel:0" -> kernel
                weights[kind] = np.asarray(group[layer][name], dtype=np.float32)
            if weights:
                layers[layer] = weights
    return layers, config


def _input_shape(layers: dict, config: dict | None, seq_len: int) -> tuple[int, int, int]:
    """(T, S, C): from the model config when the file has one, else from DENSE_1's row count
    (T x S/16 x S/16 x filters) with T = ``seq_len``."""
    channels = layers["CONV3D_1"]["kernel"].shape[3]
    if config is not None:
        for layer in config.get("config", {}).get("layers", []):
            shape = layer.get("config", {}).get("batch_input_shape")
            if shape and len(shape) == 5:
                return int(shape[1]), int(shape[2]), int(shape[4])
    rows = layers["DENSE_1"]["kernel"].shape[0]
    cells, remainder = divmod(rows, layers["CONV3D_4"]["kernel"].shape[4] * seq_len)
    side = math.isqrt(cells)
    if remainder or side * side != cells:
        raise UserError(f"DENSE_1 has {rows} inputs, which is no {seq_len}-frame square input; give --seq-len")
    return seq_len, side * 16, channels


def keras_to_state_dict(layers: dict, seq_len: int, image_size: int) -> dict[str, torch.Tensor]:
    """The torch ``state_dict`` of ConvNet3D for Keras ConvNet3D weights: kernels transposed
    to torch layouts, DENSE_1's rows permuted from Keras' channels-last flatten (T, H, W, C)
    to torch's (C, T, H, W)."""
    state: dict[str, torch.Tensor] = {}
    for i, (conv, norm) in enumerate(zip(CONV_LAYERS, NORM_LAYERS)):
        kernel = layers[conv]["kernel"]  # (kT, kH, kW, in, out)
        state[f"features.{4 * i}.weight"] = torch.from_numpy(kernel.transpose(4, 3, 0, 1, 2).copy())
        state[f"features.{4 * i}.bias"] = torch.from_numpy(layers[conv]["bias"])
        for kind in ("gamma", "beta", "moving_mean", "moving_variance"):
            state[f"features.{4 * i + 3}.{KERAS_TO_TORCH[kind]}"] = torch.from_numpy(layers[norm][kind])
        state[f"features.{4 * i + 3}.num_batches_tracked"] = torch.tensor(0)
    side = image_size // 16
    first = layers["DENSE_1"]["kernel"]  # (T*H*W*C, out)
    filters = layers["CONV3D_4"]["kernel"].shape[4]
    first = first.reshape(seq_len, side, side, filters, -1).transpose(4, 3, 0, 1, 2).reshape(first.shape[1], -1)
    state["classifier.1.weight"] = torch.from_numpy(np.ascontiguousarray(first))
    state["classifier.1.bias"] = torch.from_numpy(layers["DENSE_1"]["bias"])
    for index, layer in ((3, "DENSE_2"), (5, "DENSE_CLASS")):
        state[f"classifier.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(layers[layer]["kernel"].T))
        state[f"classifier.{index}.bias"] = torch.from_numpy(layers[layer]["bias"])
    return state


def _preset_of(layers: dict, path: str) -> str:
    from .model import PRESETS

    needed = {**{n: ("kernel", "bias") for n in CONV_LAYERS + DENSE_LAYERS},
              **{n: ("gamma", "beta", "moving_mean", "moving_variance") for n in NORM_LAYERS}}
    missing = [f"{layer}/{kind}" for layer, kinds in needed.items() for kind in kinds
               if kind not in layers.get(layer, {})]
    if missing:
        raise UserError(f"{path}: not a pyACT ConvNet3D weights file (missing {', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''}; it has {', '.join(layers) or 'no weights'})")
    filters = tuple(layers[n]["kernel"].shape[4] for n in CONV_LAYERS)
    dense = tuple(layers[n]["kernel"].shape[1] for n in DENSE_LAYERS[:2])
    for name, preset in PRESETS.items():
        if preset.filters == filters and preset.dense == dense:
            return name
    raise UserError(f"{path}: ConvNet3D with filters {filters} and dense {dense} matches no preset")


def convert_keras(config: KerasConfig, print_fn: Callable[[str], None] = print) -> dict:
    """``pyact convert-keras``: a pyACT Keras HDF5 file -> a pyact-torch checkpoint."""
    from .checkpoint import CHECKPOINT_FORMAT
    from .model import build_model

    if not os.path.isfile(config.h5):
        raise UserError(f"{config.h5}: no such file")
    layers, model_config = read_keras_weights(config.h5)
    preset = _preset_of(layers, config.h5)
    seq_len, image_size, channels = _input_shape(layers, model_config, config.seq_len)
    classes = list(config.classes or PYACT_CLASS_ORDER)
    outputs = layers["DENSE_CLASS"]["kernel"].shape[1]
    if outputs != len(classes):
        raise UserError(f"{config.h5}: DENSE_CLASS has {outputs} outputs but {len(classes)} classes were given")
    state_dict = keras_to_state_dict(layers, seq_len, image_size)
    model = build_model(preset, channels, seq_len, image_size, len(classes))
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        raise UserError(f"{config.h5}: weights do not fit ConvNet3D at {seq_len}x{image_size}x{image_size}x{channels} "
                        f"({str(exc).splitlines()[-1].strip()})") from None
    if channels not in MODALITY_OF:
        raise UserError(f"{config.h5}: CONV3D_1 takes {channels} channels; pyact-torch data has 1, 3 or 4")
    modality = MODALITY_OF[channels]
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "step": 0, "epoch": 0,
        "config": {"model": preset}, "classes": classes,
        "data_shape": {"channels": channels, "seq_len": seq_len, "image_size": image_size, "modality": modality},
        "converted_from": os.path.basename(config.h5), "metrics": "[]",
    }
    with storage.open_write(config.out) as sink:
        torch.save(checkpoint, sink)
    print_fn(f"wrote {config.out}: {preset} at {seq_len}x{image_size}x{image_size}x{channels}, "
             f"{len(classes)} classes in {'the given' if config.classes else 'pyACT'} order")
    return checkpoint


# --- TFRecords -------------------------------------------------------------------------------

class CorruptRecord(Exception):
    def __init__(self, url: str, offset: int, reason: str):
        super().__init__(f"{url}: corrupt record at byte {offset} ({reason})")


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecords(handle, url: str) -> Iterator[tuple[int, bytes | None]]:
    """``(offset, payload)`` of each record of a TFRecord stream, CRCs checked. A record whose
    payload fails its CRC comes as ``(offset, None)`` (the next one is still found); a bad
    length or a truncated file raises CorruptRecord (nothing after it can be trusted)."""
    offset = 0
    while True:
        header = handle.read(12)
        if not header:
            return
        if len(header) < 12:
            raise CorruptRecord(url, offset, "truncated header")
        length, length_crc = struct.unpack("<QI", header)
        if _masked_crc(header[:8]) != length_crc:
            raise CorruptRecord(url, offset, "length CRC mismatch")
        body = handle.read(length + 4)
        if len(body) < length + 4:
            raise CorruptRecord(url, offset, f"truncated: {length} bytes announced")
        payload, (data_crc,) = body[:length], struct.unpack("<I", body[length:])
        yield offset, (payload if _masked_crc(payload) == data_crc else None)
        offset += 12 + length + 4


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message; length-delimited values as bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated field")
        yield number, wire, value


def parse_example(data: bytes) -> dict[str, np.ndarray]:
    """``tf.train.Example`` -> ``{name: values}`` (float32, int64, or a list of bytes)."""
    features: dict[str, np.ndarray] = {}
    for number, _, features_msg in _fields(data):
        if number != 1:
            continue
        for entry_number, _, entry in _fields(features_msg):  # map<string, Feature> entries
            if entry_number != 1:
                continue
            name, feature = "", b""
            for n, _, value in _fields(entry):
                if n == 1:
                    name = value.decode()
                elif n == 2:
                    feature = value
            features[name] = _feature_values(feature)
    return features


def _feature_values(feature: bytes):
    for kind, _, values in _fields(feature):  # oneof: 1 bytes_list, 2 float_list, 3 int64_list
        if kind == 1:
            return [v for n, _, v in _fields(values) if n == 1]
        if kind == 2:
            parts = [np.frombuffer(v, "<f4") for n, _, v in _fields(values) if n == 1]
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if kind == 3:
            ints = []
            for n, wire, v in _fields(values):
                if n != 1:
                    continue
                if wire == 2:  # packed
                    pos = 0
                    while pos < len(v):
                        value, pos = _varint(v, pos)
                        ints.append(value)
                else:
                    ints.append(v)
            return np.array([i - (1 << 64) if i >= 1 << 63 else i for i in ints], dtype=np.int64)
    return np.zeros(0, np.float32)


@dataclass
class TFRecordSummary:
    windows: int = 0
    corrupt: list[str] = field(default_factory=list)
    files: int = 0


def _record_files(src: str) -> list[str]:
    if storage.is_gcs(src) or os.path.isdir(src):
        names = [n for n in storage.list_files(src) if not n.startswith(".")]
        return [storage.join(src, n) for n in sorted(names)]
    if os.path.isfile(src):
        return [src]
    raise UserError(f"{src}: no such file or folder")


def convert_tfrecords(config: TFRecordConfig, progress: bool = True, print_fn: Callable[[str], None] = print) -> TFRecordSummary:
    """``pyact convert-tfrecords``: pyACT TFRecords (one split) -> shards + manifest, streaming
    (one record in memory at a time). Runs for other splits add to the same manifest."""
    from tqdm import tqdm

    from .shards import FORMAT, MANIFEST, read_manifest, shard_name, split_entry, write_shard, encode_sample

    files = _record_files(config.src)
    if not files:
        raise UserError(f"{config.src}: no record files")
    classes = list(config.classes or PYACT_CLASS_ORDER)
    summary = TFRecordSummary(files=len(files))
    shape: list[int] = []  # (T, S, S, C) once known
    counts: Counter = Counter()
    index: list[dict] = []
    manifest_url = storage.join(config.dest, MANIFEST)
    previous = read_manifest(config.dest) if storage.exists(manifest_url) else None
    if previous is not None and previous["classes"] != classes:
        raise UserError(f"{config.dest}: its manifest has other classes; convert into a new DEST")
    bar = tqdm(unit="window", desc=f"converting {config.split}", disable=None if progress else True)

    def skip(exc: CorruptRecord) -> None:
        if not config.skip_corrupt:
            raise UserError(f"{exc}; use --skip-corrupt to skip such records")
        summary.corrupt.append(str(exc))

    def samples() -> Iterator[dict]:
        for url in files:
            stem = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.basename(url))
            with storage.open_read(url) as handle:
                records = tfrecords(handle, url)
                number = 0
                while True:
                    try:
                        offset, payload = next(records)
                    except StopIteration:
                        break
                    except CorruptRecord as exc:
                        skip(exc)
                        break
                    if payload is None:
                        skip(CorruptRecord(url, offset, "data CRC mismatch"))
                        continue
                    try:
                        clip, label = _window(parse_example(payload), url, offset, config.seq_len, shape)
                    except ValueError as exc:
                        raise UserError(f"{url}: record at byte {offset}: {exc}") from None
                    if not 0 <= label < len(classes):
                        raise UserError(f"{url}: record at byte {offset} has label {label}, "
                                        f"outside the {len(classes)} classes")
                    key = f"{stem}/{number:06d}"
                    meta = {"path": os.path.basename(url), "start": number, "stop": number,
                            "label": classes[label], "subject": "", "action": "", "offset": offset}
                    counts[classes[label]] += 1
                    index.append({"key": key, "path": meta["path"], "start": number, "stop": number,
                                  "class": classes[label]})
                    number += 1
                    bar.update(1)
                    yield encode_sample(key, clip, label, meta)

    stream = samples()
    shards = []
    for number in itertools.count():
        first = next(stream, None)
        if first is None:
            break
        info = write_shard(config.dest, shard_name(config.split, number),
                           itertools.chain([first], itertools.islice(stream, config.shard_size - 1)))
        shards.append(info)
    bar.close()
    summary.windows = sum(s.count for s in shards)
    if not summary.windows:
        raise UserError(f"{config.src}: no readable records")
    seq_len, size, _, channels = shape
    modality = MODALITY_OF[channels]
    manifest = previous or {"format": FORMAT, "classes": classes, "seq_len": seq_len, "image_size": size,
                            "modality": modality, "channels": list(CHANNELS[modality]),
                            "clip_layout": "uint8 (T, H, W, C)", "splits": {},
                            "source": {"converted_from": "pyACT TFRecords", "class_order": classes}}
    if (manifest["seq_len"], manifest["image_size"], len(manifest["channels"])) != (seq_len, size, channels):
        raise UserError(f"{config.dest}: its manifest has clips of another shape; convert into a new DEST")
    stale = [s["name"] for s in manifest["splits"].get(config.split, {}).get("shards", [])
             if s["name"] not in {i.name for i in shards}]
    manifest["splits"][config.split] = split_entry(shards, {c: counts.get(c, 0) for c in classes})
    manifest["splits"][config.split]["corrupt_records_skipped"] = len(summary.corrupt)
    storage.write_json(storage.join(config.dest, config.split, "index.json"), index)
    storage.write_json(manifest_url, manifest)
    for name in stale:
        storage.remove(storage.join(config.dest, name))
    print_fn(f"wrote {summary.windows} windows of {seq_len}x{size}x{size}x{channels} in {len(shards)} shards to "
             f"{storage.join(config.dest, config.split)} from {len(files)} files"
             + (f"; skipped {len(summary.corrupt)} corrupt record(s)" if summary.corrupt else ""))
    return summary


def _window(features: dict, url: str, offset: int, seq_len: int, shape: list[int]) -> tuple[np.ndarray, int]:
    """A record's ``feats`` as a uint8 ``(T, S, S, C)`` clip (round(feats x 255)) and its label."""
    if "feats" not in features or "label" not in features:
        raise ValueError(f"no feats/label features (has {', '.join(features) or 'none'})")
    feats, label = np.asarray(features["feats"], np.float32), features["label"]
    if not shape:
        for channels in (3, 1, 4):
            cells, remainder = divmod(feats.size, seq_len * channels)
            side = math.isqrt(cells)
            if not remainder and side * side == cells and side:
                shape.extend((seq_len, side, side, channels))
                break
        else:
            raise ValueError(f"{feats.size} values are no {seq_len}-frame square clip; give --seq-len")
    if feats.size != int(np.prod(shape)):
        raise ValueError(f"{feats.size} values, the first record had {int(np.prod(shape))}")
    clip = np.clip(np.rint(feats * 255.0), 0, 255).astype(np.uint8).reshape(shape)
    return clip, int(label[0])
