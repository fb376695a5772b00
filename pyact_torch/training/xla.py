"""The only module that imports torch_xla: ``XlaBackend`` (the ``devices.Backend`` interface on
a TPU core, or XLA:CPU with ``PJRT_DEVICE=CPU``), ``spawn`` (xmp.spawn, one replica per local
device), and ``SpmdBackend`` (one process per host drives every device: a 1-D ``data`` mesh,
the batch sharded on it, parameters replicated, XLA inserting the gradient reduction).
torch_xla is imported lazily: nothing may touch the XLA runtime before xmp.spawn or use_spmd.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Iterable, Iterator, cast

import torch

from .devices import Backend, step_seed
from ..io.lifecycle import Arriving, forwarding_to_replicas, replica_main


class XlaBackend(Backend):
    """torch_xla on this replica's device (a TPU core, or XLA:CPU)."""

    kind = "xla"
    vote_every_step = False

    def __init__(self) -> None:
        require_torch_xla()
        import torch_xla
        import torch_xla.core.xla_model as xm
        import torch_xla.runtime as xr

        self._torch_xla, self._xm, self._xr = torch_xla, xm, xr
        self.device = torch_xla.device()

    @property
    def rank(self) -> int:
        return self._xr.global_ordinal()

    @property
    def agrees_at_setup(self) -> bool:  # type: ignore[override]
        """Not on XLA:CPU: its replicas share one host (they meet the same errors) and its
        cross-process collectives cannot run there (pytorch/xla#9089); they would hang."""
        return self._xr.device_type() != "CPU"

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
        return cast(torch.Tensor, self._xm.all_reduce(self._xm.REDUCE_SUM, tensor)) if self.world > 1 else tensor

    def any_reader(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        return float(self.all_reduce_sum(torch.tensor(float(flag), device=self.device)).cpu()) > 0

    def add_step_closure(self, fn: Callable, args: tuple = ()) -> None:
        """After the graph runs, so reading the tensors forces no extra compile or mid-step transfer."""
        self._xm.add_step_closure(fn, args=args)

    def seed_step(self, seed: int, step: int) -> None:
        self._xm.set_rng_state(step_seed(seed, self.rank, step), self.device)  # type: ignore[arg-type]  # a device

    def compile_counts(self) -> dict[str, Any]:
        """XLA compilations and CPU fallbacks so far (the TPU-efficiency proxy)."""
        import torch_xla.debug.metrics as met

        fallbacks = {
            name: int(met.counter_value(name) or 0) for name in met.counter_names() if name.startswith("aten::")
        }
        return {
            "compiles": int(met.counter_value("UncachedCompile") or 0),
            "cpu_fallbacks": sum(fallbacks.values()),
            "fallback_ops": sorted(fallbacks),
        }


class SpmdBackend(XlaBackend):
    """SPMD data parallelism: this process is one reader (one per host) whose batches are
    sharded over all of its devices; the model code is unchanged. BatchNorm statistics are
    therefore over the global batch, as on a single device."""

    kind = "spmd"

    def __init__(self) -> None:
        require_torch_xla()
        import numpy as np
        import torch_xla.distributed.spmd as xs
        import torch_xla.runtime as xr

        xr.use_spmd()  # before anything touches a device
        super().__init__()
        self._xs = xs
        self.mesh = xs.Mesh(np.arange(xr.global_runtime_device_count()), (xr.global_runtime_device_count(),), ("data",))

    @property
    def rank(self) -> int:
        """This host's index: data is split by host, not by device."""
        return self._xr.process_index()

    @property
    def world(self) -> int:
        """Hosts (readers); every device of a host shares its reader's batch."""
        return self._xr.process_count()

    @property
    def devices_per_reader(self) -> int:
        return self._xr.addressable_runtime_device_count()

    def _spec(self, dims: int) -> Any:  # a torch_xla ShardingSpec
        """Shard the first (batch) dimension over ``data``; across hosts each host's batch is
        its own part of the global one (``minibatch``)."""
        return self._xs.ShardingSpec(self.mesh, ("data",) + (None,) * (dims - 1), minibatch=self.world > 1)

    def device_loader(self, loader: Iterable) -> Iterator:
        """Every tensor of each batch sharded on its batch dimension over all devices."""
        import torch_xla.distributed.parallel_loader as pl

        batches = iter(loader)
        first = next(batches, None)
        if first is None:
            return iter(())
        shardings = {str(i): self._spec(t.dim()) for i, t in enumerate(first)}
        named = _Named(itertools.chain([first], batches), len(loader))  # type: ignore[arg-type]  # a DataLoader; per-tensor specs need a dict
        device = pl.MpDeviceLoader(named, self.device, input_sharding=shardings)
        return (tuple(batch[str(i)] for i in range(len(shardings))) for batch in device)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The gradients are already global: XLA reduced them across devices inside the step."""
        optimizer.step()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Values computed from sharded batches are already global arrays."""
        return tensor

    def any_reader(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        # each host's flag, once per device, becomes its part of one global array, as its
        # batches do (minibatch input); the sum over that array is every host's vote
        local = torch.full((self.devices_per_reader,), float(flag))
        votes = self._xm.send_cpu_data_to_device([local], self.device, self._spec(1))[0]
        return float(votes.sum().cpu()) > 0


class _Named:
    """Tuple batches as ``{"0": ..., "1": ...}`` dicts, with the length MpDeviceLoader asks for."""

    def __init__(self, batches: Iterator, length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[dict]:
        return ({str(i): tensor for i, tensor in enumerate(batch)} for batch in self.batches)


def require_torch_xla(instead: str = "on a GPU use --device cuda, on a CPU --device cpu") -> None:
    """A UserError naming the package when torch_xla is not installed (a GPU box), and what to
    use ``instead``."""
    from ..errors import UserError, installed

    if not installed("torch_xla"):
        raise UserError(f"--device xla needs torch_xla (pip install torch_xla, matching this torch); {instead}")


def spawn(fn: Callable[..., Any], args: tuple) -> None:
    """Run ``fn(index, *args)`` on every local XLA device through xmp.spawn."""
    require_torch_xla()
    os.environ.setdefault("PJRT_DEVICE", "CPU" if not _has_tpu() else "TPU")
    import torch_xla.distributed.xla_multiprocessing as xmp

    with forwarding_to_replicas():
        xmp.spawn(replica_main, args=(os.getpid(), Arriving(fn), *args))


def _has_tpu() -> bool:
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")
