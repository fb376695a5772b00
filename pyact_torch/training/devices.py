"""The device layer: what the training loop and scoring need from a device, and launching one
replica per device (how replicas stop and die: ``io.lifecycle``).

``Backend`` is plain eager PyTorch on the CPU or one GPU (one replica); ``xla.XlaBackend`` maps
the same names to torch_xla (TPU cores, or XLA:CPU with ``PJRT_DEVICE=CPU``) and
``distributed.DistBackend`` to torch.distributed (one process per CPU or GPU under torchrun:
gloo or NCCL), so the training loop has one code path. ``xla.py`` is the only module that
imports torch_xla and ``distributed.py`` the only one that sets up a process group, each only
when asked for.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterable, Iterator

import torch

from ..io.lifecycle import restore_handlers, watch_sigterm


class Backend:
    """Eager PyTorch on the CPU or one GPU: one replica, no collectives, no graph to cut."""

    kind = "cpu"
    # whether a replica may ask the others every step if one of them was stopped (cheap on a
    # process group; on XLA a reduction's result costs a host sync, so only at log steps)
    vote_every_step = True
    # whether the replicas ask each other, before training, if any failed to set up (a rank
    # whose machine lacks a file would otherwise leave the others waiting in a collective)
    agrees_at_setup = True

    def __init__(self, device: str = "cpu") -> None:
        self.kind = device
        self.device = torch.device(device)
        if device == "cuda":
            self.device = cuda_device(0)

    @property
    def rank(self) -> int:
        """Global ordinal of this replica (across all hosts of a pod)."""
        return 0

    @property
    def world(self) -> int:
        """Number of replicas (all cores of all hosts)."""
        return 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def devices_per_reader(self) -> int:
        """Devices one reader's batch is split over (SPMD: every device of the host)."""
        return 1

    def any_reader(self, flag: bool) -> bool:
        """True on every reader when ``flag`` is true on any (every reader must call it)."""
        return flag

    def device_loader(self, loader: Iterable) -> Iterable:
        """Batches moved to the device."""
        if self.device.type == "cpu":
            return loader
        # through pinned memory: a copy from pageable memory may wait for the GPU's earlier work
        # (the step before, an NCCL reduction that a lost peer never finishes); this one returns
        # at once and overlaps the step
        return (tuple(t.pin_memory().to(self.device, non_blocking=True) for t in batch) for batch in loader)

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training step runs (data-parallel wrappers go here); its weights stay
        those of ``model``, which is what checkpoints save."""
        return model

    def same_everywhere(self, value: int) -> bool:
        """Whether the integer ``value`` (below 2**31 / world) is the same on every replica
        (every replica must call it). Integers: a TPU would round float sums of large steps."""
        if self.world == 1:
            return True
        mine = torch.tensor([value], dtype=torch.int32, device=self.device)
        total = self.all_reduce_sum(mine)
        # each replica's distance from the mean, summed: 0 only when every value is the same
        return int(self.all_reduce_sum((mine * self.world - total).abs()).cpu()) == 0

    def check_peers(self) -> None:
        """Raise when another replica is gone (every replica must call it; see DistBackend)."""

    def close(self, failed: bool = False) -> None:
        """Release what the backend holds (a process group); ``failed``: the run is ending on an
        error, and other replicas may be gone."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step, after summing gradients over replicas when there are several (no host sync)."""
        optimizer.step()

    def sync(self) -> None:
        """Cut and run the pending graph (nothing to do eagerly)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over replicas (every replica must call it)."""
        return tensor

    def add_step_closure(self, fn: Callable, args: tuple = ()) -> None:
        """Run ``fn(*args)`` once this step's tensors are computed."""
        fn(*args)

    def to_host(self, value: Any) -> Any:
        """A CPU copy of (nested) tensors: the only part of a checkpoint that blocks training."""
        self.sync()
        return _host_copy(value)

    def compile_counts(self) -> dict[str, Any]:
        """Graph compilations and CPU fallbacks so far (none eagerly)."""
        return {}

    def seed_step(self, seed: int, step: int) -> None:
        """Seed the generator this replica's next training step draws from (dropout's masks)
        from the run's seed, the replica and the step alone: a resumed run, on any replica,
        draws what the uninterrupted run drew, with no generator state to save per replica."""
        torch.manual_seed(step_seed(seed, self.rank, step))  # the CPU's and every GPU's


def step_seed(seed: int, rank: int, step: int) -> int:
    """A distinct 63-bit seed for each (run seed, replica, step)."""
    return ((seed % 2**31) * 1_000_003 + rank) * 1_000_000_007 + step & (2**63 - 1)


def auto_device(distributed: bool = False) -> tuple[str, str]:
    """``--device auto``: the device this machine is for, and why. A TPU when one is attached or
    ``PJRT_DEVICE`` is set (and torch_xla is installed; never under torchrun, which runs cpu or
    cuda), else a GPU when there is one, else eager CPU (XLA:CPU is several times slower)."""
    from ..errors import installed
    from .xla import _has_tpu

    has_xla = installed("torch_xla")
    if not distributed and has_xla:
        if os.environ.get("PJRT_DEVICE"):
            return "xla", f"PJRT_DEVICE={os.environ['PJRT_DEVICE']}"
        if _has_tpu():
            return "xla", "a TPU is attached"
    if torch.cuda.is_available():
        return "cuda", f"{torch.cuda.device_count()} GPU(s) found"
    if distributed:
        return "cpu", "no GPU found (under torchrun: cpu or cuda)"
    if os.environ.get("PJRT_DEVICE"):  # and no torch_xla, else the TPU branch above
        return "cpu", f"no GPU found, and PJRT_DEVICE={os.environ['PJRT_DEVICE']} is set but torch_xla is not installed"
    return "cpu", "no TPU or GPU found, and PJRT_DEVICE is not set"


def chosen_device(requested: str, distributed: bool = False, say: Callable[[str], None] = print) -> str:
    """``requested``, or for ``auto`` the ``auto_device`` choice, said once per machine."""
    if requested != "auto":
        return requested
    from ..errors import local_rank

    device, why = auto_device(distributed)
    if not local_rank():
        say(f"device: {device} (--device auto: {why}; --device chooses another)")
    return device


def check_device(kind: str) -> None:
    """Before any work: a UserError when the machine or this Python cannot run ``kind``."""
    if kind == "cuda":
        _check_cuda()
    elif kind in ("xla", "spmd"):
        from .xla import require_torch_xla

        require_torch_xla()


def _check_cuda() -> None:
    from ..errors import UserError

    if not torch.cuda.is_available():
        raise UserError(
            "--device cuda: this machine has no usable GPU (torch.cuda.is_available() is False"
            f"{'' if torch.version.cuda else '; this torch is a CPU-only build'}); use --device cpu"
        )


def cuda_device(index: int) -> torch.device:
    """GPU ``index`` of this machine, or a UserError saying why there is none."""
    from ..errors import UserError

    _check_cuda()
    if index >= torch.cuda.device_count():
        raise UserError(
            f"--device cuda: this process is local rank {index} but the machine has "
            f"{torch.cuda.device_count()} GPUs; start at most that many processes per machine"
        )
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextlib.contextmanager
def device_memory_errors(batch_size: int, also: str = "") -> Iterator[None]:
    """A GPU running out of memory inside the block is one UserError naming ``--batch-size``
    (and ``also``, another way out), not a traceback."""
    from ..errors import UserError

    try:
        yield
    except torch.OutOfMemoryError as exc:
        said = ". ".join(str(exc).strip().splitlines()[0].split(". ")[:2])[:200]  # what ran out, how much
        raise UserError(
            f"the GPU ran out of memory at --batch-size {batch_size} ({said}): use a smaller --batch-size{also}"
        ) from None


def make_backend(kind: str, distributed: bool = False, **options: Any) -> Backend:
    """``cpu``/``cuda``: eager PyTorch, one replica, or with ``distributed`` one replica per
    process of a torchrun launch (gloo/NCCL, ``options`` as ``DistBackend`` takes them);
    ``xla``: torch_xla on this replica's device (one process per device, xmp.spawn); ``spmd``:
    torch_xla SPMD over every device (one process per host)."""
    if kind in ("cpu", "cuda"):
        if distributed:
            from .distributed import DistBackend

            return DistBackend(kind, **options)
        return Backend(kind)
    if kind == "xla":
        from .xla import XlaBackend

        return XlaBackend()
    if kind == "spmd":
        from .xla import SpmdBackend

        return SpmdBackend()
    raise ValueError(f"unknown device {kind!r}")


def _host_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return value


def launch(fn: Callable[..., Any], args: tuple, kind: str, distributed: bool = False) -> None:
    """Run ``fn(index, *args)`` on every replica: xmp.spawn over all local XLA devices, or
    once in this process (eager CPU or GPU; one process of a torchrun launch; SPMD, where one
    process drives every device of its host)."""
    if kind == "xla":
        from .xla import spawn

        spawn(fn, args)
        return
    if distributed:  # SIGTERM becomes a stop request once the process group is up
        from .distributed import run_replica

        run_replica(fn, args)
        return
    previous = watch_sigterm()
    try:
        fn(0, *args)
    finally:
        restore_handlers(previous)
