"""Preprocessing end to end: shards read back through webdataset, determinism, gs://, resume."""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

import cv2
import numpy as np
import pytest
import webdataset as wds

from pyact_torch.io import storage
from pyact_torch.config import PreprocessConfig
from pyact_torch.data.preprocess import preprocess
from pyact_torch.data.shards import read_manifest

from helpers import ROOT, count_frames, tree_bytes

SCRIPT = os.path.join(ROOT, "scripts", "preprocess.py")


def labelled_frames(src: str) -> int:
    """The colour frames of Train, Eval and Test (those preprocessing reads; TestDetection's it
    never does)."""
    return count_frames(src) - count_frames(os.path.join(src, "TestDetection"))


def run(src: str, dest: str, **settings):
    settings.setdefault("workers", 2)
    return preprocess(PreprocessConfig(src, dest, **settings), progress=False, print_fn=lambda *a: None)


def read_split(dest: str, manifest: dict, split: str) -> list[dict]:
    urls = [os.path.join(dest, s["name"]) for s in manifest["splits"][split]["shards"]]
    if not urls:
        return []
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def expected_clip(src: str, path: str, start: int, stop: int, size: int = 64) -> np.ndarray:
    frames = []
    for i in range(start, stop + 1):
        bgr = cv2.imread(os.path.join(src, path, f"color_{i}.png"))
        frames.append(cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


def expected_label(src: str, path: str, stop: int, length: int = 6) -> str:
    root = ElementTree.parse(os.path.join(src, path + ".xml")).getroot()
    segments = [(int(e.find("pos").text), int(e.find("len").text)) for e in root.iter("_")]
    inside = sum(any(p <= f < p + n for p, n in segments) for f in range(stop - length + 1, stop + 1))
    return path.split("/")[-1] if inside >= length // 2 else "no-action"


@pytest.fixture(scope="module")
def local_output(raw_dataset, tmp_path_factory):
    dest = str(tmp_path_factory.mktemp("out") / "shards")
    summary = run(raw_dataset, dest, shard_size=64)
    return dest, summary


def test_round_trip_through_webdataset(raw_dataset, local_output):
    dest, summary = local_output
    manifest = read_manifest(dest).document
    classes = manifest["classes"]
    assert manifest["seq_len"] == 6 and manifest["image_size"] == 64
    assert manifest["channels"] == ["R", "G", "B"] and len(classes) == 17
    keys = set()
    for split in ("train", "eval", "test"):
        samples = read_split(dest, manifest, split)
        entry = manifest["splits"][split]
        assert len(samples) == entry["count"] == sum(s["count"] for s in entry["shards"])
        counts = {name: 0 for name in classes}
        for sample in samples:
            meta = sample["json"]
            assert sample["clip.npy"].dtype == np.uint8 and sample["clip.npy"].shape == (6, 64, 64, 3)
            assert classes[sample["cls"]] == meta["label"]
            assert meta["stop"] - meta["start"] == 5
            assert sample["__key__"] == f"{meta['subject']}/{meta['action']}/{meta['stop']:06d}"
            assert meta["path"] == f"{meta['path'].split('/')[0]}/{meta['subject']}/{meta['action']}"
            assert meta["label"] == expected_label(raw_dataset, meta["path"], meta["stop"])
            counts[meta["label"]] += 1
            keys.add((split, sample["__key__"]))
        assert counts == entry["class_counts"]
        index = json.load(open(os.path.join(dest, split, "index.json")))
        assert [row["key"] for row in index] == [s["__key__"] for s in samples]
        for sample in samples[:: max(1, len(samples) // 6)]:
            meta = sample["json"]
            np.testing.assert_array_equal(
                sample["clip.npy"], expected_clip(raw_dataset, meta["path"], meta["start"], meta["stop"])
            )
    assert len(keys) == sum(manifest["splits"][s]["count"] for s in ("train", "eval", "test"))
    train = manifest["splits"]["train"]["class_counts"]
    n_action = sum(v for k, v in train.items() if k != "no-action")
    assert train["no-action"] == n_action // 17
    test_sequences = [
        os.path.join(dp)
        for dp, dn, fn in os.walk(os.path.join(raw_dataset, "Test"))
        if any(f.startswith("color_") for f in fn)
    ]
    assert manifest["splits"]["test"]["count"] == sum(count_frames(s) - 5 for s in test_sequences)
    assert not os.path.exists(os.path.join(dest, ".pyact-cache"))
    assert summary.decoded == summary.frames == labelled_frames(raw_dataset)  # TestDetection's never read


def test_every_frame_is_decoded_exactly_once(raw_dataset, tmp_path, monkeypatch, local_output):
    from pyact_torch.data import frames

    calls, paths = [], []
    real_imdecode, real_load = cv2.imdecode, frames.load_png

    def counting_imdecode(data, flags):
        calls.append(1)
        return real_imdecode(data, flags)

    def recording_load(path):
        paths.append(path)
        return real_load(path)

    monkeypatch.setattr(cv2, "imdecode", counting_imdecode)
    monkeypatch.setattr(frames, "load_png", recording_load)
    dest = str(tmp_path / "out")
    summary = run(raw_dataset, dest, shard_size=64, workers=1)
    assert len(calls) == len(paths) == len(set(paths)) == labelled_frames(raw_dataset) == summary.decoded
    # one process or two: the same bytes
    assert tree_bytes(dest) == tree_bytes(local_output[0])


def test_gcs_output_equals_local_output(raw_dataset, gcs, local_output):
    dest = "gs://pyact-test/shards"
    run(raw_dataset, dest, shard_size=64)
    local = tree_bytes(local_output[0])
    assert storage.list_files(dest) == sorted(local)
    for name, data in local.items():
        assert storage.read_bytes(f"{dest}/{name}") == data, name
    assert read_manifest(dest).document["splits"]["test"]["count"] > 0


def test_missing_bucket_is_a_one_line_error(raw_dataset, gcs, capsys):
    from pyact_torch.cli import main

    assert main(["preprocess", raw_dataset, "gs://no-such-bucket/x"]) == 2
    assert capsys.readouterr().err.strip() == "error: gs://no-such-bucket: bucket does not exist"


def _wait_for(predicate, process, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.005)
    return False


@pytest.mark.parametrize("phase", ["decode", "shards"])
def test_resume_after_kill_gives_identical_output(raw_dataset, tmp_path, phase):
    flags = ["--shard-size", "16", "--workers", "1"]
    reference = str(tmp_path / "reference")
    run(raw_dataset, reference, shard_size=16, workers=1)
    dest = str(tmp_path / "killed")
    process = subprocess.Popen(
        [sys.executable, SCRIPT, raw_dataset, dest, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = os.path.join(dest, ".pyact-cache", "decoded.log")
    if phase == "decode":
        ready = lambda: os.path.exists(log) and open(log).read().count("\n") >= 4  # noqa: E731
    else:
        ready = lambda: len(storage.list_files(os.path.join(dest, "test"))) >= 4  # noqa: E731
    assert _wait_for(ready, process), "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not os.path.exists(os.path.join(dest, "manifest.json"))
    result = subprocess.run([sys.executable, SCRIPT, raw_dataset, dest, *flags], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    if phase == "shards":
        assert "kept from an earlier run" in result.stdout and " 0 kept" not in result.stdout
    else:
        decoded = int(result.stdout.split(" decoded in this run")[0].rsplit(" ", 1)[1])
        assert 0 < decoded < labelled_frames(raw_dataset)
    assert tree_bytes(dest) == tree_bytes(reference)


def test_rerun_is_a_no_op_and_other_settings_are_refused(tiny_dataset, tmp_path, capsys):
    from pyact_torch.cli import main

    dest = str(tmp_path / "out")
    assert main(["preprocess", tiny_dataset, dest, "--workers", "1"]) == 0
    before = {p: os.stat(os.path.join(dest, p)).st_mtime_ns for p in tree_bytes(dest)}
    capsys.readouterr()
    assert main(["preprocess", tiny_dataset, dest, "--workers", "2"]) == 0
    assert "already complete" in capsys.readouterr().out
    assert {p: os.stat(os.path.join(dest, p)).st_mtime_ns for p in tree_bytes(dest)} == before
    assert main(["preprocess", tiny_dataset, dest, "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and dest in err and "--overwrite" in err
    assert "--image-size 64 (this run: 32)" in err  # it said "other settings or inputs": which?
    assert read_manifest(dest).document["image_size"] == 64
    assert main(["preprocess", tiny_dataset, dest, "--image-size", "32", "--overwrite"]) == 0
    manifest = read_manifest(dest).document
    assert manifest["image_size"] == 32
    sample = read_split(dest, manifest, "test")[0]
    assert sample["clip.npy"].shape == (6, 32, 32, 3)


def test_dest_with_foreign_files_is_refused(tiny_dataset, tmp_path, capsys):
    from pyact_torch.cli import main

    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    assert main(["preprocess", tiny_dataset, str(dest)]) == 2
    assert "other files" in capsys.readouterr().err
    assert main(["preprocess", tiny_dataset, str(dest), "--overwrite"]) == 0
    assert (dest / "notes.txt").read_text() == "mine"  # --overwrite removes only our own files


def test_rgbd_and_depth_modalities(tiny_dataset, tmp_path):
    from pyact_torch.data.frames import depth_to_uint8

    dest = str(tmp_path / "rgbd")
    run(tiny_dataset, dest, modality="rgbd", image_size=16)
    manifest = read_manifest(dest).document
    assert manifest["channels"] == ["R", "G", "B", "D"] and manifest["modality"] == "rgbd"
    sample = read_split(dest, manifest, "test")[0]
    meta, clip = sample["json"], sample["clip.npy"]
    assert clip.shape == (6, 16, 16, 4)
    raw = cv2.imread(os.path.join(tiny_dataset, meta["path"], f"depth_{meta['start']}.png"), cv2.IMREAD_UNCHANGED)
    expected = depth_to_uint8(cv2.resize(raw, (16, 16), interpolation=cv2.INTER_NEAREST), (150, 1000))
    np.testing.assert_array_equal(clip[0, :, :, 3], expected)
    np.testing.assert_array_equal(
        clip[..., :3], expected_clip(tiny_dataset, meta["path"], meta["start"], meta["stop"], 16)
    )
    dest = str(tmp_path / "depth")
    run(tiny_dataset, dest, modality="depth", image_size=16)
    depth_clip = read_split(dest, read_manifest(dest).document, "test")[0]["clip.npy"]
    assert depth_clip.shape == (6, 16, 16, 1)


def test_eval_subjects_flag_and_eval_folder(tiny_dataset, tmp_path):
    dest = str(tmp_path / "flag")
    run(tiny_dataset, dest, eval_subjects=("train01",))
    manifest = read_manifest(dest).document
    assert manifest["eval_subjects"] == ["train01"]
    paths = {s["json"]["path"] for s in read_split(dest, manifest, "eval")}
    assert paths and all(p.startswith("Train/train01/") for p in paths)
    os.makedirs(os.path.join(tiny_dataset, "Eval"))
    os.rename(os.path.join(tiny_dataset, "Train", "train00"), os.path.join(tiny_dataset, "Eval", "train00"))
    dest = str(tmp_path / "folder")
    run(tiny_dataset, dest)
    manifest = read_manifest(dest).document
    assert manifest["eval_source"] == "Eval/ folder" and manifest["eval_subjects"] == ["train00"]
    paths = {s["json"]["path"] for s in read_split(dest, manifest, "eval")}
    assert paths and all(p.startswith("Eval/train00/") for p in paths)


def test_testdetection_is_left_alone_and_said_once(tiny_dataset, raw_dataset, tmp_path, capsys):
    """A dataset with TestDetection/ preprocesses to the very bytes (fingerprints included) of the
    same dataset without it, and says once that it is not used."""
    from pyact_torch.cli import main

    assert os.path.isdir(os.path.join(raw_dataset, "TestDetection"))
    with_it = str(tmp_path / "with")
    shutil.copytree(tiny_dataset, with_it)
    shutil.copytree(os.path.join(raw_dataset, "TestDetection"), os.path.join(with_it, "TestDetection"))
    assert main(["preprocess", tiny_dataset, str(tmp_path / "a"), "--workers", "1"]) == 0
    assert "TestDetection" not in capsys.readouterr().out
    assert main(["preprocess", with_it, str(tmp_path / "b"), "--workers", "1"]) == 0
    assert capsys.readouterr().out.count("TestDetection/ is not preprocessed") == 1
    a, b = tree_bytes(str(tmp_path / "a")), tree_bytes(str(tmp_path / "b"))
    manifests = [json.loads(t.pop("manifest.json")) for t in (a, b)]
    assert a == b  # every shard and index, byte for byte
    for m in manifests:
        m.pop("src", None)
        m.get("source", {}).pop("src", None)
    assert manifests[0] == manifests[1]
    assert manifests[0]["fingerprint"] == manifests[1]["fingerprint"]
