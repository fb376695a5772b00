"""Helpers the test modules share (and what CI runs on a demo's outputs): files as bytes, a
read-only folder, the demo's checks, TensorBoard's own reading of a run, and pyACT's file
formats (Keras HDF5, TFRecord framing) built independently of the code under test."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from contextlib import contextmanager

import cv2
import h5py
import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


@contextmanager
def read_only(folder):
    """``folder`` made read-only for this process: a read-only bind mount when running as root
    (root ignores mode bits), else mode 0o555."""
    folder = str(folder)
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            yield
        finally:
            os.chmod(folder, 0o755)
        return
    if subprocess.run(["mount", "--bind", folder, folder], capture_output=True).returncode:
        pytest.skip("cannot bind-mount here to make a read-only folder for root")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", "-l", folder], capture_output=True)


def tree_bytes(folder) -> dict[str, bytes]:
    """Every file below ``folder`` with its bytes, by path relative to it."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            files[os.path.relpath(path, folder)] = open(path, "rb").read()
    return files


def count_frames(root: str, kind: str = "color") -> int:
    return sum(1 for _, _, files in os.walk(root) for f in files if f.startswith(kind + "_"))


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
    video = next(
        os.path.join(out, f) for f in os.listdir(out) if f.startswith("predictions.") and f.endswith((".mp4", ".avi"))
    )
    # each frame of every test sequence once (before: each window's frames, 6x as many)
    assert _frames(video) == len({(r["sequence"], f) for r in rows for f in range(r["start"], r["stop"] + 1)})
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
    # the 10 TestDetection recordings, several actions each
    assert detection["sequences"] == len(found) == 10 and all(s["name"].startswith("TestDetection/") for s in found)
    # the demo's training (--augment standard), seeds 1-6: F1 0.719-0.942, mAP 0.763-0.982 here
    # (docs/benchmarks.md); without augmentation mAP fell to 0.598
    assert detection["segments"]["0.5"]["f1"] >= 0.55, detection["segments"]["0.5"]
    assert detection["mAP"]["thresholds"]["0.5"]["mAP"] >= 0.6, detection["mAP"]
    assert (
        _frames(os.path.join(out, "detection", "detections.mp4"))
        == detection["frames"]
        == sum(s["frames"] for s in found)
    )
    return metrics


def scalars(folder: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar as TensorBoard itself reads the folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(folder)
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


FILTERS, DENSE = (64, 128, 256, 512), (4096, 128)


def keras_weights(rng, channels=3, seq_len=6, size=32, classes=17) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """pyACT's ConvNet3D layer list with random weights in Keras layouts."""
    layers, cin = [], channels
    for i, width in enumerate(FILTERS, 1):
        kernel = rng.normal(0, np.sqrt(2 / (27 * cin)), (3, 3, 3, cin, width)).astype(np.float32)
        layers.append((f"CONV3D_{i}", [("kernel", kernel), ("bias", rng.normal(0, 0.05, width).astype(np.float32))]))
        layers.append((f"POOL3D_{i}", []))
        layers.append((f"ACTIVATION_{i}", []))
        layers.append(
            (
                f"BATCH_NORM_{i}",
                [
                    ("gamma", rng.uniform(0.5, 1.5, width).astype(np.float32)),
                    ("beta", rng.normal(0, 0.1, width).astype(np.float32)),
                    ("moving_mean", rng.normal(0, 0.1, width).astype(np.float32)),
                    ("moving_variance", rng.uniform(0.5, 2, width).astype(np.float32)),
                ],
            )
        )
        cin = width
    layers.append(("FLATTEN", []))
    fan_in = seq_len * (size // 16) ** 2 * cin
    for name, width in (("DENSE_1", DENSE[0]), ("DENSE_2", DENSE[1]), ("DENSE_CLASS", classes)):
        layers.append(
            (
                name,
                [
                    ("kernel", rng.normal(0, np.sqrt(2 / fan_in), (fan_in, width)).astype(np.float32)),
                    ("bias", rng.normal(0, 0.05, width).astype(np.float32)),
                ],
            )
        )
        fan_in = width
    return layers


def write_keras_h5(path, layers, whole_model: bool, input_shape=(6, 32, 32, 3), functional: bool = False) -> None:
    """The legacy Keras 2 HDF5 layout: save_weights, or model.save (weights under model_weights);
    the model config of a Sequential model (pyACT 0.0.7) or of a functional one (1.x: an Input)."""
    with h5py.File(path, "w") as f:
        group = f
        if whole_model:
            first = (
                {"class_name": "InputLayer", "config": {"name": "input_1", "batch_input_shape": [None, *input_shape]}}
                if functional
                else {"class_name": "Conv3D", "config": {"name": "CONV3D_1", "batch_input_shape": [None, *input_shape]}}
            )
            config = {
                "class_name": "Model" if functional else "Sequential",
                "config": {"name": "ConvNet3D", "layers": [first]},
            }
            f.attrs["model_config"] = json.dumps(config).encode()
            f.attrs["training_config"] = b'{"loss": "categorical_crossentropy"}'
            group = f.create_group("model_weights")
            f.create_group("optimizer_weights")
        group.attrs["layer_names"] = [name.encode() for name, _ in layers]
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.2.4"
        for name, weights in layers:
            layer = group.create_group(name)
            names = [f"{name}/{kind}:0" for kind, _ in weights]
            layer.attrs["weight_names"] = [n.encode() for n in names]
            for weight_name, (_, value) in zip(names, weights):
                layer.create_dataset(weight_name, data=value)


def masked_crc(data: bytes) -> int:
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc(length)) + payload + struct.pack("<I", masked_crc(payload))
