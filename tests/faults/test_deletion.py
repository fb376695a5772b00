"""Faults of the class "deletion: only what we made and marked" (docs/faults.md): the frame
cache, a folder of the user's in DEST and a DEST of other files are left as they were.
"""

from __future__ import annotations

import os

import numpy as np

from pyact_torch.cli import main
from pyact_torch.data.shards import read_manifest

from faults_common import one_line, cli, one_error_line, pyact_records, write_records


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
    assert read_manifest(str(dest)).document["splits"]["train"]["count"] > 0


def test_a_cache_folder_that_is_not_ours_is_refused(tiny_dataset, tmp_path, capsys):
    dest = tmp_path / "out"
    (dest / ".pyact-cache").mkdir(parents=True)
    (dest / ".pyact-cache" / "frames.u8").write_text("not a cache of ours")
    code, err = cli(capsys, "preprocess", tiny_dataset, str(dest), "--workers", "1", "--image-size", "16")
    assert code == 2 and one_line(err)
    assert (dest / ".pyact-cache" / "frames.u8").read_text() == "not a cache of ours"


# --- convert-tfrecords ------------------------------------------------------------------------


def test_tfrecords_into_a_dest_of_other_files_is_refused(tmp_path, capsys):
    """Files but no manifest (another tool's output, an unfinished preprocessing run): never
    written over or deleted."""
    write_records(tmp_path / "records", pyact_records(np.random.default_rng(3), 4))
    dest = tmp_path / "dest"
    (dest / "train").mkdir(parents=True)
    (dest / "train" / "train-000000.tar").write_bytes(b"someone else's shard")
    assert main(["convert-tfrecords", str(tmp_path / "records"), str(dest), "--split", "train"]) == 2
    one_error_line(capsys, str(dest))
    assert (dest / "train" / "train-000000.tar").read_bytes() == b"someone else's shard"
