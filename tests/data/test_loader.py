"""The shard reading pipeline: replica/worker splits, equal step counts, eval counted once."""

from __future__ import annotations

import io
import os
import random
import signal
import re
import tarfile
from collections import Counter

import pytest
import torch

from pyact_torch.config import PreprocessConfig
from pyact_torch.data import loader as loader_module
from pyact_torch.data.loader import (
    HostBatches,
    Part,
    WindowDataset,
    batches,
    epoch_order,
    make_loader,
    shuffle_buffer,
    tar_samples,
    train_steps,
    worker_shards,
)
from pyact_torch.errors import UserError
from pyact_torch.model import model_input
from pyact_torch.data.preprocess import preprocess
from pyact_torch.data.shards import Shard, ShardError, TarFormatError, read_manifest, read_tar, split_shards

SHARDS = [Shard(f"s{i}", count) for i, count in enumerate([8] * 20 + [5, 3, 1])]


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_replicas_and_workers_get_disjoint_shards_covering_all(world, workers):
    ordered = epoch_order(SHARDS, seed=3, epoch=2)
    seen = []
    for rank in range(world):
        for worker in range(max(1, workers)):
            seen += worker_shards(ordered, Part(rank, world), workers, worker)
    assert sorted(s.url for s in seen) == sorted(s.url for s in SHARDS)
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("workers", [0, 2])
def test_every_replica_can_run_the_common_number_of_training_steps(world, workers):
    batch = 4
    for epoch in range(3):
        ordered = epoch_order(SHARDS, seed=0, epoch=epoch)
        steps = train_steps(ordered, world, workers, batch)
        assert steps > 0
        possible = []
        for rank in range(world):
            full = 0
            for worker in range(max(1, workers)):
                samples = sum(s.count for s in worker_shards(ordered, Part(rank, world), workers, worker))
                full += samples // batch
            possible.append(full)
        assert min(possible) == steps  # all can run it, and the poorest one has no more
        # never more than the data allows in total
        assert steps * world * batch <= sum(s.count for s in SHARDS)


def test_epoch_order_changes_with_epoch_and_is_seeded():
    assert epoch_order(SHARDS, 0, 1) == epoch_order(SHARDS, 0, 1)
    assert epoch_order(SHARDS, 0, 1) != epoch_order(SHARDS, 0, 2)


def test_batches_drop_or_pad_the_remainder():
    items = [(torch.full((1, 2), float(i)), i) for i in range(7)]
    dropped = list(batches(items, 3, pad=False))
    assert [b[1].tolist() for b in dropped] == [[0, 1, 2], [3, 4, 5]]
    padded = list(batches(items, 3, pad=True))
    assert [b[2].tolist() for b in padded] == [[True] * 3, [True] * 3, [True, False, False]]
    assert padded[-1][0][1:].abs().sum() == 0


def test_shuffle_buffer_is_a_seeded_permutation():
    out = list(shuffle_buffer(range(100), 10, random.Random(1)))
    assert sorted(out) == list(range(100)) and out != list(range(100))
    assert out == list(shuffle_buffer(range(100), 10, random.Random(1)))


@pytest.fixture(scope="module")
def shards_dir(tiny_template, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("loader") / "shards")
    preprocess(
        PreprocessConfig(tiny_template, dest, image_size=16, shard_size=8, workers=2),
        progress=False,
        print_fn=lambda *a: None,
    )
    return dest


@pytest.mark.parametrize("world", [1, 2, 3, 5, 8])
def test_evaluation_counts_every_window_once_whatever_the_replica_count(shards_dir, world):
    manifest = read_manifest(shards_dir)
    classes = manifest.classes
    labels = Counter()
    lengths = set()
    for rank in range(world):
        dataset = WindowDataset(shards_dir, manifest, "test", batch_size=4, part=Part(rank, world), train=False)
        got = list(dataset)
        lengths.add((len(got), len(dataset)))
        for clips, label, mask in got:
            assert clips.dtype == torch.uint8 and model_input(clips).shape == (4, 3, 6, 16, 16)
            labels.update(classes[i] for i in label[mask].tolist())
    assert len(lengths) == 1 and len({a for a, b in lengths} | {b for a, b in lengths}) == 1
    expected = {k: v for k, v in manifest.splits["test"].class_counts.items() if v}
    assert dict(labels) == expected


def test_training_batches_through_dataloader_workers(shards_dir):
    manifest = read_manifest(shards_dir)
    dataset = WindowDataset(
        shards_dir, manifest, "train", batch_size=4, part=Part(0, 2), train=True, workers=2, shuffle_size=16
    )
    dataset.set_epoch(1)
    got = list(make_loader(dataset, workers=2))
    assert len(got) >= len(dataset) > 0
    clips, labels, mask = got[0]
    assert clips.dtype == torch.uint8 and clips.shape[1:] == (6, 16, 16, 3)  # made float on the device
    inputs = model_input(clips)
    assert inputs.dtype == torch.float32 and inputs.shape[1:] == (3, 6, 16, 16)
    assert torch.equal(inputs[:, 1, 2], clips[:, 2, ..., 1].float() / 255)  # channel 1 of frame 2
    assert mask.all() and labels.shape == (4,)


class _DiesAtFirst(torch.utils.data.IterableDataset):
    """Batches 0..9, dealt to the workers in turn (the order DataLoader gives them back); in the
    first ``deaths`` loaders, the last worker is killed (``kill -9``) after its first batch."""

    augment = "none"

    def __init__(self, attempts: str, deaths: int):
        self.attempts, self.deaths = attempts, deaths

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info.id == info.num_workers - 1:
            with open(self.attempts, "a") as log:
                log.write("x")
        attempt = os.path.getsize(self.attempts)
        for index in range(info.id, 10, info.num_workers):
            if index > info.id and info.id == info.num_workers - 1 and attempt <= self.deaths:
                os.kill(os.getpid(), signal.SIGKILL)
            yield torch.tensor([index])


@pytest.mark.parametrize("restarts, workers", [(2, 2), (0, 1)])  # each death: torch's 5 s status check
def test_a_loader_worker_that_dies_is_replaced_a_bounded_number_of_times(restarts, workers, tmp_path, monkeypatch):
    """Two workers killed: the loader starts over twice and gives every batch once, in order
    (with two workers, the other one's batches too). With no restarts allowed (the bound
    reached), the same first death ends the epoch with one line instead of a hang or a
    traceback. torch's SIGCHLD handler, which raised the death in whatever line the main thread
    ran, is never installed."""
    monkeypatch.setattr(loader_module, "WORKER_RESTARTS", restarts)
    warnings: list[str] = []
    attempts = tmp_path / "attempts"
    attempts.write_text("")
    host = HostBatches(_DiesAtFirst(str(attempts), deaths=2), workers, 10, skip=1, warn=warnings.append)
    got = [int(batch) for batch in host]
    assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL
    if restarts:
        assert got == list(range(1, 10)) and host.yielded == 9
        host.check()
        assert len(warnings) == 2 and all(
            w.startswith("warning: a data loader worker died (killed by SIGKILL); starting the data loader over at")
            for w in warnings
        ), warnings
        assert attempts.read_text() == "xxx"
    else:
        assert warnings == [] and got == list(range(1, len(got) + 1)) and len(got) <= workers
        with pytest.raises(UserError, match=r"worker died 1 time in one epoch \(last: killed by SIGKILL\); the usual"):
            host.check()


def test_reads_shards_from_gcs(shards_dir, gcs):
    from pyact_torch.io import storage

    for name in storage.list_files(shards_dir):
        storage.write_bytes(f"gs://pyact-test/loader/{name}", open(f"{shards_dir}/{name}", "rb").read())
    manifest = read_manifest("gs://pyact-test/loader")
    local = WindowDataset(shards_dir, manifest, "eval", 4, Part(), train=False)
    remote = WindowDataset("gs://pyact-test/loader", manifest, "eval", 4, Part(), train=False)
    for (a, la, ma), (b, lb, mb) in zip(local, remote, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb) and torch.equal(ma, mb)


# --- the tar stage (shards.read_tar), checked against the standard library's tarfile ---------


def _tarfile_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]


def _tar(fmt: int, entries: list[tuple[str, bytes | None, bytes]]) -> bytes:
    """A tar in ``fmt`` of (name, content or None, member type) entries."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for name, content, kind in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.SYMTYPE:
                info.linkname = "elsewhere"
            info.size = len(content) if content is not None else 0
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def _read(data: bytes) -> list[tuple[str, bytes]]:
    return list(read_tar(io.BytesIO(data)))


def test_read_tar_gives_what_tarfile_gives_on_real_shards(shards_dir):
    shards = [s.url for s in split_shards(shards_dir, read_manifest(shards_dir), "train")]
    for url in shards:
        data = open(url, "rb").read()
        assert _read(data) == _tarfile_members(data)
    samples = list(tar_samples(shards))
    assert len(samples) == read_manifest(shards_dir).document["splits"]["train"]["count"]
    assert all(set(s) == {"__key__", "__url__", "clip.npy", "cls", "json"} for s in samples)


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_read_tar_handles_long_and_unicode_names_and_skips_non_files(fmt):
    rng = random.Random(fmt)
    entries = [
        ("dir", None, tarfile.DIRTYPE),
        ("a.clip.npy", bytes(rng.randrange(256) for _ in range(1000)), tarfile.REGTYPE),
        ("a.cls", b"3", tarfile.REGTYPE),
        ("empty.txt", b"", tarfile.REGTYPE),
        ("link", None, tarfile.SYMTYPE),
        ("p" * 90 + "/" + "q" * 60 + ".json", b"{}", tarfile.REGTYPE),  # USTAR prefix field
        ("block.bin", bytes(512), tarfile.REGTYPE),  # content of exactly one zero block
    ]
    if fmt != tarfile.USTAR_FORMAT:
        entries += [("x" * 300 + ".clip.npy", b"long", tarfile.REGTYPE), ("kéy-数据.cls", b"7", tarfile.REGTYPE)]
    data = _tar(fmt, entries)
    expected = _tarfile_members(data)
    assert [name for name, _ in expected] == [name for name, content, kind in entries if kind == tarfile.REGTYPE]
    assert _read(data) == expected


def test_read_tar_never_stops_silently_on_a_damaged_shard(shards_dir, tmp_path):
    url = split_shards(shards_dir, read_manifest(shards_dir), "train")[0].url
    data = open(url, "rb").read()
    starts = [0]  # where each member's header starts; the last entry is the end-of-archive block
    for _, content in _tarfile_members(data):
        starts.append(starts[-1] + 512 + -(-len(content) // 512) * 512)
    # cut inside a header, inside data, and exactly between members or before the end blocks
    for cut in (100, 512 + 77, starts[1] - 3, starts[1], starts[-2], starts[-1]):
        with pytest.raises(TarFormatError, match="truncated"):
            _read(data[:cut])
    assert len(_read(data[: starts[-1] + 512])) == len(starts) - 1  # one end block is enough
    corrupt = bytearray(data)
    corrupt[starts[1] + 5] ^= 0x20  # one bit of the second member's name
    with pytest.raises(TarFormatError, match="checksum"):
        _read(bytes(corrupt))
    bad = str(tmp_path / "bad.tar")
    with open(bad, "wb") as handle:
        handle.write(data[: starts[-2]])
    with pytest.raises(ShardError, match=re.escape(bad)):
        list(tar_samples([bad]))
