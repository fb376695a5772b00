"""Faults and hostile input, grouped by class: path escape, deletion, atomicity, bounded
parsing, signals, one-line errors. Each case failed (lost data, escaped, hung or ended in a
traceback) before the hardening of issue 11; the table in docs/faults.md counts them.

Cases that could hang run in a subprocess with a timeout. Disk-full cases mount a small tmpfs
and need root (skipped elsewhere, with the reason).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from pyact_torch.data import preprocess as preprocess_module
from pyact_torch.io import storage
from pyact_torch.training.checkpoint import CheckpointWriter, load_checkpoint
from pyact_torch.cli import main
from pyact_torch.errors import UserError
from pyact_torch.data.shards import TarFormatError, read_manifest, read_tar

from helpers import ROOT, read_only, tree_bytes

CLI = [sys.executable, "-c", "import sys; from pyact_torch.cli import main; sys.exit(main(sys.argv[1:]))"]
TRAIN = [
    "--device",
    "cpu",
    "--model",
    "tiny",
    "--epochs",
    "1",
    "--batch-size",
    "4",
    "--workers",
    "0",
    "--log-every",
    "1",
]


# --- helpers -----------------------------------------------------------------------------------


def one_line(err: str) -> str:
    """The single ``error:`` line a user-fixable failure must end with."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    return lines[0]


def cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def run(*args, timeout=120, **kwargs) -> subprocess.CompletedProcess:
    """The command in a subprocess (a hang fails the test instead of stopping the suite)."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def write_manifest(dest: str, manifest: dict) -> None:
    with open(os.path.join(dest, "manifest.json"), "w") as handle:
        json.dump(manifest, handle)


@pytest.fixture
def shards(small_shards, tmp_path) -> str:
    """A private copy of small preprocessed shards (16x16, 16 windows a shard) to damage."""
    copy = str(tmp_path / "shards")
    shutil.copytree(small_shards, copy)
    return copy


@pytest.fixture(scope="module")
def small_run(small_shards, tmp_path_factory) -> str:
    """A finished one-epoch tiny run on the small shards."""
    run_dir = str(tmp_path_factory.mktemp("run") / "run")
    assert main(["train", "--data", small_shards, "--run-dir", run_dir, *TRAIN]) == 0
    return run_dir


@contextmanager
def small_tmpfs(path, size: str):
    """A tmpfs of ``size`` at ``path`` (root only); yields a function that resizes it."""
    if os.geteuid() != 0:
        pytest.skip("disk-full cases mount a tmpfs, which needs root")
    os.makedirs(path, exist_ok=True)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield lambda new: subprocess.run(["mount", "-o", f"remount,size={new}", str(path)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def crafted_tar(*members: tuple[bytes, bytes]) -> bytes:
    """A tar of raw (header, data) pairs, headers given as dicts of field -> bytes."""
    return b"".join(members) + bytes(1024)


def header(name: str, size: int, kind: bytes = b"0") -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = 0, kind
    block = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    block[124:136] = f"{size:011o}\0".encode() if size < 8**11 else b"\x80" + size.to_bytes(11, "big")
    block[148:156] = b"        "
    block[148:156] = f"{sum(block):06o}\0 ".encode()
    return bytes(block)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


# --- path escape: names read from files are data, never paths -------------------------------------


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
    manifest = read_manifest(shards)
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


# --- deletion: only what we made and marked -------------------------------------------------------


def test_cache_dir_keeps_what_the_user_had_in_it(tiny_dataset, tmp_path):
    cache = tmp_path / "scratch"
    cache.mkdir()
    (cache / "thesis.tex").write_text("years of work")
    (cache / "sub").mkdir()
    (cache / "sub" / "data.bin").write_bytes(b"\1\2")
    assert (
        main(
            [
                "preprocess",
                tiny_dataset,
                str(tmp_path / "out"),
                "--cache-dir",
                str(cache),
                "--workers",
                "1",
                "--image-size",
                "16",
            ]
        )
        == 0
    )
    assert (cache / "thesis.tex").read_text() == "years of work" and (cache / "sub" / "data.bin").exists()
    assert sorted(os.listdir(cache)) == ["sub", "thesis.tex"]  # our own cache folder inside it is gone


def test_a_user_folder_named_tmp_in_dest_is_foreign(tiny_dataset, tmp_path, capsys):
    dest = tmp_path / "out"
    (dest / ".tmp").mkdir(parents=True)
    (dest / ".tmp" / "notes.txt").write_text("mine")
    (dest / ".notes.txt.77.partial").write_text("also mine")
    code, err = cli(capsys, "preprocess", tiny_dataset, str(dest), "--workers", "1", "--image-size", "16")
    assert code == 2 and "other files" in one_line(err)
    assert main(["preprocess", tiny_dataset, str(dest), "--workers", "1", "--image-size", "16", "--overwrite"]) == 0
    assert (dest / ".tmp" / "notes.txt").read_text() == "mine"
    assert (dest / ".notes.txt.77.partial").read_text() == "also mine"
    assert read_manifest(str(dest))["splits"]["train"]["count"] > 0


def test_a_cache_folder_that_is_not_ours_is_refused(tiny_dataset, tmp_path, capsys):
    dest = tmp_path / "out"
    (dest / ".pyact-cache").mkdir(parents=True)
    (dest / ".pyact-cache" / "frames.u8").write_text("not a cache of ours")
    code, err = cli(capsys, "preprocess", tiny_dataset, str(dest), "--workers", "1", "--image-size", "16")
    assert code == 2 and one_line(err)
    assert (dest / ".pyact-cache" / "frames.u8").read_text() == "not a cache of ours"


# --- atomicity: every write checked, every replace atomic, resume re-verifies --------------------


def _interrupt(monkeypatch, name: str, after: int) -> None:
    """Make preprocessing stop (as a Ctrl-C would) after ``after`` results of ``name``."""
    real = getattr(preprocess_module, name)

    def limited(*args, **kwargs):
        for count, result in enumerate(real(*args, **kwargs)):
            if count == after:
                raise KeyboardInterrupt
            yield result

    monkeypatch.setattr(preprocess_module, name, limited)


PRE = ["--workers", "1", "--image-size", "16", "--shard-size", "8"]


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_resume_rewrites_a_kept_shard_damaged_between_runs(damage, tiny_dataset, tmp_path, monkeypatch, capsys):
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    dest = str(tmp_path / "out")
    _interrupt(monkeypatch, "map_unordered", 4)
    with pytest.raises(KeyboardInterrupt):
        preprocess_module.preprocess(
            preprocess_module.PreprocessConfig(tiny_dataset, dest, workers=1, image_size=16, shard_size=8),
            progress=False,
            print_fn=lambda *a: None,
        )
    monkeypatch.undo()
    kept = sorted(n for n in storage.list_files(dest) if n.endswith(".tar"))
    assert len(kept) >= 4  # the last one may be written but not yet logged: also rewritten
    path = os.path.join(dest, kept[1])
    data = open(path, "rb").read()
    if damage == "flip a byte":
        data = data[:700] + bytes([data[700] ^ 1]) + data[701:]
        open(path, "wb").write(data)
    elif damage == "truncate":
        open(path, "wb").write(data[:1000])
    else:
        os.remove(path)
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 0
    assert tree_bytes(dest) == tree_bytes(reference)


def test_resume_re_decodes_frame_chunks_whose_cache_bytes_changed(tiny_dataset, tmp_path, monkeypatch):
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    dest = str(tmp_path / "out")
    _interrupt(monkeypatch, "map_unordered", 1)  # decoding done, one shard written
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 130  # as after a Ctrl-C
    monkeypatch.undo()
    frames = os.path.join(dest, ".pyact-cache", "frames.u8")
    with open(frames, "r+b") as handle:  # what a short write or a bad sector leaves
        handle.seek(5000)
        handle.write(bytes(3000))
    for name in storage.list_files(dest):
        if name.endswith(".tar"):
            os.remove(os.path.join(dest, name))
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 0
    assert tree_bytes(dest) == tree_bytes(reference)


def test_a_frame_fixed_after_skip_bad_sequences_is_decoded_again(tiny_dataset, tmp_path, capsys):
    frame = os.path.join(tiny_dataset, "Train/train00/asl-z/color_3.png")
    good = open(frame, "rb").read()
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    open(frame, "wb").write(good[:200])
    dest = str(tmp_path / "out")
    assert main(["preprocess", tiny_dataset, dest, *PRE, "--skip-bad-sequences"]) == 0
    assert read_manifest(dest)["skipped_sequences"]
    open(frame, "wb").write(good)
    capsys.readouterr()
    code, err = cli(capsys, "preprocess", tiny_dataset, dest, *PRE, "--skip-bad-sequences")
    assert code == 2 and "frames changed" in one_line(err)
    assert main(["preprocess", tiny_dataset, dest, *PRE, "--skip-bad-sequences", "--overwrite"]) == 0
    assert not read_manifest(dest)["skipped_sequences"]
    ours, theirs = tree_bytes(dest), tree_bytes(reference)
    manifest, expected = json.loads(ours.pop("manifest.json")), json.loads(theirs.pop("manifest.json"))
    assert ours == theirs  # every shard and index byte-identical to a run on the intact dataset
    assert manifest["splits"] == expected["splits"]


@pytest.mark.parametrize("damage", ["empty cache.json", "cut-off state file"])
def test_damaged_state_files_do_not_block_resume(damage, tiny_dataset, tmp_path, monkeypatch):
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    dest = str(tmp_path / "out")
    _interrupt(monkeypatch, "map_unordered", 2)
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 130  # as after a Ctrl-C
    monkeypatch.undo()
    if damage == "empty cache.json":
        open(os.path.join(dest, ".pyact-cache", "cache.json"), "w").close()
    else:
        state = os.path.join(dest, ".pyact-preprocess.json")
        data = open(state).read()
        open(state, "w").write(data[: len(data) // 2])
    assert main(["preprocess", tiny_dataset, dest, *PRE]) == 0
    assert tree_bytes(dest) == tree_bytes(reference)


@pytest.mark.parametrize("phase", ["decode", "shards"])
def test_disk_full_is_one_line_and_the_resumed_output_is_identical(phase, tiny_dataset, tmp_path, capsys, monkeypatch):
    """Root only (tmpfs). Before the fix a short pwrite was logged as decoded and the resumed
    run published all-black frames. The disk fills after the space check (another program
    wrote to it): the check itself is the next test."""
    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    full = tmp_path / "full"
    with small_tmpfs(full, "64m") as resize:
        if phase == "decode":
            dest, extra = str(tmp_path / "out"), ["--cache-dir", str(full)]
        else:
            dest, extra = str(full / "out"), ["--cache-dir", str(tmp_path / "cache")]
        real_check = preprocess_module.check_space

        def then_the_disk_fills(*args):
            real_check(*args)
            resize("96k" if phase == "decode" else "160k")

        monkeypatch.setattr(preprocess_module, "check_space", then_the_disk_fills)
        code, err = cli(capsys, "preprocess", tiny_dataset, dest, *PRE, *extra)
        monkeypatch.undo()
        assert code == 2 and "No space left on device" in one_line(err)
        resize("64m")
        assert main(["preprocess", tiny_dataset, dest, *PRE, *extra]) == 0
        assert tree_bytes(dest) == tree_bytes(reference)


@pytest.mark.parametrize("where", ["cache", "dest"])
def test_an_image_size_the_disk_cannot_hold_is_refused_before_work(where, tiny_dataset, tmp_path, capsys):
    """--image-size 4096 wrote 46 GB of cache in two minutes from 17 MB of frames. Root only
    (tmpfs). The negative control: the same disk holds --image-size 16."""
    disk = tmp_path / "disk"
    with small_tmpfs(disk, "4m"):
        dest, extra = (
            (str(tmp_path / "out"), ["--cache-dir", str(disk)])
            if where == "cache"
            else (str(disk / "out"), ["--cache-dir", str(tmp_path / "cache")])
        )
        code, err = cli(capsys, "preprocess", tiny_dataset, dest, "--workers", "1", "--image-size", "128", *extra)
        assert code == 2
        line = one_line(err)
        assert "--image-size 128" in line and "free" in line and ("cache" if where == "cache" else "shards") in line
        assert os.listdir(disk) == []
        assert main(["preprocess", tiny_dataset, dest, *PRE, *extra]) == 0


def test_an_emulator_outage_mid_run_is_one_line_and_the_resumed_bucket_is_identical(
    tiny_dataset, tmp_path, monkeypatch, capsys
):
    from pyact_torch.io.emulator import GCSEmulator

    reference = str(tmp_path / "reference")
    assert main(["preprocess", tiny_dataset, reference, *PRE]) == 0
    monkeypatch.setattr(storage, "GCS_DEADLINE", 3.0)
    with GCSEmulator(str(tmp_path / "gcs"), log=str(tmp_path / "gcs.log")) as emulator:
        emulator.create_bucket("outage")
        real = preprocess_module.map_unordered

        def outage_after_three(*args, **kwargs):
            for count, result in enumerate(real(*args, **kwargs)):
                if count == 3:
                    emulator.pause()
                yield result

        monkeypatch.setattr(preprocess_module, "map_unordered", outage_after_three)
        dest = "gs://outage/shards"
        code, err = cli(capsys, "preprocess", tiny_dataset, dest, *PRE, "--cache-dir", str(tmp_path / "cache"))
        assert code == 2 and "cannot reach" in one_line(err)
        monkeypatch.setattr(preprocess_module, "map_unordered", real)
        emulator.start()
        assert main(["preprocess", tiny_dataset, dest, *PRE, "--cache-dir", str(tmp_path / "cache")]) == 0
        kept = int(capsys.readouterr().out.split(" kept from an earlier run")[0].rsplit(" ", 1)[1])
        assert kept >= 3  # the shards uploaded before the outage were verified and kept
        remote = {name: storage.read_bytes(f"{dest}/{name}") for name in storage.list_files(dest)}
    assert remote == tree_bytes(reference)


def test_synth_onto_an_unwritable_place_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = cli(capsys, "synth", str(blocker / "raw"))
    assert code == 2 and "not writable" in one_line(err)


def test_a_full_disk_stops_checkpointing_at_once_with_one_line(tmp_path):
    with small_tmpfs(tmp_path / "full", "64k"):
        writer = CheckpointWriter(str(tmp_path / "full" / "run"), log=lambda m: None)
        started = time.monotonic()
        writer.save({**_state(1), "big": torch.zeros(100_000)}, 1, 0)
        with pytest.raises(UserError, match="No space left on device"):
            writer.close()
        assert time.monotonic() - started < 10  # no 9 retries over minutes
        assert not os.path.exists(tmp_path / "full" / "run" / "latest.json")


# --- bounded parsing -----------------------------------------------------------------------------

HANG_CHECK = """
import sys, tracemalloc
from pyact_torch.data.shards import read_tar, TarFormatError
tracemalloc.start()
try:
    with open(sys.argv[1], 'rb') as stream:  # a buffered file, as shards are read: read(n) allocates n
        list(read_tar(stream))
except TarFormatError as exc:
    print('refused:', exc)
print('peak', tracemalloc.get_traced_memory()[1])
"""


def _pax(record: bytes) -> bytes:
    return crafted_tar(header("././@PaxHeader", len(record), b"x") + pad(record), header("a.cls", 1) + pad(b"3"))


@pytest.mark.parametrize(
    "case",
    [
        "pax length 0",
        "pax length 1",
        "pax length past the end",
        "pax no newline",
        "1 GiB member in 4 KB",
        "2**40 member",
        "8 GiB base-256 member",
    ],
)
def test_tar_headers_cannot_hang_or_exhaust_memory(case, tmp_path):
    data = {
        "pax length 0": _pax(b"0 path=x\n"),
        "pax length 1": _pax(b"1 path=x\n"),
        "pax length past the end": _pax(b"99 path=x\n"),
        "pax no newline": _pax(b"10 path=xy"),
        "1 GiB member in 4 KB": crafted_tar(header("a.clip.npy", 1 << 30) + bytes(3000)),
        "2**40 member": crafted_tar(header("a.clip.npy", 1 << 40) + bytes(3000)),
        "8 GiB base-256 member": crafted_tar(header("a.clip.npy", 8 << 30) + bytes(3000)),
    }[case]
    path = tmp_path / "crafted.tar"
    path.write_bytes(data)
    result = subprocess.run([sys.executable, "-c", HANG_CHECK, str(path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("refused:")
    assert int(result.stdout.rsplit("peak ", 1)[1]) < 16 << 20  # bytes held at the most


def test_a_lying_member_size_never_allocates_more_than_the_file_holds(tmp_path):
    """A member within the size bound but cut short: read in pieces, never allocated whole."""
    import tracemalloc

    path = tmp_path / "cut.tar"
    path.write_bytes(crafted_tar(header("a.clip.npy", 900 << 20) + bytes(4096)))
    tracemalloc.start()
    with open(path, "rb") as stream, pytest.raises(TarFormatError, match="truncated"):
        list(read_tar(stream))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 16 << 20


def _replace_member(shard: str, ext: str, content: bytes) -> None:
    """Rewrite a shard with the first window's ``ext`` member replaced."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    first_key = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            if info.name == f"{first_key}.{ext}":
                data = content
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


NPY = b"\x93NUMPY\x01\x00"


@pytest.mark.parametrize(
    "case",
    [
        "cls not a number",
        "cls out of range",
        "npy wrong shape",
        "npy huge header",
        "npy object dtype",
        "npy short data",
        "missing shard",
        "half shard",
        "count disagrees",
    ],
)
@pytest.mark.slow
def test_damaged_data_in_training_is_one_line_naming_the_shard(case, shards, tmp_path):
    manifest = read_manifest(shards)
    entry = manifest["splits"]["train"]["shards"][0]
    shard = os.path.join(shards, entry["name"])
    if case == "cls not a number":
        _replace_member(shard, "cls", b"seven")
    elif case == "cls out of range":
        _replace_member(shard, "cls", b"99")
    elif case == "npy wrong shape":
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((2, 2), np.uint8))
        _replace_member(shard, "clip.npy", buffer.getvalue())
    elif case == "npy huge header":
        _replace_member(shard, "clip.npy", NPY + (60000).to_bytes(2, "little") + b"{" * 100)
    elif case == "npy object dtype":
        _replace_member(
            shard,
            "clip.npy",
            NPY + b"\x76\x00" + b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }".ljust(117) + b"\n",
        )
    elif case == "npy short data":
        buffer = io.BytesIO()
        np.save(buffer, np.zeros((6, 16, 16, 3), np.uint8))
        _replace_member(shard, "clip.npy", buffer.getvalue()[:-100])
    elif case == "missing shard":
        os.remove(shard)
    elif case == "half shard":
        data = open(shard, "rb").read()
        open(shard, "wb").write(data[: len(data) // 2])
    else:
        entry["count"] += 1
        manifest["splits"]["train"]["count"] += 1
        write_manifest(shards, manifest)
    for workers in ("0", "2"):
        result = run(
            "train",
            "--data",
            shards,
            "--run-dir",
            str(tmp_path / f"run{workers}"),
            *TRAIN[:-4],
            "--workers",
            workers,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-3000:]
        line = one_line(result.stderr)
        assert entry["name"] in line or "inspect" in line, line


@pytest.mark.slow
def test_a_damaged_shard_under_xla_is_one_line_not_a_short_epoch(shards, tmp_path):
    """On XLA the device loader reads host batches in a thread whose exceptions never reach
    training: before, a damaged shard ended the epoch early, the run went on and exited 0."""
    entry = read_manifest(shards)["splits"]["train"]["shards"][2]
    shard = os.path.join(shards, entry["name"])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "scripts", "train_tpu.py"),
            "--data",
            shards,
            "--run-dir",
            str(tmp_path / "run"),
            "--device",
            "xla",
            "--model",
            "tiny",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PJRT_DEVICE="CPU"),
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert entry["name"] in one_line(result.stderr)
    assert not (tmp_path / "run" / "final.pt").exists()


@pytest.mark.parametrize(
    "damage", ["count 0", "count missing", "count disagrees with the shards", "not a dict", "shard count not a number"]
)
@pytest.mark.parametrize("command", ["inspect", "train", "evaluate"])
def test_a_malformed_split_entry_is_one_line(damage, command, shards, small_run, tmp_path, capsys):
    manifest = read_manifest(shards)
    split = "test" if command == "evaluate" else "train"
    entry = manifest["splits"][split]
    if damage == "count 0":
        entry["count"] = 0
    elif damage == "count missing":
        del entry["count"]
    elif damage == "count disagrees with the shards":
        entry["count"] += 5
    elif damage == "not a dict":
        manifest["splits"][split] = ["x"]
    else:
        entry["shards"][0]["count"] = "12"
    write_manifest(shards, manifest)
    args = {
        "inspect": ["inspect", shards, "--out", str(tmp_path / "g.png"), "--split", split],
        "train": ["train", "--data", shards, "--run-dir", str(tmp_path / "run"), *TRAIN],
        "evaluate": [
            "evaluate",
            "--checkpoint",
            small_run,
            "--data",
            shards,
            "--out",
            str(tmp_path / "s"),
            "--device",
            "cpu",
        ],
    }[command]
    code, err = cli(capsys, *args)
    assert code == 2 and "malformed" in one_line(err)


def test_a_json_member_that_is_not_the_metadata_is_one_line(shards, small_run, tmp_path, capsys):
    entry = read_manifest(shards)["splits"]["test"]["shards"][0]
    _replace_member(os.path.join(shards, entry["name"]), "json", b"not json")
    code, err = cli(
        capsys, "evaluate", "--checkpoint", small_run, "--data", shards, "--out", str(tmp_path / "s"), "--device", "cpu"
    )
    line = one_line(err)
    assert code == 2 and entry["name"] in line and "json" in line
    assert not (tmp_path / "s" / "predictions.json").exists()


def test_evaluate_with_a_missing_split_or_folder_is_one_line(shards, small_run, tmp_path, capsys):
    shutil.rmtree(os.path.join(shards, "test"))
    code, err = cli(
        capsys, "evaluate", "--checkpoint", small_run, "--data", shards, "--out", str(tmp_path / "s"), "--device", "cpu"
    )
    assert code == 2 and "missing" in one_line(err)
    manifest = read_manifest(shards)
    del manifest["splits"]["test"]
    write_manifest(shards, manifest)
    code, err = cli(
        capsys, "evaluate", "--checkpoint", small_run, "--data", shards, "--out", str(tmp_path / "s"), "--device", "cpu"
    )
    assert code == 2 and "no 'test' split" in one_line(err)


# --- signals -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_to_the_process_group_checkpoints_and_exits_zero(learn_shards, tmp_path):
    """A VM shutdown SIGTERMs every process of the group, loader workers included."""
    run_dir = str(tmp_path / "run")
    args = [
        "train",
        "--data",
        learn_shards,
        "--run-dir",
        run_dir,
        "--device",
        "cpu",
        "--model",
        "tiny",
        "--epochs",
        "3",
        "--workers",
        "2",
        "--log-every",
        "5",
        "--ckpt-every",
        "0",
    ]
    process = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and not os.path.exists(metrics):
        time.sleep(0.05)
    time.sleep(0.5)  # loader workers are up
    os.killpg(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM" in out
    pointer = json.load(open(os.path.join(run_dir, "latest.json")))
    stopped = int(out.split("stopped by SIGTERM at step ")[1].split()[0])
    assert pointer["step"] == stopped > 0
    resumed = run(*args, timeout=600)
    assert resumed.returncode == 0 and "resumed at step" in resumed.stdout, resumed.stderr[-2000:]
    assert os.path.exists(os.path.join(run_dir, "final.pt"))


EXIT_WITH_A_LIVE_LOADER = """
import sys
from pyact_torch.data.loader import HostBatches, Part, WindowDataset
from pyact_torch.data.shards import read_manifest
dataset = WindowDataset(sys.argv[1], read_manifest(sys.argv[1]), "train", 4, Part(), train=True, workers=1)
batches = iter(HostBatches(dataset, 1, len(dataset)))
next(batches)  # a loader worker runs, its iterator still referenced: as when an error stops a step
raise SystemExit(2)
"""


def test_a_command_that_fails_mid_epoch_still_exits(small_shards):
    """At exit, multiprocessing ends leftover loader workers with SIGTERM from the main process:
    workers ignore only SIGTERMs from others (a process-group preemption). With every SIGTERM
    ignored, this exit hung forever (measured: killed by the timeout)."""
    result = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_A_LIVE_LOADER, small_shards], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr[-2000:]


def _children(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
def test_preprocessing_workers_die_with_their_parent(raw_dataset, tmp_path):
    import psutil

    dest = str(tmp_path / "out")
    process = subprocess.Popen(
        [*CLI, "preprocess", raw_dataset, dest, "--workers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = os.path.join(dest, ".pyact-cache", "decoded.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.exists(log) and open(log).read().count("\n") >= 2):
        time.sleep(0.02)
    workers = _children(process.pid)
    assert len(workers) >= 2, "no worker processes to watch"
    process.kill()
    process.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"{len(alive)} workers outlived their killed parent"


@pytest.mark.slow
def test_sigterm_to_preprocessing_stops_cleanly_and_the_rerun_is_identical(raw_dataset, tmp_path):
    reference = str(tmp_path / "reference")
    assert main(["preprocess", raw_dataset, reference, "--workers", "2", "--shard-size", "16"]) == 0
    dest = str(tmp_path / "out")
    process = subprocess.Popen(
        [*CLI, "preprocess", raw_dataset, dest, "--workers", "2", "--shard-size", "16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    log = os.path.join(dest, ".pyact-cache", "decoded.log")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (os.path.exists(log) and open(log).read().count("\n") >= 2):
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert not [n for n in storage.list_files(dest) if n.endswith(".partial")]
    assert main(["preprocess", raw_dataset, dest, "--workers", "2", "--shard-size", "16"]) == 0
    assert tree_bytes(dest) == tree_bytes(reference)


# --- one line for every user-fixable failure -------------------------------------------------------


def _state(step: int) -> dict:
    from pyact_torch.training.checkpoint import make_checkpoint

    return make_checkpoint({"w": torch.full((3,), float(step))}, {"model": "tiny"}, ["a", "no-action"], {}, step=step)


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


@pytest.mark.parametrize("damage", ["invalid JSON", "a list", "names a missing file"])
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
            "a list": "[]",
            "names a missing file": json.dumps({**good, "name": "ckpt-999.pt", "history": []}),
        }[damage]
    )
    capsys.readouterr()
    assert main([*args, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "warning" in out and f"resumed at step {good['step']}" in out
    assert (run_dir / "final.pt").exists()


def test_scoring_falls_back_from_a_damaged_best_to_final(small_run, small_shards, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(small_run, run_dir)
    best = json.loads((run_dir / "best.json").read_text())
    for damage in ({**best, "sha256": "0" * 64}, {k: v for k, v in best.items() if k != "name"}):
        (run_dir / "best.json").write_text(json.dumps(damage))
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
    manifest = read_manifest(shards)
    del manifest["splits"]["eval"]
    write_manifest(shards, manifest)
    assert main(["train", "--data", shards, "--run-dir", str(tmp_path / "run"), *TRAIN]) == 0
    assert "no eval split" in capsys.readouterr().out
    assert (tmp_path / "run" / "final.pt").exists() and not (tmp_path / "run" / "best.json").exists()


def test_an_image_size_the_model_cannot_take_is_refused_before_work(tiny_dataset, shards, tmp_path, capsys):
    code, err = cli(capsys, "preprocess", tiny_dataset, str(tmp_path / "out"), "--image-size", "40")
    assert code == 2 and "--image-size" in one_line(err)
    assert not (tmp_path / "out").exists()
    manifest = read_manifest(shards)
    manifest["image_size"] = 40  # e.g. a conversion of other data
    write_manifest(shards, manifest)
    code, err = cli(capsys, "train", "--data", shards, "--run-dir", str(tmp_path / "run"), *TRAIN)
    assert code == 2 and "multiple of 16" in one_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_lone_reader_with_more_workers_than_shards_uses_fewer(small_shards, tmp_path, capsys):
    """It was refused ("lower --workers") although one reader reads every shard. The refusal
    stays where replicas or hosts outnumber shards (tests/training/test_spmd.py)."""
    manifest = read_manifest(small_shards)
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
