"""The shard sample schema, writing shards, and the dataset manifest.

A shard ``DEST/<split>/<split>-NNNNNN.tar`` is a WebDataset tar with one sample per window:
``<key>.clip.npy`` (uint8 ``(T, H, W, C)``), ``<key>.cls`` (class index, ASCII digits) and
``<key>.json`` (path, start, stop, label, subject, action). ``DEST/manifest.json`` is written
last: its presence means the dataset is complete.
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import tarfile
from dataclasses import asdict, dataclass
from typing import IO, Any, Iterable, Iterator

import numpy as np

from ..io import storage
from ..errors import UserError
from .frames import CHANNELS
from ..config import CLASS_NAME

MANIFEST = "manifest.json"
FORMAT = "pyact-torch-shards/1"
TAR_MTIME = 0  # fixed tar metadata: the same windows always give the same bytes
SPLIT_NAMES = ("train", "eval", "test")
# The shard names a manifest may list: ``<split>/<split>-NNNNNN.tar``, or with an 8-hex tag
# (``<split>/<split>-<tag>-NNNNNN.tar``) when a conversion replaced a split under new names.
SHARD_NAME = re.compile(r"(train|eval|test)/\1-(?:[0-9a-f]{8}-)?\d{6}\.tar")


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to DEST, e.g. "train/train-000000.tar"
    count: int
    bytes: int
    sha256: str


MODALITY_OF = {len(channels): modality for modality, channels in CHANNELS.items()}  # channel count -> modality
CLIP_LAYOUT = "uint8 (T, H, W, C)"


class ShardError(UserError):
    """A shard or manifest that is missing, damaged or disagrees with the manifest (named)."""


def shard_name(split: str, index: int, tag: str = "") -> str:
    return f"{split}/{split}-{tag + '-' if tag else ''}{index:06d}.tar"


def shard_url(dest: str, name: str) -> str:
    """Where a shard named in ``dest``'s manifest is: only names of our own form, inside ``dest``."""
    return storage.child(dest, name, SHARD_NAME, storage.join(dest, MANIFEST))


def npy_bytes(array: np.ndarray) -> bytes:
    """``np.save`` of an array (loads without pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def encode_sample(key: str, clip: np.ndarray, class_index: int, meta: dict) -> dict:
    """One window as a WebDataset sample."""
    return {
        "__key__": key,
        "clip.npy": npy_bytes(clip),
        "cls": str(class_index).encode(),
        "json": json.dumps(meta, separators=(",", ":")).encode(),
    }


def _tar_member(name: str, data: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o444
    info.uname = info.gname = "pyact"
    return info


def write_shard(dest: str, name: str, samples: Iterable[dict]) -> ShardInfo:
    """Write samples to ``dest/name`` atomically; returns its count, size and sha256.

    Plain ``tarfile`` in WebDataset's layout (``<key>.<ext>`` members, sorted extensions):
    webdataset's own writer imports torch, which would cost every preprocessing worker
    ~450 MB of memory for nothing."""
    count = 0
    with storage.open_write(storage.join(dest, name)) as sink:
        hashing = storage.HashingWriter(sink)
        with tarfile.open(fileobj=hashing, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext in sorted(k for k in sample if k != "__key__"):
                    tar.addfile(_tar_member(f"{key}.{ext}", sample[ext]), io.BytesIO(sample[ext]))
                count += 1
    return ShardInfo(name, count, hashing.size, hashing.digest.hexdigest())


BLOCK = 512
MAX_MEMBER = 1 << 30  # no member of a shard of ours comes near this (a 6x64x64x4 clip is 98 KB)
PAX_LIMIT = 1 << 20
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_IGNORED = (b"1", b"2", b"3", b"4", b"5", b"6", b"g", b"K")  # links, devices, dirs, fifos, pax globals


class TarFormatError(ValueError):
    """A shard that is not a complete, valid tar archive (or not one this project could write)."""


def _number(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256, for sizes past 8 GiB
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] == 0xFF else value
    try:
        return int(field.replace(b"\0", b" ").strip() or b"0", 8)
    except ValueError:
        raise TarFormatError(f"bad number field {field!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """``"<len> <key>=<value>\n"`` records of a pax extended header; each record must advance
    and fit inside the header (a length of 0 would otherwise loop forever)."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos, pos + 21)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        end = pos + length
        if length <= space - pos + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise TarFormatError(f"malformed pax record at offset {pos} of its header")
        key, equals, value = data[space + 1 : end - 1].partition(b"=")
        if not equals:
            raise TarFormatError(f"malformed pax record at offset {pos} of its header")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def read_tar(stream: IO[bytes] | io.RawIOBase, max_member: int = MAX_MEMBER) -> Iterator[tuple[str, bytes]]:
    """``(name, content)`` of each regular file of a tar stream, in order.

    The loader's tar stage: ``tarfile`` spends ~25 µs building a ``TarInfo`` per member, which
    was two thirds of the loader's time per window. This reads USTAR, GNU long names and pax
    headers (``path``/``size``) with two reads per member. Unlike ``tarfile``'s stream mode it
    never stops silently: a bad checksum, a truncated member or a missing end-of-archive block
    raises ``TarFormatError``, because a shard that yields fewer windows than the manifest
    says would leave replicas with unequal step counts. A member larger than ``max_member``
    (a clip can only be so big) or a pax header that does not parse is an error too.
    """
    pad, offset = 0, 0
    name_override: str | None = None
    size_override: int | None = None
    while True:
        block = stream.read(pad + BLOCK)
        if len(block) < pad + BLOCK:
            raise TarFormatError(f"truncated at byte {offset + len(block)} (no end-of-archive block)")
        header = block[pad:]
        offset += pad + BLOCK
        if header == _ZERO_BLOCK:
            return
        stored = _number(header[148:156])
        if sum(header) - sum(header[148:156]) + 8 * 0x20 != stored:
            raise TarFormatError(f"bad header checksum at byte {offset - BLOCK}")
        size = _number(header[124:136]) if size_override is None else size_override
        if size < 0:
            raise TarFormatError(f"negative member size at byte {offset - BLOCK}")
        kind = header[156:157]
        limit = PAX_LIMIT if kind in (b"x", b"L", b"g") else max_member
        if size > limit:
            raise TarFormatError(
                f"member at byte {offset - BLOCK} declares {size} bytes, more than the {limit} such a member can have"
            )
        data = storage.read_up_to(stream, size)
        if len(data) < size:
            raise TarFormatError(f"truncated member at byte {offset} ({len(data)} of {size} bytes)")
        offset += size
        pad = -size % BLOCK
        if kind in _REGULAR:
            if name_override is not None:
                name = name_override
            else:
                name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
            yield name, data
        elif kind == b"L":  # GNU long name of the next member
            name_override = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue
        elif kind == b"x":  # pax header of the next member
            records = _pax_records(data)
            if any(key.startswith("GNU.sparse") for key in records):
                raise TarFormatError("sparse members are not supported")
            name_override = records.get("path", name_override)
            if "size" in records:
                try:
                    size_override = int(records["size"])
                except ValueError:
                    raise TarFormatError(
                        f"bad pax size {records['size'][:20]!r} at byte {offset - size - BLOCK}"
                    ) from None
            continue
        elif kind not in _IGNORED:
            raise TarFormatError(f"unsupported member type {kind!r} at byte {offset - size - BLOCK}")
        name_override = size_override = None


def group_samples(members: Iterable[tuple[str, bytes]]) -> Iterator[dict]:
    """Consecutive ``<key>.<ext>`` members -> ``{"__key__": key, ext: data, ...}`` samples
    (the key ends at the first dot of the file name, as in WebDataset)."""
    sample: dict = {}
    for name, data in members:
        folder, _, base = name.rpartition("/")
        stem, dot, ext = base.partition(".")
        if not dot:
            raise TarFormatError(f"member {name[:80]!r} has no extension")
        key = f"{folder}/{stem}" if folder else stem
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        if ext in sample:
            raise TarFormatError(f"member {name[:80]!r} appears twice")
        sample["__key__"] = key
        sample[ext] = data
    if sample:
        yield sample


def stream_samples(stream: IO[bytes] | io.RawIOBase, url: str, max_member: int = MAX_MEMBER) -> Iterator[dict]:
    """The samples of an open shard stream; a damaged shard is a ``ShardError`` naming ``url``."""
    try:
        for sample in group_samples(read_tar(stream, max_member)):
            sample["__url__"] = url  # errors further down the pipeline name the shard
            yield sample
    except TarFormatError as exc:
        raise ShardError(f"{url}: not a valid shard: {exc}") from None


def read_samples(url: str, expected: int | None = None, max_member: int = MAX_MEMBER) -> Iterator[dict]:
    """The samples of one shard, streamed; a missing or damaged shard, or one holding another
    number of windows than ``expected`` (the manifest's count), is a ``ShardError`` naming it."""
    count = 0
    try:
        with storage.open_read(url) as stream:
            for sample in stream_samples(stream, url, max_member):
                count += 1
                yield sample
    except FileNotFoundError:
        raise ShardError(f"{url}: missing (listed in the manifest)") from None
    if expected is not None and count != expected:
        raise ShardError(f"{url}: holds {count} windows, the manifest says {expected}")


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return dtype, shape, fortran


NPY_HEADER_LIMIT = 4096  # numpy itself writes headers of 128 bytes and reads at most 10 KB


def load_npy(data: bytes) -> np.ndarray:
    """``np.load`` of ``.npy`` bytes, never unpickling; the header is parsed once per distinct
    header (every clip of a dataset has the same one), which makes this several times faster
    than ``np.load`` for small clips. Anything but a complete plain array is a ValueError."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not a .npy member")
    start = 10 if data[6] == 1 else 12
    length = int.from_bytes(data[8:start], "little")
    if length > NPY_HEADER_LIMIT:
        raise ValueError(f".npy header of {length} bytes")
    try:
        dtype, shape, fortran = _npy_header(bytes(data[: start + length]))
    except (ValueError, SyntaxError, TypeError) as exc:
        raise ValueError(f"bad .npy header ({exc})") from None
    if dtype.hasobject:
        raise ValueError(".npy member with Python objects")
    if len(data) - start - length != math.prod(shape) * dtype.itemsize:
        raise ValueError(f".npy member of shape {shape} holds {len(data) - start - length} data bytes")
    array = np.frombuffer(data, dtype, count=math.prod(shape), offset=start + length)
    return array.reshape(shape, order="F" if fortran else "C")


def decode_sample(sample: dict, url: str, clip_shape: tuple[int, ...], num_classes: int) -> tuple[np.ndarray, int]:
    """A sample's uint8 ``(T, H, W, C)`` clip and class index, checked against the manifest's
    clip shape and class count (a damaged window is a ``ShardError`` naming shard and key)."""
    key = sample.get("__key__", "?")
    try:
        clip = load_npy(sample["clip.npy"])
        label = int(sample["cls"])
    except KeyError as exc:
        raise ShardError(f"{url}: window {key} has no {exc.args[0]} member") from None
    except ValueError as exc:
        raise ShardError(f"{url}: window {key}: {exc}") from None
    if clip.dtype != np.uint8 or clip.shape != clip_shape:
        raise ShardError(
            f"{url}: window {key}: clip is {clip.dtype} {clip.shape}, the manifest says uint8 {clip_shape}"
        )
    if not 0 <= label < num_classes:
        raise ShardError(f"{url}: window {key}: class {label} is not one of the manifest's {num_classes}")
    return clip, label


def hash_shard(dest: str, name: str) -> ShardInfo:
    """Count, size and sha256 of an existing shard, read back in one pass (after a resume)."""
    with storage.open_read(shard_url(dest, name)) as handle:
        reader = storage.HashingReader(handle)
        count = sum(1 for member, _ in read_tar(reader) if member.endswith(".cls"))
        while reader.read(1 << 20):
            pass  # the tar's end padding also counts
    return ShardInfo(name, count, reader.size, reader.digest.hexdigest())


def sample_meta(path: str, start: int, stop: int, label: str, subject: str, action: str) -> dict:
    """A window's ``json`` member: its sequence folder (relative to SRC), first and last frame."""
    return {"path": path, "start": start, "stop": stop, "label": label, "subject": subject, "action": action}


def index_row(key: str, meta: dict) -> dict:
    """A window's row of ``<split>/index.json`` (pyACT's JSON: path, start, stop, class)."""
    return {"key": key, "path": meta["path"], "start": meta["start"], "stop": meta["stop"], "class": meta["label"]}


def new_manifest(classes: list[str], seq_len: int, image_size: int, modality: str, **extra: Any) -> dict:
    """A manifest without splits yet; ``extra`` records where the data came from."""
    return {
        "format": FORMAT,
        "classes": list(classes),
        "seq_len": seq_len,
        "image_size": image_size,
        "modality": modality,
        "channels": list(CHANNELS[modality]),
        "clip_layout": CLIP_LAYOUT,
        "splits": {},
        **extra,
    }


def split_entry(shards: list[ShardInfo], class_counts: dict[str, int]) -> dict:
    """The manifest's record of one split."""
    return {"count": sum(s.count for s in shards), "class_counts": class_counts, "shards": [asdict(s) for s in shards]}


@dataclass(frozen=True)
class SplitRecord:
    """One split of a manifest: its window count, its windows per class and its shards in order
    (each with ``name``, ``count`` and, for preprocessed data, ``bytes`` and ``sha256``)."""

    count: int
    class_counts: dict[str, int]
    shards: list[dict[str, Any]]


@dataclass(frozen=True)
class Manifest:
    """``DEST/manifest.json``, read and checked in one place (``read_manifest``): what every reader of the
    data needs, typed. ``document`` is the whole file as read, for the writers that extend it
    and the few fields only one reader uses."""

    classes: list[str]
    seq_len: int
    image_size: int
    modality: str
    channels: list[str]
    splits: dict[str, SplitRecord]
    document: dict[str, Any]

    @property
    def clip_shape(self) -> tuple[int, int, int, int]:
        """A window's uint8 array shape ``(T, H, W, C)``."""
        return self.seq_len, self.image_size, self.image_size, len(self.channels)

    @property
    def max_member(self) -> int:
        """The largest tar member a shard of this data can hold (a clip plus its .npy header,
        with room for a long JSON row)."""
        return math.prod(self.clip_shape) + NPY_HEADER_LIMIT + 65536

    @property
    def data_shape(self) -> dict:
        """What a model trained on this data depends on, besides the classes."""
        return {
            "channels": len(self.channels),
            "seq_len": self.seq_len,
            "image_size": self.image_size,
            "modality": self.modality,
        }

    @property
    def fingerprint(self) -> str:
        """What a training run read, independent of where the data lies: the classes and every
        train and eval shard's name, window count and sha256. A moved copy has the same one."""
        import hashlib

        splits = {
            split: [[shard["name"], shard["count"], shard.get("sha256")] for shard in self.splits[split].shards]
            for split in ("train", "eval")
            if split in self.splits
        }
        text = json.dumps({"classes": self.classes, "splits": splits}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def source_settings(self) -> dict:
        """What else detection needs to read raw frames as this data's were read: the depth range
        and the Train subjects moved to the eval split (absent from converted data)."""
        settings = self.document.get("settings")
        if not isinstance(settings, dict):
            settings = {}
        return {"depth_range": settings.get("depth_range"), "eval_subjects": self.document.get("eval_subjects")}


def read_manifest(dest: str) -> Manifest:
    """The manifest of a preprocessed dataset, checked for the fields and types every reader
    needs (a missing split is reported by ``split_shards``)."""
    url = storage.join(storage.check_location(dest, "--data"), MANIFEST)
    if not storage.exists(url):
        if storage.is_gcs(dest) and not storage.bucket_exists(dest):
            raise UserError(f"{dest}: bucket does not exist")
        raise UserError(f"{url}: no manifest; is {dest} a finished preprocessing output?")
    manifest = storage.read_json(url)
    fields = {
        "format": str,
        "classes": list,
        "seq_len": int,
        "image_size": int,
        "modality": str,
        "channels": list,
        "splits": dict,
    }
    wrong = [k for k, kind in fields.items() if not isinstance(manifest, dict) or not isinstance(manifest.get(k), kind)]
    if wrong or manifest["format"] != FORMAT:
        raise UserError(f"{url}: not a {FORMAT} manifest (missing or malformed: {', '.join(wrong) or 'format'})")
    if (
        not 1 <= manifest["seq_len"] <= 10_000
        or not 1 <= manifest["image_size"] <= 10_000
        or not 1 <= len(manifest["channels"]) <= 4
    ):
        raise UserError(f"{url}: seq_len, image_size or channels out of range")
    classes = manifest["classes"]
    odd = [c for c in classes if not isinstance(c, str) or not CLASS_NAME.fullmatch(c)]
    if not 2 <= len(classes) <= 1000 or odd or len(set(classes)) != len(classes):
        problem = (
            f"a class name is not of the form the project writes ({str(odd[0])[:40]!r}: letters, digits, '_.+-')"
            if odd
            else "a class is named twice"
            if len(set(classes)) != len(classes)
            else f"{len(classes)} classes (2 to 1000 are allowed)"
        )
        raise UserError(
            f"{url}: {problem}; this data cannot be used: re-create it (pyact preprocess and "
            f"convert-tfrecords now refuse such names before any work, naming the folder or flag)"
        )
    for split, entry in manifest["splits"].items():
        if not _valid_split(entry):
            raise UserError(
                f"{url}: the {str(split)[:20]!r} split is malformed (it needs shards with names and "
                f"window counts that add up to its count, and class counts)"
            )
    splits = {
        split: SplitRecord(entry["count"], dict(entry["class_counts"]), list(entry["shards"]))
        for split, entry in manifest["splits"].items()
    }
    return Manifest(
        list(classes),
        manifest["seq_len"],
        manifest["image_size"],
        manifest["modality"],
        list(manifest["channels"]),
        splits,
        manifest,
    )


def _valid_split(entry: Any) -> bool:
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    return (
        isinstance(entry, dict)
        and count(entry.get("count"))
        and isinstance(entry.get("shards"), list)
        and all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and count(s.get("count")) for s in entry["shards"]
        )
        and entry["count"] == sum(s["count"] for s in entry["shards"])
        and isinstance(entry.get("class_counts"), dict)
        and all(isinstance(k, str) and count(v) for k, v in entry["class_counts"].items())
    )


@dataclass(frozen=True)
class Shard:
    """One shard of a split: where it is and how many windows it holds."""

    url: str
    count: int


def split_shards(dest: str, manifest: Manifest, split: str) -> list[Shard]:
    """Every shard of one split, in manifest order; the names are checked to be shard names of
    ours inside ``dest``."""
    entry = manifest.splits.get(split)
    if entry is None:
        raise UserError(
            f"{storage.join(dest, MANIFEST)}: no {split!r} split (it has {', '.join(manifest.splits) or 'none'})"
        )
    return [Shard(shard_url(dest, s["name"]), int(s["count"])) for s in entry.shards]
