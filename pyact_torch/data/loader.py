"""Reading shards for training and evaluation: a pipeline of small stages.

shard list (from the manifest) -> per-epoch seeded shard order -> this replica's shards (by the
backend's ordinal: the XLA ordinal or the torch.distributed rank, never webdataset's reading of
RANK/WORLD_SIZE) -> this DataLoader worker's shards -> samples (local or
gs://, opened through ``storage`` and read by ``shards.read_samples``) -> seeded shuffle buffer
-> decode (uint8, checked against the manifest) -> training only: augmentation (``augment``) ->
uint8 batches; ``model_input`` makes them float on the device.

Every replica runs the same number of steps: training counts, from the manifest, the full
batches each replica can make this epoch and all take the smallest; evaluation pads and masks
so that every window is counted exactly once, whatever the number of replicas. A damaged shard
fails the run with one line naming it, also from a loader worker process or the device
loader's thread (which would otherwise end the epoch early without a word).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch.utils.data._utils import signal_handling as _signal_handling

from . import shards as shard_format
from .augment import augmented, colour_channels
from ..errors import UserError
from ..io.lifecycle import watch_loader_worker
from .shards import Manifest, Shard, decode_sample, read_samples, split_shards


@dataclass(frozen=True)
class Part:
    """Which slice of the data this reader takes: replica ``rank`` of ``world``."""

    rank: int = 0
    world: int = 1


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


def window_draws(seed: int, epoch: int, rank: int, worker: int) -> np.random.Generator:
    """The generator of one loader stream's augmentation draws: its own for every run seed,
    epoch, replica and worker, so a replica never repeats another's transforms."""
    return np.random.default_rng([seed % 2**64, epoch, rank, worker, 0xA06])


def tar_samples(
    urls: Iterable[str], counts: Iterable[int | None] | None = None, max_member: int = shard_format.MAX_MEMBER
) -> Iterator[dict]:
    """Raw samples (``__key__``, ``clip.npy``, ``cls``, ``json`` bytes) of the given shards,
    each checked to hold its manifest ``counts`` of windows when given."""
    for url, count in zip(urls, counts if counts is not None else itertools.repeat(None)):
        yield from read_samples(url, count, max_member)


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
    """Pass samples through, appending each one's ``json`` metadata (plus its key) to ``sink``;
    metadata without the sequence path and frame range is a ``ShardError`` naming the shard."""
    for sample in samples:
        try:
            meta = json.loads(sample["json"])
        except (KeyError, ValueError, RecursionError):
            meta = None
        if not (
            isinstance(meta, dict)
            and isinstance(meta.get("path"), str)
            and all(isinstance(meta.get(k), int) for k in ("start", "stop"))
        ):
            raise shard_format.ShardError(
                f"{sample.get('__url__', 'shard')}: window {sample.get('__key__', '?')}: "
                f"its json member is not the window's metadata"
            )
        meta["key"] = sample["__key__"]
        sink.append(meta)
        yield sample


def decode(samples: Iterable[dict], clip_shape: tuple[int, ...], num_classes: int) -> Iterator[tuple[np.ndarray, int]]:
    """``clip.npy`` -> uint8 ``(T, H, W, C)`` array (converted to float on the device, see
    ``model_input``); ``cls`` -> int; both checked against the manifest."""
    for sample in samples:
        yield decode_sample(sample, sample.get("__url__", "shard"), clip_shape, num_classes)


def _stack(items: list) -> torch.Tensor:
    if isinstance(items[0], np.ndarray):
        return torch.from_numpy(np.stack(items))
    return torch.stack(items)


def batches(
    items: Iterable[tuple[Any, int]], size: int, pad: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
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
            mask[len(chunk) :] = False
        yield clips, labels, mask


def empty_batch(size: int, clip_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fully masked batch (evaluation padding for replicas with fewer windows)."""
    return (
        torch.zeros((size,) + clip_shape, dtype=torch.uint8),
        torch.zeros(size, dtype=torch.long),
        torch.zeros(size, dtype=torch.bool),
    )


@dataclass(frozen=True)
class LoaderFailure:
    """A user-fixable failure inside a loader worker, sent to the main process as a batch
    (an exception would arrive there wrapped in the worker's traceback)."""

    message: str


class WindowDataset(torch.utils.data.IterableDataset):
    """One replica's batches of one split for one epoch (``set_epoch`` before iterating).

    Use with ``DataLoader(dataset, batch_size=None, num_workers=workers)``; ``len()`` is the
    number of batches every replica yields this epoch.
    """

    def __init__(
        self,
        data_dir: str,
        manifest: Manifest,
        split: str,
        batch_size: int,
        part: Part,
        train: bool,
        seed: int = 0,
        workers: int = 0,
        shuffle_size: int = 1000,
        augment: str = "none",
    ):
        self.shards = split_shards(data_dir, manifest, split)
        self.clip_shape = manifest.clip_shape  # uint8 (T, H, W, C)
        self.num_classes = len(manifest.classes)
        self.max_member = manifest.max_member
        self.batch_size, self.part, self.train = batch_size, part, train
        self.seed, self.workers, self.shuffle_size = seed, workers, shuffle_size
        self.augment = augment if train else "none"  # eval and test windows are never augmented
        self.colours = colour_channels(manifest.channels)
        self.epoch = 0
        self.meta_sink: list | None = None  # scoring: collect each window's metadata (in-process only)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _ordered(self) -> list[Shard]:
        return epoch_order(self.shards, self.seed, self.epoch) if self.train else self.shards

    def __len__(self) -> int:
        count = train_steps if self.train else eval_steps
        return count(self._ordered(), self.part.world, self.workers, self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | LoaderFailure]:
        info = torch.utils.data.get_worker_info()
        try:
            yield from self._batches(info.id if info is not None else 0)
        except UserError as exc:
            if info is None:
                raise
            yield LoaderFailure(str(exc))

    def _batches(self, worker: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        shards = worker_shards(self._ordered(), self.part, self.workers, worker)
        samples = tar_samples([s.url for s in shards], [s.count for s in shards], self.max_member)
        if self.train:
            rng = random.Random(f"{self.seed}:samples:{self.epoch}:{self.part.rank}:{worker}")
            samples = shuffle_buffer(samples, self.shuffle_size, rng)
        if self.meta_sink is not None:
            if torch.utils.data.get_worker_info() is not None:
                raise RuntimeError("meta_sink needs the dataset iterated in this process (workers=0)")
            samples = record_meta(samples, self.meta_sink)
        items = decode(samples, self.clip_shape, self.num_classes)
        if self.augment != "none":
            # drawn in the order this worker yields its windows, itself fixed by the seeds
            items = augmented(
                items, self.augment, window_draws(self.seed, self.epoch, self.part.rank, worker), self.colours
            )
        produced = batches(items, self.batch_size, pad=not self.train)
        yield from produced
        if not self.train and worker == 0:
            # evaluation: worker 0 also tops this replica up to the common step count
            mine = replica_batches(self.shards, self.part, self.workers, self.batch_size, pad=True)
            for _ in range(len(self) - mine):
                yield empty_batch(self.batch_size, self.clip_shape)


def make_loader(dataset: WindowDataset, workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader over a WindowDataset (batches are made inside the dataset)."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        persistent_workers=False,
        pin_memory=False,
        # its own generator: the workers' base seed (unused here) must
        # not be drawn from the global one that dropout draws from, or
        # a resumed epoch would drop other units
        generator=torch.Generator(),
        worker_init_fn=watch_loader_worker if workers else None,
    )


@contextlib.contextmanager
def single_threaded_opencv(when: bool) -> Iterator[None]:
    """While loader workers are forked: OpenCV with one thread, so each augmenting worker runs
    its warps alone (the workers are the parallelism; OpenCV's own threads in each made the
    loader 1.3x slower here). Set in this process around the fork, never in a worker: a forked
    worker that reconfigured the thread pool it inherited hung in it."""
    if not when:
        yield
        return
    import cv2

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(threads)


# torch says that a worker died from a SIGCHLD handler, i.e. in whatever line the main thread runs
# then (a checkpoint write, a collective); marked as installed, it never is, and the same death
# comes from the loader's next() within 5 s, where HostBatches starts the loader over
_signal_handling._SIGCHLD_handler_set = True

WORKER_RESTARTS = 2
"""How many times an epoch's loader starts over after a worker died (the kernel's OOM killer,
a stray ``kill``): more deaths end the run with one line, to be resumed."""


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _how_workers_ended(iterator: Any, wait: float) -> list[str]:
    """How ``iterator``'s worker processes that are no longer running ended ("killed by
    SIGKILL"), waiting up to ``wait`` s for one to be reaped. A loader's workers run until the
    loader is shut down, so during an epoch any that ended died."""
    workers = list(getattr(iterator, "_workers", ()))  # torch's worker processes (no public view)
    deadline = time.monotonic() + wait
    while True:
        ended = [w.exitcode for w in workers if w.exitcode is not None]
        if ended or time.monotonic() >= deadline:
            return [_ending(code) for code in ended]
        time.sleep(0.05)


def _ending(code: int) -> str:
    """A process's exit code in words: "killed by SIGKILL", "exit status 1"."""
    if code >= 0:
        return f"exit status {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:  # a real-time signal has no name
        return f"killed by signal {-code}"


class HostBatches:
    """One epoch's host batches: ``length`` of them, the first ``skip`` read and dropped
    (resume), ``on_batch`` called with each one yielded (a progress bar). A loader failure ends
    the iteration quietly and is raised by ``check()``: the device loader iterates in a thread
    whose exceptions never reach training. A loader worker that dies is replaced: the loader
    starts over, reading and dropping the batches already yielded (the same ones, as in a
    resume), up to ``WORKER_RESTARTS`` times, each said through ``warn``."""

    def __init__(
        self,
        dataset: WindowDataset,
        workers: int,
        length: int,
        skip: int = 0,
        on_batch: Callable[[Any], None] | None = None,
        warn: Callable[[str], None] | None = None,
    ):
        self.dataset, self.workers, self.length, self.skip = dataset, workers, length, skip
        self.on_batch = on_batch
        self.warn = warn if warn is not None else _warn
        self.yielded = 0
        self.error: UserError | None = None

    def __len__(self) -> int:
        return self.length - self.skip

    def __iter__(self) -> Iterator:
        self.yielded, self.error = 0, None
        deaths = 0
        while True:
            done = self.skip + self.yielded
            iterator = self._start()
            try:
                for index, batch in enumerate(itertools.islice(iterator, self.length)):
                    if isinstance(batch, LoaderFailure):
                        self.error = UserError(batch.message)
                        return
                    if index < done:
                        continue
                    if self.on_batch is not None:
                        self.on_batch(batch)
                    self.yielded += 1
                    yield batch
                return
            except UserError as exc:
                self.error = exc
                return
            except (RuntimeError, OSError, EOFError) as exc:
                # torch's own word for a death, or a batch that could not be fetched from a
                # worker killed just after it sent it (its shared memory went with it)
                said = str(exc).startswith("DataLoader worker (pid")
                how = _how_workers_ended(iterator, wait=0 if said or not self.workers else 2)
                if not (said or how):
                    raise
                death = ", ".join(how) or str(exc)
            finally:
                del iterator  # its workers are shut down before new ones start
            deaths += 1
            if deaths > WORKER_RESTARTS:
                hint = (
                    "the usual sender is the kernel's out-of-memory killer: lower --workers or --batch-size, then "
                    if "SIGKILL" in death
                    else ""
                )
                self.error = UserError(
                    f"a data loader worker died {deaths} time{'s' if deaths > 1 else ''} in one epoch (last: "
                    f"{death}); {hint}run the same command again to resume (--workers 0 reads the data in "
                    f"the training process itself)"
                )
                return
            self.warn(
                f"warning: a data loader worker died ({death}); starting the data loader over at batch "
                f"{self.skip + self.yielded + 1} of {self.length} of this epoch"
            )

    def _start(self) -> Iterator:
        """A new loader's iterator over the epoch (its workers started)."""
        loader = make_loader(self.dataset, self.workers)
        blocked = signal.pthread_sigmask(
            signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT}
        )  # workers fork with them blocked
        try:
            with single_threaded_opencv(self.workers > 0 and self.dataset.augment != "none"):
                return iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def check(self) -> None:
        """Raise the loader's failure, or a short epoch (fewer batches than promised)."""
        if self.error is not None:
            raise self.error
        if self.yielded != len(self):
            raise UserError(
                f"the data gave {self.yielded} of the {len(self)} batches the manifest promises; "
                f"check the shards with pyact inspect"
            )


def on_device(host: HostBatches, backend: Any) -> Iterator:
    """``host``'s batches moved to the device, then ``host.check()``."""
    yield from backend.device_loader(host)
    host.check()
