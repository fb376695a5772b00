"""Reading shards for training and evaluation: a WebDataset pipeline as a list of stages.

shard list (from the manifest) -> per-epoch seeded shard order -> this replica's shards (by the
XLA ordinal, never by RANK/WORLD_SIZE) -> this DataLoader worker's shards -> tar samples
(local or gs://, streamed through ``storage``; members read by ``shards.read_tar``, grouped
by webdataset) -> seeded shuffle buffer -> decode (uint8) -> batches -> float.

Every replica runs the same number of steps: training counts, from the manifest, the full
batches each replica can make this epoch and all take the smallest; evaluation pads and masks
so that every window is counted exactly once, whatever the number of replicas.
"""

from __future__ import annotations

import functools
import io
import json
import itertools
import math
import random
from dataclasses import dataclass
from typing import IO, Any, Iterable, Iterator

import numpy as np
import torch
import webdataset as wds

from . import storage
from .shards import TarFormatError, read_tar


@dataclass(frozen=True)
class Shard:
    url: str
    count: int


@dataclass(frozen=True)
class Part:
    """Which slice of the data this reader takes: replica ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1


def _gopen_gcs(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any):
    if mode != "rb":
        raise ValueError(f"gs:// shards are read-only here ({mode!r})")
    return storage.open_read(url)


def register_gcs_handler() -> None:
    """Let webdataset stream gs:// through google-cloud-storage (its own handler shells out to
    gsutil, which ignores the emulator and is often not installed)."""
    wds.gopen_schemes["gs"] = _gopen_gcs


def split_shards(data_dir: str, manifest: dict, split: str) -> list[Shard]:
    """The shards of one split, in manifest order."""
    entry = manifest["splits"].get(split)
    if entry is None:
        raise KeyError(split)
    return [Shard(storage.join(data_dir, s["name"]), s["count"]) for s in entry["shards"]]


# --- shard-level stages (pure functions of lists) ------------------------------------------

def epoch_order(shards: list[Shard], seed: int, epoch: int) -> list[Shard]:
    """A seeded shard order that changes every epoch (webdataset's own repeats each epoch)."""
    shuffled = list(shards)
    random.Random(f"{seed}:shards:{epoch}").shuffle(shuffled)
    return shuffled


def take_part(items: list, index: int, count: int) -> list:
    """Every ``count``-th item from ``index``: a disjoint share for replica or worker ``index``."""
    return items[index::count]


def worker_shards(shards: list[Shard], part: Part, workers: int, worker: int) -> list[Shard]:
    return take_part(take_part(shards, part.rank, part.world), worker, max(1, workers))


def replica_batches(shards: list[Shard], part: Part, workers: int, batch: int, pad: bool) -> int:
    """Batches one replica makes: each worker batches its own samples, dropping its remainder
    (training) or padding it (evaluation)."""
    total = 0
    for worker in range(max(1, workers)):
        samples = sum(s.count for s in worker_shards(shards, part, workers, worker))
        total += -(-samples // batch) if pad else samples // batch
    return total


def train_steps(shards: list[Shard], world: int, workers: int, batch: int) -> int:
    """Full batches per replica this epoch: the poorest replica sets the number all run."""
    return min(replica_batches(shards, Part(rank, world), workers, batch, pad=False) for rank in range(world))


def eval_steps(shards: list[Shard], world: int, workers: int, batch: int) -> int:
    """Batches per replica so that every window is seen once: the richest replica's count of
    (padded) batches; the others add fully masked batches."""
    return max(replica_batches(shards, Part(rank, world), workers, batch, pad=True) for rank in range(world))


# --- sample-level stages (generators) ------------------------------------------------------

def tar_members(sources: Iterable[dict]) -> Iterator[dict]:
    """webdataset's tar expander on ``shards.read_tar``: ``{"url", "stream"}`` dicts ->
    ``{"fname", "data", "__url__"}`` members, with ``{}`` after each shard so that samples of two
    shards are never merged."""
    for source in sources:
        with source["stream"] as stream:
            try:
                for name, data in read_tar(stream):
                    yield {"fname": name, "data": data, "__url__": source["url"]}
            except TarFormatError as exc:
                raise TarFormatError(f"{source['url']}: not a valid shard: {exc}") from None
        yield {}


def stream_samples(stream: IO[bytes], url: str) -> Iterator[dict]:
    """Samples of one open shard stream (``url`` names it in errors)."""
    return wds.tariterators.group_by_keys(tar_members([{"url": url, "stream": stream}]))


def tar_samples(urls: Iterable[str]) -> Iterator[dict]:
    """Raw samples (``__key__``, ``clip.npy``, ``cls``, ``json`` bytes) of the given shards."""
    return wds.tariterators.group_by_keys(tar_members(wds.tariterators.url_opener({"url": url} for url in urls)))


def shuffle_buffer(samples: Iterable, size: int, rng: random.Random) -> Iterator:
    """Approximate shuffle through a buffer of ``size`` items (``size <= 1``: unchanged)."""
    if size <= 1:
        yield from samples
        return
    buffer: list = []
    for item in samples:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


def record_meta(samples: Iterable[dict], sink: list) -> Iterator[dict]:
    """Pass samples through, appending each one's ``json`` metadata (plus its key) to ``sink``."""
    for sample in samples:
        meta = json.loads(sample["json"])
        meta["key"] = sample["__key__"]
        sink.append(meta)
        yield sample


@functools.lru_cache(maxsize=64)
def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    return dtype, shape, fortran


def load_npy(data: bytes) -> np.ndarray:
    """``np.load`` of ``.npy`` bytes, never unpickling; the header is parsed once per distinct
    header (every clip of a dataset has the same one), which makes this several times faster
    than ``np.load`` for small clips."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy member")
    start = 10 if data[6] == 1 else 12
    length = int.from_bytes(data[8:start], "little")
    dtype, shape, fortran = _npy_header(bytes(data[:start + length]))
    if dtype.hasobject:
        raise ValueError(".npy member with Python objects")
    array = np.frombuffer(data, dtype, count=math.prod(shape), offset=start + length)
    return array.reshape(shape, order="F" if fortran else "C")


def decode(samples: Iterable[dict]) -> Iterator[tuple[np.ndarray, int]]:
    """``clip.npy`` -> uint8 ``(T, H, W, C)`` array (converted to float per batch, see
    ``to_float``); ``cls`` -> int."""
    for sample in samples:
        yield load_npy(sample["clip.npy"]), int(sample["cls"])


def _stack(items: list) -> torch.Tensor:
    if isinstance(items[0], np.ndarray):
        return torch.from_numpy(np.stack(items))
    return torch.stack(items)


def batches(items: Iterable[tuple[Any, int]], size: int,
            pad: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(clips, labels, mask)`` batches of exactly ``size``. Without ``pad`` the remainder is
    dropped; with it the last batch is zero-padded and ``mask`` marks the real windows."""
    iterator = iter(items)
    while True:
        chunk = list(itertools.islice(iterator, size))
        if not chunk or (len(chunk) < size and not pad):
            return
        clips = _stack([c for c, _ in chunk])
        labels = torch.tensor([label for _, label in chunk], dtype=torch.long)
        mask = torch.ones(size, dtype=torch.bool)
        if len(chunk) < size:
            missing = size - len(chunk)
            clips = torch.cat([clips, clips.new_zeros((missing,) + clips.shape[1:])])
            labels = torch.cat([labels, labels.new_zeros(missing)])
            mask[len(chunk):] = False
        yield clips, labels, mask


def to_float(batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Iterator[tuple]:
    """uint8 ``(N, T, H, W, C)`` clips -> float ``(N, C, T, H, W)`` in [0, 1], one conversion
    per batch."""
    for clips, labels, mask in batches:
        yield clips.permute(0, 4, 1, 2, 3).contiguous().float().div_(255.0), labels, mask


def empty_batch(size: int, clip_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fully masked batch (evaluation padding for replicas with fewer windows)."""
    return (torch.zeros((size,) + clip_shape), torch.zeros(size, dtype=torch.long),
            torch.zeros(size, dtype=torch.bool))


class WindowDataset(torch.utils.data.IterableDataset):
    """One replica's batches of one split for one epoch (``set_epoch`` before iterating).

    Use with ``DataLoader(dataset, batch_size=None, num_workers=workers)``; ``len()`` is the
    number of batches every replica yields this epoch.
    """

    def __init__(self, data_dir: str, manifest: dict, split: str, batch_size: int, part: Part,
                 train: bool, seed: int = 0, workers: int = 0, shuffle_size: int = 1000):
        self.shards = split_shards(data_dir, manifest, split)
        self.clip_shape = (len(manifest["channels"]), manifest["seq_len"], manifest["image_size"],
                           manifest["image_size"])
        self.batch_size, self.part, self.train = batch_size, part, train
        self.seed, self.workers, self.shuffle_size = seed, workers, shuffle_size
        self.epoch = 0
        self.meta_sink: list | None = None  # scoring: collect each window's metadata (in-process only)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _ordered(self) -> list[Shard]:
        return epoch_order(self.shards, self.seed, self.epoch) if self.train else self.shards

    def __len__(self) -> int:
        count = train_steps if self.train else eval_steps
        return count(self._ordered(), self.part.world, self.workers, self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        register_gcs_handler()  # in each worker process too
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        shards = worker_shards(self._ordered(), self.part, self.workers, worker)
        samples = tar_samples([s.url for s in shards])
        if self.train:
            rng = random.Random(f"{self.seed}:samples:{self.epoch}:{self.part.rank}:{worker}")
            samples = shuffle_buffer(samples, self.shuffle_size, rng)
        if self.meta_sink is not None:
            if info is not None:
                raise RuntimeError("meta_sink needs the dataset iterated in this process (workers=0)")
            samples = record_meta(samples, self.meta_sink)
        produced = to_float(batches(decode(samples), self.batch_size, pad=not self.train))
        if self.train:
            yield from produced
            return
        # evaluation: worker 0 also tops this replica up to the common step count
        yield from produced
        if worker == 0:
            mine = replica_batches(self.shards, self.part, self.workers, self.batch_size, pad=True)
            for _ in range(len(self) - mine):
                yield empty_batch(self.batch_size, self.clip_shape)


def make_loader(dataset: WindowDataset, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over a WindowDataset (batches are made inside the dataset)."""
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                       persistent_workers=False, pin_memory=False)
