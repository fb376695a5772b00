"""The synthetic dataset: real layout, deterministic, labels consistent with what is drawn."""

import os

import cv2
import numpy as np
import pytest

from pyact_torch.cli import main
from pyact_torch.config import SynthConfig
from pyact_torch.data.labels import ACTIONS, parse_label_file, scan_dataset, scan_detection
from pyact_torch.data.synthetic import make_dataset


def tree(root):
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def test_same_seed_same_bytes_and_real_layout(tmp_path):
    config = dict(subjects=(1, 1, 1), frames=(14, 16), size=(32, 24), seed=5, detection=3)
    make_dataset(SynthConfig(str(tmp_path / "a"), workers=1, **config), progress=False)
    make_dataset(SynthConfig(str(tmp_path / "b"), workers=2, **config), progress=False)
    a = tree(tmp_path / "a")
    assert a == tree(tmp_path / "b")
    sequences, bad = scan_dataset(str(tmp_path / "a"), "rgbd")
    assert not bad and len(sequences) == 3 * len(ACTIONS)
    assert {s.split_dir for s in sequences} == {"Train", "Eval", "Test"}
    seq = sequences[0]
    folder = tmp_path / "a" / seq.path
    colour = cv2.imread(str(folder / "color_0.png"), cv2.IMREAD_UNCHANGED)
    depth = cv2.imread(str(folder / "depth_0.png"), cv2.IMREAD_UNCHANGED)
    confi = cv2.imread(str(folder / "confi_0.png"), cv2.IMREAD_UNCHANGED)
    assert colour.shape == (24, 32, 3) and colour.dtype == np.uint8
    assert depth.shape == confi.shape == (12, 16) and depth.dtype == confi.dtype == np.uint16
    assert min(g.len for s in sequences for g in s.segments) == 6
    recordings, bad = scan_detection(str(tmp_path / "a"), "rgbd")
    assert not bad and [r.path for r in recordings] == [f"TestDetection/detect0{i}" for i in range(3)]
    assert not set(os.listdir(tmp_path / "a" / "TestDetection")) & {s.subject for s in sequences}  # people of their own
    for recording in recordings:
        actions = [g.action for g in recording.segments]
        assert 4 <= len(actions) == len(set(actions)) <= 7 and set(actions) <= set(ACTIONS)  # different classes
        gaps = [b.pos - (a.pos + a.len) for a, b in zip(recording.segments, recording.segments[1:])]
        assert min(gaps) >= 2  # background between actions
    assert (
        len({g for r in recordings for g in [b.pos - (a.pos + a.len) for a, b in zip(r.segments, r.segments[1:])]}) > 2
    )  # of varying length


def test_shape_is_drawn_exactly_inside_segments(tmp_path):
    make_dataset(
        SynthConfig(str(tmp_path / "d"), subjects=(1, 0, 1), frames=(20, 24), size=(64, 48), seed=1, workers=1),
        progress=False,
    )
    folder = tmp_path / "d" / "Train" / "train00" / "asl-milk"
    segments = parse_label_file(str(folder) + ".xml")
    n = len([f for f in os.listdir(folder) if f.startswith("depth_")])
    for frame in range(n):
        depth = cv2.imread(str(folder / f"depth_{frame}.png"), cv2.IMREAD_UNCHANGED)
        near = int(((depth > 0) & (depth < 500)).sum())  # the hand is at ~380 mm, the room beyond 650
        assert (near > 0) == any(frame in s for s in segments), frame


def test_recordings_draw_each_action_inside_its_own_segment(tmp_path):
    """What a TestDetection label file says is what its frames show: the hand only inside the
    segments."""
    make_dataset(
        SynthConfig(
            str(tmp_path / "r"), subjects=(1, 0, 1), frames=(20, 24), size=(64, 48), seed=4, workers=1, detection=1
        ),
        progress=False,
    )
    folder = tmp_path / "r" / "TestDetection" / "detect00"
    segments = parse_label_file(str(folder) + ".xml")
    n = len([f for f in os.listdir(folder) if f.startswith("depth_")])
    inside = {frame for g in segments for frame in range(g.pos, g.pos + g.len)}
    for frame in range(n):
        depth = cv2.imread(str(folder / f"depth_{frame}.png"), cv2.IMREAD_UNCHANGED)
        assert (int(((depth > 0) & (depth < 500)).sum()) > 0) == (frame in inside), frame


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--size", "100000x100000"], "--size"),  # was numpy's ArrayMemoryError
        (["--seed", "-1"], "--seed"),  # was numpy's ValueError
        (["--min-segment", "1"], "--min-segment"),  # made a dataset that preprocess then refused
        (["--workers", "-1"], "--workers"),  # was accepted without a word
    ],
)
def test_bad_synth_settings_are_one_line_before_any_file(flags, named, tmp_path, capsys):
    out = tmp_path / "raw"
    assert main(["synth", str(out), "--subjects", "1,0,1", "--frames", "14:16", "--size", "32x24", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {named}") and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
