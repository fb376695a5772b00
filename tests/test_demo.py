"""The demo end to end. ``check_demo_output`` is also what docker/ci.sh runs on the demo made
inside the container image."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch

from pyact_torch.cli import main


def _frames(path: str) -> int:
    capture = cv2.VideoCapture(path)
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count


def check_demo_output(out: str) -> dict:
    """The demo's outputs exist, decode and agree with each other; test accuracy >= 0.8."""
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    rows = json.load(open(os.path.join(out, "predictions.json")))
    assert metrics["windows"] == len(rows) > 100
    assert metrics["accuracy"] == np.mean([r["truth"] == r["prediction"] for r in rows])
    assert metrics["accuracy"] >= 0.8, metrics["accuracy"]
    seq_len = rows[0]["stop"] - rows[0]["start"] + 1
    video = next(os.path.join(out, f) for f in os.listdir(out) if f.startswith("predictions.") and
                 f.endswith((".mp4", ".avi")))
    assert _frames(video) == len(rows) * seq_len
    for png in ("confusion_matrix.png", "loss.png", os.path.splitext(os.path.basename(video))[0] + "-sheet.png"):
        image = cv2.imread(os.path.join(out, png))
        assert image is not None and image.size > 0, png
    # the run's checkpoints: in DIR/run, or in the emulator's files under DIR/gcs
    final = [os.path.join(folder, f) for folder, _, files in os.walk(out) for f in files if f.endswith("final.pt")]
    assert final, "no final.pt among the demo's outputs"
    state = torch.load(final[0], weights_only=True)
    assert state["classes"][-1] == "no-action" and state["config"]["model"] == "tiny"
    detection = json.load(open(os.path.join(out, "detection", "metrics.json")))["detection"]
    found = json.load(open(os.path.join(out, "detection", "detections.json")))["sequences"]
    assert detection["sequences"] == len(found) > 10
    assert detection["segments"]["0.5"]["f1"] >= 0.7, detection["segments"]["0.5"]
    assert _frames(os.path.join(out, "detection", "detections.mp4")) == detection["frames"] == sum(s["frames"] for s in found)
    return metrics


@pytest.mark.slow
def test_demo_with_the_gcs_emulator(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--gcs-emulator"]) == 0
    metrics = check_demo_output(out)
    printed = capsys.readouterr().out
    assert f"test accuracy {metrics['accuracy']:.3f}" in printed
    assert "gs://pyact-demo/run" in printed and "gs://pyact-demo/shards" in printed
    assert not os.path.exists(os.path.join(out, "shards"))  # they went to the bucket


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    precious = tmp_path / "precious.txt"
    precious.write_text("keep me")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not an earlier demo's output" in capsys.readouterr().err
    assert precious.read_text() == "keep me"
