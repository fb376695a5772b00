"""Faults of the class "one-line errors, checks before work" (docs/faults.md): every
user-fixable failure ends with one `error:` line (exit status 2, no traceback), and settings,
resumes, inputs and output locations are checked before any decoding, training or reading.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch

from pyact_torch.data import preprocess as preprocess_module
from pyact_torch.training.checkpoint import load_checkpoint
from pyact_torch.cli import main
from pyact_torch.data.shards import read_manifest

from helpers import read_only
from faults_common import TRAIN, PRE, one_line, cli, run, write_manifest, one_error_line, pyact_records, write_records


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize(
    "case",
    [
        "text file",
        "folder",
        "pickle that runs code",
        "truncated",
        "weights only",
        "other model",
        "other batch size",
        "other workers",
        "other seed",
        "other shuffle buffer",
        "other augment",
        "other dropout",
        "other weight decay",
        "other data",
        "missing",
    ],
)
def test_bad_resume_checkpoints_are_one_line(case, small_shards, small_run, tmp_path, capsys):
    target = str(tmp_path / "resume.pt")
    final = os.path.join(small_run, "final.pt")
    extra: list[str] = []
    if case == "text file":
        open(target, "w").write("hello")
    elif case == "folder":
        os.mkdir(target)
    elif case == "pickle that runs code":
        torch.save({"model": _Exploit(tmp_path / "pwned")}, target)
    elif case == "truncated":
        open(target, "wb").write(open(final, "rb").read()[:5000])
    elif case == "weights only":
        state = torch.load(final, weights_only=True)
        torch.save({k: v for k, v in state.items() if k not in ("optimizer", "scheduler")}, target)
    elif case.startswith("other") and case != "other data":
        shutil.copy(final, target)
        extra = {
            "other model": ["--model", "c3d"],
            "other batch size": ["--batch-size", "8"],
            "other workers": ["--workers", "1"],
            "other seed": ["--seed", "1"],
            "other shuffle buffer": ["--shuffle-buffer", "10"],
            "other augment": ["--augment", "pyact"],
            "other dropout": ["--dropout", "0.2"],
            "other weight decay": ["--weight-decay", "1e-4"],
        }[case]
    elif case == "other data":  # the same shapes and classes, one train shard fewer
        shutil.copy(final, target)
        data = str(tmp_path / "other")
        shutil.copytree(small_shards, data)
        manifest = json.load(open(os.path.join(data, "manifest.json")))
        dropped = manifest["splits"]["train"]["shards"].pop()
        manifest["splits"]["train"]["count"] -= dropped["count"]
        write_manifest(data, manifest)
        extra = ["--data", data]  # the last --data wins
    else:
        target = str(tmp_path / "nothing.pt")
    code, err = cli(
        capsys, "train", "--data", small_shards, "--run-dir", str(tmp_path / "run"), *TRAIN, "--resume", target, *extra
    )
    assert code == 2
    line = one_line(err)
    if case.startswith("other") and case != "other data":
        assert extra[0] in line, line  # names the setting
    if case == "other data":
        assert "other data" in line and "--resume none" in line, line
    assert not (tmp_path / "pwned").exists()
    assert not os.path.exists(tmp_path / "run" / "latest.json")


def test_a_moved_copy_of_the_data_resumes(small_shards, small_run, tmp_path, capsys):
    """The data is recognised by its shards (names, counts, sha256s), not by its path; the
    negative control is the "other data" case above."""
    data = str(tmp_path / "elsewhere" / "shards")
    shutil.copytree(small_shards, data)
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    for name in ("final.pt", "final.json"):
        os.remove(run_dir / name)
    step = json.loads((run_dir / "latest.json").read_text())["step"]
    capsys.readouterr()
    assert main(["train", "--data", data, "--run-dir", str(run_dir), *TRAIN]) == 0
    assert f"resumed at step {step}" in capsys.readouterr().out


@pytest.mark.parametrize("classes", ["a class twice", "a path", "a newline", "one class"])
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_class_names_in_a_manifest_are_checked(classes, command, shards, small_run, tmp_path, capsys):
    """Duplicate or odd class names passed train and evaluate: a name twice makes two outputs
    one class; a name is printed and drawn, and a path or control character has no place."""
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    names = manifest["classes"]
    manifest["classes"] = {
        "a class twice": names[:-1] + names[:1],
        "a path": ["../../x"] + names[1:],
        "a newline": [names[0] + "\nerror: forged"] + names[1:],
        "one class": names[:1],
    }[classes]
    write_manifest(shards, manifest)
    args = {
        "train": ["train", "--data", shards, "--run-dir", str(tmp_path / "run"), *TRAIN],
        "evaluate": [
            "evaluate",
            "--checkpoint",
            small_run,
            "--data",
            shards,
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
    }[command]
    code, err = cli(capsys, *args)
    assert code == 2
    line = one_line(err)
    assert "manifest.json" in line and ("class" in line)  # one line: a newline in a name is escaped
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["asl blue", "no-action"])
def test_action_folders_that_are_no_class_name_are_refused_before_preprocessing(name, tiny_dataset, tmp_path, capsys):
    """Preprocessing wrote them into the manifest, which every reader then refused (a space),
    or named no-action twice."""
    subject = os.path.join(tiny_dataset, "Train", sorted(os.listdir(os.path.join(tiny_dataset, "Train")))[0])
    action = sorted(n for n in os.listdir(subject) if not n.endswith(".xml"))[0]
    os.rename(os.path.join(subject, action), os.path.join(subject, name))
    os.rename(os.path.join(subject, action + ".xml"), os.path.join(subject, name + ".xml"))
    code, err = cli(capsys, "preprocess", tiny_dataset, str(tmp_path / "out"), *PRE)
    assert code == 2
    line = one_line(err)
    assert repr(name) in line and "rename the folder" in line, line
    assert not (tmp_path / "out").exists()


def test_class_names_given_on_the_command_line_are_checked(capsys):
    for given in ("a,b,a", "a,../b", "a,b c", "a"):
        with pytest.raises(SystemExit) as stop:
            main(["convert-tfrecords", "src", "dest", "--classes", given])
        assert stop.value.code == 2
        assert "--classes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case",
    [
        "evaluate --batch-size",
        "train --batch-size",
        "inspect --size",
        "inspect --n",
        "video --size",
        "video --sheet-windows",
    ],
)
def test_sizes_beyond_the_machine_are_refused_with_the_figure(case, small_shards, small_run, tmp_path, capsys):
    """They tried to allocate tens of GB to TB (evaluate --batch-size 100000000, inspect and
    video --size 100000). A bound where a person's use has one (a displayed frame, a batch an
    exported program takes); the memory estimate, named, where it depends on the machine."""
    predictions = tmp_path / "predictions.json"
    predictions.write_text(
        json.dumps(
            [
                {
                    "key": f"k{i}",
                    "path": "p/color_0.png",
                    "sequence": "p",
                    "start": 0,
                    "stop": 5,
                    "truth": "a",
                    "prediction": "a",
                    "probability": 1.0,
                }
                for i in range(2000)
            ]
        )
    )
    args = {
        "evaluate --batch-size": [
            "evaluate",
            "--checkpoint",
            small_run,
            "--data",
            small_shards,
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--batch-size",
            "100000000",
        ],
        "train --batch-size": [
            "train",
            "--data",
            small_shards,
            "--run-dir",
            str(tmp_path / "run"),
            *TRAIN,
            "--batch-size",
            "1000000000",
        ],
        "inspect --size": ["inspect", small_shards, "--out", str(tmp_path / "g.png"), "--size", "100000"],
        "inspect --n": ["inspect", small_shards, "--out", str(tmp_path / "g.png"), "--n", "100000"],
        "video --size": [
            "video",
            str(predictions),
            str(tmp_path / "v.mp4"),
            "--data",
            small_shards,
            "--size",
            "100000",
        ],
        "video --sheet-windows": [
            "video",
            str(predictions),
            str(tmp_path / "v.mp4"),
            "--data",
            small_shards,
            "--sheet-windows",
            "1000",
            "--size",
            "2048",
        ],
    }[case]
    code, err = cli(capsys, *args)
    assert code == 2
    line = one_line(err)
    assert case.split()[1] in line, line
    if case in ("train --batch-size", "video --sheet-windows"):
        assert "of memory" in line and "available" in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
    assert sorted(os.listdir(tmp_path)) == ["predictions.json"]


def test_an_empty_split_is_one_line_in_evaluate(shards, small_run, tmp_path, capsys):
    """A manifest whose test split has no windows: a ValueError traceback ("no windows to score")."""
    manifest = json.load(open(os.path.join(shards, "manifest.json")))
    manifest["splits"]["test"] = {"count": 0, "class_counts": {c: 0 for c in manifest["classes"]}, "shards": []}
    write_manifest(shards, manifest)
    code, err = cli(
        capsys,
        "evaluate",
        "--checkpoint",
        small_run,
        "--data",
        shards,
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    )
    assert code == 2 and "no windows" in one_line(err) and "--split" in one_line(err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("log_every", ["1", "50"])
def test_a_diverged_loss_stops_training_before_a_checkpoint(log_every, small_shards, tmp_path, capsys, monkeypatch):
    """A NaN loss trained on and exited 0 without a word. Now the run stops at the next log
    step or checkpoint, naming the step and --lr, and no checkpoint holds the diverged weights
    (with --log-every 50 it is the checkpoint of step 6 that finds it)."""
    import torch.nn.functional as F

    from pyact_torch.training import train

    real, calls = F.cross_entropy, [0]

    def cross_entropy(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls[0] == 5 else loss

    monkeypatch.setattr(train.F, "cross_entropy", cross_entropy)
    run_dir = tmp_path / "run"
    code, err = cli(
        capsys,
        "train",
        "--data",
        small_shards,
        "--run-dir",
        str(run_dir),
        *TRAIN,
        "--log-every",
        log_every,
        "--ckpt-every",
        "3",
    )
    assert code == 2
    line = one_line(err)
    assert f"by step {5 if log_every == '1' else 6}" in line and "--lr" in line, line
    assert json.loads((run_dir / "latest.json").read_text())["step"] == 3
    assert sorted(p.name for p in run_dir.glob("*.pt")) == ["ckpt-3.pt"]
    if log_every == "50":
        return
    # the advice works: the rerun with a lower --lr continues from step 3 at that rate (the saved
    # optimizer and schedule brought the old one back)
    monkeypatch.undo()
    lr = float(TRAIN[TRAIN.index("--lr") + 1]) / 10 if "--lr" in TRAIN else 1e-4
    assert main(["train", "--data", small_shards, "--run-dir", str(run_dir), *TRAIN, "--lr", str(lr)]) == 0
    out = capsys.readouterr().out
    assert "resumed at step 3" in out and f"note: --lr {lr:g} from here on" in out
    final = torch.load(run_dir / "final.pt", weights_only=True)
    assert final["optimizer"]["param_groups"][0]["lr"] == pytest.approx(lr)


@pytest.mark.parametrize("fails", [True, False], ids=["ending on an error", "ending well"])
def test_the_backend_is_told_whether_the_run_ends_on_an_error(fails, small_shards, tmp_path, monkeypatch):
    """A run that ends on an error closes its backend as failed, once: under NCCL that aborts
    the process group, whose clean destroy would wait for collectives a lost peer never ends
    (distributed.DistBackend.close). A run that ends well closes it as finished."""
    import torch.nn.functional as F

    from pyact_torch.training import train

    closes, make_backend = [], train.make_backend

    def recording(*args, **kwargs):
        backend = make_backend(*args, **kwargs)
        close = backend.close
        backend.close = lambda failed=False: (closes.append(failed), close(failed))  # type: ignore[method-assign]
        return backend

    monkeypatch.setattr(train, "make_backend", recording)
    if fails:  # a NaN loss at the first step: the run stops on an error at its first log step
        real = F.cross_entropy
        monkeypatch.setattr(train.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    args = ["train", "--data", small_shards, "--run-dir", str(tmp_path / "run"), *TRAIN, "--log-every", "1"]
    assert main(args) == (2 if fails else 0)
    assert closes == [fails]


@pytest.mark.parametrize("damage", ["invalid JSON", "nested too deeply", "a list", "names a missing file"])
def test_a_damaged_latest_pointer_falls_back_to_the_checkpoints(damage, small_shards, tmp_path, capsys):
    """The README promises a fallback to older checkpoints; a damaged pointer must not end the run."""
    run_dir = tmp_path / "run"
    args = ["train", "--data", small_shards, "--run-dir", str(run_dir), *TRAIN, "--ckpt-every", "3"]
    assert main(args) == 0  # one epoch; then it stands for a run preempted after that epoch
    os.remove(run_dir / "final.pt")
    os.remove(run_dir / "final.json")
    pointer = run_dir / "latest.json"
    good = json.loads(pointer.read_text())
    pointer.write_text(
        {
            "invalid JSON": "{not json",
            "nested too deeply": "[" * 100_000 + "]" * 100_000,  # was a RecursionError traceback
            "a list": "[]",
            "names a missing file": json.dumps({**good, "name": "ckpt-999.pt", "history": []}),
        }[damage]
    )
    capsys.readouterr()
    assert main([*args, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "warning" in out and f"resumed at step {good['step']}" in out
    assert (run_dir / "final.pt").exists()


@pytest.mark.parametrize(
    "damage",
    ["clip shape a list", "classes not names", "model name a list", "no output layer", "a NaN weight", "not a zip"],
)
def test_a_damaged_checkpoint_is_one_line_for_evaluate(damage, small_run, small_shards, tmp_path, capsys):
    """A checkpoint's fields are data: each of these was a traceback (TypeError, IndexError, or
    scikit-learn's ValueError on NaN probabilities) or was read whole before being refused."""
    target = tmp_path / "damaged.pt"
    state = torch.load(os.path.join(small_run, "final.pt"), weights_only=True)
    if damage == "clip shape a list":
        state["data_shape"] = [1, 2]
    elif damage == "classes not names":
        state["classes"] = list(range(len(state["classes"])))
    elif damage == "model name a list":
        state["config"]["model"] = ["tiny"]
    elif damage == "no output layer":  # and the classes in another order, so that they are reordered
        state["classes"] = state["classes"][::-1]
        state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("classifier.")}
    elif damage == "a NaN weight":
        next(v for v in state["model"].values() if v.is_floating_point()).view(-1)[0] = float("nan")
    if damage == "not a zip":  # sparse: a file that is not ours must not be read whole to be refused
        with open(target, "wb") as handle:
            handle.truncate(2 << 30)
    else:
        torch.save(state, target)
    out = tmp_path / "scores"
    code, err = cli(
        capsys, "evaluate", "--checkpoint", str(target), "--data", small_shards, "--out", str(out), "--device", "cpu"
    )
    line = one_line(err)
    assert code == 2 and str(target) in line, err
    expected = {
        "a NaN weight": "NaN or infinite",
        "not a zip": "not a zip archive",
        "no output layer": "no output layer",
    }
    assert expected.get(damage, "malformed") in line
    assert not out.exists()


def test_scoring_falls_back_from_a_damaged_best_to_final(small_run, small_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    best = json.loads((run_dir / "best.json").read_text())
    for damage in (
        json.dumps({**best, "sha256": "0" * 64}),
        json.dumps({k: v for k, v in best.items() if k != "name"}),
        "[" * 100_000 + "]" * 100_000,  # nested too deeply for Python's parser: was a traceback
    ):
        (run_dir / "best.json").write_text(damage)
        state, url = load_checkpoint(str(run_dir), log=lambda m: None)
        assert url.endswith("final.pt")
    (run_dir / "final.pt").write_bytes((run_dir / "final.pt").read_bytes()[:4000])
    state, url = load_checkpoint(str(run_dir), log=lambda m: None)
    assert os.path.basename(url).startswith("ckpt-")
    for name in os.listdir(run_dir):
        if name.endswith(".pt"):
            (run_dir / name).write_bytes(b"junk")
    code, err = cli(
        capsys,
        "evaluate",
        "--checkpoint",
        str(run_dir),
        "--data",
        small_shards,
        "--out",
        str(tmp_path / "s"),
        "--device",
        "cpu",
    )
    assert code == 2 and "an intact checkpoint" in one_line(err)


@pytest.mark.parametrize(
    "flag",
    [
        ("--lr", "nan"),
        ("--lr", "inf"),
        ("--lr", "-1"),
        ("--epochs", "0"),
        ("--dropout", "1"),
        ("--dropout", "-0.1"),
        ("--weight-decay", "nan"),
        ("--weight-decay", "2"),
        ("--model", "c3d-v1"),
    ],
)  # 16x16 frames: c3d-v1 pools 5 times
def test_absurd_training_flags_are_refused_before_work(flag, small_shards, tmp_path, capsys):
    code, err = cli(capsys, "train", "--data", small_shards, "--run-dir", str(tmp_path / "run"), *TRAIN, *flag)
    assert code == 2 and flag[0] in one_line(err)
    assert not (tmp_path / "run").exists()


def test_data_without_an_eval_split_trains_without_validation(shards, tmp_path, capsys):
    manifest = read_manifest(shards).document
    del manifest["splits"]["eval"]
    write_manifest(shards, manifest)
    assert main(["train", "--data", shards, "--run-dir", str(tmp_path / "run"), *TRAIN]) == 0
    assert "no eval split" in capsys.readouterr().out
    assert (tmp_path / "run" / "final.pt").exists() and not (tmp_path / "run" / "best.json").exists()


def test_an_image_size_the_model_cannot_take_is_refused_before_work(tiny_dataset, shards, tmp_path, capsys):
    code, err = cli(capsys, "preprocess", tiny_dataset, str(tmp_path / "out"), "--image-size", "40")
    assert code == 2 and "--image-size" in one_line(err)
    assert not (tmp_path / "out").exists()
    manifest = read_manifest(shards).document
    manifest["image_size"] = 40  # e.g. a conversion of other data
    write_manifest(shards, manifest)
    code, err = cli(capsys, "train", "--data", shards, "--run-dir", str(tmp_path / "run"), *TRAIN)
    assert code == 2 and "multiple of 16" in one_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_lone_reader_with_more_workers_than_shards_uses_fewer(small_shards, tmp_path, capsys):
    """It was refused ("lower --workers") although one reader reads every shard. The refusal
    stays where replicas or hosts outnumber shards (tests/training/test_spmd.py)."""
    manifest = read_manifest(small_shards).document
    shards_count, windows = len(manifest["splits"]["train"]["shards"]), manifest["splits"]["train"]["count"]
    code = main(
        [
            "train",
            "--data",
            small_shards,
            "--run-dir",
            str(tmp_path / "run"),
            *TRAIN[:-4],
            "--batch-size",
            "4",
            "--workers",
            str(shards_count + 3),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"note: {shards_count} loader workers instead of --workers {shards_count + 3}" in out
    assert f"{windows // 4} steps of 4 windows" in out  # every window of the epoch (but a last partial batch)


@pytest.mark.parametrize("case", ["seq-len 1", "seq-len beyond every sequence", "empty Test split", "duplicate keys"])
def test_preprocessing_checks_before_decoding(case, tiny_dataset, tmp_path, capsys, monkeypatch):
    extra: list[str] = []
    if case == "seq-len 1":
        extra = ["--seq-len", "1"]
    elif case == "seq-len beyond every sequence":
        extra = ["--seq-len", "40"]
    elif case == "empty Test split":
        for name in os.listdir(os.path.join(tiny_dataset, "Test", "test00")):
            if name.endswith(".xml"):
                os.remove(os.path.join(tiny_dataset, "Test", "test00", name))
        extra = ["--skip-bad-sequences"]
    else:
        shutil.copytree(os.path.join(tiny_dataset, "Train", "train00"), os.path.join(tiny_dataset, "Train", "a.b"))
        shutil.copytree(os.path.join(tiny_dataset, "Train", "train00"), os.path.join(tiny_dataset, "Train", "a_b"))
        extra = ["--eval-subjects", "train01"]
    decoded = []
    monkeypatch.setattr(preprocess_module, "decode_into_cache", lambda *a, **k: decoded.append(1) or iter(()))
    dest = tmp_path / "out"
    code, err = cli(capsys, "preprocess", tiny_dataset, str(dest), "--workers", "1", *extra)
    assert code == 2
    one_line(err)
    assert not decoded
    assert not dest.exists() or not os.listdir(dest)  # nothing that would make the fixed rerun refuse


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", ["invalid bucket name", "endpoint unreachable", "endpoint silent", "missing bucket as --data"]
)
def test_gcs_failures_are_one_line_and_fast(case, small_shards, tmp_path, gcs):
    """ "endpoint silent" accepts connections and never answers: each request waited the
    library's own 60 s while the message said "gave up after 5 s"."""
    import socket

    env = dict(os.environ, PYACT_GCS_TIMEOUT="3")
    data = {
        "invalid bucket name": "gs://Bad_Bucket!!/x",
        "endpoint unreachable": "gs://pyact-test/x",
        "endpoint silent": "gs://pyact-test/x",
        "missing bucket as --data": "gs://no-such-bucket/shards",
    }[case]
    silent = socket.create_server(("127.0.0.1", 0), backlog=64)  # the kernel completes connections; no answer
    if case == "endpoint unreachable":
        env["STORAGE_EMULATOR_HOST"] = "http://127.0.0.1:9"  # nothing listens there
    if case == "endpoint silent":
        env["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{silent.getsockname()[1]}"
    started = time.monotonic()
    with silent:
        result = run("train", "--data", data, "--run-dir", str(tmp_path / "run"), *TRAIN, env=env, timeout=120)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert {
        "invalid bucket name": "not a valid bucket name",
        "endpoint unreachable": "cannot reach",
        "endpoint silent": "cannot reach",
        "missing bucket as --data": "bucket does not exist",
    }[case] in line
    if "gave up after" in line:  # the time said is the time taken, and within twice the deadline
        assert int(line.split("gave up after ")[1].split(" s")[0]) <= 6, line
    assert time.monotonic() - started < 50


@pytest.mark.parametrize("case", ["a folder", "under a file", "the manifest", "not a png"])
def test_inspect_checks_its_output_before_reading_shards(case, shards, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = {
        "a folder": str(tmp_path),
        "under a file": str(blocker / "grid.png"),
        "the manifest": os.path.join(shards, "manifest.json"),
        "not a png": str(tmp_path / "grid.txt"),
    }[case]
    before = open(os.path.join(shards, "manifest.json"), "rb").read()
    read = []
    monkeypatch.setattr("pyact_torch.data.inspection.stream_samples", lambda *a, **k: read.append(1) or iter(()))
    code, err = cli(capsys, "inspect", shards, "--out", out)
    assert code == 2 and one_line(err)
    assert not read
    assert open(os.path.join(shards, "manifest.json"), "rb").read() == before


@pytest.mark.parametrize("command", ["synth", "preprocess", "inspect", "train", "evaluate", "video"])
def test_a_read_only_output_folder_is_one_line_before_work(
    command, tiny_dataset, small_shards, small_run, tmp_path, capsys, monkeypatch
):
    locked = tmp_path / "locked"
    locked.mkdir()
    rows = [
        {
            "key": "k",
            "path": "Test/test00/asl-z/color_0.png",
            "sequence": "Test/test00/asl-z",
            "start": 0,
            "stop": 0,
            "truth": "a",
            "prediction": "a",
        }
    ]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    args = {
        "synth": ["synth", str(locked / "raw")],
        "preprocess": ["preprocess", tiny_dataset, str(locked / "out"), "--workers", "1"],
        "inspect": ["inspect", small_shards, "--out", str(locked / "grid.png")],
        "train": ["train", "--data", small_shards, "--run-dir", str(locked / "run"), *TRAIN],
        "evaluate": [
            "evaluate",
            "--checkpoint",
            small_run,
            "--data",
            small_shards,
            "--out",
            str(locked / "s"),
            "--device",
            "cpu",
        ],
        "video": ["video", str(tmp_path / "p.json"), str(locked / "v.mp4"), "--src", tiny_dataset],
    }[command]
    decoded = []
    monkeypatch.setattr(preprocess_module, "decode_into_cache", lambda *a, **k: decoded.append(1) or iter(()))
    with read_only(locked):
        code, err = cli(capsys, *args)
    assert code == 2 and "not writable" in one_line(err) and str(locked) in err
    assert not decoded and os.listdir(locked) == []


def test_video_into_an_unwritable_place_is_named_before_work(small_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rows = [
        {
            "key": "k",
            "path": "Test/x/y/color_0.png",
            "sequence": "Test/x/y",
            "start": 0,
            "stop": 0,
            "truth": "a",
            "prediction": "a",
        }
    ]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    code, err = cli(capsys, "video", str(tmp_path / "p.json"), str(blocker / "v.mp4"), "--src", str(tmp_path))
    assert code == 2 and "not writable" in one_line(err) and "codec" not in err


@pytest.mark.slow
def test_export_from_another_folder_finds_the_recorded_data(small_shards, tmp_path, capsys, monkeypatch):
    """The checkpoint recorded --data as typed ("shards"): export from another folder said
    "shards/manifest.json: no manifest" without suggesting --data. Local paths are recorded
    absolute now; a recorded path that is gone names the flags that replace it."""
    shutil.copytree(small_shards, tmp_path / "shards")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", "shards", "--run-dir", "run", *TRAIN]) == 0
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert recorded["data"] == str(tmp_path / "shards") and recorded["run_dir"] == str(tmp_path / "run")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    assert main(["export", "--checkpoint", "../run", "--out", "model.pt2", "--windows", "2"]) == 0
    os.rename(tmp_path / "shards", tmp_path / "moved")
    code, err = cli(capsys, "export", "--checkpoint", "../run", "--out", "again.pt2", "--windows", "2")
    assert code == 2 and "--data" in one_line(err) and "not there any more" in one_line(err)


def test_data_of_another_shape_names_the_flag_to_preprocess_with(small_run, learn_shards, tmp_path, capsys):
    """It printed both shape dicts but not the --image-size to preprocess with."""
    code, err = cli(
        capsys,
        "evaluate",
        "--checkpoint",
        small_run,
        "--data",
        learn_shards,
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
    )
    assert code == 2
    line = one_line(err)
    assert "--image-size 16 (this data: 32)" in line and "preprocess with --image-size 16" in line, line


def test_a_video_suffix_opencv_cannot_write_is_refused_before_work(small_shards, tmp_path, capsys):
    """`pyact video … out.gif` blamed a full disk after reading every window."""
    (tmp_path / "p.json").write_text("[]")
    code, err = cli(capsys, "video", str(tmp_path / "p.json"), str(tmp_path / "out.gif"), "--data", small_shards)
    assert code == 2
    line = one_line(err)
    assert "out.gif" in line and ".mp4" in line and ".avi" in line and "disk" not in line, line


@pytest.mark.parametrize("folder", ["Test", "Test/test00"])
def test_detect_on_a_split_or_subject_folder_points_to_split(folder, tiny_dataset, small_run, tmp_path, capsys):
    """It said "not a sequence folder" without saying how to run over a split."""
    code, err = cli(
        capsys,
        "detect",
        "--checkpoint",
        small_run,
        "--src",
        os.path.join(tiny_dataset, folder),
        "--out",
        str(tmp_path / "det"),
    )
    assert code == 2
    assert f"--src {tiny_dataset} --split test" in one_line(err)


# --- convert-keras and convert-tfrecords: output locations are checked before any input is read ---


def test_keras_output_under_a_file_fails_before_reading(tmp_path, capsys):
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"not an hdf5 file: reading it would be the first error")
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert main(["convert-keras", str(h5), str(blocker / "out.pt")]) == 2
    line = one_error_line(capsys, str(blocker))
    assert str(h5) not in line


def test_keras_output_that_is_a_folder_fails_before_reading(tmp_path, capsys):
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"not an hdf5 file: reading it would be the first error")
    out = tmp_path / "checkpoints"
    out.mkdir()
    assert main(["convert-keras", str(h5), str(out)]) == 2
    line = one_error_line(capsys, str(out))
    assert str(h5) not in line and os.listdir(out) == []


def test_tfrecords_dest_under_a_file_fails_before_reading(tmp_path, capsys):
    path = write_records(tmp_path / "records", pyact_records(np.random.default_rng(3), 4), corrupt_at=0)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    assert main(["convert-tfrecords", str(tmp_path / "records"), str(blocker / "shards")]) == 2
    line = one_error_line(capsys, str(blocker))
    assert path not in line


def test_read_only_outputs_fail_before_reading(tmp_path, capsys):
    h5 = tmp_path / "model.h5"
    h5.write_bytes(b"not an hdf5 file")
    write_records(tmp_path / "records", pyact_records(np.random.default_rng(3), 4), corrupt_at=0)
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        assert main(["convert-keras", str(h5), str(locked / "out.pt")]) == 2
        one_error_line(capsys, str(locked))
        assert main(["convert-tfrecords", str(tmp_path / "records"), str(locked / "shards")]) == 2
        one_error_line(capsys, str(locked))


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["preprocess", "{src}", "{out}", "--seq-len", "1"],
            "--seq-len must be 0 (from the label files) or at least 2, got 1",
        ),
        (["preprocess", "{src}", "{out}", "--workers", "-1"], "--workers must be 0 (all cores) or positive, got -1"),
        (
            ["detect", "--checkpoint", "{src}", "--src", "{src}", "--out", "{out}", "--smooth", "2"],
            "--smooth must be odd and at most 999, got 2",
        ),
        (["video", "{src}/p.json", "{out}.mp4", "--fps", "0"], "--fps must be positive and at most 240, got 0"),
    ],
)
def test_a_range_error_names_only_the_flag_at_fault(args, expected, tmp_path, capsys):
    """These once named a second flag the user had not given ("--smooth must be odd ...,
    --min-length at most 100000")."""
    filled = [a.format(src=tmp_path, out=tmp_path / "out") for a in args]
    code, err = cli(capsys, *filled)
    assert code == 2 and one_line(err) == f"error: {expected}"


def test_a_run_started_over_never_falls_back_to_the_run_before(small_shards, tmp_path, capsys):
    """``--resume none`` starts another run in the same run dir, whose files at higher steps
    stay. With every checkpoint of the new run damaged, a resume is refused: before, the
    pointer's history still listed the old run's checkpoints and the resume went on from the
    abandoned run's newest one, saying only "using the older checkpoint"."""
    run_dir = tmp_path / "run"
    base = ["train", "--data", small_shards, "--run-dir", str(run_dir), *TRAIN, "--ckpt-every", "2"]
    assert main([*base, "--epochs", "3"]) == 0  # the run abandoned below
    old = {p.name for p in run_dir.glob("ckpt-*.pt")}
    assert main([*base, "--resume", "none"]) == 0
    latest = json.loads((run_dir / "latest.json").read_text())
    runs = {entry["run"] for entry in latest["history"]}
    assert len(runs) == 1 and latest["run"] in runs  # only the new run's checkpoints are listed
    newest_old = max(int(name[5:-3]) for name in old)
    assert newest_old > latest["step"] and (run_dir / f"ckpt-{newest_old}.pt").exists()  # the old run's, kept
    for entry in latest["history"]:
        (run_dir / entry["name"]).write_bytes(b"damaged")
    capsys.readouterr()
    assert main([*base, "--epochs", "3"]) == 2
    captured = capsys.readouterr()
    assert f"cannot use checkpoint ckpt-{newest_old}.pt: it is of a run started over since" in captured.out
    assert "no intact checkpoint left to resume from" in one_line(captured.err)
