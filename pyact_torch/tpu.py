"""The only module that imports torch_xla: device, replica ordinal and count, master check,
device loader, optimizer step, reductions, step closures and launch (xmp.spawn).

``Backend("xla")`` runs on TPU cores (or XLA:CPU with ``PJRT_DEVICE=CPU``); ``Backend("cpu")``
maps the same names to plain eager PyTorch, one replica, so the training loop has one code
path. torch_xla is imported lazily: nothing may touch the XLA runtime before xmp.spawn.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Iterable

import torch

from .parallel import die_with_parent


class Backend:
    """What the training loop needs from the device runtime."""

    def __init__(self, kind: str):
        if kind not in ("xla", "cpu"):
            raise ValueError(f"unknown device {kind!r}")
        self.kind = kind
        if kind == "xla":
            import torch_xla
            import torch_xla.core.xla_model as xm
            import torch_xla.runtime as xr

            self._torch_xla, self._xm, self._xr = torch_xla, xm, xr
            self.device = torch_xla.device()
        else:
            self.device = torch.device("cpu")

    @property
    def rank(self) -> int:
        """Global ordinal of this replica (across all hosts of a pod)."""
        return self._xr.global_ordinal() if self.kind == "xla" else 0

    @property
    def world(self) -> int:
        """Number of replicas (all cores of all hosts)."""
        return self._xr.world_size() if self.kind == "xla" else 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def device_loader(self, loader: Iterable) -> Iterable:
        """Batches moved to the device (XLA: background transfer, one graph cut per batch)."""
        if self.kind == "xla":
            import torch_xla.distributed.parallel_loader as pl

            return pl.MpDeviceLoader(loader, self.device)
        return loader

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step, after summing gradients over replicas when there are several (no host sync)."""
        if self.kind == "xla":
            self._xm.optimizer_step(optimizer)
        else:
            optimizer.step()

    def sync(self) -> None:
        """Cut and run the pending XLA graph (no-op on CPU)."""
        if self.kind == "xla":
            self._torch_xla.sync()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over replicas (every replica must call it)."""
        if self.kind == "xla" and self.world > 1:
            return self._xm.all_reduce(self._xm.REDUCE_SUM, tensor)
        return tensor

    def add_step_closure(self, fn: Callable, args: tuple = ()) -> None:
        """Run ``fn(*args)`` once this step's tensors are computed (XLA: after the graph runs,
        so reading them does not force an extra compile or a mid-step transfer)."""
        if self.kind == "xla":
            self._xm.add_step_closure(fn, args=args)
        else:
            fn(*args)

    def rendezvous(self, tag: str) -> None:
        """Wait until every replica reaches this point."""
        if self.kind == "xla" and self.world > 1:
            self._xm.rendezvous(tag)

    def to_host(self, value: Any) -> Any:
        """A CPU copy of (nested) tensors: the only part of a checkpoint that blocks training.
        On XLA the pending step is run first, so the copies are plain transfers (copying a
        tensor of an unexecuted graph compiles a graph for each tensor)."""
        self.sync()
        return _host_copy(value)

    def compile_counts(self) -> dict[str, int]:
        """XLA compilations and CPU fallbacks so far (the TPU-efficiency proxy)."""
        if self.kind != "xla":
            return {}
        import torch_xla.debug.metrics as met

        fallbacks = {name: int(met.counter_value(name) or 0) for name in met.counter_names()
                     if name.startswith("aten::")}
        return {"compiles": int(met.counter_value("UncachedCompile") or 0),
                "cpu_fallbacks": sum(fallbacks.values()), "fallback_ops": sorted(fallbacks)}


def _host_copy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _host_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_copy(v) for v in value)
    return value


# --- preemption (SIGTERM) ---------------------------------------------------------------------
# A TPU VM's preemption notice is a SIGTERM. Training finishes its step, checkpoints and exits 0.
# Under xmp.spawn a replica runs in a thread of a child process, where no handler can be set:
# the child's main thread sets it when it imports this module (it does, to unpickle the
# replica function), and the launcher passes a SIGTERM it receives on to its children.

_LAUNCHER_ENV = "PYACT_LAUNCHER_PID"
_PREEMPTED = threading.Event()


def _on_sigterm(signum: int, frame: Any) -> None:
    _PREEMPTED.set()


def preempted() -> bool:
    """True once this process received SIGTERM."""
    return _PREEMPTED.is_set()


def _watch_sigterm() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _forward_to_replicas(signum: int, frame: Any) -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        os.kill(child.pid, signum)


if os.environ.get(_LAUNCHER_ENV) == str(os.getppid()):  # imported in a replica process
    _watch_sigterm()


def launch(fn: Callable[..., Any], args: tuple, kind: str) -> None:
    """Run ``fn(index, *args)`` on every replica: xmp.spawn over all local XLA devices, or
    once in this process for eager CPU."""
    if kind != "xla":
        _watch_sigterm()
        fn(0, *args)
        return
    os.environ.setdefault("PJRT_DEVICE", "CPU" if not _has_tpu() else "TPU")
    import torch_xla.distributed.xla_multiprocessing as xmp

    os.environ[_LAUNCHER_ENV] = str(os.getpid())
    forwarding = threading.current_thread() is threading.main_thread()
    if forwarding:
        previous = signal.signal(signal.SIGTERM, _forward_to_replicas)
    try:
        xmp.spawn(_replica_main, args=(os.getpid(), fn, *args))
    finally:
        if forwarding:
            signal.signal(signal.SIGTERM, previous)
        os.environ.pop(_LAUNCHER_ENV, None)


def _replica_main(index: int, launcher: int, fn: Callable[..., Any], *args: Any) -> None:
    """A replica process dies with the process that launched it: after a ``kill -9`` of the
    launcher an orphan would otherwise go on holding the TPU (and writing to the run dir)."""
    if os.getpid() != launcher:
        die_with_parent(launcher)
    fn(index, *args)


def _has_tpu() -> bool:
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
