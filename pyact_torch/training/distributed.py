"""torch.distributed data parallelism: one replica per process of a ``torchrun`` launch (one
machine or several), gloo between CPU processes, NCCL between GPUs. The only module that sets
up a process group.

Gradients are reduced by ``DistributedDataParallel`` during the backward pass (bucketed, so
the reduction overlaps the rest of the backward; ``xm.optimizer_step`` reduces after it), which
averages them as ``xm.optimizer_step`` does. BatchNorm statistics are per replica in the
forward pass, as under xmp.spawn, unless ``--sync-bn`` (GPUs) makes them global; the running
statistics are rank 0's (DDP broadcasts its buffers before each forward), which is what a
checkpoint saves, so a resumed run continues exactly.

Every collective is bounded by ``--collective-timeout``: a replica that dies (``kill -9``, a
lost machine) ends the others with one line instead of gloo's 30-minute wait, and the run
resumes from its last checkpoint. On GPUs only the gradients and DDP's buffers travel over
NCCL; the per-step stop vote and the small sums the host reads go over a gloo group beside it,
which notices a dead peer at once (an NCCL collective would wait out the timeout).
"""

from __future__ import annotations

import datetime
import os
import re
from typing import Any, Callable

import torch

from .devices import Backend, cuda_device
from ..errors import ExplainedElsewhere, ReplicaError, UserError, launch_rank
from ..io.lifecycle import PARENT_AT_START, die_with_parent, watch_sigterm

# gloo reports a lost peer or a timeout as a plain RuntimeError (NCCL's are DistErrors)
_LOST_PEER = re.compile(
    r"gloo/transport|connection (reset|closed) by peer|wait timeout after|"
    r"Timed out waiting",
    re.IGNORECASE,
)


class DistBackend(Backend):
    """One replica of a torchrun launch: rank and world from its process group."""

    def __init__(self, device: str = "cpu", timeout: float = 600.0, sync_bn: bool = False) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.kind = f"{device}, torch.distributed"
        self.sync_bn = sync_bn
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "cuda":
            _check_gpu_count(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        self.device = cuda_device(local_rank) if device == "cuda" else torch.device("cpu")
        self._nccl = device == "cuda"
        self._votes: Any = None  # the gloo group beside NCCL
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if self._nccl else "gloo",
                timeout=datetime.timedelta(seconds=timeout),
                device_id=self.device if self._nccl else None,
            )
        try:
            # only now: a worker still joining the group must die of torchrun's SIGTERM, not wait on
            watch_sigterm()
            # stop votes travel on the CPU: a GPU tensor would make every step wait for the GPU
            if self._nccl:
                self._votes = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout))
        except BaseException:
            self.close(failed=True)
            raise

    @property
    def rank(self) -> int:
        return self._dist.get_rank()

    @property
    def world(self) -> int:
        return self._dist.get_world_size()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP over the process group (``--sync-bn``: SyncBatchNorm first)."""
        from torch.nn.parallel import DistributedDataParallel

        if self.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=True, gradient_as_bucket_view=True)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        # Small sums the host reads at once (validation totals, the restored step). On GPUs they
        # go through the CPU group too: gloo reports a dead peer at once, while an NCCL
        # collective waits out --collective-timeout and then its watchdog aborts the process.
        if self._nccl:
            self.check_peers()  # .cpu() below waits for the GPU, which a lost peer may hold up
        summed = tensor.detach().cpu().clone() if self._nccl else tensor.clone()
        self._dist.all_reduce(summed, op=self._dist.ReduceOp.SUM, group=self._votes)
        return summed.to(tensor.device)

    def any_reader(self, flag: bool) -> bool:
        vote = torch.tensor([1.0 if flag else 0.0])  # on the CPU: gloo, also beside NCCL
        self._dist.all_reduce(vote, op=self._dist.ReduceOp.SUM, group=self._votes)
        return bool(vote.item() > 0)

    def check_peers(self) -> None:
        # A round over gloo, where a dead peer's closed socket fails it at once. On GPUs the
        # host runs ahead of the GPU, so this catches a lost peer before the host waits on GPU
        # work that an NCCL collective with that peer holds up (until --collective-timeout).
        # Between CPU processes gloo's own collectives fail as fast; the round is kept there
        # (tens of microseconds) so that the tests run it.
        if self.world > 1:
            self.any_reader(False)

    def close(self, failed: bool = False) -> None:
        if not self._dist.is_initialized():
            return
        if failed and self._nccl:
            # NCCL's destroy_process_group first finishes the collectives queued on the GPU
            # (torch >= 2.6), which never finish once a peer is gone: abort them instead
            try:
                from torch.distributed.distributed_c10d import _abort_process_group

                _abort_process_group()
            except Exception:  # the process is ending on an error already: never hide it
                pass
            return
        self._dist.destroy_process_group()


def _check_gpu_count(processes: int) -> None:
    """One GPU per process: more processes than GPUs is refused by every rank alike (before
    the process group, which would otherwise wait for the rank that failed)."""
    if torch.cuda.is_available() and processes > torch.cuda.device_count():
        error = UserError(
            f"torchrun starts {processes} processes on this machine but it has "
            f"{torch.cuda.device_count()} GPUs: use --nproc_per_node {torch.cuda.device_count()}"
        )
        error.every_rank = True  # type: ignore[attr-defined]
        raise error


def run_replica(fn: Callable[..., Any], args: tuple) -> None:
    """``fn(rank, *args)`` as one process of a torchrun launch. The process dies with torchrun
    (which starts it in a session of its own, so a ``kill -9`` of torchrun would leave it
    training on), and a lost peer or a collective past its timeout is one UserError."""
    die_with_parent(PARENT_AT_START)
    try:
        fn(launch_rank(), *args)
    except UserError as exc:
        if getattr(exc, "every_rank", False) or isinstance(exc, (ReplicaError, ExplainedElsewhere)):
            raise
        raise ReplicaError(f"rank {launch_rank()}: {exc}") from None
    except RuntimeError as exc:
        import torch.distributed as dist

        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not (isinstance(exc, dist.DistError) or _LOST_PEER.search(message)):
            raise
        raise ReplicaError(
            f"rank {launch_rank()}: lost contact with another replica ({message[:200]}); "
            f"it died or stopped answering within --collective-timeout. Every checkpoint "
            f"published so far is intact: run the same command again to resume"
        ) from None
