"""The shard sample schema, writing shards, and the dataset manifest.

A shard ``DEST/<split>/<split>-NNNNNN.tar`` is a WebDataset tar with one sample per window:
``<key>.clip.npy`` (uint8 ``(T, H, W, C)``), ``<key>.cls`` (class index, ASCII digits) and
``<key>.json`` (path, start, stop, label, subject, action). ``DEST/manifest.json`` is written
last: its presence means the dataset is complete.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import asdict, dataclass
from typing import IO, Any, Iterable, Iterator

import numpy as np

from . import storage
from .errors import UserError

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
    """``"<len> <key>=<value>\\n"`` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def read_tar(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """``(name, content)`` of each regular file of a tar stream, in order.

    The loader's tar stage: ``tarfile`` spends ~25 µs building a ``TarInfo`` per member, which
    was two thirds of the loader's time per window. This reads USTAR, GNU long names and pax
    headers (``path``/``size``) with two reads per member. Unlike ``tarfile``'s stream mode it
    never stops silently: a bad checksum, a truncated member or a missing end-of-archive block
    raises ``TarFormatError``, because a shard that yields fewer windows than the manifest
    says would leave replicas with unequal step counts.
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
        data = stream.read(size)
        if len(data) < size:
            raise TarFormatError(f"truncated member at byte {offset} ({len(data)} of {size} bytes)")
        offset += size
        pad = -size % BLOCK
        kind = header[156:157]
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
                size_override = int(records["size"])
            continue
        elif kind not in _IGNORED:
            raise TarFormatError(f"unsupported member type {kind!r} at byte {offset - size - BLOCK}")
        name_override = size_override = None


def hash_shard(dest: str, name: str) -> ShardInfo:
    """Count, size and sha256 of an existing shard, read back in one pass (after a resume)."""
    with storage.open_read(storage.join(dest, name)) as handle:
        reader = storage.HashingReader(handle)
        count = sum(1 for member, _ in read_tar(reader) if member.endswith(".cls"))
        while reader.read(1 << 20):
            pass  # the tar's end padding also counts
    return ShardInfo(name, count, reader.size, reader.digest.hexdigest())


def split_entry(shards: list[ShardInfo], class_counts: dict[str, int]) -> dict:
    """The manifest's record of one split."""
    return {"count": sum(s.count for s in shards), "class_counts": class_counts,
            "shards": [asdict(s) for s in shards]}


def read_manifest(dest: str) -> dict[str, Any]:
    """The manifest of a preprocessed dataset, checked for the fields every reader needs."""
    url = storage.join(dest, MANIFEST)
    if not storage.exists(url):
        raise UserError(f"{url}: no manifest; is {dest} a finished preprocessing output?")
    try:
        manifest = storage.read_json(url)
    except ValueError:
        raise UserError(f"{url}: not valid JSON") from None
    missing = [k for k in ("format", "classes", "seq_len", "image_size", "modality", "channels", "splits")
               if k not in manifest]
    if missing or manifest["format"] != FORMAT:
        raise UserError(f"{url}: not a {FORMAT} manifest (missing {', '.join(missing) or 'format'})")
    return manifest


def data_shape(manifest: dict) -> dict:
    """What a model trained on this data depends on, besides the classes."""
    return {"channels": len(manifest["channels"]), "seq_len": manifest["seq_len"],
            "image_size": manifest["image_size"], "modality": manifest["modality"]}
