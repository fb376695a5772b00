"""Faults of the class "signals: preemption through the process group" (docs/faults.md):
SIGTERM to the process group of a training or a preprocessing run, preprocessing workers whose
parent is killed, and an exit with a loader worker still running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pyact_torch.io import storage
from pyact_torch.cli import main

from helpers import tree_bytes
from faults_common import CLI, run


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_exits_zero(learn_shards, tmp_path):
    """A VM shutdown SIGTERMs every process of the group, loader workers included."""
    run_dir = str(tmp_path / "run")
    args = [
        "train",
        "--data",
        learn_shards,
        "--run-dir",
        run_dir,
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--epochs",
        "3",
        "--workers",
        "2",
        "--log-every",
        "5",
        "--ckpt-every",
        "0",
    ]
    process = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not os.path.exists(metrics):
        time.sleep(0.05)
    time.sleep(0.5)  # loader workers are up
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    pointer = json.load(open(os.path.join(run_dir, "latest.json")))
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split()[0])
    assert pointer["step"] == stopped > 0
    resumed = run(*args, timeout=600)
    assert resumed.returncode == 0 and "resumed at step" in resumed.stdout, resumed.stderr[-2000:]
    assert os.path.exists(os.path.join(run_dir, "final.pt"))


EXIT_WITH_A_LIVE_LOADER = """
import sys
from pyact_torch.data.loader import HostBatches, Part, WindowDataset
from pyact_torch.data.shards import read_manifest
dataset = WindowDataset(sys.argv[1], read_manifest(sys.argv[1]), "train", 4, Part(), train=True, workers=1)
batches = iter(HostBatches(dataset, 1, len(dataset)))
next(batches)  # a loader worker runs, its iterator still referenced: as when an error stops a step
raise SystemExit(2)
"""


def test_a_command_that_fails_mid_epoch_still_exits(small_shards):
    """At exit, multiprocessing ends leftover loader workers with SIGTERM from the main process:
    workers ignore only SIGTERMs from others (a process-group preemption). With every SIGTERM
    ignored, this exit hung forever (measured: killed by the timeout)."""
    result = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_A_LIVE_LOADER, small_shards], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr[-2000:]


def _children(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
def test_preprocessing_workers_die_with_their_parent(raw_dataset, tmp_path):
    import psutil

    dest = str(tmp_path / "out")
    process = subprocess.Popen(
        [*CLI, "preprocess", raw_dataset, dest, "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = os.path.join(dest, ".pyact-cache", "decoded.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.exists(log) and open(log).read().count("\n") >= 2):
        time.sleep(0.02)
    workers = _children(process.pid)
    assert len(workers) >= 2, "no worker processes to watch"
    process.kill()
    process.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"{len(alive)} workers outlived their killed parent"


@pytest.mark.slow
def test_sigterm_to_preprocessing_stops_cleanly_and_the_rerun_is_identical(raw_dataset, tmp_path):
    reference = str(tmp_path / "reference")
    assert main(["preprocess", raw_dataset, reference, "--workers", "2", "--shard-size", "16"]) == 0
    dest = str(tmp_path / "out")
    process = subprocess.Popen(
        [*CLI, "preprocess", raw_dataset, dest, "--workers", "2", "--shard-size", "16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = os.path.join(dest, ".pyact-cache", "decoded.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.exists(log) and open(log).read().count("\n") >= 2):
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not [n for n in storage.list_files(dest) if n.endswith(".partial")]
    assert main(["preprocess", raw_dataset, dest, "--workers", "2", "--shard-size", "16"]) == 0
    assert tree_bytes(dest) == tree_bytes(reference)
