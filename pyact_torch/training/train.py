"""Training: train_step (no host sync inside), train_epoch, fit(config).

fit() launches one replica per device (xmp.spawn over the TPU cores, or one eager CPU process);
each replica reads its own shards, steps in lockstep with the others (gradients are summed by
the optimizer step), validates on the eval split every epoch, and the master writes metrics,
the loss plot and checkpoints (in the background) to the run directory.
"""

from __future__ import annotations

import json
import math
import os
import random
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, cast

import torch
import torch.nn.functional as F

from ..io import storage
from .checkpoint import FINAL, CheckpointWriter, check_compatible, check_resumable, make_checkpoint, restore
from ..config import TrainConfig, to_dict
from ..errors import ExplainedElsewhere, ReplicaError, UserError, local_rank
from .validation import evaluate
from ..io.lifecycle import Interrupted, in_xmp_replica, interrupted, preempted
from ..io.locks import Lock
from ..io.outputs import remove_empty_up_to, topmost_missing
from ..data.loader import HostBatches, Part, WindowDataset, on_device
from ..model import build_model, check_input, conv_kernels, model_input
from .run_log import RunLog
from ..data.shards import (
    Manifest,
    read_manifest,
    split_shards,
)
from ..io.resources import check_memory
from .devices import Backend, check_device, chosen_device, device_memory_errors, launch, make_backend


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    clips: torch.Tensor,
    labels: torch.Tensor,
    backend: Backend,
    precision: str = "fp32",
) -> torch.Tensor:
    """One optimisation step; returns the loss as a device tensor (never read here: reading
    it would force a host sync on XLA)."""
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(backend.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(clips)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    backend.optimizer_step(optimizer)
    return loss.detach()


@dataclass
class RunState:
    """Where training is: what a checkpoint restores besides weights and optimizer."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best_val_loss: float = math.inf
    metrics: list[dict] = field(default_factory=list)
    # which run: a --resume none in the same run dir starts another, whose resumes never fall
    # back to the checkpoints of the one before
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:16])

    @property
    def displayed_epoch(self) -> int:
        """The 1-based epoch of the last step trained (0 before the first): what people read."""
        return self.epoch + (1 if self.batch_in_epoch else 0)


class Divergence:
    """Whether every training loss so far was finite, kept on the device (reading each step's
    loss would force a host sync): checked at log steps and before every checkpoint, so a
    diverged run stops naming the step, and never saves NaN weights over good ones."""

    def __init__(self, backend: Backend, lr: float):
        self.backend, self.lr = backend, lr
        self.finite: torch.Tensor | None = None

    def add(self, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss)
        self.finite = finite if self.finite is None else self.finite & finite

    def check(self, step: int) -> None:
        """A UserError on every replica when any saw a loss that is NaN or infinite."""
        bad = self.finite is not None and not bool(self.finite.cpu())
        if self.backend.any_reader(bad):
            raise UserError(
                f"the training loss was not finite (NaN or infinite) by step {step}: training diverged; "
                f"lower --lr (now {self.lr:g}) and run again (it resumes from the last checkpoint, "
                f"saved before), or start over with --resume none"
            )


def _stop_agreed(backend: Backend) -> bool:
    """Every replica must stop at the same step: with several, they agree through a reduction."""
    return backend.any_reader(preempted())


def _checkpoint_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: RunState,
    config: TrainConfig,
    manifest: Manifest,
    backend: Backend,
) -> dict:
    return make_checkpoint(
        backend.to_host(model.state_dict()),
        recorded_settings(config),
        manifest.classes,
        manifest.data_shape,
        optimizer=backend.to_host(optimizer.state_dict()),
        scheduler=scheduler.state_dict(),
        step=state.step,
        epoch=state.epoch,
        batch_in_epoch=state.batch_in_epoch,
        best_val_loss=state.best_val_loss,
        replicas=backend.world,
        source=manifest.source_settings,
        data_fingerprint=manifest.fingerprint,
        rng={"torch": torch.get_rng_state(), "python": random.getstate()},
        metrics=json.dumps(state.metrics),
        run=state.run,
    )


def recorded_settings(config: TrainConfig) -> dict:
    """The settings as a checkpoint and config.json record them: local paths absolute, so that
    a command run from another folder (``pyact export``) finds the data."""
    settings = to_dict(config)
    for key in ("data", "run_dir"):
        if not storage.is_gcs(settings[key]):
            settings[key] = os.path.abspath(settings[key])
    return settings


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Adam:
    """Adam (pyACT's optimizer). ``weight_decay`` is pyACT 1.0.3's ``l2(W)`` on the conv kernels:
    the loss gains W * sum(w**2), whose gradient 2 W w is what Adam's coupled ``weight_decay``
    adds (so 2 W on the kernels' group). Coupled, not AdamW's decoupled decay, because it is
    what pyACT 1.x trained with, so its settings carry over. Without it, one parameter group,
    as every earlier checkpoint has."""
    if not weight_decay:
        return torch.optim.Adam(model.parameters(), lr=lr)
    kernels = {id(p) for p in conv_kernels(model)}
    return torch.optim.Adam(
        [
            {"params": [p for p in model.parameters() if id(p) in kernels], "weight_decay": 2 * weight_decay},
            {"params": [p for p in model.parameters() if id(p) not in kernels], "weight_decay": 0.0},
        ],
        lr=lr,
    )


def per_replica_batch(global_batch: int, world: int, devices_per_reader: int = 1) -> int:
    """Each reader's share of the global batch, which must divide evenly (under SPMD, also over
    the devices of each reader)."""
    if global_batch % world:
        raise UserError(f"--batch-size {global_batch} does not divide evenly over {world} replicas")
    if (global_batch // world) % devices_per_reader:
        raise UserError(
            f"--batch-size {global_batch} does not divide evenly over {world * devices_per_reader} "
            f"devices ({world} hosts x {devices_per_reader})"
        )
    return global_batch // world


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batches: Iterable,
    backend: Backend,
    config: TrainConfig,
    state: RunState,
    log: RunLog,
    on_checkpoint: Callable[..., None],
    divergence: Divergence,
    epoch_steps: int,
) -> bool:
    """Run the epoch's remaining batches (``epoch_steps`` in all); returns False when stopped by
    SIGTERM or Ctrl-C. The loss is logged every ``--log-every`` steps and at the epoch's last."""
    model.train()
    for clips, labels, _ in batches:
        lr = scheduler.get_last_lr()[0]
        if config.dropout:
            backend.seed_step(
                config.seed, state.step
            )  # dropout's masks: a function of the step, so resumes draw them again
        loss = train_step(model, optimizer, model_input(clips), labels, backend, config.precision)
        divergence.add(loss)
        scheduler.step()
        state.step += 1
        state.batch_in_epoch += 1
        log.advance()
        logged = state.step % config.log_every == 0 or state.batch_in_epoch == epoch_steps
        voted = logged or backend.vote_every_step
        # the vote before the host reads the loss (log.step, divergence.check): reading it waits
        # for the step's gradient reduction, which a lost peer never finishes (NCCL), while the
        # vote notices the loss at once
        stop = voted and _stop_agreed(backend)
        if logged:
            backend.add_step_closure(log.step, (loss, state.step, state.epoch, lr))
            divergence.check(state.step)
        if stop:
            on_checkpoint(best=False)
            return False
        if not voted and backend.world == 1 and preempted():
            on_checkpoint(best=False)
            return False
        if config.ckpt_every and state.step % config.ckpt_every == 0:
            on_checkpoint(best=False)
    return True


@dataclass
class _Run:
    """What the steps of one replica's training share."""

    config: TrainConfig
    backend: Backend
    manifest: Manifest
    model: torch.nn.Module  # the weights (what checkpoints save)
    net: torch.nn.Module  # what the steps run: the model, data-parallel or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    state: RunState
    train_set: WindowDataset
    eval_set: WindowDataset | None
    steps: list[int]  # batches per epoch, the same on every replica
    writer: CheckpointWriter | None  # the master's
    log: RunLog
    lock: Lock | None  # the master's hold on the run directory
    divergence: Divergence

    def checkpoint(self, best: bool, name: str | None = None) -> None:
        """Copy the state to the host (every replica) and hand it to the writer (the master)."""
        self.divergence.check(self.state.step)
        if self.lock is not None:
            self.lock.check()
        host_state = _checkpoint_state(
            self.model, self.optimizer, self.scheduler, self.state, self.config, self.manifest, self.backend
        )
        if self.writer is not None:
            self.log.flush()
            self.writer.save(host_state, self.state.step, self.state.displayed_epoch, best=best, name=name)


def _replica(index: int, config: TrainConfig, failed: UserError | None = None) -> None:
    """One replica: set up (or resume), run the epochs, publish the final weights. ``failed``:
    this replica's inputs failed their checks (it joins the others only to tell them)."""
    try:
        backend = make_backend(
            config.backend, distributed=config.distributed, timeout=config.collective_timeout, sync_bn=config.sync_bn
        )
    except UserError as exc:  # the machine or its Python: the same for every process on it
        exc.every_rank = True  # type: ignore[attr-defined]
        raise
    try:
        with device_memory_errors(config.batch_size, also=" or --precision bf16"):
            run = _start(config, backend, failed)
            try:
                if _epochs(run):
                    _finish(run)
            finally:
                try:
                    if run.writer is not None:
                        run.writer.close()  # lets an upload under way finish, also when training failed
                finally:
                    if run.lock is not None:
                        run.lock.release()
    except BaseException:  # a Ctrl-C stop too: aborting a group whose work is done costs nothing
        backend.close(failed=True)
        raise
    backend.close()


def _start(config: TrainConfig, backend: Backend, failed: UserError | None = None) -> _Run:
    """The run's lock (the master's: one writer per run directory, taken before anything in it
    is read), then everything else of ``_build``; the lock is let go if that fails."""
    lock = None
    if failed is None and backend.is_master:
        try:
            lock = Lock(config.run_dir, "train").acquire()
        except UserError as exc:
            failed = exc
    try:
        return _build(config, backend, failed, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build(config: TrainConfig, backend: Backend, failed: UserError | None, lock: Lock | None) -> _Run:
    """Data, model, optimizer and schedule, restored from a checkpoint when there is one."""
    try:  # everything each replica reads on its own, before the first collective
        if failed is not None:
            raise failed
        manifest = read_manifest(config.data)
        train_set, eval_set, steps = _datasets(config, manifest, backend)
        torch.manual_seed(config.seed)
        model = build_model(
            config.model,
            len(manifest.channels),
            manifest.seq_len,
            manifest.image_size,
            len(manifest.classes),
            dropout=config.dropout,
        )
        saved = _restore_weights(config, manifest, model, backend)
    except UserError as exc:
        _setup_agreed(backend, exc)
        raise
    _setup_agreed(backend, None)
    step = saved["step"] if saved is not None else -1
    if not backend.same_everywhere(step):
        raise ReplicaError(
            f"rank {backend.rank}: found {f'the checkpoint of step {step}' if saved else 'no checkpoint'} "
            f"in {config.run_dir}, another replica found another: --run-dir must be one location "
            f"every machine sees (a bucket or a shared file system)"
        )
    model.to(backend.device)
    net = backend.wrap(model)
    if config.compile:
        net = cast(torch.nn.Module, torch.compile(net))  # an OptimizedModule
    optimizer = make_optimizer(model, config.lr, config.weight_decay)
    total = sum(steps)
    schedule = (
        (lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
        if config.lr_schedule == "cosine"
        else (lambda s: 1.0)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state = RunState() if saved is None else _restore_training(saved, optimizer, scheduler, backend, config.lr)
    if saved is None and backend.is_master:
        print(_fresh_start(config), flush=True)
    writer = None
    if backend.is_master:
        writer = CheckpointWriter(config.run_dir, keep=config.keep, run=state.run)
        storage.write_json(
            storage.join(config.run_dir, "config.json"),
            {
                "config": recorded_settings(config),
                "classes": manifest.classes,
                "data_shape": manifest.data_shape,
                "replicas": backend.world,
                "per_replica_batch": train_set.batch_size,
            },
        )
    log = RunLog(config.run_dir, state.metrics, steps, config.batch_size, backend.is_master)
    return _Run(
        config,
        backend,
        manifest,
        model,
        net,
        optimizer,
        scheduler,
        state,
        train_set,
        eval_set,
        steps,
        writer,
        log,
        lock,
        Divergence(backend, config.lr),
    )


def _fresh_start(config: TrainConfig) -> str:
    """The line a run that starts at step 0 prints: why, when the run dir says it ran before."""
    if config.resume == "none":
        return f"--resume none: starting at step 0 in {config.run_dir}"
    if storage.is_file(storage.join(config.run_dir, "config.json")):
        return (
            f"starting at step 0: {config.run_dir} holds no checkpoint (a run there stopped before its first "
            f"one was written)"
        )
    return f"starting at step 0 in {config.run_dir}"


def _setup_agreed(backend: Backend, error: UserError | None) -> None:
    """Every replica learns whether any failed to set up before the first collective of
    training, where a healthy one would wait for a failed one until the collective timeout.
    All failed: the same cause on every replica (settings, shared files), said once; some:
    each says its own (a machine missing a file); the others stop without a word."""
    if not backend.agrees_at_setup:
        if error is not None:
            raise error
        return
    someone_failed = backend.any_reader(error is not None)
    everyone_failed = not backend.any_reader(error is None)
    if error is not None:
        if everyone_failed:
            error.every_rank = True  # type: ignore[attr-defined]
            raise error
        raise ReplicaError(f"rank {backend.rank}: {error}") from None
    if someone_failed:
        raise ExplainedElsewhere("another replica failed to start")


def _datasets(
    config: TrainConfig, manifest: Manifest, backend: Backend
) -> tuple[WindowDataset, WindowDataset | None, list[int]]:
    """This reader's train and eval data, and every epoch's step count (the same on every
    reader; refused when an epoch would have no step, naming what to change)."""
    per_reader = per_replica_batch(config.batch_size, backend.world, backend.devices_per_reader)
    part = Part(backend.rank, backend.world)
    workers, shards = config.workers, len(manifest.splits["train"].shards)
    if backend.world == 1 and workers > max(shards, 1):
        # a lone reader's workers share out the shards: more workers than shards would idle,
        # and the same number on a resume (it depends on the data and the flag only)
        workers = max(shards, 1)
        print(
            f"note: {workers} loader worker{'s' if workers > 1 else ''} instead of --workers {config.workers}: "
            f"the train split has {shards} shard{'s' if shards > 1 else ''} (a worker reads whole shards)",
            flush=True,
        )
    train_set = WindowDataset(
        config.data,
        manifest,
        "train",
        per_reader,
        part,
        train=True,
        seed=config.seed,
        workers=workers,
        shuffle_size=config.shuffle_buffer,
        augment=config.augment,
    )
    eval_set = (
        WindowDataset(config.data, manifest, "eval", per_reader, part, train=False, workers=min(config.workers, 1))
        if "eval" in manifest.splits
        else None
    )
    steps = []
    for epoch in range(config.epochs):
        train_set.set_epoch(epoch)
        steps.append(len(train_set))
    check_readers(
        len(train_set.shards),
        manifest.splits["train"].count,
        backend.world,
        workers,
        per_reader,
        steps[0],
        config.data,
    )
    if backend.is_master:
        used = steps[0] * config.batch_size / manifest.splits["train"].count
        print(
            f"{backend.world} readers ({backend.kind}"
            f"{', ' + str(backend.devices_per_reader) + ' devices each' if backend.kind == 'spmd' else ''}) "
            f"x {max(1, workers)} loader streams (--workers {workers}) over {len(train_set.shards)} train shards: "
            f"{steps[0]} steps of {config.batch_size} windows use {used:.1%} of the epoch's windows",
            flush=True,
        )
    return train_set, eval_set, steps


def check_readers(shards: int, windows: int, readers: int, workers: int, batch: int, steps: int, data: str) -> None:
    """Refuse, before any work, readers (replicas or hosts, times loader workers) left without
    a shard, which would set every replica's step count by the poorest and silently drop the
    rest of each epoch, and an epoch without a step. Names the counts and the ``--shard-size``
    that fixes it."""
    streams = readers * max(1, workers)  # --workers 0 reads in the training process: one stream
    if shards < streams:
        fits = max(1, windows // streams)
        lower = f", or use --workers {shards // readers}" if shards >= readers and workers > 1 else ""
        raise UserError(
            f"{data}: {shards} train shards for {streams} readers ({readers} replicas/hosts x "
            f"{max(1, workers)} loader streams of --workers {workers}): a reader without a shard makes every "
            f"replica stop where the poorest does, dropping the rest of each epoch; "
            f"preprocess with --shard-size {fits} or less{lower}"
        )
    if not steps:
        raise UserError(
            f"{data}: the train split has fewer windows per reader than one batch ({batch}); lower --batch-size"
        )


def _restore_weights(config: TrainConfig, manifest: Manifest, model: torch.nn.Module, backend: Backend) -> dict | None:
    """The checkpoint to continue from (checked to fit this run), its weights loaded."""
    restored = restore(config.run_dir, config.resume, log=print if backend.is_master else (lambda m: None))
    if restored is None:
        return None
    saved, url = restored
    check_compatible(saved, manifest.classes, manifest.data_shape)
    check_resumable(saved, url, to_dict(config), backend.world, manifest.fingerprint)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError:
        raise UserError(f"{url}: its weights do not fit --model {config.model} on this data") from None
    return saved


def _restore_training(
    saved: dict, optimizer: torch.optim.Optimizer, scheduler: Any, backend: Backend, lr: float
) -> RunState:
    """Optimizer, schedule, random generators and position of a saved run. ``lr`` (this run's
    --lr) replaces the saved one: the way on after a diverged loss is a lower --lr."""
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if any(base != lr for base in scheduler.base_lrs):
        if backend.is_master:
            print(f"note: --lr {lr:g} from here on (the run so far used {scheduler.base_lrs[0]:g})", flush=True)
        scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
        for group, factor in zip(optimizer.param_groups, [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]):
            group["initial_lr"] = lr
            group["lr"] = lr * factor
    torch.set_rng_state(saved["rng"]["torch"])
    random.setstate(saved["rng"]["python"])
    state = RunState(
        saved["step"],
        saved["epoch"],
        saved["batch_in_epoch"],
        saved["best_val_loss"],
        [m for m in json.loads(saved["metrics"]) if m["step"] <= saved["step"]],
        saved["run"] if isinstance(saved.get("run"), str) else "",
    )
    if backend.is_master:
        print(
            f"resumed at step {state.step} (epoch {state.epoch + 1}, after its batch {state.batch_in_epoch})",
            flush=True,
        )
    return state


def _epochs(run: _Run) -> bool:
    """The epoch loop: train, validate, checkpoint; False when stopped by SIGTERM."""
    config, state, backend = run.config, run.state, run.backend
    if backend.kind in ("xla", "spmd") and state.epoch < config.epochs:
        run.log.note(
            "note: XLA compiles the training step during the first steps and the evaluation step at the first "
            "validation; nothing moves meanwhile (tens of seconds on a CPU, less on a TPU)"
        )
    while state.epoch < config.epochs:
        epoch = state.epoch
        run.train_set.set_epoch(epoch)
        # resume: the batches this epoch already trained on are read and skipped
        host = HostBatches(
            run.train_set, run.train_set.workers, run.steps[epoch], skip=state.batch_in_epoch, warn=run.log.warn
        )
        run.log.epoch_start(epoch, state.batch_in_epoch, state.step)
        if not train_epoch(
            run.net,
            run.optimizer,
            run.scheduler,
            on_device(host, backend),
            backend,
            config,
            state,
            run.log,
            run.checkpoint,
            run.divergence,
            run.steps[epoch],
        ):
            run.log.stop()
            if run.writer is not None:
                run.writer.wait()
                print(
                    f"{'interrupted' if interrupted() else 'stopped by SIGTERM'} at step {state.step} "
                    f"(epoch {state.displayed_epoch}/{config.epochs}); checkpoint saved",
                    flush=True,
                )
            if interrupted() and not in_xmp_replica():  # xmp: the launcher says it (``fit``)
                raise Interrupted(
                    f"interrupted at step {state.step}; its checkpoint was saved: run the same "
                    f"command again to continue from it"
                )
            return False
        result = _validate(run)
        state.epoch, state.batch_in_epoch = epoch + 1, 0
        loss = result["loss"] if result is not None else math.inf
        improved = loss < state.best_val_loss
        if improved:
            state.best_val_loss = loss
        run.log.epoch_end(epoch, state.step, result)
        run.checkpoint(best=improved)
    return True


def _validate(run: _Run) -> dict | None:
    """Loss, accuracy and confusion on the eval split (None without one)."""
    if run.eval_set is None or not len(run.eval_set):
        return None
    host = HostBatches(run.eval_set, run.eval_set.workers, len(run.eval_set), warn=run.log.warn)
    return evaluate(run.net, on_device(host, run.backend), run.backend, len(run.manifest.classes))


def _finish(run: _Run) -> None:
    """``final.pt``, and the closing line with the XLA compile counts."""
    run.checkpoint(best=False, name=FINAL)
    if run.writer is None:
        return
    run.writer.close()
    counts = run.backend.compile_counts()
    extra = (
        (
            f" (XLA: {counts['compiles']} compilations, {counts['cpu_fallbacks']} CPU fallbacks"
            f"{': ' + ', '.join(counts['fallback_ops']) if counts['fallback_ops'] else ''})"
        )
        if counts
        else ""
    )
    run.log.closing(run.state.step, run.state.epoch, storage.join(run.config.run_dir, FINAL), run.writer.best, extra)


def fit(config: TrainConfig) -> None:
    """Check the inputs, then train on every replica (xmp.spawn, torchrun's processes, or one
    eager process). Under torchrun a process whose inputs fail still joins the others with its
    error, so that they learn of it instead of waiting for it (``_setup_agreed``)."""
    if config.device == "auto":
        config = replace(config, device=chosen_device("auto", config.distributed))
    created = "" if storage.is_gcs(config.run_dir) else topmost_missing(config.run_dir)
    try:
        try:
            _check_inputs(config)
        except UserError as exc:
            if not config.distributed:
                raise
            launch(_replica, (config, exc), config.backend, distributed=True)
            return
        launch(_replica, (config,), config.backend, distributed=config.distributed)
    except UserError:
        remove_empty_up_to(config.run_dir, created)  # refused before its first file: no empty run dir
        raise
    if config.backend == "xla" and interrupted():
        raise Interrupted(
            "interrupted; the replicas saved a checkpoint at the step they reached: run the same "
            "command again to continue from it"
        )


def _check_memory(config: TrainConfig, manifest: Manifest) -> None:
    """The host memory one machine's loaders need: each loader process holds a shuffle buffer of
    windows, and each replica a batch as read (uint8) and as model input (float32). Replicas of
    one machine: torchrun's LOCAL_WORLD_SIZE (xmp and SPMD: counted as one)."""
    window = math.prod(manifest.clip_shape)
    replicas, world = _env_count("LOCAL_WORLD_SIZE"), _env_count("WORLD_SIZE")
    loaders = max(config.workers, 1) * replicas
    batch = -(-config.batch_size // world)
    # a buffer never holds more than its loader's share of the split
    buffer = min(config.shuffle_buffer, -(-manifest.splits["train"].count // (max(config.workers, 1) * world)))
    check_memory(
        window * (buffer * loaders + 5 * batch * replicas),
        f"--shuffle-buffer {config.shuffle_buffer} in each of {loaders} loader processes and --batch-size "
        f"{config.batch_size} (windows of {'x'.join(map(str, manifest.clip_shape))})",
        "lower --shuffle-buffer, --workers or --batch-size",
    )


def _env_count(name: str) -> int:
    try:
        return max(int(os.environ.get(name, "1")), 1)
    except ValueError:
        return 1


def _check_inputs(config: TrainConfig) -> None:
    """The data, the model's fit to it, the device and the run directory, before any work."""
    manifest = read_manifest(config.data)
    split_shards(config.data, manifest, "train")
    if "eval" in manifest.splits:
        split_shards(config.data, manifest, "eval")
    elif local_rank() == 0:
        print(f"note: {config.data} has no eval split: no validation, and best.json is not written")
    try:
        check_input(config.model, manifest.image_size)
    except ValueError as exc:
        raise UserError(
            f"{config.data}: --model {config.model}: {exc}; preprocess at another --image-size, or "
            f"choose another --model"
        ) from None
    check_device(config.backend)
    _check_memory(config, manifest)
    storage.check_writable(config.run_dir)
