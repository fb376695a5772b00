"""The shard sample schema, writing shards, and the dataset manifest.

A shard ``DEST/<split>/<split>-NNNNNN.tar`` is a WebDataset tar with one sample per window:
``<key>.clip.npy`` (uint8 ``(T, H, W, C)``), ``<key>.cls`` (class index, ASCII digits) and
``<key>.json`` (path, start, stop, label, subject, action). ``DEST/manifest.json`` is written
last: its presence means the dataset is complete.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

from . import storage
from .errors import UserError

MANIFEST = "manifest.json"
FORMAT = "pyact-torch-shards/1"
TAR_MTIME = 0  # fixed tar metadata: the same windows always give the same bytes


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to DEST, e.g. "train/train-000000.tar"
    count: int
    bytes: int
    sha256: str


def shard_name(split: str, index: int) -> str:
    return f"{split}/{split}-{index:06d}.tar"


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


def hash_shard(dest: str, name: str) -> ShardInfo:
    """Count, size and sha256 of an existing shard, read back in one pass (after a resume)."""
    with storage.open_read(storage.join(dest, name)) as handle:
        reader = storage.HashingReader(handle)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            count = sum(1 for member in tar if member.name.endswith(".cls"))
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
