"""Shared fixtures: small synthetic datasets in the real layout, and a real fake-gcs-server."""

from __future__ import annotations

import shutil

import pytest

from pyact_torch.config import SynthConfig
from pyact_torch.io.emulator import GCSEmulator
from pyact_torch.data.synthetic import make_dataset


def _synthetic(root, subjects, frames, size, seed, detection=0) -> str:
    make_dataset(
        SynthConfig(str(root), subjects=subjects, frames=frames, size=size, seed=seed, workers=2, detection=detection),
        progress=False,
    )
    return str(root)


@pytest.fixture(scope="session")
def raw_dataset(tmp_path_factory) -> str:
    """3 Train and 2 Test subjects, 16 actions each, 20-30 frames a sequence, 96x72 colour; 2
    TestDetection recordings (which preprocessing leaves alone)."""
    return _synthetic(tmp_path_factory.mktemp("raw") / "handaction", (3, 0, 2), (20, 30), (96, 72), seed=1, detection=2)


@pytest.fixture(scope="session")
def tiny_template(tmp_path_factory) -> str:
    """A very small dataset (2 Train, 1 Test subjects, 14-16 frames) to copy and break."""
    return _synthetic(tmp_path_factory.mktemp("tiny") / "handaction", (2, 0, 1), (14, 16), (32, 24), seed=2)


@pytest.fixture
def tiny_dataset(tiny_template, tmp_path) -> str:
    """A private copy of the tiny dataset that a test may damage."""
    copy = str(tmp_path / "raw")
    shutil.copytree(tiny_template, copy)
    return copy


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A running fake-gcs-server with bucket ``pyact-test``; STORAGE_EMULATOR_HOST points at it."""
    root = tmp_path_factory.mktemp("gcs")
    emulator = GCSEmulator(str(root / "data"), log=str(root / "server.log"))
    emulator.start()
    emulator.create_bucket("pyact-test")
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def learn_shards(tmp_path_factory) -> str:
    """Shards of a learnable dataset: 6 Train subjects, a held-out Eval subject, 2 Test; its raw
    folder (``../raw``) also has 4 TestDetection recordings."""
    from pyact_torch.config import PreprocessConfig
    from pyact_torch.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("learn")
    raw = _synthetic(root / "raw", (6, 1, 2), (40, 60), (96, 72), seed=3, detection=4)
    dest = str(root / "shards")
    preprocess(
        PreprocessConfig(raw, dest, image_size=32, shard_size=64, workers=2), progress=False, print_fn=lambda *a: None
    )
    return dest


@pytest.fixture(scope="session")
def small_shards(tiny_template, tmp_path_factory) -> str:
    """Shards of the tiny dataset at 16x16: quick XLA:CPU runs where learning does not matter."""
    from pyact_torch.config import PreprocessConfig
    from pyact_torch.data.preprocess import preprocess

    dest = str(tmp_path_factory.mktemp("small") / "shards")
    preprocess(
        PreprocessConfig(tiny_template, dest, image_size=16, shard_size=16, workers=2),
        progress=False,
        print_fn=lambda *a: None,
    )
    return dest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: takes more than ~20 s (training, subprocesses); `make test-quick` runs the rest"
    )
    config.addinivalue_line("markers", "cuda: needs a GPU; skipped without one (bench/gpu_check.sh runs them)")


@pytest.fixture(scope="session")
def detector_run(learn_shards, tmp_path_factory) -> str:
    """``tiny`` trained on ``learn_shards`` with the demo's settings (the demo's dataset too),
    ``--augment standard`` included: without it, detection on the Test split swings with the
    training seed and the CPU's rounding (docs/benchmarks.md, "Detection and augmentation")."""
    from pyact_torch.cli import main

    run_dir = str(tmp_path_factory.mktemp("detector") / "run")
    assert (
        main(
            [
                "train",
                "--data",
                learn_shards,
                "--run-dir",
                run_dir,
                "--model",
                "tiny",
                "--device",
                "cpu",
                "--epochs",
                "10",
                "--lr",
                "2e-3",
                "--lr-schedule",
                "cosine",
                "--ckpt-every",
                "0",
                "--log-every",
                "1000",
                "--workers",
                "1",
                "--seed",
                "3",
                "--augment",
                "standard",
            ]
        )
        == 0
    )
    return run_dir
