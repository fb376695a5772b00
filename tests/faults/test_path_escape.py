"""Faults of the class "path escape: names read from files are data" (docs/faults.md): a name
read from a pointer, a checkpoint history, a manifest or a predictions file, or given as an
empty or non-gs:// location, never reaches anything outside the place it belongs to (no read,
no deletion, no command run). Cases that could hang run in a subprocess with a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pyact_torch.training.checkpoint import CheckpointWriter
from pyact_torch.cli import main
from pyact_torch.data.shards import read_manifest

from helpers import tree_bytes
from faults_common import TRAIN, one_line, cli, run, write_manifest, _state, one_error_line


@pytest.mark.parametrize("name", ["/abs/victim.txt", "../../x/victim.txt", "ckpt-1.pt/../../victim.txt"])
def test_retention_never_deletes_what_a_history_names_outside_the_run(name, tmp_path):
    run_dir = tmp_path / "runs" / "run"
    victim = tmp_path / "x" / "victim.txt"
    victim.parent.mkdir(parents=True)
    victim.write_text("precious")
    target = name if name.startswith("/") else name
    if name.startswith("/"):
        target = str(victim)
    writer = CheckpointWriter(str(run_dir), keep=1, log=lambda m: None)
    writer.save(_state(1), 1, 0)
    writer.close()
    pointer = json.load(open(run_dir / "latest.json"))
    pointer["history"].insert(0, {**pointer["history"][0], "name": target})
    (run_dir / "latest.json").write_text(json.dumps(pointer))
    writer = CheckpointWriter(str(run_dir), keep=1, log=lambda m: None)
    writer.save(_state(2), 2, 0)
    writer.save(_state(3), 3, 0)
    writer.close()
    assert victim.read_text() == "precious"
    # negative control: retention does delete the run's own expired checkpoints
    assert not (run_dir / "ckpt-1.pt").exists() and not (run_dir / "ckpt-2.pt").exists()
    assert (run_dir / "ckpt-3.pt").exists()


@pytest.mark.parametrize("target", ["/etc/passwd", "/dev/zero", "fifo", "../outside.pt"])
def test_a_pointer_naming_anything_but_our_checkpoint_is_ignored(target, small_run, tmp_path):
    """best.json naming a system file, an endless device, a FIFO or a file outside the run:
    never read (no hang, no memory blow-up); scoring falls back to final.pt."""
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    record = json.load(open(run_dir / "best.json"))
    if target == "fifo":
        os.remove(run_dir / record["name"])
        os.mkfifo(run_dir / record["name"])  # a valid name, but no regular file
    else:
        record["name"] = target
        (run_dir / "best.json").write_text(json.dumps(record))
    code = (
        "import sys; from pyact_torch.training.checkpoint import load_checkpoint; "
        "state, url = load_checkpoint(sys.argv[1]); print(url)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("final.pt")
    assert "warning" in result.stdout


@pytest.mark.parametrize(
    "name", ["/abs/victim.tar", "../../victim.tar", "/dev/zero", "pipe:touch {marker}; cat {real}"]
)
@pytest.mark.slow
@pytest.mark.parametrize("command", ["inspect", "evaluate", "train", "video"])
def test_shard_names_in_a_manifest_are_never_opened_outside_dest(name, command, shards, small_run, tmp_path):
    marker = tmp_path / "pwned"
    manifest = read_manifest(shards).document
    split = {"inspect": "train", "train": "train"}.get(command, "test")
    real = os.path.join(shards, manifest["splits"][split]["shards"][0]["name"])
    manifest["splits"][split]["shards"][0]["name"] = name.format(marker=marker, real=real)
    write_manifest(shards, manifest)
    predictions = tmp_path / "predictions.json"
    predictions.write_text(
        json.dumps(
            [
                {
                    "key": "k/a/000005",
                    "path": "Test/x/asl-z/color_0.png",
                    "sequence": "Test/x/asl-z",
                    "start": 0,
                    "stop": 5,
                    "truth": "asl-z",
                    "prediction": "asl-z",
                }
            ]
        )
    )
    args = {
        "inspect": ["inspect", shards, "--out", str(tmp_path / "grid.png"), "--split", split],
        "evaluate": [
            "evaluate",
            "--checkpoint",
            small_run,
            "--data",
            shards,
            "--out",
            str(tmp_path / "scores"),
            "--device",
            "cpu",
        ],
        "train": ["train", "--data", shards, "--run-dir", str(tmp_path / "r"), *TRAIN],
        "video": ["video", str(predictions), str(tmp_path / "v.mp4"), "--data", shards],
    }[command]
    result = run(*args, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "not a name this project writes" in one_line(result.stderr)
    assert not marker.exists()


def test_empty_or_scheme_locations_are_refused(capsys, tmp_path):
    """An unset shell variable gives an empty flag; a URL scheme other than gs:// is never ours."""
    marker = tmp_path / "pwned"
    for args, flag, why in (
        (["train", "--data", "", "--run-dir", str(tmp_path / "r")], "--data", "empty"),
        (["train", "--data", f"pipe:touch {marker}", "--run-dir", str(tmp_path / "r")], "--data", "only local"),
        (
            ["evaluate", "--checkpoint", "x", "--data", "http://example.invalid/d", "--out", str(tmp_path)],
            "--data",
            "only local",
        ),
        (["preprocess", str(tmp_path), ""], "DEST", "empty"),
        (["inspect", "", "--out", str(tmp_path / "g.png")], "DEST", "empty"),
    ):
        code, err = cli(capsys, *args)
        line = one_line(err)
        assert code == 2 and line.startswith(f"error: {flag}") and why in line, line
    assert not marker.exists()


@pytest.mark.parametrize(
    "sequence", ["../outside", "/etc", "Test/../../outside", "Test/x/../../../outside", "Test/a\u0000b/asl-z"]
)
def test_video_never_reads_frames_outside_src(sequence, tiny_dataset, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(os.path.join(tiny_dataset, "Test/test00/asl-z/color_0.png"), outside / "color_0.png")
    rows = [
        {
            "key": "k",
            "path": "Test/x/y/color_0.png",
            "sequence": sequence,
            "start": 0,
            "stop": 0,
            "truth": "asl-z",
            "prediction": "asl-z",
        }
    ]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    code, err = cli(capsys, "video", str(tmp_path / "p.json"), str(tmp_path / "v.mp4"), "--src", tiny_dataset)
    assert code == 2 and "not a name this project writes" in one_line(err)
    assert not (tmp_path / "v.mp4").exists()
    # negative control: a sequence inside SRC is read
    rows[0]["sequence"] = "Test/test00/asl-z"
    (tmp_path / "p.json").write_text(json.dumps(rows))
    assert main(["video", str(tmp_path / "p.json"), str(tmp_path / "v.mp4"), "--src", tiny_dataset]) == 0


# --- convert-tfrecords: re-conversion into an existing DEST -----------------------------------


@pytest.mark.parametrize("case", ["absolute", "parent", "other split", "not a string"])
def test_manifest_shard_names_are_not_paths(case, converted, tmp_path, capsys):
    dest, _ = converted
    victim = tmp_path / "x" / "victim"
    victim.parent.mkdir()
    victim.write_text("not ours")
    name = {"absolute": str(victim), "parent": "../../x/victim", "other split": str(victim), "not a string": 7}[case]
    manifest_path = dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    split = "test" if case == "other split" else "train"
    entry = manifest["splits"].setdefault(split, {"count": 0, "class_counts": {}, "shards": []})
    entry["shards"].append({"name": name, "count": 1, "bytes": 8, "sha256": "0" * 64})
    manifest_path.write_text(json.dumps(manifest))
    before = tree_bytes(dest)
    assert main(["convert-tfrecords", str(tmp_path / "first"), str(dest), "--shard-size", "8"]) == 2
    one_error_line(capsys, str(manifest_path))
    assert victim.read_text() == "not ours"
    assert tree_bytes(dest) == before
