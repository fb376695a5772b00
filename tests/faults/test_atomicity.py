"""Faults of the class "atomicity: checked writes, atomic replace, verified resume"
(docs/faults.md): preprocessing interrupted, damaged between runs, on a full disk or with the
GCS emulator gone resumes to output byte-identical to an uninterrupted run; a full disk stops
checkpointing at once; a failed (re-)conversion leaves DEST as it was. Disk-full cases mount a
small tmpfs and need root (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch

from pyact_torch.data import preprocess as preprocess_module
from pyact_torch.io import storage
from pyact_torch.training.checkpoint import CheckpointWriter
from pyact_torch.cli import main
from pyact_torch.errors import UserError
from pyact_torch.data.shards import read_manifest

from helpers import tree_bytes
from faults_common import (
    PRE,
    one_line,
    cli,
    small_tmpfs,
    _state,
    one_error_line,
    pyact_records,
    write_records,
    shard_labels,
)


def _interrupt(monkeypatch, name: str, after: int) -> None:
    """Make preprocessing stop (as a Ctrl-C would) after ``after`` results of ``name``."""
    real = getattr(preprocess_module, name)

    def limited(*args, **kwargs):
        for count, result in enumerate(real(*args, **kwargs)):
            if count == after:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(preprocess_module, name, limited)


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_resume_rewrites_a_kept_shard_damaged_between_runs(damage, tiny_dataset, tmp_path, monkeypatch, capsys):
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    dest = str(tmp_path / "out")
    _interrupt(monkeypatch, "map_unordered", 4)
    with pytest.raises(KeyboardInterrupt):
        preprocess_module.preprocess(
            preprocess_module.PreprocessConfig(tiny_dataset, dest, workers=1, image_size=16, shard_size=8),
            progress=False,
            print_fn=lambda *a: None,
        )
    monkeypatch.undo()
    kept = sorted(n for n in storage.list_files(dest) if n.endswith(".tar"))
    assert len(kept) >= 4  # the last one may be written but not yet logged: also rewritten
    path = os.path.join(dest, kept[1])
    data = open(path, "rb").read()
    if damage == "flip a byte":
        data = data[:700] + bytes([data[700] ^ 1]) + data[701:]
        open(path, "wb").write(data)
    elif damage == "truncate":
        open(path, "wb").write(data[:1000])
    else:
        os.remove(path)
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 0
    assert tree_bytes(dest) == tree_bytes(reference)


def test_resume_re_decodes_frame_chunks_whose_cache_bytes_changed(tiny_dataset, tmp_path, monkeypatch):
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    dest = str(tmp_path / "out")
    _interrupt(monkeypatch, "map_unordered", 1)  # decoding done, one shard written
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 130  # as after a Ctrl-C
    monkeypatch.undo()
    frames = os.path.join(dest, ".pyact-cache", "frames.u8")
    with open(frames, "r+b") as handle:  # what a short write or a bad sector leaves
        handle.seek(5000)
        handle.write(bytes(3000))
    for name in storage.list_files(dest):
        if name.endswith(".tar"):
            os.remove(os.path.join(dest, name))
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 0
    assert tree_bytes(dest) == tree_bytes(reference)


def test_a_frame_fixed_after_skip_bad_sequences_is_decoded_again(tiny_dataset, tmp_path, capsys):
    frame = os.path.join(tiny_dataset, "Train/train00/asl-z/color_3.png")
    good = open(frame, "rb").read()
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    open(frame, "wb").write(good[:200])
    dest = str(tmp_path / "out")
    assert main(["preprocess", tiny_dataset, dest, *PRE, "--skip-bad-sequences"]) == 0
    assert read_manifest(dest).document["skipped_sequences"]
    open(frame, "wb").write(good)
    capsys.readouterr()
    code, err = cli(capsys, "preprocess", tiny_dataset, dest, *PRE, "--skip-bad-sequences")
    assert code == 2 and "frames changed" in one_line(err)
    assert main(["preprocess", tiny_dataset, dest, *PRE, "--skip-bad-sequences", "--overwrite"]) == 0
    assert not read_manifest(dest).document["skipped_sequences"]
    ours, theirs = tree_bytes(dest), tree_bytes(reference)
    manifest, expected = json.loads(ours.pop("manifest.json")), json.loads(theirs.pop("manifest.json"))
    assert ours == theirs  # every shard and index byte-identical to a run on the intact dataset
    assert manifest["splits"] == expected["splits"]


@pytest.mark.parametrize("damage", ["empty cache.json", "cut-off state file"])
def test_damaged_state_files_do_not_block_resume(damage, tiny_dataset, tmp_path, monkeypatch):
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    dest = str(tmp_path / "out")
    _interrupt(monkeypatch, "map_unordered", 2)
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 130  # as after a Ctrl-C
    monkeypatch.undo()
    if damage == "empty cache.json":
        open(os.path.join(dest, ".pyact-cache", "cache.json"), "w").close()
    else:
        state = os.path.join(dest, ".pyact-preprocess.json")
        data = open(state).read()
        open(state, "w").write(data[: len(data) // 2])
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 0
    assert tree_bytes(dest) == tree_bytes(reference)


DEEP_JSON = "[" * 100_000 + "]" * 100_000  # a few hundred kB: Python's JSON parser recurses per level


@pytest.mark.parametrize("damage", ["dest not an object", "a FIFO", "nested too deeply"])
def test_a_damaged_cache_record_behind_a_damaged_state_file_is_one_line(
    damage, tiny_dataset, tmp_path, capsys, monkeypatch
):
    """With the state file cut off, the cache's record says which run the folder served. A
    record of the wrong shape was a traceback and a FIFO in its place a hang: now neither is
    trusted, the folder is refused in one line and --overwrite rebuilds it."""
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    dest = str(tmp_path / "out")
    _interrupt(monkeypatch, "map_unordered", 2)
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 130
    monkeypatch.undo()
    state = os.path.join(dest, ".pyact-preprocess.json")
    open(state, "w").write(open(state).read()[:10])
    record = os.path.join(dest, ".pyact-cache", "cache.json")
    os.remove(record)
    if damage == "a FIFO":
        os.mkfifo(record)
    else:
        open(record, "w").write(json.dumps({"dest": [1]}) if damage == "dest not an object" else DEEP_JSON)
    capsys.readouterr()
    code, err = cli(capsys, "preprocess", tiny_dataset, dest, *PRE)
    assert code == 2 and "--overwrite" in one_line(err)
    assert main(["preprocess", tiny_dataset, dest, *PRE, "--overwrite"]) == 0
    assert tree_bytes(dest) == tree_bytes(reference)


@pytest.mark.parametrize("phase", ["decode", "shards"])
def test_disk_full_is_one_line_and_the_resumed_output_is_identical(phase, tiny_dataset, tmp_path, capsys, monkeypatch):
    """Root only (tmpfs). Before the fix a short pwrite was logged as decoded and the resumed
    run published all-black frames. The disk fills after the space check (another program
    wrote to it): the check itself is the next test."""
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    full = tmp_path / "full"
    with small_tmpfs(full, "64m") as resize:
        if phase == "decode":
            dest, extra = str(tmp_path / "out"), ["--cache-dir", str(full)]
        else:
            dest, extra = str(full / "out"), ["--cache-dir", str(tmp_path / "cache")]
        real_check = preprocess_module.check_space

        def then_the_disk_fills(*args):
            real_check(*args)
            resize("96k" if phase == "decode" else "160k")

        monkeypatch.setattr(preprocess_module, "check_space", then_the_disk_fills)
        code, err = cli(capsys, "preprocess", tiny_dataset, dest, *PRE, *extra)
        monkeypatch.undo()
        assert code == 2 and "No space left on device" in one_line(err)
        resize("64m")
        assert main(["preprocess", tiny_dataset, dest, *PRE, *extra]) == 0
        assert tree_bytes(dest) == tree_bytes(reference)


@pytest.mark.parametrize("where", ["cache", "dest"])
def test_an_image_size_the_disk_cannot_hold_is_refused_before_work(where, tiny_dataset, tmp_path, capsys):
    """--image-size 4096 wrote 46 GB of cache in two minutes from 17 MB of frames. Root only
    (tmpfs). The negative control: the same disk holds --image-size 16."""
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "4m"):
        dest, extra = (
            (str(tmp_path / "out"), ["--cache-dir", str(disk)])
            if where == "cache"
            else (str(disk / "out"), ["--cache-dir", str(tmp_path / "cache")])
        )
        code, err = cli(capsys, "preprocess", tiny_dataset, dest, "--workers", "1", "--image-size", "128", *extra)
        assert code == 2
        line = one_line(err)
        assert "--image-size 128" in line and "free" in line and ("cache" if where == "cache" else "shards") in line
        assert os.listdir(disk) == []
        assert main(["preprocess", tiny_dataset, dest, *PRE, *extra]) == 0


def test_an_emulator_outage_mid_run_is_one_line_and_the_resumed_bucket_is_identical(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    from pyact_torch.io.emulator import GCSEmulator

    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    monkeypatch.setattr(storage, "GCS_DEADLINE", 3.0)
    with GCSEmulator(str(tmp_path / "gcs"), log=str(tmp_path / "gcs.log")) as emulator:
        emulator.create_bucket("outage")
        real = preprocess_module.map_unordered

        def outage_after_three(*args, **kwargs):
            for count, result in enumerate(real(*args, **kwargs)):
                if count == 3:
                    emulator.pause()
                yield result

        monkeypatch.setattr(preprocess_module, "map_unordered", outage_after_three)
        dest = "gs://outage/shards"
        code, err = cli(capsys, "preprocess", tiny_dataset, dest, *PRE, "--cache-dir", str(tmp_path / "cache"))
        assert code == 2 and "cannot reach" in one_line(err)
        monkeypatch.setattr(preprocess_module, "map_unordered", real)
        emulator.start()
        assert main(["preprocess", tiny_dataset, dest, *PRE, "--cache-dir", str(tmp_path / "cache")]) == 0
        kept = int(capsys.readouterr().out.split(" kept from an earlier run")[0].rsplit(" ", 1)[1])
        assert kept >= 3  # the shards uploaded before the outage were verified and kept
        remote = {name: storage.read_bytes(f"{dest}/{name}") for name in storage.list_files(dest)}
    assert remote == tree_bytes(reference)


def test_synth_onto_an_unwritable_place_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = cli(capsys, "synth", str(blocker / "raw"))
    assert code == 2 and "not writable" in one_line(err)


def test_a_full_disk_stops_checkpointing_at_once_with_one_line(tmp_path):
    with small_tmpfs(tmp_path / "full", "64k"):
        writer = CheckpointWriter(str(tmp_path / "full" / "run"), log=lambda m: None)
        started = time.monotonic()
        writer.save({**_state(1), "big": torch.zeros(100_000)}, 1, 0)
        with pytest.raises(UserError, match="No space left on device"):
            writer.close()
        assert time.monotonic() - started < 10  # no 9 retries over minutes
        assert not os.path.exists(tmp_path / "full" / "run" / "latest.json")


# --- convert-tfrecords: a failed conversion, re-conversion into an existing DEST --------------


def test_failed_first_conversion_leaves_no_shards(tmp_path, capsys):
    path = write_records(tmp_path / "records", pyact_records(np.random.default_rng(3), 30), corrupt_at=20)
    dest = tmp_path / "shards"
    assert main(["convert-tfrecords", str(tmp_path / "records"), str(dest), "--shard-size", "8"]) == 2
    one_error_line(capsys, path)
    assert tree_bytes(dest) == {}


def test_failed_reconversion_leaves_dest_as_it_was(converted, tmp_path, capsys):
    dest, _ = converted
    before = tree_bytes(dest)
    path = write_records(tmp_path / "second", pyact_records(np.random.default_rng(11), 30), corrupt_at=20)
    assert main(["convert-tfrecords", str(tmp_path / "second"), str(dest), "--shard-size", "8"]) == 2
    one_error_line(capsys, path)
    assert tree_bytes(dest) == before


def test_reconversion_of_another_shape_leaves_dest_as_it_was(converted, tmp_path, capsys):
    dest, _ = converted
    before = tree_bytes(dest)
    path = write_records(tmp_path / "bigger", pyact_records(np.random.default_rng(11), 10, shape=(6, 32, 32, 3)))
    os.rename(path, os.path.join(tmp_path / "bigger", "part-00000"))  # a file name naming no split: --split says
    assert main(["convert-tfrecords", str(tmp_path / "bigger"), str(dest), "--split", "test"]) == 2
    one_error_line(capsys, str(dest))
    assert tree_bytes(dest) == before


def test_failure_at_the_commit_point_leaves_dest_as_it_was(converted, tmp_path, capsys, monkeypatch):
    """The manifest cannot be written (say the disk filled up): the new shards are removed and
    the split's index.json is put back."""
    dest, _ = converted
    before = tree_bytes(dest)
    write_records(tmp_path / "second", pyact_records(np.random.default_rng(11), 20))
    write_json = storage.write_json

    def full_disk(url, value):
        if url.endswith("manifest.json"):
            raise UserError(f"{url}: cannot write (No space left on device)")
        write_json(url, value)

    monkeypatch.setattr(storage, "write_json", full_disk)
    assert main(["convert-tfrecords", str(tmp_path / "second"), str(dest), "--shard-size", "8"]) == 2
    one_error_line(capsys, str(dest / "manifest.json"))
    assert tree_bytes(dest) == before


def check_dest(dest) -> dict:
    """What ``pyact inspect`` checks: DEST holds exactly the manifest's shards (+ index files),
    each with the manifest's size and sha256."""
    manifest = json.loads((dest / "manifest.json").read_text())
    listed = {s["name"]: s for entry in manifest["splits"].values() for s in entry["shards"]}
    indexes = {f"{s}/index.json" for s in manifest["splits"]}
    assert set(tree_bytes(dest)) == set(listed) | indexes | {"manifest.json"}
    for name, shard in listed.items():
        data = (dest / name).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (shard["bytes"], shard["sha256"])
    return manifest


def test_reconversion_replaces_the_split_under_new_names(converted, tmp_path, monkeypatch):
    dest, first = converted
    old = [s["name"] for s in check_dest(dest)["splits"]["train"]["shards"]]
    assert old == [f"train/train-{i:06d}.tar" for i in range(4)]  # a fresh DEST: plain names
    second = pyact_records(np.random.default_rng(11), 20)
    write_records(tmp_path / "second", second)
    # the third draw repeats the tag the shards then published use: it must be drawn again
    tags = iter(["0badc0de", "0badc0de", "feedbeef"])
    monkeypatch.setattr("secrets.token_hex", lambda _: next(tags))
    for tag, folder, records in (("0badc0de", "second", second), ("feedbeef", "first", first)):
        assert main(["convert-tfrecords", str(tmp_path / folder), str(dest), "--shard-size", "8"]) == 0
        names = [s["name"] for s in check_dest(dest)["splits"]["train"]["shards"]]
        assert names == [f"train/train-{tag}-{i:06d}.tar" for i in range(len(names))]
        assert not any((dest / name).exists() for name in old)
        assert shard_labels(dest, "train") == [label for _, label, _ in records]
        old = names
    assert main(["inspect", str(dest), "--split", "train", "--out", str(tmp_path / "grid.png")]) == 0
