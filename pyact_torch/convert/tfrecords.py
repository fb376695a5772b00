"""``pyact convert-tfrecords``: pyACT's TFRecords of one split -> shards + manifest, streaming,
without TensorFlow: TFRecord framing read by ``io.records`` (lengths bounded, CRC-32C checked) and each
``tf.train.Example`` decoded by protobuf from the message's own definition. Replacing a split
that DEST already has writes new shard names first and publishes them with the manifest."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import re
import secrets
from collections import Counter
from dataclasses import replace, dataclass, field
from typing import Callable, Iterator

import numpy as np

from ..io import storage
from ..config import TFRecordConfig
from ..errors import UserError
from ..io.locks import LOCK_NAME, Lock
from ..io.outputs import remove_empty_up_to, topmost_missing
from ..io.records import CorruptRecord, tfrecords
from ..data.labels import PYACT_CLASSES
from ..data.shards import (
    MANIFEST,
    MODALITY_OF,
    encode_sample,
    index_row,
    new_manifest,
    read_manifest,
    sample_meta,
    shard_name,
    shard_url,
    split_entry,
    write_shard,
)


@functools.lru_cache(maxsize=1)
def example_class() -> type:
    """``tf.train.Example`` as a protobuf message class, built from its definition
    (tensorflow/core/example/example.proto and feature.proto) so that TensorFlow is not needed."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="pyact_tf_example.proto", package="tensorflow", syntax="proto3")
    lists = (
        ("bytes_list", "BytesList", field.TYPE_BYTES),
        ("float_list", "FloatList", field.TYPE_FLOAT),
        ("int64_list", "Int64List", field.TYPE_INT64),
    )
    feature = descriptor_pb2.DescriptorProto(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, message, kind) in enumerate(lists, 1):
        proto.message_type.add(name=message).field.add(name="value", number=1, type=kind, label=field.LABEL_REPEATED)
        feature.field.add(
            name=name,
            number=number,
            type=field.TYPE_MESSAGE,
            label=field.LABEL_OPTIONAL,
            type_name=f".tensorflow.{message}",
            oneof_index=0,
        )
    proto.message_type.append(feature)
    features = proto.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    entry.field.add(
        name="value", number=2, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL, type_name=".tensorflow.Feature"
    )
    features.field.add(
        name="feature",
        number=1,
        type=field.TYPE_MESSAGE,
        label=field.LABEL_REPEATED,
        type_name=".tensorflow.Features.FeatureEntry",
    )
    proto.message_type.add(name="Example").field.add(
        name="features", number=1, type=field.TYPE_MESSAGE, label=field.LABEL_OPTIONAL, type_name=".tensorflow.Features"
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def parse_example(data: bytes) -> dict[str, np.ndarray | list[bytes]]:
    """``tf.train.Example`` bytes -> ``{name: values}`` (float32 or int64 arrays, or a list of
    bytes); a message that does not parse is a ValueError."""
    from google.protobuf.message import DecodeError

    example = example_class()()
    try:
        example.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a tf.train.Example ({exc})") from None
    features: dict[str, np.ndarray | list[bytes]] = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        if kind == "bytes_list":
            features[name] = list(feature.bytes_list.value)
        elif kind == "float_list":
            features[name] = np.fromiter(feature.float_list.value, np.float32, len(feature.float_list.value))
        elif kind == "int64_list":
            features[name] = np.fromiter(feature.int64_list.value, np.int64, len(feature.int64_list.value))
        else:
            features[name] = np.zeros(0, np.float32)
    return features


@dataclass
class TFRecordSummary:
    windows: int = 0
    corrupt: list[str] = field(default_factory=list)
    files: int = 0


# words that name a split in a folder or file name (any case): pyACT wrote TFRECORD/Train/ and
# TFRECORD/Eval/ side by side
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "eval": "eval",
    "val": "eval",
    "valid": "eval",
    "validation": "eval",
    "test": "test",
    "testing": "test",
}


def named_split(name: str) -> str | None:
    """The split a folder or file name names by one of its words (``TFRECORD-Eval``,
    ``test_records``, ``TestRecords``, ``val2017``), or None; a name of two splits
    (``Train_and_Test``) is refused: which one it means is anyone's guess."""
    words = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+", name)
    found = {SPLIT_WORDS[w.lower()] for w in words if w.lower() in SPLIT_WORDS}
    if len(found) > 1:
        raise UserError(
            f"{name}: names several splits ({', '.join(sorted(found))}); rename it, or move each "
            f"split's records into a folder of its own"
        )
    return found.pop() if found else None


def split_of(src: str, files: list[str], given: str) -> str:
    """The one rule for a record's split: the nearest folder (or, for one file, its name) from
    the record up to SRC itself that names a split; ``given`` (--split) when none does, else
    train. Records of several splits under one SRC, or of a split other than ``given``, are
    refused naming where they are: converting them together would merge splits."""
    base = src.rstrip("/")
    where: dict[str, set[str]] = {}
    for url in files:
        if url == base:  # SRC is one file: its name, then its folder's
            names = [os.path.basename(os.path.dirname(os.path.abspath(base))), os.path.basename(base)]
        else:  # SRC's name, the folders below it, the file's own name
            names = [os.path.basename(base)] + url[len(base) :].strip("/").split("/")
        split = next((s for s in map(named_split, reversed(names)) if s), None)
        folder = os.path.dirname(url[len(base) :].strip("/")) or os.path.basename(base)
        where.setdefault(split or given or "train", set()).add(folder)
    if len(where) > 1 or (given and set(where) != {given}):
        listed = "; ".join(f"{s}: {', '.join(sorted(f)[:3])}" for s, f in sorted(where.items()))
        raise UserError(
            f"{src}: holds records of {'several splits' if len(where) > 1 else 'another split'} "
            f"({listed}{'; --split ' + given if given and len(where) == 1 else ''}); converting them "
            f"together would merge splits: convert each split's folder on its own into the same DEST "
            f"(a folder or file misnamed: rename it; names outrank --split)"
        )
    return next(iter(where))


def _record_files(src: str) -> list[str]:
    if storage.is_gcs(src) or os.path.isdir(src):
        names = [n for n in storage.list_files(src) if not n.startswith(".")]
        return [storage.join(src, n) for n in sorted(names)]
    if os.path.isfile(src):
        return [src]
    raise UserError(f"{src}: no such file or folder")


def convert_tfrecords(
    config: TFRecordConfig, progress: bool = True, print_fn: Callable[[str], None] = print
) -> TFRecordSummary:
    """``pyact convert-tfrecords``: pyACT TFRecords (one split) -> shards + manifest, streaming
    (one record in memory at a time). Runs for other splits add to the same manifest. A split
    the manifest already has is written under new shard names and its old shards are deleted
    only after the new manifest is: a run that fails leaves DEST as it was."""
    storage.check_location(config.src, "SRC")
    storage.check_location(config.dest, "DEST")
    files = _record_files(config.src)
    if not files:
        raise UserError(f"{config.src}: no record files")
    config = replace(config, split=split_of(config.src, files, config.split))
    created = "" if storage.is_gcs(config.dest) else topmost_missing(config.dest)
    storage.check_writable(config.dest)  # before reading any record
    try:
        with Lock(config.dest, "convert-tfrecords"):  # one writer per DEST (preprocess takes the same lock)
            return _convert_locked(config, files, progress, print_fn)
    except BaseException:
        remove_empty_up_to(config.dest, created, below=True)  # a failed first run leaves no empty DEST
        raise


def _convert_locked(
    config: TFRecordConfig, files: list[str], progress: bool, print_fn: Callable[[str], None]
) -> TFRecordSummary:
    """The conversion itself, holding DEST's lock."""
    from tqdm import tqdm

    classes = list(config.classes or PYACT_CLASSES)
    summary = TFRecordSummary(files=len(files))
    shape: list[int] = []  # (T, S, S, C) once known
    counts: Counter = Counter()
    index: list[dict] = []
    manifest_url = storage.join(config.dest, MANIFEST)
    previous = read_manifest(config.dest).document if storage.exists(manifest_url) else None
    if previous is None and [name for name in storage.list_files(config.dest) if name != LOCK_NAME]:
        raise UserError(
            f"{config.dest}: holds files but no manifest (another tool's output, or an unfinished "
            f"run); convert into an empty DEST or one that holds converted splits"
        )
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
                        raise UserError(
                            f"{url}: record at byte {offset} has label {label}, outside the {len(classes)} classes"
                        )
                    key = f"{stem}/{number:06d}"
                    meta = {
                        **sample_meta(os.path.basename(url), number, number, classes[label], "", ""),
                        "offset": offset,
                    }
                    counts[classes[label]] += 1
                    index.append(index_row(key, meta))
                    number += 1
                    bar.update(1)
                    yield encode_sample(key, clip, label, meta)

    stream = samples()
    sample = next(stream, None)  # the first record fixes the clip shape: checked before any shard is written
    if sample is None:
        raise UserError(f"{config.src}: no readable records")
    seq_len, size, _, channels = shape
    if previous is not None and not _fits(previous, shape):
        raise UserError(
            f"{config.dest}: its manifest has clips of another shape than "
            f"{seq_len}x{size}x{size}x{channels}; convert into a new DEST"
        )
    written: list = []
    try:
        while sample is not None:
            written.append(
                write_shard(
                    config.dest,
                    shard_name(config.split, len(written), tag),
                    itertools.chain([sample], itertools.islice(stream, config.shard_size - 1)),
                )
            )
            sample = next(stream, None)
        bar.close()
        modality = MODALITY_OF[channels]
        manifest = previous or new_manifest(
            classes, seq_len, size, modality, source={"converted_from": "pyACT TFRecords", "class_order": classes}
        )
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
    print_fn(
        f"wrote {summary.windows} windows of {seq_len}x{size}x{size}x{channels} in {len(written)} shards to "
        f"{storage.join(config.dest, config.split)} from {len(files)} files"
        + (f"; skipped {len(summary.corrupt)} corrupt record(s)" if summary.corrupt else "")
    )
    return summary


def _published_shards(manifest: dict, dest: str) -> dict[str, list[str]]:
    """``{split: [shard name]}`` of DEST's manifest. The names are data, not paths: every one
    must be a shard name of ours inside DEST before anything is written or deleted."""

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
    return (
        manifest["seq_len"] == seq_len
        and manifest["image_size"] == size
        and isinstance(manifest["channels"], list)
        and len(manifest["channels"]) == channels
    )


def _publish(index_url: str, index: list[dict], manifest_url: str, manifest: dict) -> None:
    """Write a split's index.json, then the manifest: the commit point. If the manifest cannot
    be written, the split's index.json is put back as it was."""
    # Held in memory: no bigger than the index this run already holds (one row per window).
    old_index = storage.read_bytes(index_url, storage.JSON_LIMIT) if storage.is_file(index_url) else None
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
