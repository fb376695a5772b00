"""Bad input: a one-line error naming the file, exit status 2, and no manifest."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from pyact_torch.cli import main

from helpers import ROOT

SEQ = "Train/train00/asl-z"


def write_xml(src, body):
    with open(os.path.join(src, SEQ + ".xml"), "w") as handle:
        handle.write(f'<?xml version="1.0"?>\n<opencv_storage><segments>{body}</segments></opencv_storage>\n')


def truncate(path, keep=200):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:keep])


def png_bomb(path, side=16384):
    """A real PNG of ``side`` x ``side`` 8-bit zeros: a few hundred kB that decode to side**2 bytes
    (256 MB at the default), well past the 4096x4096 pixels a frame may have."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    packer, row = zlib.compressobj(9), bytes(side + 1)  # each row: filter type 0, then its pixels
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


DAMAGE = {
    "no Test folder": (lambda s: shutil.rmtree(os.path.join(s, "Test")), "Test", "missing"),
    "folder without label file": (
        lambda s: os.remove(os.path.join(s, SEQ + ".xml")),
        SEQ + ".xml",
        "label file missing",
    ),
    "label file without folder": (
        lambda s: shutil.rmtree(os.path.join(s, SEQ)),
        SEQ + ".xml",
        "without its sequence folder",
    ),
    "label file does not parse": (
        lambda s: open(os.path.join(s, SEQ + ".xml"), "w").write("<a><b></a>"),
        SEQ + ".xml",
        "not a valid XML",
    ),
    "segment without len": (lambda s: write_xml(s, "<_><pos>2</pos></_>"), SEQ + ".xml", "without <len>"),
    "non-integer pos": (lambda s: write_xml(s, "<_><pos>two</pos><len>6</len></_>"), SEQ + ".xml", "not an integer"),
    "segment beyond last frame": (
        lambda s: write_xml(s, "<_><pos>10</pos><len>20</len></_>"),
        SEQ + ".xml",
        "beyond the last frame",
    ),
    "missing frame in the middle": (
        lambda s: os.remove(os.path.join(s, SEQ, "color_5.png")),
        SEQ + "/color_5.png",
        "frame missing",
    ),
    "truncated PNG": (lambda s: truncate(os.path.join(s, SEQ, "color_3.png")), SEQ + "/color_3.png", "truncated PNG"),
    "PNG decompression bomb": (
        lambda s: png_bomb(os.path.join(s, SEQ, "color_2.png")),
        SEQ + "/color_2.png",
        "16384x16384 pixels, more than",
    ),
    "not a PNG": (
        lambda s: open(os.path.join(s, SEQ, "color_4.png"), "wb").write(b"hello"),
        SEQ + "/color_4.png",
        "not a PNG",
    ),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_bad_dataset(case, tiny_dataset, tmp_path, capsys):
    damage, file, reason = DAMAGE[case]
    damage(tiny_dataset)
    dest = str(tmp_path / "out")
    assert main(["preprocess", tiny_dataset, dest, "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert os.path.join(tiny_dataset, file) in err and reason in err
    assert not os.path.exists(os.path.join(dest, "manifest.json"))


def test_missing_src(tmp_path, capsys):
    assert main(["preprocess", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'nowhere'}: dataset folder not found\n"


def test_dest_not_writable(tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    dest = str(blocker / "out")
    assert main(["preprocess", tiny_dataset, dest]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {dest}: not writable") and err.count("\n") == 1


def test_script_error_from_worker_process_has_no_traceback(tiny_dataset, tmp_path):
    truncate(os.path.join(tiny_dataset, SEQ, "color_7.png"))
    dest = str(tmp_path / "out")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "preprocess.py"), tiny_dataset, dest, "--workers", "2"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if not line.startswith("decode")]
    assert lines == [
        f"error: {os.path.join(tiny_dataset, SEQ, 'color_7.png')}: truncated PNG (no IEND chunk at the end)"
    ]
    assert not os.path.exists(os.path.join(dest, "manifest.json"))


def test_skip_bad_sequences_lists_and_records_them(tiny_dataset, tmp_path, capsys):
    import webdataset as wds

    from pyact_torch.data.shards import read_manifest

    truncate(os.path.join(tiny_dataset, SEQ, "color_3.png"))
    os.remove(os.path.join(tiny_dataset, "Test/test00/ui-swipe.xml"))
    dest = str(tmp_path / "out")
    assert main(["preprocess", tiny_dataset, dest, "--skip-bad-sequences", "--eval-subjects", "train01"]) == 0
    out = capsys.readouterr().out
    assert "skipped 2 broken sequences" in out and "color_3.png" in out and "ui-swipe.xml" in out
    manifest = read_manifest(dest).document
    assert sorted(b["path"] for b in manifest["skipped_sequences"]) == ["Test/test00/ui-swipe", SEQ]
    urls = [os.path.join(dest, s["name"]) for split in manifest["splits"].values() for s in split["shards"]]
    paths = {sample["json"]["path"] for sample in wds.WebDataset(urls, shardshuffle=False).decode()}
    assert SEQ not in paths and "Test/test00/ui-swipe" not in paths
    assert "Train/train00/asl-you" in paths and "Test/test00/ui-click" in paths


def test_help_explains_every_flag():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "preprocess.py"), "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0
    for flag in (
        "--image-size",
        "--seq-len",
        "--shard-size",
        "--workers",
        "--eval-subjects",
        "--modality",
        "--depth-range",
        "--seed",
        "--overwrite",
        "--skip-bad-sequences",
        "--cache-dir",
    ):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "argv, only, said",
    [
        # a shortened flag was read as the flag it starts: this trained with --epochs 1
        (
            ["train", "--data", "d", "--run-dir", "r", "--epoch", "1"],
            None,
            "pyact train: error: unrecognized arguments: --epoch 1",
        ),
        # an unknown flag was reported by `pyact` with its usage, not by the command given it
        (["detect", "--src", "s", "--fooo"], None, "pyact detect: error: unrecognized arguments: --fooo"),
        (
            ["--checkpoint", "c", "--data", "d", "--out", "o", "--devic", "cpu"],
            "evaluate",
            "evaluate.py: error: unrecognized arguments: --devic cpu",
        ),
    ],
)
def test_a_flag_is_taken_whole_and_refused_by_its_command(argv, only, said, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(argv, only=only, prog="evaluate.py" if only else None)
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == said
    assert err[0].startswith(f"usage: {said.split(':')[0]} ")  # that command's usage
