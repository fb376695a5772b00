"""Ctrl-C and SIGTERM in every command but training (issue 19): 130 or 143, one line, no
partial output, the earlier outputs whole, and a rerun that works. Each signal is sent by the
process to itself from inside the step it must interrupt (torch.save's archive writer, the
exporter, the video encoder, publishing), so the moment is exact, not a race."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch

from pyact_torch.cli import main

from helpers import tree_bytes
from helpers import keras_weights, write_keras_h5

CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


def signal_on_call(function, signum: int, call: int = 1):
    """``function`` that sends ``signum`` to this process on its ``call``-th call, then runs."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)
        return function(*args, **kwargs)

    return wrapped


def stopped(capsys, signum: int, *args) -> str:
    """Runs the command, which must end as a stop does; returns its one line."""
    assert main(list(args)) == CODES[signum]
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "stopping once" not in line]
    assert len(lines) == 1 and ("interrupted" in lines[0] or "stopped by SIGTERM" in lines[0]), lines
    return lines[0]


@pytest.fixture(scope="module")
def h5(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("keras") / "weights.h5")
    write_keras_h5(path, keras_weights(np.random.default_rng(0)), whole_model=False)
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_convert_keras_stopped_inside_torch_save(signum, h5, tmp_path, capsys, monkeypatch):
    """torch.save's writer turned the signal into a C++ error (a traceback) or lost it (rc 0)."""
    out = tmp_path / "converted.pt"
    real_save = torch.save

    def save(obj, sink, *args, **kwargs):  # the signal arrives on the archive's first write
        class Sink:
            def __init__(self):
                self.signalled = False

            def write(self, data):
                if not self.signalled:
                    self.signalled = True
                    os.kill(os.getpid(), signum)
                return sink.write(data)

            def flush(self):
                return sink.flush()

        return real_save(obj, Sink(), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    stopped(capsys, signum, "convert-keras", h5, str(out))
    assert tree_bytes(tmp_path) == {}
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["convert-keras", h5, str(out)]) == 0
    assert torch.load(str(out), weights_only=True)["format"]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".onnx", ".pt2"])
def test_export_stopped_inside_the_exporter(suffix, detector_run, learn_shards, tmp_path, capsys, monkeypatch):
    """Stopped inside torch.onnx.export / torch.export.export: a traceback from a half-imported
    torch._dynamo before; now the exporter finishes, then nothing is written."""
    out = tmp_path / f"model{suffix}"
    args = ["export", "--checkpoint", detector_run, "--data", learn_shards, "--windows", "4", "--out", str(out)]
    name = "export" if suffix == ".pt2" else None
    target = (torch.export, "export") if name else (torch.onnx, "export")
    monkeypatch.setattr(*target, signal_on_call(getattr(*target), signal.SIGTERM))
    stopped(capsys, signal.SIGTERM, *args)
    assert tree_bytes(tmp_path) == {}
    monkeypatch.undo()
    assert main(args) == 0 and out.stat().st_size > 0


@pytest.fixture(scope="module")
def scored(detector_run, learn_shards, tmp_path_factory) -> str:
    """``pyact evaluate`` outputs for the eval split."""
    out = str(tmp_path_factory.mktemp("scored") / "scored")
    assert (
        main(
            [
                "evaluate",
                "--checkpoint",
                detector_run,
                "--data",
                learn_shards,
                "--split",
                "eval",
                "--device",
                "cpu",
                "--out",
                out,
            ]
        )
        == 0
    )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["scoring", "a move fails", "a stop while publishing"])
def test_evaluate_stopped_keeps_the_earlier_outputs_whole(
    moment, scored, detector_run, learn_shards, tmp_path, capsys, monkeypatch
):
    """The new metrics.json and per_class.txt were left beside the earlier checkpoint's
    confusion_matrix.png and predictions.json. A move that fails after the first output is in
    place puts the earlier ones back; a stop while the outputs are moved waits for the moves
    (a second stop must not cut a rollback short): either set is whole, never a mix."""
    import errno
    import shutil

    from pyact_torch.scoring import metrics
    from pyact_torch.io import outputs

    out = tmp_path / "scored"
    shutil.copytree(scored, out)
    (out / "notes.txt").write_text("mine")
    before = tree_bytes(out)
    real_replace, calls = os.replace, [0]

    def failing_replace(*args):  # the 7th move: after metrics.json is in place
        calls[0] += 1
        if calls[0] == 7:
            raise OSError(errno.ENOSPC, "No space left on device", args[1])
        return real_replace(*args)

    args = [
        "evaluate",
        "--checkpoint",
        detector_run,
        "--data",
        learn_shards,
        "--split",
        "test",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    if moment == "scoring":
        monkeypatch.setattr(metrics, "confusion_png", signal_on_call(metrics.confusion_png, signal.SIGTERM))
        stopped(capsys, signal.SIGTERM, *args)
    elif moment == "a move fails":
        monkeypatch.setattr(outputs.os, "replace", failing_replace)
        code, err = main(args), capsys.readouterr().err
        assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
    else:
        monkeypatch.setattr(outputs.os, "replace", signal_on_call(os.replace, signal.SIGTERM, call=7))
        stopped(capsys, signal.SIGTERM, *args)
    after = tree_bytes(out)
    if moment == "a stop while publishing":
        assert set(after) == set(before)
        assert all(after[name] != before[name] for name in before if name != "notes.txt")  # all new
        assert json.loads(after["metrics.json"])["split"] == "test"
    else:
        assert after == before


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_video_stopped_keeps_the_earlier_video_and_sheet(signum, scored, learn_shards, tmp_path, capsys, monkeypatch):
    from pyact_torch.draw import panels

    predictions = os.path.join(scored, "predictions.json")
    out = tmp_path / "predictions.mp4"
    args = [
        "video",
        predictions,
        str(out),
        "--data",
        learn_shards,
        "--split",
        "eval",
        "--max-windows",
        "20",
        "--size",
        "48",
    ]
    assert main(args) == 0
    before = tree_bytes(tmp_path)
    assert set(before) == {"predictions.mp4", "predictions-sheet.png"}
    monkeypatch.setattr(panels, "with_banner", signal_on_call(panels.with_banner, signum, call=30))
    stopped(capsys, signum, *args[:-2], "--size", "64")  # another size: other bytes if anything were replaced
    assert tree_bytes(tmp_path) == before
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*args[:-2], "--size", "64"]) == 0
    assert set(tree_bytes(tmp_path)) == set(before) and tree_bytes(tmp_path) != before


def test_inspect_stopped_writes_nothing(small_shards, tmp_path, capsys, monkeypatch):
    from pyact_torch.data import inspection

    out = tmp_path / "grid.png"
    monkeypatch.setattr(inspection, "sheet", signal_on_call(inspection.sheet, signal.SIGTERM))
    stopped(capsys, signal.SIGTERM, "inspect", small_shards, "--out", str(out), "--n", "4")
    assert tree_bytes(tmp_path) == {}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_synth_stopped_leaves_nothing_and_reruns(signum, tmp_path, capsys, monkeypatch):
    """It left 5,497 files and refused the rerun ("not an empty folder")."""
    from pyact_torch.data import synthetic

    out = tmp_path / "raw"
    args = ["synth", str(out), "--subjects", "1,0,1", "--frames", "14:16", "--size", "64x48", "--workers", "1"]
    monkeypatch.setattr(synthetic, "render_frame", signal_on_call(synthetic.render_frame, signum, call=40))
    stopped(capsys, signum, *args)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert main(args) == 0
    assert sorted(os.listdir(out)) == ["Test", "TestDetection", "Train"]


@pytest.mark.slow
def test_synth_with_worker_processes_stopped_by_sigterm(tmp_path):
    """The same with its worker processes writing: they are stopped before the staging folder
    is removed (one still writing would leave files behind)."""
    import subprocess
    import sys
    import time

    out = tmp_path / "raw"
    process = subprocess.Popen(
        [sys.executable, "-m", "pyact_torch", "synth", str(out), "--size", "320x240", "--workers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and sum(len(f) for _, _, f in os.walk(tmp_path)) < 50:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    assert os.listdir(tmp_path) == []
    assert json.dumps(err.strip().splitlines()[-1:]).count("stopped by SIGTERM") == 1


def test_training_in_process_gives_back_the_signal_handlers(small_shards, tmp_path):
    """Training turns Ctrl-C into "checkpoint and stop"; after it returns, Ctrl-C interrupts
    again. It did not: the demo's scoring after training could not be interrupted, and a later
    convert-keras in the same process lost its Ctrl-C (seen in the full suite)."""
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    assert (
        main(
            [
                "train",
                "--data",
                small_shards,
                "--run-dir",
                str(tmp_path / "run"),
                "--model",
                "tiny",
                "--epochs",
                "1",
                "--batch-size",
                "8",
                "--workers",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_a_closed_output_pipe_stops_quietly_and_the_rerun_finishes(small_shards, tmp_path):
    """`pyact train ... | head -2`: the first print after head exits raised BrokenPipeError, a
    traceback (and another at exit). Now: one line on stderr, exit 141 as for SIGPIPE, and the
    run dir is one the same command finishes."""
    import subprocess
    import sys

    run_dir = str(tmp_path / "run")
    command = [sys.executable, "-m", "pyact_torch", "train", "--data", small_shards, "--run-dir", run_dir]
    command += ["--model", "tiny", "--device", "cpu", "--epochs", "1", "--workers", "0", "--log-every", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.readline()
    process.stdout.close()  # as `head -1` does once it has its line
    err = process.stderr.read()
    assert process.wait(timeout=300) == 141, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines() == [
        "stopped: the reader of train's output closed the pipe"
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and os.path.exists(os.path.join(run_dir, "final.pt")), done.stderr[-2000:]


def test_a_broken_pipe_that_is_not_stdout_stays_a_fault_of_ours(monkeypatch):
    """The control: a BrokenPipeError from another pipe or socket (a dead loader worker, a lost
    connection) is not reported as the user's `| head` and keeps its traceback."""
    import pyact_torch.cli as cli_module

    def broken(config):
        raise BrokenPipeError(32, "Broken pipe")

    command = cli_module.COMMANDS["inspect"]
    monkeypatch.setitem(cli_module.COMMANDS, "inspect", (command[0], broken, command[2]))
    with pytest.raises(BrokenPipeError):
        main(["inspect", "somewhere", "--out", "g.png"])
