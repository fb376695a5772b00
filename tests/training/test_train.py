"""Training: it learns through xmp.spawn, checkpoints land in GCS, resume is exact, errors are clear."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Callable

import psutil
import pytest
import torch

from pyact_torch.io import storage
from pyact_torch.training.checkpoint import CheckpointWriter, load_object, restore
from pyact_torch.cli import main
from pyact_torch.io.emulator import GCSEmulator
from pyact_torch.training.events import EVENT_PREFIX

from helpers import ROOT, scalars

SCRIPT = os.path.join(ROOT, "scripts", "train_tpu.py")


def descendants(pid: int, depth: int) -> list[int]:
    """The processes ``depth`` generations below ``pid``, without multiprocessing's resource tracker."""
    level = [psutil.Process(pid)]
    for _ in range(depth):
        below = []
        for process in level:
            with contextlib.suppress(psutil.NoSuchProcess):
                below += [c for c in process.children() if "resource_tracker" not in " ".join(c.cmdline())]
        level = below
    return [process.pid for process in level]


def train_command(data, run_dir, *extra):
    return [sys.executable, SCRIPT, "--data", data, "--run-dir", run_dir, "--model", "tiny", *extra]


def evals(run_dir):
    rows = [json.loads(line) for line in storage.read_bytes(f"{run_dir}/metrics.jsonl").decode().splitlines()]
    return [r for r in rows if r["kind"] == "eval"]


@pytest.mark.slow
def test_tiny_learns_the_held_out_subject_through_xmp_spawn(learn_shards, tmp_path):
    """The TPU code path on XLA:CPU (xmp.spawn, one replica): >= 90 % on the held-out subject."""
    run_dir = str(tmp_path / "run")
    env = dict(os.environ, PJRT_DEVICE="CPU")
    result = subprocess.run(
        train_command(
            learn_shards,
            run_dir,
            "--device",
            "xla",
            "--epochs",
            "5",
            "--lr",
            "2e-3",
            "--lr-schedule",
            "cosine",
            "--log-every",
            "20",
            "--workers",
            "1",
        ),
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = [r["accuracy"] for r in evals(run_dir)]
    assert len(accuracy) == 5 and accuracy[-1] >= 0.9, accuracy
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(train) >= 14 and sum(train[-3:]) < sum(train[:3]) / 3
    assert "0 CPU fallbacks" in result.stdout  # the loss leaves the device without an aten:: fallback
    config = storage.read_json(f"{run_dir}/config.json")
    assert config["replicas"] == 1 and config["config"]["device"] == "xla"
    pointer = storage.read_json(f"{run_dir}/best.json")
    state = load_object(f"{run_dir}/{pointer['name']}", pointer)
    assert state["classes"][-1] == "no-action"


@pytest.mark.slow
def test_tiny_learns_the_held_out_subject(learn_shards, tmp_path):
    """Eager CPU (the same loop as XLA): >= 90 % on the held-out eval subject."""
    run_dir = str(tmp_path / "run")
    assert (
        main(
            [
                "train",
                "--data",
                learn_shards,
                "--run-dir",
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
            ]
        )
        == 0
    )
    accuracy = [r["accuracy"] for r in evals(run_dir)]
    assert accuracy[-1] >= 0.9, accuracy
    best = storage.read_json(f"{run_dir}/best.json")
    assert min(r["loss"] for r in evals(run_dir)) == pytest.approx(
        load_object(f"{run_dir}/{best['name']}", best)["best_val_loss"], abs=1e-5
    )


@pytest.mark.slow
def test_checkpoints_land_in_gcs_and_load_with_plain_torch_load(learn_shards, gcs, tmp_path):
    run_dir = "gs://pyact-test/runs/gcs"
    assert (
        main(
            [
                "train",
                "--data",
                learn_shards,
                "--run-dir",
                run_dir,
                "--model",
                "tiny",
                "--device",
                "cpu",
                "--epochs",
                "2",
                "--ckpt-every",
                "20",
                "--keep",
                "2",
                "--workers",
                "0",
            ]
        )
        == 0
    )
    names = storage.list_files(run_dir)
    assert {"latest.json", "best.json", "final.pt", "metrics.jsonl", "config.json", "loss.png"} <= set(names)
    events = [n for n in names if n.startswith(EVENT_PREFIX)]
    assert len(events) == 1
    pointer = storage.read_json(f"{run_dir}/latest.json")
    checkpoints = sorted(n for n in names if n.startswith("ckpt-"))
    best = storage.read_json(f"{run_dir}/best.json")["name"]
    kept = {h["name"] for h in pointer["history"]} | {best}
    # checkpoints every 20 steps and at epoch ends (58, 116); --keep 2 keeps the newest two plus the best
    assert set(checkpoints) == kept == {"ckpt-100.pt", "ckpt-116.pt", best}
    assert [h["step"] for h in pointer["history"]][-2:] == [100, 116]
    import hashlib
    import io

    data = storage.read_bytes(f"{run_dir}/{pointer['name']}")
    assert hashlib.sha256(data).hexdigest() == pointer["sha256"] and len(data) == pointer["size"]
    state = torch.load(io.BytesIO(data), weights_only=True)
    assert state["step"] == pointer["step"] and "model" in state and "optimizer" in state
    assert storage.read_bytes(f"{run_dir}/loss.png")[:4] == b"\x89PNG"
    local = tmp_path / "events"  # TensorBoard reads the bucket's event file: both epochs' eval scalars
    local.mkdir()
    (local / events[0]).write_bytes(storage.read_bytes(f"{run_dir}/{events[0]}"))
    assert [step for step, _ in scalars(str(local))["eval/accuracy"]] == [58, 116]


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", "xla"])
def test_kill_and_resume_gives_the_same_final_weights(device, learn_shards, small_shards, tmp_path, request):
    """Eager CPU: bit-identical weights; XLA:CPU (xmp.spawn, small clips): equal within float tolerance.
    With augmentation, dropout and weight decay on: the resumed epoch draws the transforms and
    dropout masks the uninterrupted run drew. Before the kill a loader worker is killed too: the
    loader starts over and goes on with the batches it would have given."""
    if device == "cpu":
        data, kill_at = learn_shards, 30
        flags = [
            "--device",
            "cpu",
            "--epochs",
            "2",
            "--ckpt-every",
            "15",
            "--workers",
            "1",
            "--log-every",
            "5",
            "--augment",
            "pyact",
            "--dropout",
            "0.2",
            "--weight-decay",
            "1e-4",
        ]
    else:
        data, kill_at = small_shards, 20
        flags = [
            "--device",
            "xla",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--ckpt-every",
            "10",
            "--workers",
            "1",
            "--log-every",
            "1",
            "--augment",
            "standard",
            "--dropout",
            "0.2",
        ]
    env = dict(os.environ, PJRT_DEVICE="CPU")
    reference = str(tmp_path / "reference")
    with open(tmp_path / "reference.out", "w") as out, open(tmp_path / "reference.err", "w") as err:
        uninterrupted = subprocess.Popen(train_command(data, reference, *flags), env=env, stdout=out, stderr=err)
    request.addfinalizer(lambda: uninterrupted.poll() is None and uninterrupted.kill())
    if device == "cpu":  # eager CPU keeps both of CI's cores busy; XLA:CPU here about one, so it goes alongside
        uninterrupted.wait(timeout=600)
    run_dir = str(tmp_path / "killed")
    stderr = tmp_path / "killed.stderr"
    with open(stderr, "w") as err:
        process = subprocess.Popen(train_command(data, run_dir, *flags), env=env, stdout=subprocess.DEVNULL, stderr=err)
    latest = os.path.join(run_dir, "latest.json")

    def wait_for(ready) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None and not ready():
            time.sleep(0.02)

    def step() -> int:
        return json.load(open(latest))["step"] if os.path.exists(latest) else -1

    # first the epoch's loader worker dies (the kernel's OOM killer would): the loader starts
    # over, and the batches after it must be the ones the uninterrupted run trained on. Eager:
    # after the first checkpoint (batches to skip); XLA: as it starts (the replica's loader
    # thread), before the prefetching device loader has read the small epoch
    depth = 1 if device == "cpu" else 2  # xla: launcher, replica, worker
    wait_for(lambda: step() >= 1 if device == "cpu" else descendants(process.pid, depth))
    workers = descendants(process.pid, depth)
    assert workers, "no loader worker found"
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    restarted = re.compile(r"starting the data loader over at batch (\d+) ")
    wait_for(lambda: restarted.search(stderr.read_text()))
    found = restarted.search(stderr.read_text())
    assert found, stderr.read_text()[-2000:]
    # then the whole command, after a checkpoint that holds batches read after the restart
    wait_for(lambda: step() >= max(kill_at, int(found.group(1))))
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "training finished before it could be killed"
    assert not os.path.exists(os.path.join(run_dir, "final.pt"))
    result = subprocess.run(train_command(data, run_dir, *flags), capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resumed at step" in result.stdout
    assert uninterrupted.wait(timeout=600) == 0, (tmp_path / "reference.err").read_text()[-2000:]
    if device == "xla":  # dropout's random masks run inside the compiled step
        assert " 0 CPU fallbacks" in (tmp_path / "reference.out").read_text()
    a = torch.load(os.path.join(reference, "final.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(run_dir, "final.pt"), weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        if device == "cpu":
            assert torch.equal(a[key], b[key]), key
        else:
            assert torch.allclose(a[key].float(), b[key].float(), rtol=1e-4, atol=1e-5), key


def _signal_run(data, run_dir, *flags, new_session=False) -> subprocess.Popen:
    """A 50-epoch run, to be stopped by a signal once it logs."""
    return subprocess.Popen(
        train_command(data, run_dir, "--epochs", "50", *flags),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
        env=dict(os.environ, PJRT_DEVICE="CPU"),
    )


def _signal_when_logging(runs: list[tuple[subprocess.Popen, str, Callable[[int], None]]]) -> None:
    """Each run's ``send(pid)`` once its run dir has metrics (its first steps ran), in any order."""
    waiting, deadline = list(runs), time.monotonic() + 300
    while waiting and time.monotonic() < deadline:
        for run in list(waiting):
            process, run_dir, send = run
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl")) or process.poll() is not None:
                with contextlib.suppress(ProcessLookupError):  # it ended: its checks say why
                    send(process.pid)
                waiting.remove(run)
        time.sleep(0.05)
    for process, _, send in waiting:  # past the deadline: the checks below say what went wrong
        with contextlib.suppress(ProcessLookupError):
            send(process.pid)


def _sigterm_flags(device: str) -> list[str]:
    return ["--device", device, "--workers", "0", "--log-every", "5"] + (
        ["--batch-size", "8"] if device == "xla" else []
    )


def _check_sigterm(process: subprocess.Popen, run_dir: str) -> None:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert "stopped by SIGTERM" in out
    pointer = json.load(open(os.path.join(run_dir, "latest.json")))
    assert pointer["step"] > 0 and not os.path.exists(os.path.join(run_dir, "final.pt"))


CTRL_C_FLAGS = ["--batch-size", "8", "--workers", "1", "--log-every", "2", "--ckpt-every", "0"]


def _check_ctrl_c(process: subprocess.Popen, run_dir: str, device: str) -> int:
    """The run stopped by Ctrl-C: exit 130, the step reached checkpointed, said last; that step."""
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    step = json.load(open(os.path.join(run_dir, "latest.json")))["step"]
    assert f"interrupted at step {step} (epoch " in out or device == "xla"
    assert err.strip().splitlines()[-1].startswith("interrupted"), err[-2000:]
    assert "checkpoint" in err.strip().splitlines()[-1] and "Traceback" not in err, err[-2000:]
    assert step > 0 and not os.path.exists(os.path.join(run_dir, "final.pt"))
    return step


def _ctrl_c(pid: int) -> None:
    os.killpg(pid, signal.SIGINT)  # the terminal's process group: the command, its workers, its replica


def _sigterm(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_zero(learn_shards, tmp_path):
    """SIGTERM to the launched command (a TPU VM's preemption notice): the replica finishes its
    step, checkpoints and the command exits 0 (XLA: test_xla_signals_and_bf16_side_by_side)."""
    run_dir = str(tmp_path / "run")
    process = _signal_run(learn_shards, run_dir, *_sigterm_flags("cpu"))
    _signal_when_logging([(process, run_dir, _sigterm)])
    _check_sigterm(process, run_dir)


@pytest.mark.slow
def test_ctrl_c_checkpoints_the_step_reached_and_the_rerun_resumes_from_it(small_shards, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group: the command, its loader workers and,
    on XLA, the replica process) said "run the same command again to continue" but only SIGTERM
    checkpointed: the rerun resumed from an older checkpoint or started over. Now the first
    Ctrl-C finishes the step, checkpoints it and exits 130 saying so (XLA:
    test_xla_signals_and_bf16_side_by_side)."""
    run_dir = str(tmp_path / "run")
    flags = ["--device", "cpu", *CTRL_C_FLAGS]
    process = _signal_run(small_shards, run_dir, *flags, new_session=True)
    _signal_when_logging([(process, run_dir, _ctrl_c)])
    step = _check_ctrl_c(process, run_dir, "cpu")
    rerun = subprocess.run(
        train_command(small_shards, run_dir, "--epochs", "1", *flags),
        capture_output=True,
        text=True,
        env=dict(os.environ, PJRT_DEVICE="CPU"),
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"resumed at step {step}" in rerun.stdout


@pytest.mark.slow
def test_xla_signals_and_bf16_side_by_side(small_shards, tmp_path, request):
    """Through xmp.spawn, three runs side by side (each XLA:CPU run keeps about one core busy
    compiling; one after the other they took ~100 s):
    - SIGTERM to the command: the replica, a child process that gets the signal passed on,
      finishes its step, checkpoints, and the command exits 0;
    - Ctrl-C to its process group: the step reached is checkpointed, exit 130 (resuming an xmp
      run is test_kill_and_resume_gives_the_same_final_weights[xla]'s);
    - --precision bf16 (autocast to bfloat16 on the XLA device): trains, with finite losses and
      no CPU fallbacks."""
    sigterm_dir, ctrl_c_dir, bf16_dir = (str(tmp_path / name) for name in ("sigterm", "ctrl-c", "bf16"))
    sigterm = _signal_run(small_shards, sigterm_dir, *_sigterm_flags("xla"))
    ctrl_c = _signal_run(small_shards, ctrl_c_dir, "--device", "xla", *CTRL_C_FLAGS, new_session=True)
    bf16 = subprocess.Popen(
        train_command(
            small_shards,
            bf16_dir,
            *("--device", "xla", "--precision", "bf16", "--epochs", "1", "--batch-size", "8"),
            *("--log-every", "2", "--workers", "0"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PJRT_DEVICE="CPU"),
    )
    for process in (sigterm, ctrl_c, bf16):
        request.addfinalizer(lambda p=process: p.poll() is None and p.kill())
    _signal_when_logging([(sigterm, sigterm_dir, _sigterm), (ctrl_c, ctrl_c_dir, _ctrl_c)])
    _check_sigterm(sigterm, sigterm_dir)
    _check_ctrl_c(ctrl_c, ctrl_c_dir, "xla")

    out, err = bf16.communicate(timeout=600)
    assert bf16.returncode == 0, err[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(bf16_dir, "metrics.jsonl"))]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) >= 5 and all(0 < loss < 10 for loss in losses)
    assert "0 CPU fallbacks" in out
    assert "note: XLA compiles the training step" in out  # before: silent while it compiled
    assert storage.read_json(f"{bf16_dir}/config.json")["config"]["precision"] == "bf16"


def _tiny_state(step):
    return {
        "model": {"w": torch.full((3,), float(step))},
        "step": step,
        "classes": ["a", "no-action"],
        "config": {"model": "tiny"},
        "format": "pyact-torch-checkpoint/1",
    }


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path):
    run_dir = str(tmp_path / "run")
    writer = CheckpointWriter(run_dir, keep=3, log=lambda m: None)
    for step in (10, 20, 30):
        writer.save(_tiny_state(step), step, 0)
    writer.close()
    with open(os.path.join(run_dir, "ckpt-30.pt"), "r+b") as handle:
        handle.seek(100)
        handle.write(b"garbage")
    messages = []
    state, _ = restore(run_dir, "auto", log=messages.append)
    assert state["step"] == 20
    assert "ckpt-30.pt" in messages[0] and "sha256" in messages[0]
    os.remove(os.path.join(run_dir, "ckpt-20.pt"))
    assert restore(run_dir, "auto", log=messages.append)[0]["step"] == 10


def test_upload_retried_when_the_emulator_stops(tmp_path):
    emulator = GCSEmulator(str(tmp_path / "gcs"), log=str(tmp_path / "gcs.log"))
    with emulator:
        emulator.create_bucket("flaky")
        run_dir = "gs://flaky/run"
        logs = []
        writer = CheckpointWriter(run_dir, keep=2, log=logs.append, backoff=0.5)
        writer.save(_tiny_state(1), 1, 0)
        writer.wait()
        emulator.pause()
        writer.save({**_tiny_state(2), "big": torch.zeros(2_000_000)}, 2, 0)
        assert writer._queue.unfinished_tasks == 1  # save() returned: training goes on meanwhile
        time.sleep(3)
        assert writer._queue.unfinished_tasks == 1  # still retrying against the stopped server
        emulator.start()
        writer.close()
        pointer = storage.read_json(f"{run_dir}/latest.json")
        assert pointer["name"] == "ckpt-2.pt"
        assert load_object(f"{run_dir}/ckpt-2.pt", pointer)["step"] == 2


@pytest.mark.parametrize("case", ["no manifest", "missing bucket", "unwritable run dir"])
def test_bad_training_input(case, learn_shards, tmp_path, gcs, capsys):
    data, run_dir = learn_shards, str(tmp_path / "run")
    if case == "no manifest":
        data = str(tmp_path)
    elif case == "missing bucket":
        run_dir = "gs://no-such-bucket/run"
    else:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        run_dir = str(blocker / "run")
    assert main(["train", "--data", data, "--run-dir", run_dir, "--device", "cpu", "--model", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_resume_refused_when_classes_differ(learn_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    writer = CheckpointWriter(str(run_dir), log=lambda m: None)
    writer.save({**_tiny_state(5), "data_shape": None}, 5, 0)
    writer.close()
    assert main(["train", "--data", learn_shards, "--run-dir", str(run_dir), "--device", "cpu", "--model", "tiny"]) == 2
    assert "classes differ" in capsys.readouterr().err


def test_batch_must_divide_over_replicas():
    from pyact_torch.errors import UserError
    from pyact_torch.training.train import per_replica_batch

    assert [per_replica_batch(32, w) for w in (1, 2, 4, 8)] == [32, 16, 8, 4]
    with pytest.raises(UserError, match="does not divide evenly over 3 replicas"):
        per_replica_batch(32, 3)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["batch over 2 replicas", "classes differ"])
def test_errors_inside_xla_replicas_are_one_line(case, learn_shards, tmp_path):
    """A mistake found inside the spawned replicas (not before the spawn) still ends as one line
    and exit status 2; with CPU_NUM_DEVICES=2 xmp.spawn starts two replica processes."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, PJRT_DEVICE="CPU")
    extra = []
    if case == "batch over 2 replicas":
        env["CPU_NUM_DEVICES"] = "2"
        extra = ["--batch-size", "31"]
    else:
        writer = CheckpointWriter(str(run_dir), log=lambda m: None)
        writer.save({**_tiny_state(5), "data_shape": None}, 5, 0)
        writer.close()
    result = subprocess.run(
        train_command(learn_shards, str(run_dir), "--device", "xla", *extra),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert ("does not divide evenly over 2 replicas" if extra else "classes differ") in lines[0]


def test_bf16_precision_runs_the_convolutions_in_bfloat16_and_learns():
    from pyact_torch.model import build_model
    from pyact_torch.training.devices import Backend
    from pyact_torch.training.train import train_step

    torch.manual_seed(0)
    backend = Backend()
    model = build_model("tiny", 3, 6, 32, 17)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    clips, labels = torch.rand(8, 3, 6, 32, 32), torch.randint(0, 17, (8,))
    seen = []
    hook = model.features[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    losses = [float(train_step(model, optimizer, clips, labels, backend, "bf16")) for _ in range(20)]
    hook.remove()
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast, not a bf16 model
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "module, loads_sklearn", [("pyact_torch.training.train", False), ("pyact_torch.scoring.evaluate", True)]
)
def test_training_does_not_import_the_scoring_stack(module, loads_sklearn):
    """Every training replica imports pyact_torch.training.train: scikit-learn (scoring's metrics) must not
    come with it. pyact_torch.scoring.evaluate is the control that shows the check sees an import."""
    code = f"import sys, {module}; print('sklearn' in sys.modules, 'torch_xla' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(loads_sklearn), "False"]
