"""Scoring, the prediction video and shard inspection."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from pyact_torch import storage
from pyact_torch.cli import main
from pyact_torch.metrics import score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metrics_against_a_hand_computed_confusion_matrix():
    classes = ["a", "b", "c", "d"]  # d never occurs
    truth = [0, 0, 1, 2, 2, 2]
    # predictions a, b, b, c, c, a; the last row ranks its true class c last (outside the top 3)
    probabilities = [[.7, .2, .1, 0], [.4, .5, .1, 0], [.1, .8, .1, 0], [.1, .1, .8, 0], [.2, .1, .7, 0],
                     [.5, .3, 0, .2]]
    result = score(np.array(truth), np.array(probabilities), classes)
    assert result["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["micro_f1"] == pytest.approx(4 / 6)
    # per class: a P=1/2 R=1/2 F=1/2; b P=1/2 R=1 F=2/3; c P=1 R=2/3 F=4/5
    rows = {r["class"]: r for r in result["per_class"]}
    assert (rows["a"]["precision"], rows["a"]["recall"], rows["a"]["f1"]) == pytest.approx((.5, .5, .5))
    assert (rows["b"]["precision"], rows["b"]["recall"], rows["b"]["f1"]) == pytest.approx((.5, 1, 2 / 3))
    assert (rows["c"]["precision"], rows["c"]["recall"], rows["c"]["f1"]) == pytest.approx((1, 2 / 3, .8))
    assert [rows[c]["support"] for c in classes] == [2, 1, 3, 0]
    assert result["macro_f1"] == pytest.approx((.5 + 2 / 3 + .8) / 3)  # over the classes that occur
    assert result["mean_class_accuracy"] == pytest.approx((.5 + 1 + 2 / 3) / 3)
    assert result["top3_accuracy"] == pytest.approx(5 / 6)


@pytest.fixture(scope="module")
def trained_run(learn_shards, tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("scored") / "run")
    assert main(["train", "--data", learn_shards, "--run-dir", run_dir, "--model", "tiny", "--device", "cpu",
                 "--epochs", "2", "--log-every", "1000", "--workers", "0"]) == 0
    return run_dir


@pytest.fixture(scope="module")
def scored(trained_run, learn_shards, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("scored") / "score")
    assert main(["evaluate", "--checkpoint", trained_run, "--data", learn_shards, "--out", out,
                 "--device", "cpu"]) == 0
    return out


@pytest.mark.slow
def test_scoring_outputs_agree_with_each_other_and_the_manifest(scored, learn_shards, trained_run):
    metrics = json.load(open(os.path.join(scored, "metrics.json")))
    rows = json.load(open(os.path.join(scored, "predictions.json")))
    manifest = json.load(open(os.path.join(learn_shards, "manifest.json")))
    index = json.load(open(os.path.join(learn_shards, "test", "index.json")))
    assert len(rows) == metrics["windows"] == manifest["splits"]["test"]["count"]
    assert sorted(r["key"] for r in rows) == sorted(w["key"] for w in index)  # every window exactly once
    truth_of = {w["key"]: w["class"] for w in index}
    assert all(r["truth"] == truth_of[r["key"]] for r in rows)
    assert metrics["accuracy"] == pytest.approx(np.mean([r["truth"] == r["prediction"] for r in rows]))
    assert metrics["accuracy"] > 1 / len(manifest["classes"])
    confusion = np.array(metrics["confusion"])
    assert confusion.sum() == len(rows)
    assert confusion.diagonal().sum() == sum(r["truth"] == r["prediction"] for r in rows)
    assert all(0 < r["probability"] <= 1 and r["path"] == f"{r['sequence']}/color_{r['start']}.png"
               and r["stop"] - r["start"] + 1 == manifest["seq_len"] for r in rows)
    best = json.load(open(os.path.join(trained_run, "best.json")))
    assert metrics["checkpoint"].endswith(best["name"])
    table = open(os.path.join(scored, "per_class.txt")).read()
    assert all(name in table for name in manifest["classes"])
    image = cv2.imread(os.path.join(scored, "confusion_matrix.png"))
    assert image is not None and min(image.shape[:2]) >= 500


@pytest.mark.slow
def test_scoring_on_xla_and_through_gcs_gives_the_same_predictions(scored, trained_run, learn_shards, gcs):
    pointer = json.load(open(os.path.join(trained_run, "best.json")))
    storage.write_bytes("gs://pyact-test/scoring/ckpt.pt", open(os.path.join(trained_run, pointer["name"]), "rb").read())
    env = dict(os.environ, PJRT_DEVICE="CPU")
    out = "gs://pyact-test/scoring/out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "evaluate.py"), "--checkpoint",
                             "gs://pyact-test/scoring/ckpt.pt", "--data", learn_shards, "--out", out,
                             "--device", "xla"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    eager = json.load(open(os.path.join(scored, "predictions.json")))
    xla = storage.read_json(f"{out}/predictions.json")
    assert [r["key"] for r in xla] == [r["key"] for r in eager]
    agree = np.mean([a["prediction"] == b["prediction"] for a, b in zip(xla, eager)])
    assert agree >= 0.99, agree
    assert max(abs(a["probability"] - b["probability"]) for a, b in zip(xla, eager)
               if a["prediction"] == b["prediction"]) < 1e-3


def _read_video(path):
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


def _banner_colours(frame):
    """Which of green and red text the frame's banner holds."""
    banner = frame[:40].astype(int)
    b, g, r = banner[..., 0], banner[..., 1], banner[..., 2]
    return {"green": bool(((g > 120) & (r < 80) & (b < 80)).sum() > 20),
            "red": bool(((r > 150) & (g < 80) & (b < 80)).sum() > 20)}


@pytest.mark.slow
@pytest.mark.parametrize("source", ["src", "shards"])
def test_video_has_every_window_frame_and_coloured_verdicts(scored, learn_shards, tmp_path, source):
    rows = json.load(open(os.path.join(scored, "predictions.json")))[:8]
    rows[0]["prediction"] = rows[0]["truth"]
    rows[1]["prediction"] = next(c for c in ("asl-z", "asl-j") if c != rows[1]["truth"])
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(rows))
    out = str(tmp_path / "video.mp4")
    flag = ["--src", os.path.join(os.path.dirname(learn_shards), "raw")] if source == "src" else ["--data", learn_shards]
    assert main(["video", str(predictions), out, "--size", "128", "--sheet-windows", "4", *flag]) == 0
    written = out if os.path.exists(out) else out[:-4] + ".avi"
    frames = _read_video(written)
    seq_len = rows[0]["stop"] - rows[0]["start"] + 1
    assert len(frames) == len(rows) * seq_len
    assert frames[0].shape[1] == 128 and frames[0].shape[0] > 128
    assert _banner_colours(frames[0]) == {"green": True, "red": False}
    assert _banner_colours(frames[seq_len]) == {"green": False, "red": True}
    sheet = cv2.imread(written[:-4] + "-sheet.png")
    assert sheet is not None and sheet.shape[1] >= seq_len * 128
    assert not [f for f in os.listdir(tmp_path) if "partial" in f]


def test_inspect_passes_good_shards_and_names_a_damaged_one(learn_shards, tmp_path, capsys):
    out = str(tmp_path / "grid.png")
    assert main(["inspect", learn_shards, "--split", "eval", "--n", "5", "--out", out]) == 0
    manifest = json.load(open(os.path.join(learn_shards, "manifest.json")))
    printed = capsys.readouterr().out
    for name, count in manifest["splits"]["eval"]["class_counts"].items():
        assert any(line.split() == [name, str(count)] for line in printed.splitlines())
    grid = cv2.imread(out)
    assert grid is not None and grid.shape[0] > 5 * 96  # five rows of 96-pixel frames with banners

    import shutil

    damaged = str(tmp_path / "shards")
    shutil.copytree(learn_shards, damaged)
    victim = manifest["splits"]["eval"]["shards"][1]["name"]
    with open(os.path.join(damaged, victim), "r+b") as handle:
        handle.seek(3000)
        byte = handle.read(1)
        handle.seek(3000)
        handle.write(bytes([byte[0] ^ 0xFF]))
    assert main(["inspect", damaged, "--split", "eval", "--out", out]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and victim in error[0] and "sha256" in error[0]

    shutil.copy(os.path.join(learn_shards, victim), os.path.join(damaged, victim))
    os.truncate(os.path.join(damaged, victim), 3000)  # an interrupted copy: cut inside a member
    assert main(["inspect", damaged, "--split", "eval", "--out", out]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"{victim}: unreadable" in error[0] and "truncated" in error[0]


@pytest.mark.parametrize("case", ["no-checkpoint", "no-split", "bad-predictions", "missing-predictions",
                                  "no-frames-source"])
@pytest.mark.slow
def test_bad_scoring_input(case, learn_shards, trained_run, scored, tmp_path, capsys):
    bad = tmp_path / "predictions.json"
    bad.write_text("[1, 2")
    argv = {
        "no-checkpoint": ["evaluate", "--checkpoint", str(tmp_path / "nothing"), "--data", learn_shards,
                          "--out", str(tmp_path / "o"), "--device", "cpu"],
        "no-split": ["evaluate", "--checkpoint", trained_run, "--data", str(tmp_path), "--out", str(tmp_path / "o"),
                     "--device", "cpu"],
        "bad-predictions": ["video", str(bad), str(tmp_path / "v.mp4"), "--data", learn_shards],
        "missing-predictions": ["video", str(tmp_path / "missing.json"), str(tmp_path / "v.mp4"), "--data",
                                learn_shards],
        "no-frames-source": ["video", os.path.join(scored, "predictions.json"), str(tmp_path / "v.mp4")],
    }[case]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")
    assert not (tmp_path / "o" / "metrics.json").exists() and not (tmp_path / "v.mp4").exists()
