"""Bring what pyACT users already have: Keras HDF5 weights -> a pyact-torch checkpoint, and
pyACT's TFRecords -> shards + manifest. No TensorFlow: h5py for the weights, and a small
reader for TFRecord framing (CRC-32C checked) and the ``tf.train.Example`` message.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import secrets
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


MAX_WEIGHT_BYTES = 4 << 30  # one weight array as float32: c3d's DENSE_1 at 64x64 frames is 0.8 GB


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _names(node, attribute: str) -> list[str]:
    """A Keras name-list attribute (``layer_names``, ``weight_names``) as strings."""
    return [_text(name) for name in np.atleast_1d(node.attrs.get(attribute, []))]


def read_keras_weights(path: str) -> tuple[dict[str, dict[str, np.ndarray]], dict | None]:
    """``{layer: {kernel|bias|gamma|...: array}}`` of a legacy Keras HDF5 file, following its
    own ``layer_names`` / ``weight_names`` attributes; a whole-model file (weights under
    ``model_weights``) also gives its ``model_config``. Every name must lead to what it should
    (a group, a floating-point dataset) before anything is read."""
    import h5py

    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: not an HDF5 file ({str(exc).splitlines()[0]})") from None
    with handle:
        config = None
        if "model_config" in handle.attrs:
            try:
                config = json.loads(_text(handle.attrs["model_config"]))
            except ValueError:
                raise UserError(f"{path}: its model_config is not valid JSON") from None
            if not isinstance(config, dict):
                raise UserError(f"{path}: its model_config is not a JSON object")
        group = handle.get("model_weights", handle)
        if not isinstance(group, h5py.Group):
            raise UserError(f"{path}: model_weights is not a group")
        if "layer_names" not in group.attrs:
            raise UserError(f"{path}: not a Keras weights file (no layer_names attribute)")
        layers: dict[str, dict[str, np.ndarray]] = {}
        for layer in _names(group, "layer_names"):
            node = group.get(layer) if layer else None
            if not isinstance(node, h5py.Group):
                raise UserError(f"{path}: layer {layer[:80]!r} of layer_names has no group")
            weights = {}
            for name in _names(node, "weight_names"):
                data = node.get(name) if name else None
                where = f"{path}: weight {layer[:80]}/{name[:80]}"
                if not isinstance(data, h5py.Dataset):
                    raise UserError(f"{where} of weight_names is missing")
                if data.shape is None or data.dtype.kind != "f":
                    raise UserError(f"{where} is {data.dtype} {data.shape}, not floating-point numbers")
                if data.size * 4 > MAX_WEIGHT_BYTES:
                    raise UserError(f"{where} has {data.size} values, more than any ConvNet3D weight")
                kind = re.sub(r"(_\d+)?:\d+$", "", name.rsplit("/", 1)[-1])  # "CONV3D_1/kernel:0" -> kernel
                try:
                    weights[kind] = np.asarray(data, dtype=np.float32)
                except OSError as exc:  # damaged chunks
                    raise UserError(f"{where}: cannot be read ({str(exc).splitlines()[0]})") from None
            if weights:
                layers[layer] = weights
    return layers, config


def _configured_input(config: dict, path: str) -> tuple[int, int, int, int] | None:
    """(T, H, W, C) of the first 5-D ``batch_input_shape`` in a Keras model config, if any."""
    body = config.get("config", {})
    entries = body.get("layers", []) if isinstance(body, dict) else body  # Keras < 2.2 Sequential: a bare list
    for entry in entries if isinstance(entries, list) else []:
        settings = entry.get("config") if isinstance(entry, dict) else None
        shape = settings.get("batch_input_shape") if isinstance(settings, dict) else None
        if isinstance(shape, list) and len(shape) == 5:
            if not all(type(d) is int and d > 0 for d in shape[1:]):
                raise UserError(f"{path}: its model_config gives the input shape {shape[1:]}, "
                                "which is not a positive size")
            return tuple(shape[1:])
    return None


def _input_shape(layers: dict, config: dict | None, seq_len: int, path: str) -> tuple[int, int, int]:
    """(T, S, C): from the model config when the file has one, else from DENSE_1's row count
    (T x S/16 x S/16 x filters) with T = ``seq_len``; either way checked against the weights,
    so that nothing is built or reshaped for an input the weights cannot take."""
    channels = layers["CONV3D_1"]["kernel"].shape[3]
    filters = layers["CONV3D_4"]["kernel"].shape[4]
    rows = layers["DENSE_1"]["kernel"].shape[0]
    shape = _configured_input(config, path) if config is not None else None
    if shape is not None:
        seq_len, size, width, given = shape
        if size != width:
            raise UserError(f"{path}: the model takes {size}x{width} frames; ConvNet3D takes square ones")
        if given != channels:
            raise UserError(f"{path}: the model config gives {given} channels, CONV3D_1 takes {channels}")
    else:
        cells, remainder = divmod(rows, filters * seq_len)
        side = math.isqrt(cells)
        if remainder or not side or side * side != cells:
            raise UserError(f"{path}: DENSE_1 has {rows} inputs, which is no {seq_len}-frame square input; "
                            "give --seq-len")
        size = side * 16
    if size % 16:
        raise UserError(f"{path}: the model takes {size}x{size} frames; ConvNet3D needs a multiple of 16")
    if rows != seq_len * (size // 16) ** 2 * filters:
        raise UserError(f"{path}: DENSE_1 has {rows} inputs, not the {seq_len * (size // 16) ** 2 * filters} "
                        f"of a {seq_len}x{size}x{size} input")
    return seq_len, size, channels


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
    for layer, kinds in needed.items():
        for kind in kinds:
            rank = 1 if kind != "kernel" else 5 if layer in CONV_LAYERS else 2
            if layers[layer][kind].ndim != rank:
                raise UserError(f"{path}: {layer}/{kind} has shape {layers[layer][kind].shape}; "
                                f"a ConvNet3D {kind} has {rank} dimension{'s' if rank > 1 else ''}")
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

    _check_output_file(config.out)  # before any work
    if not os.path.isfile(config.h5):
        raise UserError(f"{config.h5}: no such file")
    layers, model_config = read_keras_weights(config.h5)
    preset = _preset_of(layers, config.h5)
    seq_len, image_size, channels = _input_shape(layers, model_config, config.seq_len, config.h5)
    if channels not in MODALITY_OF:
        raise UserError(f"{config.h5}: CONV3D_1 takes {channels} channels; pyact-torch data has 1, 3 or 4")
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


def _check_output_file(url: str) -> None:
    """Fail in one line unless a file can be written at ``url``: its folder is writable (or, on
    gs://, its bucket exists) and it is not a folder."""
    storage.check_location(url, "OUT")
    if storage.is_gcs(url):
        storage.check_writable(url)
        return
    if os.path.isdir(url):
        raise UserError(f"{url}: is a folder; give the checkpoint's file name")
    storage.check_writable(os.path.dirname(os.path.abspath(url)))


# --- TFRecords -------------------------------------------------------------------------------

MAX_RECORD = 64 * 1024 * 1024  # bytes in one record: a pyACT window (6x64x64x3 float32) is ~300 KB
READ_PIECE = 1024 * 1024  # a record's payload is read in pieces of this many bytes
MAX_LIST_ITEMS = 1 << 20  # separately decoded values in one feature list (a pyACT label is one int64)


class CorruptRecord(Exception):
    def __init__(self, url: str, offset: int, reason: str):
        super().__init__(f"{url}: corrupt record at byte {offset} ({reason})")


def _masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _read_up_to(handle, size: int) -> bytes:
    """Up to ``size`` bytes, read in pieces: a length field that lies about a truncated file
    never makes us allocate more than the file really holds."""
    pieces, left = [], size
    while left:
        piece = handle.read(min(left, READ_PIECE))
        if not piece:
            break
        pieces.append(piece)
        left -= len(piece)
    return b"".join(pieces)


def tfrecords(handle, url: str) -> Iterator[tuple[int, bytes | None]]:
    """``(offset, payload)`` of each record of a TFRecord stream, CRCs checked. A record whose
    payload fails its CRC comes as ``(offset, None)`` (the next one is still found); a bad or
    oversized length or a truncated file raises CorruptRecord (nothing after it can be trusted)."""
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
        if length > MAX_RECORD:
            raise CorruptRecord(url, offset, f"{length} bytes announced, more than the {MAX_RECORD} a record can have")
        body = _read_up_to(handle, length + 4)
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
        if shift >= 70:
            raise ValueError("varint longer than 10 bytes")


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


def _message(wire: int, value, what: str) -> bytes:
    """A length-delimited field's bytes; any other wire type here is a malformed message."""
    if wire != 2:
        raise ValueError(f"{what} is not length-delimited (wire type {wire})")
    return value


def _bounded(values: list, name: str) -> list:
    """``values`` of feature ``name``, unless there are more than a record of ours can have
    (each would be its own Python object: many times the bytes it came from)."""
    if len(values) > MAX_LIST_ITEMS:
        raise ValueError(f"feature {name[:80]!r} has more than {MAX_LIST_ITEMS} values")
    return values


def parse_example(data: bytes) -> dict[str, np.ndarray]:
    """``tf.train.Example`` -> ``{name: values}`` (float32, int64, or a list of bytes)."""
    features: dict[str, np.ndarray] = {}
    for number, wire, features_msg in _fields(data):
        if number != 1:
            continue
        for entry_number, entry_wire, entry in _fields(_message(wire, features_msg, "Example.features")):
            if entry_number != 1:  # map<string, Feature> entries
                continue
            name, feature = "", b""
            for n, w, value in _fields(_message(entry_wire, entry, "a feature entry")):
                if n == 1:
                    name = _message(w, value, "a feature name").decode()
                elif n == 2:
                    feature = _message(w, value, "a feature value")
            features[name] = _feature_values(feature, name)
    return features


def _feature_values(feature: bytes, name: str):
    what = f"a value of feature {name[:80]!r}"
    for kind, wire, values in _fields(feature):  # oneof: 1 bytes_list, 2 float_list, 3 int64_list
        if kind not in (1, 2, 3):
            continue
        values = _message(wire, values, f"feature {name[:80]!r}")
        if kind == 1:
            return _bounded([_message(w, v, what) for n, w, v in _fields(values) if n == 1], name)
        if kind == 2:
            parts = []
            for n, w, v in _fields(values):
                if n != 1:
                    continue
                if w not in (2, 5):  # packed, or one 32-bit float
                    raise ValueError(f"{what} is not a float (wire type {w})")
                parts.append(np.frombuffer(v, "<f4"))
                _bounded(parts, name)
            return np.concatenate(parts) if parts else np.zeros(0, np.float32)
        ints = []
        for n, w, v in _fields(values):
            if n != 1:
                continue
            if w == 2:  # packed
                pos = 0
                while pos < len(v):
                    value, pos = _varint(v, pos)
                    ints.append(value)
                    _bounded(ints, name)
            elif w == 0:
                ints.append(v)
                _bounded(ints, name)
            else:
                raise ValueError(f"{what} is not an int64 (wire type {w})")
        ints = [i & (1 << 64) - 1 for i in ints]  # a 10-byte varint can hold 70 bits: protobuf keeps 64
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
    (one record in memory at a time). Runs for other splits add to the same manifest. A split
    the manifest already has is written under new shard names and its old shards are deleted
    only after the new manifest is: a run that fails leaves DEST as it was."""
    from tqdm import tqdm

    from .shards import FORMAT, MANIFEST, read_manifest, shard_name, shard_url, split_entry, write_shard, encode_sample

    storage.check_location(config.src, "SRC")
    storage.check_location(config.dest, "DEST")
    files = _record_files(config.src)
    if not files:
        raise UserError(f"{config.src}: no record files")
    storage.check_writable(config.dest)  # before reading any record
    classes = list(config.classes or PYACT_CLASS_ORDER)
    summary = TFRecordSummary(files=len(files))
    shape: list[int] = []  # (T, S, S, C) once known
    counts: Counter = Counter()
    index: list[dict] = []
    manifest_url = storage.join(config.dest, MANIFEST)
    previous = read_manifest(config.dest) if storage.exists(manifest_url) else None
    if previous is not None and previous["classes"] != classes:
        raise UserError(f"{config.dest}: its manifest has other classes; convert into a new DEST")
    published = _published_shards(previous, config.dest) if previous is not None else {}
    old = published.get(config.split, [])
    tag = _fresh_tag(old) if config.split in published else ""  # a fresh DEST keeps the plain names
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
    sample = next(stream, None)  # the first record fixes the clip shape: checked before any shard is written
    if sample is None:
        raise UserError(f"{config.src}: no readable records")
    seq_len, size, _, channels = shape
    if previous is not None and not _fits(previous, shape):
        raise UserError(f"{config.dest}: its manifest has clips of another shape than "
                        f"{seq_len}x{size}x{size}x{channels}; convert into a new DEST")
    written: list = []
    try:
        while sample is not None:
            written.append(write_shard(config.dest, shard_name(config.split, len(written), tag),
                                       itertools.chain([sample], itertools.islice(stream, config.shard_size - 1))))
            sample = next(stream, None)
        bar.close()
        modality = MODALITY_OF[channels]
        manifest = previous or {"format": FORMAT, "classes": classes, "seq_len": seq_len, "image_size": size,
                                "modality": modality, "channels": list(CHANNELS[modality]),
                                "clip_layout": "uint8 (T, H, W, C)", "splits": {},
                                "source": {"converted_from": "pyACT TFRecords", "class_order": classes}}
        manifest["splits"][config.split] = split_entry(written, {c: counts.get(c, 0) for c in classes})
        manifest["splits"][config.split]["corrupt_records_skipped"] = len(summary.corrupt)
        _publish(storage.join(config.dest, config.split, "index.json"), index, manifest_url, manifest)
    except BaseException:
        for info in written:  # never published: nothing may be left of this run
            with contextlib.suppress(OSError, UserError):
                storage.remove(storage.join(config.dest, info.name))
        raise
    listed = {s["name"] for entry in manifest["splits"].values() for s in entry["shards"]}
    for name in old:  # replaced: the new manifest no longer lists them
        if name not in listed:
            storage.remove(shard_url(config.dest, name))
    summary.windows = sum(s.count for s in written)
    print_fn(f"wrote {summary.windows} windows of {seq_len}x{size}x{size}x{channels} in {len(written)} shards to "
             f"{storage.join(config.dest, config.split)} from {len(files)} files"
             + (f"; skipped {len(summary.corrupt)} corrupt record(s)" if summary.corrupt else ""))
    return summary


def _published_shards(manifest: dict, dest: str) -> dict[str, list[str]]:
    """``{split: [shard name]}`` of DEST's manifest. The names are data, not paths: every one
    must be a shard name of ours inside DEST before anything is written or deleted."""
    from .shards import MANIFEST, shard_url

    url = storage.join(dest, MANIFEST)
    if not isinstance(manifest["splits"], dict):
        raise UserError(f"{url}: its splits are not a table")
    names = {}
    for split, entry in manifest["splits"].items():
        shards = entry.get("shards") if isinstance(entry, dict) else None
        if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
            raise UserError(f"{url}: the {str(split)[:40]!r} split has no list of shards")
        names[split] = [s.get("name") for s in shards]
        for name in names[split]:
            shard_url(dest, name)  # a UserError for a name that is not of our form
    return names


def _fresh_tag(names: list[str]) -> str:
    """An 8-hex-digit tag for new shard names that no name in ``names`` uses, so that writing
    the new shards can never overwrite a published one."""
    while True:
        tag = secrets.token_hex(4)
        if not any(f"-{tag}-" in name for name in names):
            return tag


def _fits(manifest: dict, shape: list[int]) -> bool:
    """Whether clips of ``shape`` (T, S, S, C) are those of ``manifest``'s dataset."""
    seq_len, size, _, channels = shape
    return (manifest["seq_len"] == seq_len and manifest["image_size"] == size
            and isinstance(manifest["channels"], list) and len(manifest["channels"]) == channels)


def _publish(index_url: str, index: list[dict], manifest_url: str, manifest: dict) -> None:
    """Write a split's index.json, then the manifest: the commit point. If the manifest cannot
    be written, the split's index.json is put back as it was."""
    # Held in memory: no bigger than the index this run already holds (one row per window).
    old_index = storage.read_bytes(index_url) if storage.is_file(index_url) else None
    storage.write_json(index_url, index)
    try:
        storage.write_json(manifest_url, manifest)
    except BaseException:
        with contextlib.suppress(OSError, UserError):
            if old_index is None:
                storage.remove(index_url)
            else:
                storage.write_bytes(index_url, old_index)
        raise


def _window(features: dict, url: str, offset: int, seq_len: int, shape: list[int]) -> tuple[np.ndarray, int]:
    """A record's ``feats`` as a uint8 ``(T, S, S, C)`` clip (round(feats x 255)) and its label."""
    if "feats" not in features or "label" not in features:
        raise ValueError(f"no feats/label features (has {', '.join(features) or 'none'})")
    feats, label = features["feats"], features["label"]
    if not isinstance(feats, np.ndarray) or feats.dtype != np.float32:
        raise ValueError("feats is not a float list")
    if not isinstance(label, np.ndarray) or label.dtype != np.int64 or not label.size:
        raise ValueError("label holds no int64 value")
    if not shape:
        for channels in (3, 1, 4):
            cells, remainder = divmod(feats.size, seq_len * channels)
            side = math.isqrt(cells)
            if not remainder and side * side == cells and side:
                if side % 16:  # refused at the first record, before any shard is written
                    raise ValueError(f"frames of {side}x{side} pixels; ConvNet3D needs a multiple of 16")
                shape.extend((seq_len, side, side, channels))
                break
        else:
            raise ValueError(f"{feats.size} values are no {seq_len}-frame square clip; give --seq-len")
    if feats.size != int(np.prod(shape)):
        raise ValueError(f"{feats.size} values, the first record had {int(np.prod(shape))}")
    clip = np.clip(np.rint(feats * 255.0), 0, 255).astype(np.uint8).reshape(shape)
    return clip, int(label[0])
