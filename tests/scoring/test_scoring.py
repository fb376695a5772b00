"""Scoring, the prediction video and shard inspection."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from pyact_torch.io import storage
from pyact_torch.cli import main
from pyact_torch.errors import UserError
from pyact_torch.data.frames import load_png
from pyact_torch.scoring.metrics import score
from pyact_torch.data.shards import load_npy, read_manifest, read_samples, split_shards
from pyact_torch.draw.panels import clip_frames, to_display

from helpers import ROOT


def test_metrics_against_a_hand_computed_confusion_matrix():
    classes = ["a", "b", "c", "d"]  # d never occurs
    truth = [0, 0, 1, 2, 2, 2]
    # predictions a, b, b, c, c, a; the last row ranks its true class c last (outside the top 3)
    probabilities = [
        [0.7, 0.2, 0.1, 0],
        [0.4, 0.5, 0.1, 0],
        [0.1, 0.8, 0.1, 0],
        [0.1, 0.1, 0.8, 0],
        [0.2, 0.1, 0.7, 0],
        [0.5, 0.3, 0, 0.2],
    ]
    result = score(np.array(truth), np.array(probabilities), classes)
    assert result["confusion"] == [[1, 1, 0, 0], [0, 1, 0, 0], [1, 0, 2, 0], [0, 0, 0, 0]]
    assert result["accuracy"] == pytest.approx(4 / 6)
    assert result["micro_f1"] == pytest.approx(4 / 6)
    # per class: a P=1/2 R=1/2 F=1/2; b P=1/2 R=1 F=2/3; c P=1 R=2/3 F=4/5
    rows = {r["class"]: r for r in result["per_class"]}
    assert (rows["a"]["precision"], rows["a"]["recall"], rows["a"]["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert (rows["b"]["precision"], rows["b"]["recall"], rows["b"]["f1"]) == pytest.approx((0.5, 1, 2 / 3))
    assert (rows["c"]["precision"], rows["c"]["recall"], rows["c"]["f1"]) == pytest.approx((1, 2 / 3, 0.8))
    assert [rows[c]["support"] for c in classes] == [2, 1, 3, 0]
    assert result["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)  # over the classes that occur
    assert result["mean_class_accuracy"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert result["top3_accuracy"] == pytest.approx(5 / 6)


@pytest.fixture(scope="module")
def trained_run(detector_run) -> str:
    """A finished run with a best checkpoint: the session's detector run (training it again here
    would add a minute to the suite and test nothing more)."""
    return detector_run


@pytest.fixture(scope="module")
def scored(trained_run, learn_shards, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("scored") / "score")
    assert main(["evaluate", "--checkpoint", trained_run, "--data", learn_shards, "--out", out, "--device", "cpu"]) == 0
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
    assert all(
        0 < r["probability"] <= 1
        and r["path"] == f"{r['sequence']}/color_{r['start']}.png"
        and r["stop"] - r["start"] + 1 == manifest["seq_len"]
        for r in rows
    )
    best = json.load(open(os.path.join(trained_run, "best.json")))
    assert metrics["checkpoint"].endswith(best["name"])
    table = open(os.path.join(scored, "per_class.txt")).read()
    assert all(name in table for name in manifest["classes"])
    image = cv2.imread(os.path.join(scored, "confusion_matrix.png"))
    assert image is not None and min(image.shape[:2]) >= 500


@pytest.mark.slow
def test_scoring_on_xla_and_through_gcs_gives_the_same_predictions(scored, trained_run, learn_shards, gcs):
    pointer = json.load(open(os.path.join(trained_run, "best.json")))
    storage.write_bytes(
        "gs://pyact-test/scoring/ckpt.pt", open(os.path.join(trained_run, pointer["name"]), "rb").read()
    )
    env = dict(os.environ, PJRT_DEVICE="CPU")
    out = "gs://pyact-test/scoring/out"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "evaluate.py"),
            "--checkpoint",
            "gs://pyact-test/scoring/ckpt.pt",
            "--data",
            learn_shards,
            "--out",
            out,
            "--device",
            "xla",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    eager = json.load(open(os.path.join(scored, "predictions.json")))
    xla = storage.read_json(f"{out}/predictions.json")
    assert [r["key"] for r in xla] == [r["key"] for r in eager]
    agree = np.mean([a["prediction"] == b["prediction"] for a, b in zip(xla, eager)])
    assert agree >= 0.99, agree
    assert (
        max(abs(a["probability"] - b["probability"]) for a, b in zip(xla, eager) if a["prediction"] == b["prediction"])
        < 1e-3
    )


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
    return {
        "green": bool(((g > 120) & (r < 80) & (b < 80)).sum() > 20),
        "red": bool(((r > 150) & (g < 80) & (b < 80)).sum() > 20),
    }


def _picture(frame, size):
    """A video frame without its banner (the bottom size x size pixels), as int."""
    return frame[-size:].astype(int)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["src", "shards"])
def test_video_shows_each_frame_once_per_sequence_in_order(scored, learn_shards, tmp_path, source, capsys, monkeypatch):
    """Before: every window's frames in turn, in shard order, so each frame came back once per
    window holding it (6 times), with nothing naming the sequence. Now: sequence by sequence,
    frame by frame, each frame once: checked by the frame count and by the pictures, each
    nearest to the raw frame it should be and not to its neighbours (the negative control)."""
    rows = json.load(open(os.path.join(scored, "predictions.json")))
    names = sorted({r["sequence"] for r in rows})[:2]
    rows = [r for r in rows if r["sequence"] in names]
    for r in rows:  # one wrong window in each sequence, the rest right
        r["prediction"] = r["truth"]
    wrong = [min((r for r in rows if r["sequence"] == name), key=lambda r: r["stop"]) for name in names]
    for r in wrong:
        r["prediction"] = next(c for c in ("asl-z", "asl-j") if c != r["truth"])
    predictions = tmp_path / "predictions.json"
    predictions.write_text(json.dumps(rows[::-1]))  # any order in the file
    out = str(tmp_path / "video.avi")
    raw = os.path.join(os.path.dirname(learn_shards), "raw")
    flag = ["--src", raw] if source == "src" else ["--data", learn_shards]
    size = 64
    from pyact_torch.draw import panels

    drawn = []  # (picture, captions) of each video frame, as handed to the encoder

    def record(frame, captions):
        drawn.append((frame.copy(), captions))
        return original(frame, captions)

    original = panels.with_banner
    monkeypatch.setattr(panels, "with_banner", record)
    assert (
        main(["video", str(predictions), out, "--size", str(size), "--sheet-windows", "4", "--fps", "30", *flag]) == 0
    )
    frames = _read_video(out)
    expected = [
        (name, f)
        for name in names
        for f in sorted({f for r in rows if r["sequence"] == name for f in range(r["start"], r["stop"] + 1)})
    ]
    assert len(frames) == len(expected)  # each frame once (before: 6x the windows)
    printed = capsys.readouterr().out
    assert f"{len(expected)} frames of 2 sequences" in printed and f"{len(expected) / 30:.0f} s at 30 fps" in printed
    # order: the pictures handed to the encoder (exact, before its compression) are the expected
    # frames one by one, each named on its banner; the raw frames differ from their neighbours
    assert [c[0][0] for _, c in drawn] == [f"{n}  frame {f}" for n, f in expected]
    if source == "src":
        kind = os.path.basename(rows[0]["path"]).split("_")[0]
        reference = [to_display(load_png(os.path.join(raw, n, f"{kind}_{f}.png")), size) for n, f in expected]
    else:
        clips = {
            s["__key__"]: load_npy(s["clip.npy"])
            for shard in split_shards(learn_shards, read_manifest(learn_shards), "test")
            for s in read_samples(shard.url, shard.count)
        }
        window = {
            (r["sequence"], f): (r["key"], f - r["start"]) for r in rows for f in range(r["start"], r["stop"] + 1)
        }
        reference = [clip_frames(clips[window[k][0]][window[k][1]][None], size)[0] for k in expected]
    assert all(np.array_equal(picture, ref) for (picture, _), ref in zip(drawn, reference))
    assert not np.array_equal(drawn[1][0], reference[0])  # the control: neighbouring frames differ
    # the frame where each wrong window ends says so in red; the first frames of a sequence have no window
    first = {name: expected.index((name, min(f for n, f in expected if n == name))) for name in names}
    for r in wrong:
        at = expected.index((r["sequence"], r["stop"]))
        assert _banner_colours(frames[at]) == {"green": False, "red": True}
        assert _banner_colours(frames[at + 1]) == {"green": True, "red": False}
        assert _banner_colours(frames[first[r["sequence"]]]) == {"green": False, "red": False}


def test_video_frames_choose_sequences_and_wrong_windows():
    """--sequences and --wrong: which frames are shown, each once (the windows of a sequence
    overlap), in frame order; hand-made rows, so the expectation is known."""
    from pyact_torch.scoring.video import video_frames

    def row(sequence, start, truth="a", prediction=None):
        return {
            "key": f"{sequence}:{start}",
            "path": "x/color_0.png",
            "sequence": sequence,
            "start": start,
            "stop": start + 2,
            "truth": truth,
            "prediction": prediction or truth,
        }

    rows = [
        row("Test/s2/a", 0),
        row("Test/s2/a", 1),
        row("Test/s1/b", 5, "b", "a"),
        row("Test/s1/b", 4, "b"),
        row("Test/s1/b", 9, "b", "a"),
    ]
    shots, chosen = video_frames(rows)
    assert [(s.sequence, s.frame) for s in shots] == [("Test/s1/b", f) for f in (4, 5, 6, 7, 9, 10, 11)] + [
        ("Test/s2/a", f) for f in (0, 1, 2, 3)
    ]
    assert [s.window["start"] if s.window else None for s in shots] == [
        None,
        None,
        4,
        5,
        None,
        None,
        9,
        None,
        None,
        0,
        1,
    ]
    shots, chosen = video_frames(rows, wrong=True)
    assert [s.frame for s in shots] == [5, 6, 7, 9, 10, 11] and len(chosen) == 2
    shots, _ = video_frames(rows, sequences=("Test/s2/*",))
    assert {s.sequence for s in shots} == {"Test/s2/a"} and len(shots) == 4
    with pytest.raises(UserError, match="--sequences"):
        video_frames(rows, sequences=("Test/nobody/*",))
    # windows of different lengths (a hand-written predictions file): a longer window that starts
    # earlier and ends later brings its own first frames (before: left out, then a KeyError)
    mixed = [dict(row("Test/s3/a", 8), stop=12), dict(row("Test/s3/a", 2), stop=13)]
    assert [s.frame for s in video_frames(mixed)[0]] == list(range(2, 14))


def test_the_contact_sheet_takes_the_classes_in_turn():
    """A split of mostly one class (as most test windows are) still shows every class; before,
    windows spread evenly over the split were mostly that class."""
    from pyact_torch.scoring.video import by_class

    rows = [{"truth": "no-action", "i": i} for i in range(90)] + [
        {"truth": c, "i": 100 + i} for i, c in enumerate("abcdefghij")
    ]
    picked = by_class(rows, 12)
    assert len(picked) == 12 and {r["truth"] for r in picked} == set("abcdefghij") | {"no-action"}
    assert sum(r["truth"] == "no-action" for r in picked) == 2
    assert [r["i"] for r in picked] == sorted(r["i"] for r in picked)  # in the rows' order


def test_contact_sheet_captions_are_readable_fitted_to_a_screen():
    """Measured on the picture: the caption text's height once a 16-window sheet of 6-frame
    windows at --size 256 is scaled to fit 1920 x 1080 (before: about 3 pixels)."""
    from pyact_torch.draw.panels import Panel, sheet

    frame = np.full((256, 256, 3), 60, np.uint8)
    windows = [
        Panel(
            [frame] * 6,
            [
                ("Test/subject/asl-z", (255, 255, 255)),
                ("frames 10-15", (255, 255, 255)),
                ("truth: asl-z", (0, 255, 255)),
                ("prediction: asl-z", (0, 200, 0)),
            ],
        )
    ] * 16
    image = cv2.imdecode(np.frombuffer(sheet(windows, "title"), np.uint8), cv2.IMREAD_COLOR)
    fit = min(1920 / image.shape[1], 1080 / image.shape[0])
    column = image[:, :40].max(axis=(1, 2)) > 128  # rows of pixels with text at the left edge
    runs, length = [], 0
    for lit in column:
        if lit:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    assert len(runs) >= 16 * 4  # every caption line of every row
    assert np.median(runs) * fit >= 8, (np.median(runs), fit)


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


@pytest.mark.parametrize(
    "case", ["no-checkpoint", "no-split", "bad-predictions", "missing-predictions", "no-frames-source"]
)
@pytest.mark.slow
def test_bad_scoring_input(case, learn_shards, trained_run, scored, tmp_path, capsys):
    bad = tmp_path / "predictions.json"
    bad.write_text("[1, 2")
    argv = {
        "no-checkpoint": [
            "evaluate",
            "--checkpoint",
            str(tmp_path / "nothing"),
            "--data",
            learn_shards,
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
        "no-split": [
            "evaluate",
            "--checkpoint",
            trained_run,
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
            "--device",
            "cpu",
        ],
        "bad-predictions": ["video", str(bad), str(tmp_path / "v.mp4"), "--data", learn_shards],
        "missing-predictions": [
            "video",
            str(tmp_path / "missing.json"),
            str(tmp_path / "v.mp4"),
            "--data",
            learn_shards,
        ],
        "no-frames-source": ["video", os.path.join(scored, "predictions.json"), str(tmp_path / "v.mp4")],
    }[case]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ")
    assert not (tmp_path / "o" / "metrics.json").exists() and not (tmp_path / "v.mp4").exists()
