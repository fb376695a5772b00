"""SPMD data parallelism, run where it can be seen: one process, 4 XLA:CPU devices
(``PJRT_DEVICE=CPU CPU_NUM_DEVICES=4``), against one device; and the host split as pure functions."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyact_torch.errors import UserError
from pyact_torch.data.loader import Part, train_steps, worker_shards
from pyact_torch.data.shards import Shard
from pyact_torch.training.train import check_readers, per_replica_batch

from helpers import ROOT

SPMD_ENV = dict(os.environ, PJRT_DEVICE="CPU", CPU_NUM_DEVICES="4")
TRAIN = [sys.executable, os.path.join(ROOT, "scripts", "train_tpu.py")]


@pytest.fixture(scope="module")
def facts(small_shards, tmp_path_factory) -> dict:
    """tests/training/spmd_facts.py's measurements (~30 s): 4 Adam steps of tiny in float64 through the
    SPMD backend and eagerly on one device; the partitioned programs XLA compiled; evaluation of
    a split whose size is no multiple of the batch."""
    dump = str(tmp_path_factory.mktemp("hlo"))
    env = dict(SPMD_ENV, SPMD_FACTS_DUMP=dump, XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "training", "spmd_facts.py"), small_shards],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_spmd_steps_equal_one_device_steps(facts):
    """Tolerance 1e-6 (a thousandth of the learning rate): in float64 the two differ only in the
    order of summation (measured 7e-8 for the weights after 4 steps, where Adam's division by
    sqrt(v) magnifies rounding in near-zero gradients; 2e-9 for Adam's moments)."""
    assert facts["devices"] == 4
    assert facts["weights_vs_one_device"] < 1e-6
    assert facts["adam_state_vs_one_device"] < 1e-6
    assert facts["running_mean_vs_one_device"] < 1e-6
    # negative control: BatchNorm statistics per device (what xmp replicas compute) are visibly
    # different, so the comparison above can fail, and SPMD's statistics are the global batch's
    assert facts["weights_vs_per_device_statistics"] > 1000 * 1e-6


@pytest.mark.slow
def test_each_device_holds_a_quarter_and_the_step_reduces_across_devices(facts):
    assert facts["batch_shards"] == [[2, 3, 6, 16, 16]] * 4  # 8 windows over 4 devices
    assert max(facts["all_reduce_per_program"]) > 0  # gradients and BatchNorm statistics
    assert facts["compile_counts"]["cpu_fallbacks"] == 0


@pytest.mark.slow
def test_spmd_evaluation_counts_every_window_once(facts):
    evaluation = facts["eval"]
    assert evaluation["manifest_count"] % evaluation["batch"]  # a last, padded batch
    assert evaluation["confusion_sum"] == evaluation["windows"] == evaluation["manifest_count"]


# --- the host split, pure functions ------------------------------------------------------------

SHARDS = [Shard(f"train/train-{i:06d}.tar", 512 if i < 97 else 256) for i in range(98)]  # pyACT's Train, ~49,920


@pytest.mark.parametrize("hosts", [1, 2, 3, 4, 8, 16, 32])
def test_hosts_read_disjoint_shards_and_run_the_same_steps(hosts):
    workers = 2
    seen = []
    for host in range(hosts):
        for worker in range(workers):
            seen += [s.url for s in worker_shards(SHARDS, Part(host, hosts), workers, worker)]
    assert sorted(seen) == sorted(s.url for s in SHARDS) and len(seen) == len(set(seen))
    steps = train_steps(SHARDS, hosts, workers, per_replica_batch(96, hosts, 1))
    assert steps > 0
    # every host can make that many full batches from its own shards
    for host in range(hosts):
        mine = [worker_shards(SHARDS, Part(host, hosts), workers, w) for w in range(workers)]
        assert sum(sum(s.count for s in part) // (96 // hosts) for part in mine) >= steps


def test_too_few_shards_for_a_pod_is_one_clear_message():
    """A v4-128 under xmp: 64 devices x 2 loader workers = 128 readers for 98 shards. Training
    would run, but the replicas with one shard set the step count and the others drop half of
    theirs: a third of every epoch, silently. Refused instead, with the fix."""
    steps = train_steps(SHARDS, 64, 2, per_replica_batch(256, 64))
    assert steps * 256 < 0.7 * sum(s.count for s in SHARDS)  # what would have been used
    with pytest.raises(UserError) as error:
        check_readers(len(SHARDS), sum(s.count for s in SHARDS), 64, 2, 4, steps, "gs://b/shards")
    message = str(error.value)
    assert "98 train shards" in message and "128 readers" in message and "--shard-size 390" in message  # 49,920 / 128
    assert message.endswith("or less, or use --workers 1")  # 64 readers of one stream each fit 98 shards
    # 4 processes of --workers 0 over 3 shards: fewer workers cannot help, and it says --workers 0
    with pytest.raises(UserError) as error:
        check_readers(3, 300, 4, 0, 8, 9, "shards")
    assert "(4 replicas/hosts x 1 loader streams of --workers 0)" in str(error.value)
    assert str(error.value).endswith("preprocess with --shard-size 75 or less")
    # the same pod under SPMD reads per host (16 hosts x 2 workers = 32 readers): no refusal
    check_readers(
        len(SHARDS),
        sum(s.count for s in SHARDS),
        16,
        2,
        16,
        train_steps(SHARDS, 16, 2, per_replica_batch(256, 16, 4)),
        "gs://b/shards",
    )


def test_the_global_batch_must_divide_over_every_device():
    assert per_replica_batch(32, 2, 4) == 16
    with pytest.raises(UserError, match="over 8 devices"):
        per_replica_batch(36, 2, 4)


# --- pyact train --parallel spmd -----------------------------------------------------------------


def _train(data, run_dir, *extra, **kwargs):
    return [
        *TRAIN,
        "--data",
        data,
        "--run-dir",
        run_dir,
        "--model",
        "tiny",
        "--device",
        "xla",
        "--parallel",
        "spmd",
        *extra,
    ]


@pytest.mark.slow
def test_spmd_training_runs_end_to_end_and_saves_a_plain_checkpoint(small_shards, tmp_path):
    """The command as a user runs it, over 4 devices. That SPMD learns follows from its steps
    being one device's steps (test_spmd_steps_equal_one_device_steps) and from the learning tests
    of the one-device paths; a 4-epoch learning run here took 9 minutes of XLA:CPU."""
    run_dir = str(tmp_path / "run")
    result = subprocess.run(
        _train(small_shards, run_dir, "--epochs", "1", "--batch-size", "16", "--workers", "1", "--log-every", "2"),
        capture_output=True,
        text=True,
        env=SPMD_ENV,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 readers (spmd, 4 devices each)" in result.stdout
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["kind"] for r in rows].count("eval") == 1 and all(math.isfinite(r["loss"]) for r in rows)
    state = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)  # plain torch, as any user
    assert state["config"]["parallel"] == "spmd" and state["replicas"] == 1


@pytest.mark.slow
def test_spmd_kill_and_resume_and_sigterm(small_shards, tmp_path, request):
    flags = ["--epochs", "2", "--batch-size", "8", "--ckpt-every", "10", "--workers", "1", "--log-every", "1"]
    reference = str(tmp_path / "reference")
    # the uninterrupted run goes alongside the killed one: at this size each keeps about one core busy
    with open(tmp_path / "reference.err", "w") as err:
        uninterrupted = subprocess.Popen(
            _train(small_shards, reference, *flags), env=SPMD_ENV, stdout=subprocess.DEVNULL, stderr=err
        )
    request.addfinalizer(lambda: uninterrupted.poll() is None and uninterrupted.kill())
    run_dir = str(tmp_path / "killed")
    process = subprocess.Popen(
        _train(small_shards, run_dir, *flags), env=SPMD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    latest = os.path.join(run_dir, "latest.json")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.exists(latest) and json.load(open(latest))["step"] >= 20:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "training finished before it could be killed"
    resumed = subprocess.run(
        _train(small_shards, run_dir, *flags), capture_output=True, text=True, env=SPMD_ENV, timeout=900
    )
    assert resumed.returncode == 0 and "resumed at step" in resumed.stdout, resumed.stderr[-3000:]
    assert uninterrupted.wait(timeout=900) == 0, (tmp_path / "reference.err").read_text()[-3000:]
    a = torch.load(os.path.join(reference, "final.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)["model"]
    for key in a:  # XLA float32, as the xmp kill/resume test
        assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5), key
    # SIGTERM (preemption) to the process group: checkpoint, exit 0
    stopped = str(tmp_path / "stopped")
    process = subprocess.Popen(
        _train(small_shards, stopped, *flags[:1], "50", *flags[2:]),
        env=SPMD_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics = os.path.join(stopped, "metrics.jsonl")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None and not os.path.exists(metrics):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    assert json.load(open(os.path.join(stopped, "latest.json")))["step"] > 0
