"""Fixtures shared by the fault tests in tests/faults (one module per class of docs/faults.md)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from pyact_torch.cli import main

from faults_common import TRAIN, pyact_records, write_records


@pytest.fixture
def shards(small_shards, tmp_path) -> str:
    """A private copy of small preprocessed shards (16x16, 16 windows a shard) to damage."""
    copy = str(tmp_path / "shards")
    shutil.copytree(small_shards, copy)
    return copy


@pytest.fixture(scope="session")  # one run shared by the fault modules, as when they were one module
def small_run(small_shards, tmp_path_factory) -> str:
    """A finished one-epoch tiny run on the small shards."""
    run_dir = str(tmp_path_factory.mktemp("run") / "run")
    assert main(["train", "--data", small_shards, "--run-dir", run_dir, *TRAIN]) == 0
    return run_dir


@pytest.fixture
def converted(tmp_path):
    """DEST (two levels below tmp_path) after converting 30 records into train, 8 per shard."""
    records = pyact_records(np.random.default_rng(3), 30)
    write_records(tmp_path / "first", records)
    dest = tmp_path / "out" / "shards"
    assert main(["convert-tfrecords", str(tmp_path / "first"), str(dest), "--shard-size", "8"]) == 0
    return dest, records
