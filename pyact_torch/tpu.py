"""The only module that imports torch_xla: ``XlaBackend`` (the ``devices.Backend`` interface on
a TPU core, or XLA:CPU with ``PJRT_DEVICE=CPU``) and ``spawn`` (xmp.spawn, one replica per
local device). torch_xla is imported lazily: nothing may touch the XLA runtime before xmp.spawn.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable, Iterable

import torch

from .devices import Backend, watch_sigterm
from .parallel import die_with_parent


class XlaBackend(Backend):
    """torch_xla on this replica's device (a TPU core, or XLA:CPU)."""

    kind = "xla"

    def __init__(self) -> None:
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        self._torch_xla, self._xm, self._xr = torch_xla, xm, xr
        self.device = torch_xla.device()

    @property
    def rank(self) -> int:
        return self._xr.global_ordinal()

    @property
    def world(self) -> int:
        return self._xr.world_size()

    def device_loader(self, loader: Iterable) -> Iterable:
        """Background transfer, one graph cut per batch."""
        import torch_xla.distributed.parallel_loader as pl

        return pl.MpDeviceLoader(loader, self.device)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._xm.optimizer_step(optimizer)

    def sync(self) -> None:
        """Before a host copy too: copying a tensor of an unexecuted graph compiles a graph
        for each tensor."""
        self._torch_xla.sync()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._xm.all_reduce(self._xm.REDUCE_SUM, tensor) if self.world > 1 else tensor

    def add_step_closure(self, fn: Callable, args: tuple = ()) -> None:
        """After the graph runs, so reading the tensors forces no extra compile or mid-step transfer."""
        self._xm.add_step_closure(fn, args=args)

    def compile_counts(self) -> dict[str, Any]:
        """XLA compilations and CPU fallbacks so far (the TPU-efficiency proxy)."""
        import torch_xla.debug.metrics as met

        fallbacks = {name: int(met.counter_value(name) or 0) for name in met.counter_names()
                     if name.startswith("aten::")}
        return {"compiles": int(met.counter_value("UncachedCompile") or 0),
                "cpu_fallbacks": sum(fallbacks.values()), "fallback_ops": sorted(fallbacks)}


# --- launch (xmp.spawn) ------------------------------------------------------------------------
# Under xmp.spawn a replica runs in a thread of a child process, where no SIGTERM handler can be
# set: the child's main thread sets it when it imports this module (it does, to unpickle the
# replica function), and the launcher passes a SIGTERM it receives on to its children.

_LAUNCHER_ENV = "PYACT_LAUNCHER_PID"


def _forward_to_replicas(signum: int, frame: Any) -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        os.kill(child.pid, signum)


if os.environ.get(_LAUNCHER_ENV) == str(os.getppid()):  # imported in a replica process
    watch_sigterm()


def spawn(fn: Callable[..., Any], args: tuple) -> None:
    """Run ``fn(index, *args)`` on every local XLA device through xmp.spawn."""
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
