"""What a run shows and records: epochs counted from 1, a loss line per epoch, the progress bar
on a terminal, the closing lines, the loss plot and TensorBoard's event file."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from helpers import scalars
from pyact_torch.io import storage
from pyact_torch.cli import main
from pyact_torch.training.events import event_file, event_file_name
from pyact_torch.training.run_log import loss_plot

TINY = ["--model", "tiny", "--device", "cpu", "--batch-size", "8", "--workers", "1"]


@pytest.fixture(scope="module")
def two_epochs(small_shards, tmp_path_factory):
    """Two eager epochs with --log-every far above an epoch's steps; the run dir and its output."""
    run_dir = str(tmp_path_factory.mktemp("runlog") / "run")
    capture = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyact_torch",
            "train",
            "--data",
            small_shards,
            "--run-dir",
            run_dir,
            *TINY,
            "--epochs",
            "2",
            "--log-every",
            "1000",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert capture.returncode == 0, capture.stderr[-2000:]
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return run_dir, capture.stdout, rows, capture.stderr


def test_epochs_count_from_1_with_a_loss_line_each_whatever_log_every(two_epochs):
    """Before: no loss line at all when an epoch was shorter than --log-every, "epoch 0 done"
    for the first epoch, and metrics.jsonl and latest.json counting from 0."""
    run_dir, out, rows, _ = two_epochs
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["epoch"] for r in train] == [1, 2] and [r["epoch"] for r in evals] == [1, 2]
    assert [r["step"] for r in train] == [r["step"] for r in evals]  # each epoch's last step
    for r in train:
        assert re.search(rf"step +{r['step']}  epoch {r['epoch']}/2  loss {r['loss']:.4f}", out), out
    for r in evals:
        assert f"epoch {r['epoch']}/2 done at step {r['step']}: eval loss {r['loss']:.4f}" in out, out
    assert "about" in out.split("epoch 1/2 done")[1].splitlines()[0]  # the time left, after the first epoch
    latest = storage.read_json(f"{run_dir}/latest.json")
    assert latest["epoch"] == 2 and latest["step"] == evals[-1]["step"]


def test_the_closing_lines_name_the_best_checkpoint_its_accuracy_and_the_plot(two_epochs):
    run_dir, out, rows, _ = two_epochs
    best = storage.read_json(f"{run_dir}/best.json")
    row = next(r for r in rows if r["kind"] == "eval" and r["step"] == best["step"])
    assert row["loss"] == min(r["loss"] for r in rows if r["kind"] == "eval") and best["epoch"] == row["epoch"]
    tail = out.strip().splitlines()[-3:]
    assert tail[0].startswith(f"training finished at step {rows[-1]['step']} after 2 epochs;")
    assert tail[1] == (
        f"best checkpoint (lowest eval loss): {run_dir}/{best['name']}, epoch {row['epoch']}, "
        f"eval accuracy {row['accuracy']:.4f} (named by {run_dir}/best.json)"
    )
    assert f"{run_dir}/loss.png" in tail[2] and f"tensorboard --logdir {run_dir}" in tail[2]


def test_tensorboard_reads_every_scalar_back(two_epochs):
    run_dir, _, rows, _ = two_epochs
    seen = scalars(run_dir)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert set(seen) == {"train/loss", "train/learning_rate", "train/windows_per_s", "eval/loss", "eval/accuracy"}
    for tag, key, source in (
        ("train/loss", "loss", train),
        ("eval/loss", "loss", evals),
        ("eval/accuracy", "accuracy", evals),
    ):
        assert [s for s, _ in seen[tag]] == [r["step"] for r in source]
        assert [v for _, v in seen[tag]] == pytest.approx([r[key] for r in source], rel=1e-6)
    assert [v for _, v in seen["train/learning_rate"]] == pytest.approx([1e-3, 1e-3])  # the default --lr
    assert all(v > 0 for _, v in seen["train/windows_per_s"])


def test_tensorboard_shows_a_resumed_run_without_the_steps_trained_again(tmp_path):
    """A run stopped after step 30 but checkpointed at 20, then resumed: the first process's
    file holds 10, 20, 30; the second's (from the restored rows) 10, 20 and its own 30, 40.
    TensorBoard shows each step once, the second run's 30 (the control: the first file alone
    shows the lost 30)."""

    def row(step, loss):
        return {"kind": "train", "step": step, "epoch": 1, "loss": loss, "lr": 0.1, "windows_per_s": 5.0}

    first = [row(10, 1.0), row(20, 0.9), row(30, 0.8)]
    second = first[:2] + [row(30, 0.5), row(40, 0.4)]
    (tmp_path / event_file_name(1.0e9)).write_bytes(event_file(first, 1.0e9))
    assert scalars(str(tmp_path))["train/loss"] == [(10, 1.0), (20, pytest.approx(0.9)), (30, pytest.approx(0.8))]
    (tmp_path / event_file_name(1.0e9 + 60)).write_bytes(event_file(second, 1.0e9 + 60))
    assert sorted(os.listdir(tmp_path)) == [event_file_name(1.0e9), event_file_name(1.0e9 + 60)]
    assert [(s, round(v, 4)) for s, v in scalars(str(tmp_path))["train/loss"]] == [
        (10, 1.0),
        (20, 0.9),
        (30, 0.5),
        (40, 0.4),
    ]


def test_the_loss_plot_draws_the_eval_accuracy():
    """Two histories that differ only in eval accuracy give different plots (before: the same)."""
    rows = [
        {"kind": "train", "step": 5, "epoch": 1, "loss": 2.0},
        {"kind": "eval", "step": 5, "epoch": 1, "loss": 1.5, "accuracy": 0.2},
        {"kind": "train", "step": 10, "epoch": 2, "loss": 1.0},
        {"kind": "eval", "step": 10, "epoch": 2, "loss": 1.2, "accuracy": 0.4},
    ]
    other = [dict(r, accuracy=0.9) if r["kind"] == "eval" else r for r in rows]
    assert loss_plot(rows)[:4] == b"\x89PNG"
    assert loss_plot(rows) != loss_plot(other)
    assert loss_plot(rows) == loss_plot([dict(r) for r in rows])  # the control: same rows, same bytes


@pytest.mark.slow
def test_a_terminal_gets_a_progress_bar_and_a_pipe_plain_lines(small_shards, tmp_path):
    """On a terminal: a bar per epoch with the epoch, windows/s and the ETA; through a pipe
    (the fixture's run) no bar characters at all."""
    import fcntl
    import pty
    import struct
    import termios

    run_dir = str(tmp_path / "run")
    pid, fd = pty.fork()
    if pid == 0:  # the child: the training command on the terminal
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "pyact_torch",
                "train",
                "--data",
                small_shards,
                "--run-dir",
                run_dir,
                *TINY,
                "--epochs",
                "1",
            ],
        )
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    screen = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        screen += data
    _, status = os.waitpid(pid, 0)
    text = screen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text[-2000:]
    assert re.search(r"epoch 1/1: +\d+%\|.*\| *\d+/\d+ \[\d\d:\d\d<\d\d:\d\d, +[\d.]+window/s", text), text[-2000:]


def test_a_pipe_gets_no_bar(two_epochs):
    _, out, _, err = two_epochs
    assert "%|" not in out + err and "\r" not in out + err


def test_a_run_that_starts_at_step_0_says_why(small_shards, tmp_path, capsys):
    """Before: a rerun after a stop that came before the first checkpoint started over silently."""
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "config.json").write_text("{}")  # what an earlier run left when stopped at once
    fresh = tmp_path / "fresh"
    for run_dir, extra, says in (
        (
            earlier,
            [],
            f"starting at step 0: {earlier} holds no checkpoint (a run there stopped before its first one was written)",
        ),
        (fresh, [], f"starting at step 0 in {fresh}"),
        (earlier, ["--resume", "none"], f"--resume none: starting at step 0 in {earlier}"),
    ):
        assert main(["train", "--data", small_shards, "--run-dir", str(run_dir), *TINY, "--epochs", "1", *extra]) == 0
        out = capsys.readouterr().out
        assert says in out.splitlines(), out
    assert main(["train", "--data", small_shards, "--run-dir", str(fresh), *TINY, "--epochs", "2"]) == 0
    assert "starting at step 0" not in capsys.readouterr().out  # the control: a resume says where it resumed


def test_crc32c_without_google_crc32c_gives_the_standard_check_value():
    """The fallback that frames event files on a Python without google_crc32c: CRC-32C's
    published check value for "123456789" (RFC 3720, B.4)."""
    from pyact_torch.io.records import _crc32c

    assert _crc32c(b"123456789") == 0xE3069283
    assert _crc32c(b"123456780") != 0xE3069283  # the control
