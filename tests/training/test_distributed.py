"""torch.distributed data parallelism, run where it can be seen: real torchrun launches of 2 and
4 CPU processes over gloo, through the same training loop as xmp.spawn, SPMD and eager CPU."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from pyact_torch.io import storage

from helpers import ROOT

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
# small clips, 8 windows a step, a checkpoint every 10 steps: ~45 steps in 3 epochs; with augmentation
# and dropout, whose draws a resume on every replica must repeat exactly
SMALL = [
    "--model",
    "tiny",
    "--device",
    "cpu",
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--ckpt-every",
    "10",
    "--workers",
    "1",
    "--log-every",
    "5",
    "--collective-timeout",
    "30",
    "--augment",
    "pyact",
    "--dropout",
    "0.2",
]


def torchrun(processes: int, *args: str, module: str = "pyact_torch") -> list[str]:
    target = ["-m", module] if module else []
    return [*TORCHRUN, "--nproc_per_node", str(processes), *target, *args]


def train(processes: int, data: str, run_dir: str, *flags: str) -> list[str]:
    return torchrun(processes, "train", "--data", data, "--run-dir", run_dir, *flags)


def final_weights(run_dir: str) -> dict:
    return torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].double(), b[key].double(), rtol=0, atol=1e-6), key


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def wait_for_step(run_dir: str, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    latest = os.path.join(run_dir, "latest.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if json.load(open(latest))["step"] >= step:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"training ended or stalled before step {step}")


def workers_of(launcher: int) -> list[psutil.Process]:
    """torchrun's replica processes (its direct children), with their loader workers."""
    return psutil.Process(launcher).children(recursive=True)


def replicas_of(launcher: int) -> dict[int, psutil.Process]:
    """torchrun's replica processes (its direct children; loader workers inherit RANK too) by rank."""
    return {rank_of(p): p for p in psutil.Process(launcher).children() if rank_of(p) is not None}


def importing_torch(process: psutil.Process) -> bool:
    """Whether the replica has begun loading torch: its Python code runs (a replica can only
    record its launcher once its interpreter is up; a kill before that is a window of a few
    milliseconds that no code of ours can close), and it is still far from meeting the others."""
    try:
        with open(f"/proc/{process.pid}/maps") as maps:
            return "libtorch" in maps.read()
    except OSError:
        return False


def rank_of(process: psutil.Process) -> int | None:
    try:
        return int(process.environ().get("RANK", ""))
    except (ValueError, psutil.Error):
        return None


# --- step for step: tests/training/dist_facts.py under torchrun ---------------------------------------


@pytest.fixture(scope="module", params=[2, 4])
def facts(request, small_shards) -> dict:
    """tests/training/dist_facts.py's measurements with 2 and 4 gloo processes (~15 s each)."""
    result = subprocess.run(
        torchrun(request.param, os.path.join(ROOT, "tests", "training", "dist_facts.py"), small_shards, module=""),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


@pytest.mark.slow
def test_distributed_steps_equal_the_one_process_computation(facts):
    """DDP over gloo against one process computing the same N-replica step (each replica's
    share through the model on its own; losses averaged), float64: equal to rounding. Measured
    0.0 (bit for bit) with 2 processes and 4e-11 with 4, where gloo adds the 4 shares in
    another order and the float32 loss (as train_step computes it) can round a logit the other
    way; the bound is a thousandth of the learning rate. Negative controls: every replica fed
    replica 0's share, and BatchNorm over the whole batch, both differ by ~8e-3, so the
    comparison can fail."""
    assert facts["world"] in (2, 4)  # a real process group, not a world of one
    assert facts["weights_vs_reference"] < 1e-6
    assert facts["adam_state_vs_reference"] < 1e-6
    assert facts["rank_spread"] == 0.0  # every rank holds the same weights
    assert facts["same_share_vs_reference"] > 1e-4
    assert facts["whole_batch_bn_vs_distributed"] > 1e-4
    assert facts["agreement"] == {"same value": True, "rank as value": False}


@pytest.mark.slow
def test_replicas_read_disjoint_shards_and_run_the_same_steps(facts):
    keys = facts["train_keys"]
    assert len(keys) == facts["world"] and len(set(facts["train_steps"])) == 1
    everything = [key for rank in keys for key in rank]
    assert len(everything) == len(set(everything))  # no window read by two replicas
    assert all(len(rank) == facts["train_steps"][0] * 4 for rank in keys)  # batch 4 a replica
    assert len(everything) > facts["train_count"] * 0.7


@pytest.mark.slow
def test_distributed_evaluation_counts_every_window_once(facts):
    assert facts["eval_windows"] == facts["eval_confusion_sum"] == facts["test_count"]
    assert facts["test_count"] % (5 * facts["world"])  # the split does not divide into global batches


# --- through the command line ------------------------------------------------------------------


@pytest.mark.slow
def test_learns_the_held_out_subject_with_two_processes(learn_shards, tmp_path):
    """The eager learning test's data, flags and bar (>= 0.9 on the held-out subject), as 2 gloo
    processes sharing the global batch of 32."""
    run_dir = str(tmp_path / "run")
    result = subprocess.run(
        train(
            2,
            learn_shards,
            run_dir,
            "--model",
            "tiny",
            "--device",
            "cpu",
            "--epochs",
            "5",
            "--lr",
            "2e-3",
            "--lr-schedule",
            "cosine",
            "--log-every",
            "100",
            "--workers",
            "1",
        ),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    config = storage.read_json(f"{run_dir}/config.json")
    assert config["replicas"] == 2 and config["per_replica_batch"] == 16
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    accuracy = [r["accuracy"] for r in rows if r["kind"] == "eval"]
    assert len(accuracy) == 5 and accuracy[-1] >= 0.9, accuracy
    assert result.stdout.count("training finished") == 1  # rank 0 alone speaks


@pytest.fixture(scope="module")
def reference_run(small_shards, tmp_path_factory) -> str:
    """An uninterrupted 2-process run with SMALL's flags."""
    run_dir = str(tmp_path_factory.mktemp("dist") / "reference")
    result = subprocess.run(train(2, small_shards, run_dir, *SMALL), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_kill_9_of_torchrun_then_the_same_command_gives_the_same_final_weights(small_shards, reference_run, tmp_path):
    """torchrun starts its workers in sessions of their own; they die with it (no orphan goes on
    training), and the rerun resumes from the last checkpoint to the uninterrupted run's weights."""
    run_dir = str(tmp_path / "killed")
    process = subprocess.Popen(
        train(2, small_shards, run_dir, *SMALL),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_step(run_dir, 20, process)
    replicas = workers_of(process.pid)
    assert sorted(replicas_of(process.pid)) == [0, 1]
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    _, alive = psutil.wait_procs(replicas, timeout=15)
    assert not alive, f"replicas outlived torchrun: {alive}"
    assert not os.path.exists(os.path.join(run_dir, "final.pt"))
    result = subprocess.run(train(2, small_shards, run_dir, *SMALL), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed at step" in result.stdout
    assert_same_weights(final_weights(reference_run), final_weights(run_dir))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torchrun's process group", "every process"])
def test_sigterm_to_the_process_group_stops_every_replica_at_one_step(target, small_shards, reference_run, tmp_path):
    """A preemption notice to torchrun's process group (torchrun passes SIGTERM on to every
    worker), or to every process at once (a VM shutdown: systemd signals the whole cgroup, loader
    workers included): the replicas agree on one step, rank 0 writes one checkpoint there, every
    worker exits 0 (torchrun itself then ends with its own SignalException, status 1); the rerun
    resumes exactly."""
    run_dir = str(tmp_path / "run")
    process = subprocess.Popen(
        train(2, small_shards, run_dir, *SMALL, "--epochs", "50"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_step(run_dir, 10, process)
    replicas = list(replicas_of(process.pid).values())
    assert len(replicas) == 2
    if target == "every process":  # each worker leads a process group of its own, with its loaders
        for replica in replicas:
            os.killpg(replica.pid, signal.SIGTERM)
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "SignalException" in err  # torchrun's own, documented
    assert not errors(err), errors(err)
    stopped = [line for line in out.splitlines() if line.startswith("stopped by SIGTERM at step")]
    assert len(stopped) == 1, out[-2000:]
    step = int(stopped[0].split()[5].rstrip(";"))
    pointer = json.load(open(os.path.join(run_dir, "latest.json")))
    assert pointer["step"] == step and pointer["name"] == f"ckpt-{step}.pt"
    assert all(not p.is_running() for p in replicas)
    # the same command (the 3 epochs of the reference) resumes from there to the same weights
    assert step < 45, "stopped after the reference's last step"
    result = subprocess.run(train(2, small_shards, run_dir, *SMALL), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed at step {step}" in result.stdout
    assert_same_weights(final_weights(reference_run), final_weights(run_dir))


@pytest.mark.slow
def test_kill_9_of_one_worker_ends_the_other_with_one_line(small_shards, tmp_path):
    """The survivor's next collective fails (gloo sees the closed connection at once; a hung
    peer would take --collective-timeout): one error line naming what happened, and the rerun
    resumes from the last checkpoint."""
    run_dir = str(tmp_path / "run")
    process = subprocess.Popen(
        train(2, small_shards, run_dir, *SMALL, "--epochs", "50"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for_step(run_dir, 10, process)
    victim = replicas_of(process.pid)[1]
    started = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    out, err = process.communicate(timeout=120)
    assert time.monotonic() - started < 30 + 15  # --collective-timeout plus torchrun's own shutdown
    assert process.returncode != 0
    lines = errors(err)
    assert len(lines) == 1 and lines[0].startswith("error: rank 0: lost contact with another replica"), err[-3000:]
    pointer = json.load(open(os.path.join(run_dir, "latest.json")))
    result = subprocess.run(
        train(2, small_shards, run_dir, *SMALL, "--epochs", "4"), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        "resumed at step" in result.stdout
        and int(result.stdout.split("resumed at step ")[1].split()[0]) >= pointer["step"]
    )


@pytest.mark.slow
def test_a_resume_on_another_number_of_processes_is_refused_in_one_line(small_shards, reference_run, tmp_path):
    run_dir = str(tmp_path / "run")
    subprocess.run(["cp", "-r", reference_run, run_dir], check=True)
    result = subprocess.run(
        train(4, small_shards, run_dir, *SMALL, "--epochs", "4"), capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0
    lines = errors(result.stderr)
    assert len(lines) == 1 and "was trained on 2 replicas, this run has 4" in lines[0], result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("guarded", [1, 0])
def test_only_rank_0_writes_a_bucket_run_dir_and_every_rank_restores(guarded, small_shards, gcs, tmp_path):
    """A gs:// run dir (fake-gcs-server) with 2 processes, rank ``guarded`` unable to write:
    with rank 1 guarded training, a stop and the resume all pass (rank 1 only reads, and both
    ranks restore the same checkpoint, which the replicas check); with rank 0 guarded the run
    fails, so the guard bites."""
    run_dir = f"gs://pyact-test/dist-{guarded}-{os.getpid()}"
    env = dict(os.environ, PYACT_TEST_NO_WRITES_ON_RANK=str(guarded))
    guard = os.path.join(ROOT, "tests", "training", "rank_guard.py")
    command = [
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        guard,
        "train",
        "--data",
        small_shards,
        "--run-dir",
        run_dir,
        *SMALL,
        "--epochs",
        "1",
    ]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    if guarded == 0:
        assert first.returncode != 0 and "rank 0 wrote to storage" in first.stderr
        return
    assert first.returncode == 0, first.stderr[-3000:]
    assert storage.read_json(f"{run_dir}/latest.json")["epoch"] == 1
    again = subprocess.run(command[:-1] + ["2"], capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step" in again.stdout
    assert storage.read_json(f"{run_dir}/latest.json")["epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, rank0_late",
    [
        ("data missing on rank 1", 0),
        ("data missing everywhere", 0),
        ("bad flag", 0),
        # rank 0 says what every rank met: before, rank 1 exited first and torchrun stopped rank 0
        # before its line (seen under load); the others now wait cli.LINGER_S (5 s) for it
        ("bad flag", 2),
        ("bad value", 2),
        ("batch over 2 replicas", 0),  # met inside the replicas, after the run dir was made
    ],
)
def test_a_failure_at_start_is_said_once_by_the_rank_that_met_it(case, rank0_late, small_shards, tmp_path):
    """Each rank as a machine of its own (tests/training/rank_guard.py gives it data-<rank>): a rank that
    cannot start still joins the others to tell them, so they stop at once instead of waiting
    for it until torchrun kills them (30 s), and its own line names it. A cause every rank
    meets is said once; so is a usage error, also when rank 0 starts late."""
    if case in ("data missing on rank 1", "bad value", "batch over 2 replicas"):
        shutil.copytree(small_shards, tmp_path / "data-0")
    if case in ("bad value", "batch over 2 replicas"):
        shutil.copytree(small_shards, tmp_path / "data-1")
    extra = {
        "bad flag": ["--bogus"],
        "bad value": ["--collective-timeout", "inf"],
        "batch over 2 replicas": ["--batch-size", "7"],
    }.get(case, [])
    command = [
        *TORCHRUN,
        "--nproc_per_node",
        "2",
        os.path.join(ROOT, "tests", "training", "rank_guard.py"),
        "train",
        "--data",
        str(tmp_path / "data-{rank}"),
        "--run-dir",
        str(tmp_path / "run"),
        *SMALL,
        *extra,
    ]
    started = time.monotonic()
    env = dict(os.environ, PYACT_TEST_RANK0_LATE_S=str(rank0_late))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    assert time.monotonic() - started < 28, "a rank waited to be killed by torchrun"
    assert not os.path.exists(tmp_path / "run")  # no empty run dir left by a refused launch
    if case == "bad flag":
        assert result.stderr.count("unrecognized arguments: --bogus") == 1, result.stderr[-2000:]
        return
    lines = errors(result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    if case == "data missing on rank 1":
        assert lines[0].startswith("error: rank 1: ") and "data-1" in lines[0] and "manifest" in lines[0]
    elif case == "bad value":
        assert lines[0] == "error: --collective-timeout must be 1 to 86400 seconds, got inf"
    elif case == "batch over 2 replicas":
        assert lines[0] == "error: --batch-size 7 does not divide evenly over 2 replicas"
    else:
        assert not lines[0].startswith("error: rank") and "manifest" in lines[0]


@pytest.mark.slow
def test_kill_9_of_torchrun_while_its_workers_start_leaves_no_process(small_shards, tmp_path):
    """Killed while its workers are still importing torch: they learn of it from the launcher's
    pid recorded first thing when they started (later, the parent they see is init)."""
    process = subprocess.Popen(
        train(2, small_shards, str(tmp_path / "run"), *SMALL),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while (
        not (len(replicas_of(process.pid)) == 2 and all(map(importing_torch, replicas_of(process.pid).values())))
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    replicas = list(replicas_of(process.pid).values())
    assert len(replicas) == 2 and all(map(importing_torch, replicas))
    process.send_signal(signal.SIGKILL)
    process.wait()
    _, alive = psutil.wait_procs(replicas, timeout=45)
    assert not alive, f"replicas outlived torchrun: {alive}"
