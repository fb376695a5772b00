"""Devices beyond TPUs: a GPU (``--device cuda``; the tests marked ``cuda`` run only where
there is one, e.g. through bench/gpu_check.sh), torch.compile, and a bare GPU box's Python
(no torch_xla, no google-cloud-storage) running training and scoring on local data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pyact_torch.cli import main
from pyact_torch.errors import installed
from pyact_torch.training.devices import make_backend
from pyact_torch.model import build_model, model_input
from pyact_torch.training.train import train_step

from helpers import ROOT

HAS_GPU = torch.cuda.is_available()
HAS_XLA, HAS_GCS = installed("torch_xla"), installed("google.cloud.storage")
cuda = pytest.mark.skipif(not HAS_GPU, reason="needs a GPU (run bench/gpu_check.sh on a GPU machine)")
# a Python without torch_xla, webdataset and google-cloud-storage: imports of them fail as if absent
BARE = """
import sys
class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch_xla", "webdataset") or name.split(".")[0] == "google":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""
SMALL = ["--model", "tiny", "--epochs", "1", "--batch-size", "8", "--workers", "1", "--log-every", "5"]


def bare_pyact(tmp_path, *args: str) -> subprocess.CompletedProcess:
    site = tmp_path / "bare-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BARE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), ROOT]))
    env.pop("STORAGE_EMULATOR_HOST", None)
    return subprocess.run(
        [sys.executable, "-m", "pyact_torch", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.mark.slow
def test_a_bare_gpu_box_python_trains_and_scores_local_data(small_shards, tmp_path):
    """What `pip install --no-deps --no-build-isolation -e .` gives on a GPU box whose Python has
    torch but neither torch_xla nor google-cloud-storage: train and evaluate work on local data; a gs:// path and
    --device xla are one line each naming the package."""
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "scores")
    trained = bare_pyact(tmp_path, "train", "--data", small_shards, "--run-dir", run_dir, "--device", "cpu", *SMALL)
    assert trained.returncode == 0, trained.stderr[-2000:]
    scored = bare_pyact(
        tmp_path, "evaluate", "--checkpoint", run_dir, "--data", small_shards, "--out", out, "--device", "cpu"
    )
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.load(open(os.path.join(out, "metrics.json")))["windows"] > 0
    probe = bare_pyact(tmp_path, "-c", "x")  # the probe itself: really no torch_xla or google here
    assert probe.returncode == 2
    for args, package in (
        (["--run-dir", "gs://pyact-test/run", "--device", "cpu"], "google-cloud-storage"),
        (["--run-dir", str(tmp_path / "xla"), "--device", "xla"], "torch_xla"),
    ):
        failed = bare_pyact(tmp_path, "train", "--data", small_shards, *SMALL, *args)
        assert failed.returncode == 2
        assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1, failed.stderr[-2000:]
        assert package in failed.stderr


@pytest.mark.skipif(not (HAS_XLA and HAS_GCS), reason="torch_xla or google-cloud-storage is not installed here")
def test_the_bare_box_probe_hides_the_packages(tmp_path):
    """Negative control for the test above: the probe makes torch_xla and google.cloud.storage
    unimportable in the child, and the same child sees them without it."""
    code = (
        "import importlib.util as u\nfor n in ('torch_xla', 'google.cloud.storage'):\n"
        "    try: print(n, u.find_spec(n) is not None)\n    except ImportError: print(n, False)\n"
    )
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BARE)
    hidden = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(site))
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert hidden.stdout.split() == ["torch_xla", "False", "google.cloud.storage", "False"]
    assert shown.stdout.split() == ["torch_xla", "True", "google.cloud.storage", "True"]


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("command", ["train", "evaluate", "detect", "export"])
def test_device_cuda_without_a_gpu_is_one_line(command, detector_run, learn_shards, tmp_path, capsys):
    args = {
        "train": ["train", "--data", learn_shards, "--run-dir", str(tmp_path / "run"), *SMALL],
        "evaluate": ["evaluate", "--checkpoint", detector_run, "--data", learn_shards, "--out", str(tmp_path / "o")],
        "detect": [
            "detect",
            "--checkpoint",
            detector_run,
            "--src",
            os.path.join(os.path.dirname(learn_shards), "raw"),
            "--out",
            str(tmp_path / "o"),
        ],
        "export": ["export", "--checkpoint", detector_run, "--out", str(tmp_path / "m.onnx")],
    }[command]
    assert main([*args, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda: this machine has no usable GPU") and err.count("\n") == 1
    assert not any(os.path.exists(tmp_path / name) for name in ("run", "o", "m.onnx"))


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--device", "cpu", "--sync-bn"], "--sync-bn needs --device cuda"),
        (["--device", "xla", "--compile"], "--compile is for --device cpu or cuda"),
        (["--device", "cpu", "--collective-timeout", "0"], "--collective-timeout"),
    ],
)
def test_device_flags_that_do_not_fit_are_one_line(flags, says, learn_shards, tmp_path, capsys):
    assert main(["train", "--data", learn_shards, "--run-dir", str(tmp_path / "run"), "--model", "tiny", *flags]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_compiled_steps_equal_eager_steps():
    """--compile (torch.compile, inductor on the CPU) against eager: the same losses and weights
    after 3 steps, to float32 rounding (fused kernels sum in another order). SGD, not Adam:
    Adam turns rounding-sized gradients of a dead channel into whole learning-rate steps
    (measured: one conv bias 2.8e-3 apart after 3 steps), which says nothing about compile."""
    torch.manual_seed(0)
    eager = build_model("tiny", 3, 6, 16, 17)
    compiled = build_model("tiny", 3, 6, 16, 17)
    compiled.load_state_dict(eager.state_dict())
    backend = make_backend("cpu")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, compiled)]
    net = torch.compile(compiled)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        clips = torch.randint(0, 256, (8, 6, 16, 16, 3), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 17, (8,), generator=generator)
        a = train_step(eager, optimizers[0], model_input(clips), labels, backend)
        b = train_step(net, optimizers[1], model_input(clips), labels, backend)
        assert abs(float(a) - float(b)) < 1e-4
    for key, value in eager.state_dict().items():
        assert torch.allclose(value.float(), compiled.state_dict()[key].float(), atol=1e-4), key


# --- on a GPU (bench/gpu_check.sh runs these) ---------------------------------------------------


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_a_gpu_learns_and_scores_like_the_cpu(precision, learn_shards, tmp_path):
    run_dir, out = str(tmp_path / "run"), str(tmp_path / "scores")
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
                "cuda",
                # the detector's recipe, not the CPU learning test's: a GPU's rounding changes the
                # run as another seed would, and 5 epochs without augmentation reach 0.78-0.96 over
                # seeds 0-2 on the CPU; this recipe reached 0.984-0.988 over seeds 0-4
                # (docs/benchmarks.md, "The GPU learning test's recipe")
                "--epochs",
                "10",
                "--augment",
                "standard",
                "--lr",
                "2e-3",
                "--lr-schedule",
                "cosine",
                "--log-every",
                "100",
                "--workers",
                "1",
                "--precision",
                precision,
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["accuracy"] for r in rows if r["kind"] == "eval"][-1] >= 0.9
    assert main(["evaluate", "--checkpoint", run_dir, "--data", learn_shards, "--out", out, "--device", "cuda"]) == 0
    on_gpu = json.load(open(os.path.join(out, "metrics.json")))
    assert (
        main(["evaluate", "--checkpoint", run_dir, "--data", learn_shards, "--out", out + "-cpu", "--device", "cpu"])
        == 0
    )
    on_cpu = json.load(open(os.path.join(out + "-cpu", "metrics.json")))
    assert abs(on_gpu["accuracy"] - on_cpu["accuracy"]) <= 2 / on_cpu["windows"]


@cuda
@pytest.mark.cuda
def test_detect_and_export_on_a_gpu_match_the_cpu(learn_shards, tmp_path):
    from pyact_torch.detection.runners import load_checkpoint_runner

    # any trained weights will do: one epoch on the GPU (the 10 CPU epochs of detector_run would
    # take a third of bench/gpu_check.sh's time for the tests)
    run_dir = str(tmp_path / "run")
    args = ["--model", "tiny", "--epochs", "1", "--log-every", "100", "--workers", "1"]
    assert main(["train", "--data", learn_shards, "--run-dir", run_dir, "--device", "cuda", *args]) == 0
    gpu = load_checkpoint_runner(run_dir, log=lambda *a: None, device="cuda")
    cpu = load_checkpoint_runner(run_dir, log=lambda *a: None)
    windows = np.random.default_rng(0).integers(0, 256, (8, *cpu.info.clip_shape), dtype=np.uint8)
    assert np.abs(gpu.logits(windows) - cpu.logits(windows)).max() < 1e-3
    assert main(["export", "--checkpoint", run_dir, "--out", str(tmp_path / "m.pt2"), "--device", "cuda"]) == 0
    raw = os.path.join(os.path.dirname(learn_shards), "raw")
    assert (
        main(
            [
                "detect",
                "--checkpoint",
                run_dir,
                "--src",
                raw,
                "--out",
                str(tmp_path / "det"),
                "--device",
                "cuda",
                "--no-video",
            ]
        )
        == 0
    )


@cuda
@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize(
    "sync_bn",
    [
        False,  # on one GPU too: NCCL with device_id, the gloo vote group beside it, DDP(device_ids)
        pytest.param(
            True,
            # SyncBatchNorm with one process is plain batch norm (it syncs only when world > 1)
            marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="--sync-bn needs 2 GPUs to mean anything"),
        ),
    ],
)
def test_torchrun_on_gpus_with_and_without_sync_bn(sync_bn, small_shards, tmp_path):
    gpus = min(torch.cuda.device_count(), 2)
    run_dir = str(tmp_path / "run")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--local-addr",  # the workers' MASTER_ADDR, rather than the host's name, which may not resolve
        "127.0.0.1",
        "--nproc_per_node",
        str(gpus),
        "-m",
        "pyact_torch",
        "train",
        "--data",
        small_shards,
        "--run-dir",
        run_dir,
        "--device",
        "cuda",
        "--model",
        "tiny",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--workers",
        "1",
    ]
    result = subprocess.run(command + (["--sync-bn"] if sync_bn else []), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["replicas"] == gpus and config["config"]["sync_bn"] is sync_bn


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU: auto picks it")
def test_device_auto_picks_eager_cpu_here_and_says_so(small_shards, tmp_path, capsys, monkeypatch):
    """The default was xla: without PJRT_DEVICE it ran XLA:CPU at a fraction of eager speed
    without a word. The negative control: PJRT_DEVICE set means a TPU (or XLA:CPU) was asked for."""
    from pyact_torch.training.devices import auto_device

    monkeypatch.delenv("PJRT_DEVICE", raising=False)
    assert main(["train", "--data", small_shards, "--run-dir", str(tmp_path / "run"), *SMALL[:-2]]) == 0
    out = capsys.readouterr().out
    assert "device: cpu (--device auto: no TPU or GPU found" in out
    assert "1 readers (cpu)" in out
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    if HAS_XLA:
        assert auto_device() == ("xla", "PJRT_DEVICE=CPU")
    else:  # a bare GPU box's Python (bench/gpu_check.sh's)
        assert auto_device() == ("cpu", "no GPU found, and PJRT_DEVICE=CPU is set but torch_xla is not installed")
    assert auto_device(distributed=True) == ("cpu", "no GPU found (under torchrun: cpu or cuda)")


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_a_gpu_out_of_memory_is_one_line_naming_the_batch_size(command, small_shards, tmp_path, capsys, monkeypatch):
    """torch.OutOfMemoryError (what the CUDA allocator raises; raised here by hand) was a
    traceback. The run dir is left so that the same command with a smaller batch goes on."""
    import pyact_torch.scoring.evaluate
    import pyact_torch.training.train

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "1.2 GiB is free.\nIncluding non-PyTorch memory, this process has 78 GiB memory in use."
        )

    run_dir = str(tmp_path / "run")
    train = ["train", "--data", small_shards, "--run-dir", run_dir, *SMALL[:-2], "--device", "cpu"]
    if command == "evaluate":
        assert main(train) == 0
        monkeypatch.setattr(pyact_torch.scoring.evaluate, "evaluate", out_of_memory)
        args = ["evaluate", "--checkpoint", run_dir, "--data", small_shards, "--out", str(tmp_path / "o")]
        args += ["--device", "cpu", "--batch-size", "16"]
    else:
        monkeypatch.setattr(pyact_torch.training.train, "train_step", out_of_memory)
        args = train
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    batch = "16" if command == "evaluate" else "8"
    assert err == (
        f"error: the GPU ran out of memory at --batch-size {batch} (CUDA out of memory. Tried to allocate "
        f"20.00 GiB): use a smaller --batch-size{' or --precision bf16' if command == 'train' else ''}\n"
    )
    assert not os.path.exists(tmp_path / "o")
    monkeypatch.undo()
    assert main(args) == 0  # nothing left behind stands in the way


@pytest.mark.parametrize(
    "flags, package", [(["--device", "xla"], "torch_xla"), (["--gcs-emulator"], "google-cloud-storage")]
)
def test_a_demo_that_needs_a_missing_package_says_so_before_any_work(flags, package, tmp_path):
    """On a bare GPU box's Python the demo made its dataset and shards first (and cleared an
    earlier demo), then refused, suggesting --device cuda, which demo does not take."""
    out = tmp_path / "demo"
    failed = bare_pyact(tmp_path, "demo", "--out", str(out), *flags)
    assert failed.returncode == 2
    assert failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1, failed.stderr[-2000:]
    assert package in failed.stderr and "cuda" not in failed.stderr
    assert not out.exists()
