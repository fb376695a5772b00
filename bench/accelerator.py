#!/usr/bin/env python3
"""Accelerator benchmark: the training step on one device (``--device cpu|cuda``).

No data loading: every step trains on random uint8 clips made on the device once, through the
project's own ``model_input`` and ``train.train_step`` with a ``devices.make_backend(device)``
backend, so the figures are the model's and the step's alone (no loader, no host->device copy).
The machines are shared and noisy, so every figure is also printed as a ratio against a baseline
measured in the same run. Measures:
- training windows/s of ``tiny`` (32x32) and ``c3d`` (pyACT's ConvNet3D, 64x64) at several
  per-device batch sizes, fp32 and bf16 (``precision="bf16"``: autocast), eager and
  ``torch.compile`` (only where compiling takes reasonable time: on CPU only ``tiny``; a failed
  compile is a ``null`` figure with its reason); against eager fp32 at the smallest batch of the
  preset ("x base") and against the arm's reference at the same batch ("x ref": bf16 vs fp32,
  compiled vs eager, channels-last vs default layout);
- FLOPs per training window: ``FlopCounterMode`` over one forward + backward (on the meta
  device), divided by the batch (convolutions and matrix products, as FlopCounterMode counts);
- the device's dense matmul rate in this run (square fp32 and bf16; on cuda also TF32, which
  cuDNN uses for fp32 convolutions by default) and model FLOP utilisation (MFU) = FLOPs/window
  x windows/s / the matching precision's matmul rate;
- channels-last 3D (model and input ``.to(memory_format=torch.channels_last_3d)``) against the
  default layout: c3d fp32/bf16 (and tiny) on cuda, tiny on CPU;
- peak memory per arm on cuda (``torch.cuda.max_memory_allocated``: weights, Adam state and
  activations);
- 2 processes (``torch.distributed.run``, gloo, DDP through ``Backend.wrap``) against 1 process
  on the same global batch of ``tiny``: steps/s. torchrun gives each worker OMP_NUM_THREADS=1,
  so the fair 1-process baseline uses 2 threads (the same two cores); a 1-thread baseline is
  reported too. On cuda: one GPU per process (NCCL) against one GPU, skipped with fewer than 2.
On a CPU without native bf16 (bf16 matmul under half the fp32 rate) bf16 runs only at the
smallest batch of ``tiny``: a c3d bf16 step would take minutes. Every figure goes to one JSON
file (``--out``, rewritten after each measurement, so a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pyact_torch.training.devices import Backend, make_backend  # noqa: E402
from pyact_torch.errors import UserError  # noqa: E402
from pyact_torch.model import build_model, model_input  # noqa: E402
from pyact_torch.training.train import train_step  # noqa: E402

SEQ_LEN, CHANNELS, CLASSES = 6, 3, 17
IMAGE_SIZE = {"tiny": 32, "c3d": 64}
DEFAULT, CHANNELS_LAST = "default", "channels_last_3d"


# --- plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PresetPlan:
    """Which arms one preset runs, and how many steps each."""

    preset: str
    batches: tuple[int, ...]  # eager fp32 (the first is the preset's baseline) and bf16
    compile_batches: tuple[int, ...]  # torch.compile, fp32 and bf16
    channels_last_batches: tuple[int, ...]  # channels-last 3D, fp32 and bf16
    warmup: int
    steps: int
    compile_warmup: int = 3  # the first call compiles; the next ones must not


def make_plans(device: str, quick: bool) -> list[PresetPlan]:
    """The arms for this device (``quick``: the ~3-minute CPU smoke run)."""
    if device == "cuda":
        return [
            PresetPlan("tiny", (8, 32, 128, 512), (128,), (128,), 5, 10 if quick else 30),
            PresetPlan("c3d", (8, 32, 128, 256), (128,), (32, 128), 3, 5 if quick else 10),
        ]
    if quick:
        return [PresetPlan("tiny", (8, 32, 128), (32,), (32,), 2, 5), PresetPlan("c3d", (2, 8), (), (), 1, 2)]
    return [PresetPlan("tiny", (8, 32, 128), (32, 128), (32,), 3, 20), PresetPlan("c3d", (2, 8), (), (), 2, 3)]


# --- timing helpers --------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reason(exc: BaseException) -> str:
    """One line saying why a measurement failed."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


def random_batch(batch: int, image_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8 ``(N, T, H, W, C)`` clips and labels, made on ``device``."""
    clips = torch.randint(0, 256, (batch, SEQ_LEN, image_size, image_size, CHANNELS), dtype=torch.uint8, device=device)
    return clips, torch.randint(0, CLASSES, (batch,), device=device)


def timed_steps(
    step: Callable[[], torch.Tensor],
    device: torch.device,
    warmup: int,
    steps: int,
    barrier: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Run ``warmup`` then ``steps`` calls of ``step``; seconds of each phase (after a device
    sync, and ``barrier`` between them when replicas must start the timed phase together)."""
    started = time.perf_counter()
    loss = None
    for _ in range(warmup):
        loss = step()
    if loss is not None:
        float(loss)
    synchronize(device)
    if barrier is not None:
        barrier()
    warm = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss = step()
    synchronize(device)
    last = float(loss)  # the last step's loss: it has been computed
    elapsed = time.perf_counter() - started
    return {"warmup_s": warm, "seconds": elapsed, "steps_per_s": steps / elapsed, "last_loss": last}


def make_step(
    net: torch.nn.Module,
    model: torch.nn.Module,
    batch: int,
    image_size: int,
    backend: Backend,
    precision: str = "fp32",
    layout: str = DEFAULT,
) -> Callable[[], torch.Tensor]:
    """One training step of ``net`` (whose weights are ``model``'s) on a fixed random batch,
    uint8 -> float conversion included, as ``train.train_epoch`` runs it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    clips, labels = random_batch(batch, image_size, backend.device)
    model.train()

    def step() -> torch.Tensor:
        inputs = model_input(clips)
        if layout == CHANNELS_LAST:
            inputs = inputs.contiguous(memory_format=torch.channels_last_3d)
        return train_step(net, optimizer, inputs, labels, backend, precision)

    return step


def new_model(preset: str, device: torch.device) -> torch.nn.Module:
    """A freshly initialised model, made directly on ``device``."""
    torch.manual_seed(0)
    with device:
        return build_model(preset, CHANNELS, SEQ_LEN, IMAGE_SIZE[preset], CLASSES)


def release(device: torch.device) -> None:
    """Free what the last arm left (c3d with Adam holds ~3.3 GB)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- measurements ----------------------------------------------------------------------------


def conv_uses_tf32() -> bool:
    """Whether cuDNN runs fp32 convolutions in TF32 (torch's default)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):  # torch < 2.9
        return bool(torch.backends.cudnn.allow_tf32)
    for precision in (conv.fp32_precision, torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":  # "none" inherits the enclosing setting
            return precision == "tf32"
    return False


@contextlib.contextmanager
def matmul_tf32(enabled: bool) -> Iterator[None]:
    """cuBLAS fp32 matmuls in TF32 (``enabled``) or in full fp32, restored afterwards."""
    matmul = torch.backends.cuda.matmul
    name, value = (
        ("fp32_precision", "tf32" if enabled else "ieee")
        if hasattr(matmul, "fp32_precision")
        else ("allow_tf32", enabled)
    )
    saved = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


def matmul_rate(
    device: torch.device, dtype: torch.dtype, n: int, repeats: int, inner: int, tf32: bool = False
) -> dict[str, Any]:
    """FLOP/s of an ``n`` x ``n`` matmul in ``dtype`` (best of ``repeats`` timings of ``inner``
    products; on cuda fp32 in full precision, or TF32 with ``tf32``)."""
    with matmul_tf32(tf32) if device.type == "cuda" else contextlib.nullcontext():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        synchronize(device)
        best = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(inner):
                a @ b
            synchronize(device)
            best = min(best, (time.perf_counter() - started) / inner)
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "tf32": tf32,
        "seconds": best,
        "flops_per_s": 2 * n**3 / best,
    }


def measure_matmul(device: torch.device, quick: bool) -> dict[str, dict[str, Any]]:
    """The dense matmul rates MFU is measured against (keys: fp32, bf16, and tf32 on cuda)."""
    if device.type == "cuda":
        return {
            "fp32": matmul_rate(device, torch.float32, 8192, 3, 5),
            "tf32": matmul_rate(device, torch.float32, 8192, 3, 10, tf32=True),
            "bf16": matmul_rate(device, torch.bfloat16, 8192, 3, 20),
        }
    rates = {"fp32": matmul_rate(device, torch.float32, 2048, 3 if quick else 5, 1)}
    # without native bf16 a 2048 bf16 matmul takes a minute on a 2-core CPU: probe small first
    probe = matmul_rate(device, torch.bfloat16, 512, 2, 1)
    native = probe["flops_per_s"] >= 0.25 * rates["fp32"]["flops_per_s"]
    rates["bf16"] = matmul_rate(device, torch.bfloat16, 2048, 3 if quick else 5, 1) if native else probe
    return rates


def flops_per_window(preset: str) -> float:
    """FLOPs of one training window: one forward + backward at batch 2 on the meta device
    (shapes only, nothing computed), divided by 2."""
    batch = 2
    meta = torch.device("meta")
    model = new_model(preset, meta).train()
    clips, labels = random_batch(batch, IMAGE_SIZE[preset], meta)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(model_input(clips)), labels).backward()
    return counter.get_total_flops() / batch


@dataclass
class Arm:
    """One training measurement and its result."""

    preset: str
    batch: int
    precision: str = "fp32"
    compiled: bool = False
    layout: str = DEFAULT
    warmup: int = 0
    steps: int = 0
    windows_per_s: float | None = None
    seconds: float | None = None
    warmup_s: float | None = None  # for a compiled arm: mostly compilation
    last_loss: float | None = None
    peak_memory_bytes: int | None = None
    error: str | None = None  # why windows_per_s is null
    derived: dict[str, Any] = field(default_factory=dict)  # ratios and MFU, filled at the end

    @property
    def key(self) -> tuple:
        return self.preset, self.batch, self.precision, self.compiled, self.layout

    @property
    def mode(self) -> str:
        return ("compiled" if self.compiled else "eager") + (" cl3d" if self.layout == CHANNELS_LAST else "")

    def reference_key(self) -> tuple | None:
        """The arm this one is compared with at the same batch (None: eager fp32 default)."""
        if self.layout == CHANNELS_LAST:
            return self.preset, self.batch, self.precision, self.compiled, DEFAULT
        if self.compiled:
            return self.preset, self.batch, self.precision, False, DEFAULT
        if self.precision != "fp32":
            return self.preset, self.batch, "fp32", False, DEFAULT
        return None


def run_arm(arm: Arm, backend: Backend) -> Arm:
    """Train ``arm.warmup`` + ``arm.steps`` steps of a fresh model; fills in the figures (or
    ``error``: a failed compile or an out-of-memory is a null figure, not a crash)."""
    device = backend.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = net = step = None
    try:
        model = new_model(arm.preset, device)
        if arm.layout == CHANNELS_LAST:
            model = model.to(memory_format=torch.channels_last_3d)
        net = backend.wrap(model)
        if arm.compiled:
            torch._dynamo.reset()
            net = torch.compile(net)
        step = make_step(net, model, arm.batch, IMAGE_SIZE[arm.preset], backend, arm.precision, arm.layout)
        timing = timed_steps(step, device, arm.warmup, arm.steps)
        arm.windows_per_s = timing["steps_per_s"] * arm.batch
        arm.seconds, arm.warmup_s, arm.last_loss = timing["seconds"], timing["warmup_s"], timing["last_loss"]
        if device.type == "cuda":
            arm.peak_memory_bytes = torch.cuda.max_memory_allocated(device)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported null figure
        arm.error = reason(exc)
    finally:
        del model, net, step
        release(device)
    return arm


def plan_arms(plans: list[PresetPlan], native_bf16: bool, device: str) -> tuple[list[Arm], list[dict]]:
    """The arms to run, in order (eager first, compiled last: the slowest to set up), and those
    skipped with the reason."""
    eager, layout, compiled, skipped = [], [], [], []

    def bf16_runs(plan: PresetPlan, batch: int) -> bool:
        if native_bf16:
            return True
        if plan.preset == "tiny" and batch == plan.batches[0]:
            return True
        skipped.append(
            {
                "preset": plan.preset,
                "batch": batch,
                "precision": "bf16",
                "reason": "no native bf16 on this CPU (bf16 matmul under half the fp32 rate)",
            }
        )
        return False

    for plan in plans:
        common = {"preset": plan.preset, "warmup": plan.warmup, "steps": plan.steps}
        for batch in plan.batches:
            eager.append(Arm(batch=batch, **common))
            if bf16_runs(plan, batch):
                eager.append(Arm(batch=batch, precision="bf16", **common))
        for batch in plan.channels_last_batches:
            for precision in ("fp32", "bf16"):
                if precision == "fp32" or native_bf16:
                    layout.append(Arm(batch=batch, precision=precision, layout=CHANNELS_LAST, **common))
        for batch in plan.compile_batches:
            for precision in ("fp32", "bf16"):
                if precision == "fp32" or native_bf16:
                    compiled.append(
                        Arm(
                            batch=batch,
                            precision=precision,
                            compiled=True,
                            preset=plan.preset,
                            warmup=max(plan.warmup, plan.compile_warmup),
                            steps=plan.steps,
                        )
                    )
        if not plan.compile_batches:
            skipped.append(
                {
                    "preset": plan.preset,
                    "compiled": True,
                    "reason": f"compiling {plan.preset} on {device} takes too long for this benchmark",
                }
            )
    return eager + layout + compiled, skipped


def derive(arms: list[Arm], flops: dict[str, float], matmul: dict[str, dict], device: str) -> None:
    """Fill each arm's ratios: against its preset's baseline (eager fp32, default layout, the
    smallest batch), against its reference arm, and MFU against the matching matmul rate."""
    by_key = {arm.key: arm for arm in arms}
    baselines = {}
    for arm in arms:
        if arm.reference_key() is None and arm.preset not in baselines:
            baselines[arm.preset] = arm
    fp32_rate = "tf32" if device == "cuda" and conv_uses_tf32() else "fp32"

    def ratio(value: float | None, base: float | None) -> float | None:
        return value / base if value is not None and base else None

    for arm in arms:
        base = baselines.get(arm.preset)
        reference = by_key.get(arm.reference_key()) if arm.reference_key() else None
        rate_name = fp32_rate if arm.precision == "fp32" else arm.precision
        rate = matmul.get(rate_name, {}).get("flops_per_s")
        achieved = flops[arm.preset] * arm.windows_per_s if arm.windows_per_s is not None else None
        arm.derived = {
            "baseline": f"{base.preset} b{base.batch} fp32 eager" if base else None,
            "vs_baseline": ratio(arm.windows_per_s, base.windows_per_s if base else None),
            "reference": f"{reference.precision} {reference.mode} b{reference.batch}" if reference else None,
            "vs_reference": ratio(arm.windows_per_s, reference.windows_per_s if reference else None),
            "flops_per_s": achieved,
            "mfu": ratio(achieved, rate),
            "mfu_against": rate_name,
            "peak_memory_vs_baseline": ratio(arm.peak_memory_bytes, base.peak_memory_bytes if base else None),
        }


# --- 2 processes vs 1 ------------------------------------------------------------------------


class _AllReduceAfterBackward:
    """The alternative to DDP: ``xm.optimizer_step``'s semantics, every gradient all-reduced
    (one call per parameter) and averaged after the whole backward pass, then the step."""

    def __init__(self, backend: Backend):
        self.backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        import torch.distributed as dist

        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if parameter.grad is not None:
                    dist.all_reduce(parameter.grad)
                    parameter.grad /= self.backend.world
        optimizer.step()


def _dist_replica(
    index: int, device: str, batch: int, warmup: int, steps: int, result: str, reduction: str = "ddp"
) -> None:
    """One torchrun worker: tiny through DDP (``Backend.wrap``), or with ``reduction="manual"``
    an all-reduce of every gradient after the backward pass, at ``batch`` windows per process;
    rank 0 writes its steps/s to ``result``."""
    backend = make_backend(device, distributed=True, timeout=120)
    try:
        model = new_model("tiny", backend.device)
        net = backend.wrap(model) if reduction == "ddp" else model
        if reduction != "ddp":
            backend = _AllReduceAfterBackward(backend)  # type: ignore[assignment]
        step = make_step(net, model, batch, IMAGE_SIZE["tiny"], backend)

        def barrier() -> None:
            backend.all_reduce_sum(torch.zeros(1, device=backend.device)).cpu()

        timing = timed_steps(step, backend.device, warmup, steps, barrier=barrier)
        if backend.is_master:
            with open(result, "w") as handle:
                json.dump(dict(timing, world=backend.world, threads=torch.get_num_threads()), handle)
    finally:
        backend.close()


def child_dist(args: argparse.Namespace) -> None:
    """``--child-dist``: run as one worker of a torchrun launch."""
    from pyact_torch.training.devices import launch

    launch(
        _dist_replica,
        (args.child_device, args.batch, args.warmup, args.steps, args.result, args.reduction),
        args.child_device,
        distributed=True,
    )


def two_processes(device: str, global_batch: int, warmup: int, steps: int, reduction: str = "ddp") -> dict[str, Any]:
    """steps/s of 2 torchrun workers at ``global_batch // 2`` each (rank 0's figure)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = handle.name
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        os.path.abspath(__file__),
        "--child-dist",
        "--child-device",
        device,
        "--batch",
        str(global_batch // 2),
        "--warmup",
        str(warmup),
        "--steps",
        str(steps),
        "--result",
        result,
        "--reduction",
        reduction,
    ]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode:
            tail = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()][-3:]
            raise RuntimeError(f"torchrun exited {done.returncode}: {' | '.join(tail)[:400]}")
        with open(result) as handle:
            return json.load(handle)
    finally:
        os.remove(result)


def measure_distributed(device: torch.device, quick: bool) -> dict[str, Any]:
    """2 processes vs 1 on the same global batch of tiny (see the module docstring)."""
    if device.type == "cuda" and torch.cuda.device_count() < 2:
        return {"skipped": f"cuda with {torch.cuda.device_count()} GPU: 2 processes need 2 GPUs"}
    global_batch, warmup, steps = (32, 3, 10) if quick else (64, 5, 30)
    report: dict[str, Any] = {
        "preset": "tiny",
        "global_batch": global_batch,
        "per_process_batch": global_batch // 2,
        "warmup": warmup,
        "steps": steps,
        "backend": "nccl" if device.type == "cuda" else "gloo",
    }
    try:
        report["two_processes"] = two_processes(device.type, global_batch, warmup, steps)
    except Exception as exc:  # noqa: BLE001
        report["two_processes"] = {"steps_per_s": None, "error": reason(exc)}
    try:  # DDP's choice against the all-reduce after the backward pass
        report["two_processes_manual_all_reduce"] = two_processes(device.type, global_batch, warmup, steps, "manual")
    except Exception as exc:  # noqa: BLE001
        report["two_processes_manual_all_reduce"] = {"steps_per_s": None, "error": reason(exc)}
    manual = report["two_processes_manual_all_reduce"].get("steps_per_s")
    ddp = report["two_processes"].get("steps_per_s")
    report["ddp_vs_manual_all_reduce"] = ddp / manual if ddp and manual else None
    backend = make_backend(device.type)
    saved = torch.get_num_threads()
    baselines = (
        {"one_process": None} if device.type == "cuda" else {"one_process_2_threads": 2, "one_process_1_thread": 1}
    )
    try:
        for name, threads in baselines.items():
            if threads:
                torch.set_num_threads(threads)
            model = new_model("tiny", device)
            timing = timed_steps(
                make_step(model, model, global_batch, IMAGE_SIZE["tiny"], backend), device, warmup, steps
            )
            report[name] = dict(timing, threads=torch.get_num_threads())
            del model
            release(device)
    finally:
        torch.set_num_threads(saved)
    two = report["two_processes"].get("steps_per_s")
    for name in baselines:
        one = report[name]["steps_per_s"]
        report[f"two_vs_{name}"] = two / one if two and one else None
    return report


# --- report ----------------------------------------------------------------------------------


def write_json(path: str, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path`` atomically (a run cut short leaves the last complete one)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as handle:
        json.dump(report, handle, indent=1)
    os.replace(handle.name, path)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
        return names[0] if names else platform.processor()
    except OSError:
        return platform.processor()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(report: dict[str, Any]) -> None:
    """The readable summary: every figure with its ratio."""
    meta = report["meta"]
    print(
        f"\n== {meta['device']} ({meta['device_name']}), torch {meta['torch']}, cuda {meta['cuda']}, "
        f"{meta['threads']} threads, {'quick' if meta['quick'] else 'full'} run, {meta['seconds']:.0f} s =="
    )
    # the 1-minute load at the end counts this benchmark's own threads (one drives a GPU)
    own = meta["threads"] if meta["device"] == "cpu" else 1
    load = max(meta["loadavg_start"][0], meta["loadavg_now"][0] - own)
    if load > 0.5 * (meta["cpu_count"] or 1):
        print(
            f"note: a load average of {load:.1f} besides this benchmark's on {meta['cpu_count']} CPUs: other work "
            f"shared the machine; CPU figures (multi-threaded ones most) are disturbed"
        )
    matmul = report.get("matmul", {})
    if matmul:
        fp32 = matmul["fp32"]["flops_per_s"]
        print("\ndense matmul (square)      n   GFLOP/s   x fp32")
        for name, row in matmul.items():
            print(f"  {name:<20} {row['n']:>6} {row['flops_per_s'] / 1e9:>9.1f}   {row['flops_per_s'] / fp32:6.3f}")
    flops = report.get("flops_per_window", {})
    if flops:
        print(
            "\nFLOPs per training window (forward + backward): "
            + ", ".join(f"{k} {v / 1e9:.3f} GFLOP" for k, v in flops.items())
            + (f"  (c3d / tiny = {flops['c3d'] / flops['tiny']:.1f})" if {"c3d", "tiny"} <= flops.keys() else "")
        )
    arms = report.get("train", [])
    if arms:
        print("\ntraining (x base: vs eager fp32 at the preset's smallest batch; x ref: vs the arm named in ref)")
        print(
            f"{'preset':<6} {'batch':>5} {'prec':<5} {'mode':<14} {'win/s':>9} {'x base':>7} {'x ref':>7} "
            f"{'ref':<18} {'MFU':>7} {'peak GiB':>8} {'warm-up s':>9}"
        )
        for arm in arms:
            d = arm["derived"]
            mode = ("compiled" if arm["compiled"] else "eager") + (" cl3d" if arm["layout"] == CHANNELS_LAST else "")
            peak = arm["peak_memory_bytes"] / 2**30 if arm["peak_memory_bytes"] is not None else None
            mfu = _fmt(d.get("mfu") * 100 if d.get("mfu") is not None else None, ".2f")
            print(
                f"{arm['preset']:<6} {arm['batch']:>5} {arm['precision']:<5} {mode:<14} "
                f"{_fmt(arm['windows_per_s'], '.1f'):>9} {_fmt(d.get('vs_baseline'), '.2f'):>7} "
                f"{_fmt(d.get('vs_reference'), '.2f'):>7} {d.get('reference') or '-':<18} "
                f"{mfu + ('%' if mfu != '-' else ''):>7} {_fmt(peak, '.2f'):>8} {_fmt(arm['warmup_s'], '.1f'):>9}"
            )
            if arm["error"]:
                print(f"{'':<6} failed: {arm['error']}")
        print(
            "MFU: FLOPs/window x windows/s / this run's matmul rate of the arm's precision "
            f"(fp32 arms against '{arms[0]['derived'].get('mfu_against')}')"
        )
        if any((arm["derived"].get("mfu") or 0) > 1 for arm in arms):
            print(
                "MFU over 100%: that precision's matmul rate understates its convolutions (on a CPU without "
                "native bf16 the bf16 matmul is emulated; the bf16 rate is then a 512x512 probe)"
            )
    for row in report.get("skipped", []):
        what = f"{row['preset']} " + (f"b{row['batch']} {row['precision']}" if "batch" in row else "compiled")
        print(f"skipped: {what}: {row['reason']}")
    dist = report.get("distributed")
    if dist:
        print("\n2 processes vs 1, same global batch of tiny")
        if "skipped" in dist:
            print(f"  skipped: {dist['skipped']}")
        else:
            two = dist["two_processes"]
            print(
                f"  2 x {dist['backend']} processes, {dist['per_process_batch']} windows each "
                f"({two.get('threads', '?')} thread each): {_fmt(two.get('steps_per_s'), '.2f')} steps/s"
                + (f"  failed: {two['error']}" if two.get("error") else "")
            )
            for name in ("one_process_2_threads", "one_process_1_thread", "one_process"):
                if name in dist:
                    print(
                        f"  {name.replace('_', ' ')} (baseline), {dist['global_batch']} windows: "
                        f"{dist[name]['steps_per_s']:.2f} steps/s   2 processes / this = "
                        f"{_fmt(dist[f'two_vs_{name}'], '.2f')}"
                    )
            manual = dist.get("two_processes_manual_all_reduce", {})
            print(
                f"  2 processes, gradients all-reduced after the backward pass instead of DDP: "
                f"{_fmt(manual.get('steps_per_s'), '.2f')} steps/s   DDP / this = "
                f"{_fmt(dist.get('ddp_vs_manual_all_reduce'), '.2f')}"
            )
            if "one_process_2_threads" in dist:
                print(
                    "  the fair baseline is 1 process with 2 threads (the two workers' cores); "
                    "1 thread shows the per-core scaling"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer steps and arms (CPU smoke run, ~3 minutes)")
    parser.add_argument("--out", default="bench-accelerator.json", help="the JSON file of every figure")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="skip the arms not yet started after this many seconds (to finish within a limit)",
    )
    parser.add_argument("--child-dist", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--reduction", choices=("ddp", "manual"), default="ddp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_dist:
        child_dist(args)
        return

    started = time.perf_counter()
    try:
        backend = make_backend(args.device)
    except UserError as exc:  # a mistake the user can fix: one line, exit 2, as the CLI does
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    device = backend.device
    report: dict[str, Any] = {
        "meta": {
            "device": args.device,
            "device_name": device_name(device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if args.device == "cuda" else None,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "conv_tf32": conv_uses_tf32(),
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "quick": args.quick,
            "argv": sys.argv[1:],
            "seconds": 0.0,
            "data": "random uint8 clips made on the device once; no data loading",
            # model_input permutes (N, T, H, W, C): the "default" input is channels-last-3d in memory already
            "default_input_is_channels_last_3d": model_input(random_batch(1, 32, torch.device("cpu"))[0]).is_contiguous(
                memory_format=torch.channels_last_3d
            ),
        }
    }

    def save() -> None:
        report["meta"]["seconds"] = time.perf_counter() - started
        report["meta"]["loadavg_now"] = os.getloadavg()
        write_json(args.out, report)

    def over_budget() -> bool:
        return args.budget_s is not None and time.perf_counter() - started > args.budget_s

    report["matmul"] = measure_matmul(device, args.quick)
    native_bf16 = report["matmul"]["bf16"]["flops_per_s"] >= 0.5 * report["matmul"]["fp32"]["flops_per_s"]
    report["meta"]["native_bf16"] = native_bf16
    plans = make_plans(args.device, args.quick)
    report["flops_per_window"] = {plan.preset: flops_per_window(plan.preset) for plan in plans}
    save()

    arms, report["skipped"] = plan_arms(plans, native_bf16, args.device)
    done: list[Arm] = []
    for arm in arms:
        if over_budget():
            arm.error = f"skipped: past --budget-s {args.budget_s:g}"
        else:
            run_arm(arm, backend)
            print(
                f"{arm.preset} b{arm.batch} {arm.precision} {arm.mode}: "
                + (f"{arm.windows_per_s:.1f} windows/s" if arm.windows_per_s is not None else arm.error or ""),
                flush=True,
            )
        done.append(arm)
        derive(done, report["flops_per_window"], report["matmul"], args.device)
        report["train"] = [asdict(a) for a in done]
        save()

    report["distributed"] = (
        {"skipped": f"past --budget-s {args.budget_s:g}"} if over_budget() else measure_distributed(device, args.quick)
    )
    save()
    print_table(report)
    print(f"\nfigures: {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
