"""One writer per run directory: a second training on a live run's directory is refused in one
line naming the holder; a dead holder never blocks (local: flock, released by the kernel;
gs://: a lock object created only when absent, a heartbeat, a stale lock taken over by one
taker alone)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from pyact_torch.io import locks, storage
from pyact_torch.errors import UserError

from helpers import ROOT

TRAIN = [
    sys.executable,
    "-m",
    "pyact_torch",
    "train",
    "--model",
    "tiny",
    "--device",
    "cpu",
    "--batch-size",
    "8",
    "--workers",
    "1",
    "--log-every",
    "5",
]


@pytest.mark.slow
def test_a_second_training_on_a_live_run_dir_is_refused_naming_the_holder(small_shards, tmp_path):
    """On main before the fix both ran to 'training finished', their checkpoints, pointers and
    metrics mixed in one directory."""
    run_dir = str(tmp_path / "run")
    first = subprocess.Popen(
        [*TRAIN, "--data", small_shards, "--run-dir", run_dir, "--epochs", "40"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(run_dir, "config.json")) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(
        [*TRAIN, "--data", small_shards, "--run-dir", run_dir, "--epochs", "2", "--lr", "5e-4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    first.terminate()  # SIGTERM: checkpoints and exits 0
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2
    assert second.stderr.startswith(f"error: {run_dir}: in use by pyact train (pid {first.pid} on ")
    assert second.stderr.count("\n") == 1
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["config"]["lr"] == 1e-3 and config["config"]["epochs"] == 40  # the first run's own
    locks.Lock(run_dir, "train").acquire().release()  # the holder gone, the directory is free again


def test_a_local_lock_dies_with_its_holder(tmp_path):
    code = (
        "import sys, time; from pyact_torch.io.locks import Lock; Lock(sys.argv[1], 'train').acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match=f"in use by pyact train \\(pid {holder.pid} on "):
        locks.Lock(str(tmp_path), "train").acquire()
    holder.kill()
    holder.wait()
    lock = locks.Lock(str(tmp_path), "train").acquire()  # kill -9 released it
    lock.release()


def test_a_bucket_lock_is_exclusive_and_taken_over_only_when_stale(gcs, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT", 0.2)
    where = f"gs://pyact-test/lock-{os.getpid()}"
    first = locks.Lock(where, "train").acquire()
    with pytest.raises(UserError, match="in use by pyact train"):
        locks.Lock(where, "preprocess").acquire()
    time.sleep(0.6)  # heartbeats keep it fresh
    with pytest.raises(UserError, match="last heartbeat 0 s ago"):
        locks.Lock(where, "train").acquire()
    first._stop.set()  # the holder stalls (a preempted VM): no more heartbeats
    first._thread.join()
    monkeypatch.setattr(locks, "STALE_AFTER", 0.3)
    time.sleep(0.5)
    second = locks.Lock(where, "train").acquire()  # taken over
    first._stop.clear()
    thread = threading.Thread(target=first._heartbeat)  # the stalled holder wakes up and beats
    thread.start()
    thread.join(timeout=10)
    assert first.lost
    with pytest.raises(UserError, match="another run took over"):
        first.check()
    first.release()  # does not delete the new holder's lock
    assert storage.exists(f"{where}/.pyact-lock.json")
    second.release()
    assert not storage.exists(f"{where}/.pyact-lock.json")


def test_of_many_runs_starting_together_on_a_bucket_exactly_one_gets_the_lock(gcs):
    where = f"gs://pyact-test/race-{os.getpid()}"
    results: list = []

    def start() -> None:
        try:
            results.append(locks.Lock(where, "train").acquire())
        except UserError as exc:
            results.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    held = [r for r in results if isinstance(r, locks.Lock)]
    assert len(held) == 1 and len(results) == 6
    held[0].release()


@pytest.mark.parametrize("command", ["preprocess", "convert-tfrecords"])
def test_a_second_writer_of_a_dataset_is_refused_before_work(command, tiny_dataset, tmp_path, capsys):
    """On main before the fix, two preprocessing runs into one DEST raced (one deleted the
    other's live .partial: a traceback in 2 of 5 tries)."""
    from pyact_torch.cli import main

    dest = tmp_path / "dest"
    code = (
        "import sys, time; from pyact_torch.io.locks import Lock; Lock(sys.argv[1], 'preprocess').acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(dest)],
        stdout=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        if command == "preprocess":
            args = ["preprocess", tiny_dataset, str(dest), "--image-size", "16", "--workers", "1"]
        else:
            records = tmp_path / "records-train"
            records.mkdir()
            (records / "a.tfrecords").write_bytes(b"")
            args = ["convert-tfrecords", str(records), str(dest)]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert (
            err.startswith(f"error: {dest}: in use by pyact preprocess (pid {holder.pid} on ") and err.count("\n") == 1
        )
        assert os.listdir(dest) == [".pyact-lock.json"]  # the holder's, untouched
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "folder", "hard link"])
def test_a_lock_path_that_is_not_our_file_is_refused_and_left_alone(kind, tmp_path):
    """A link would be followed, a FIFO truncated, a hard link would overwrite the user's file
    (found by a review; a traceback or a clobbered file before the fix)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    path = run / ".pyact-lock.json"
    {
        "symlink": lambda: path.symlink_to(notes),
        "dangling symlink": lambda: path.symlink_to(tmp_path / "nothing"),
        "fifo": lambda: os.mkfifo(path),
        "folder": lambda: path.mkdir(),
        "hard link": lambda: os.link(notes, path),
    }[kind]()
    with pytest.raises(UserError, match="not a lock file pyact-torch wrote"):
        locks.Lock(str(run), "train").acquire()
    assert notes.read_text() == "mine" and os.path.lexists(path)


def test_releasing_never_removes_a_later_holders_lock(tmp_path):
    first = locks.Lock(str(tmp_path), "train").acquire()
    os.unlink(tmp_path / ".pyact-lock.json")  # someone removes the file under the holder
    second = locks.Lock(str(tmp_path), "train").acquire()
    first.release()
    with pytest.raises(UserError, match="in use by"):
        locks.Lock(str(tmp_path), "train").acquire()
    second.release()
