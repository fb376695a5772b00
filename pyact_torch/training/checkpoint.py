"""Checkpoints in a run directory (local path or gs://), written in the background.

Only the host copy of the state blocks training. A background thread streams ``torch.save``
bytes straight into ``ckpt-<step>.pt`` (a resumable upload on GCS, no local temporary file),
hashing as it goes, retries when storage fails, and only after the object is complete publishes
``latest.json`` (and ``best.json``) naming it with its size and sha256. At most one upload is in
flight; the last ``keep`` checkpoints plus the best are kept. Restoring verifies the sha256
and falls back to the previous checkpoint when an object is missing or corrupt. Everything
loads with ``torch.load(..., weights_only=True)``.

Pointers are data, not paths: a name in ``latest.json``, ``best.json`` or ``final.json`` is used
only when it is a checkpoint name this module writes (``ckpt-<step>.pt``, ``final.pt``), inside
the run directory, and its object is read up to the size the pointer records. Retention deletes
only ``ckpt-<step>.pt`` objects.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import queue
import re
import threading
import time
import zipfile
from dataclasses import dataclass
from typing import IO, Any, Callable, cast

import torch

from ..io import storage
from ..config import CLASS_NAME
from ..errors import UserError

LATEST, BEST, FINAL, FINAL_POINTER = "latest.json", "best.json", "final.pt", "final.json"
CHECKPOINT_FORMAT = "pyact-torch-checkpoint/1"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
CKPT_NAME = re.compile(r"ckpt-(\d{1,15})\.pt")
OBJECT_NAME = re.compile(r"ckpt-\d{1,15}\.pt|final\.pt")
POINTER_LIMIT = 1 << 20  # a pointer with its history is a few KB
# What resuming training needs besides the weights (a converted or hand-made file lacks them).
# settings added after checkpoints were first written, with the value those checkpoints ran with
LATER_SETTINGS = {"augment": "none", "dropout": 0.0, "weight_decay": 0.0}
TRAINING_KEYS = ("optimizer", "scheduler", "step", "epoch", "batch_in_epoch", "best_val_loss", "rng", "metrics")


@dataclass
class _Job:
    name: str
    state: dict
    step: int
    epoch: int
    best: bool


class CheckpointWriter:
    """Background checkpoint uploads for one run directory (used by the master replica)."""

    def __init__(
        self,
        run_dir: str,
        keep: int = 3,
        log: Callable[[str], None] = print,
        retries: int = 8,
        backoff: float = 1.0,
        run: str = "",
    ):
        """``run``: this run's identity (``RunState.run``); what the pointers list of another
        run (before a ``--resume none``) is dropped from them, its files left where they are."""
        self.run_dir, self.keep, self.log, self.run = run_dir, keep, log, run
        self.retries, self.backoff = retries, backoff
        self.history: list[dict] = []
        self.best: dict | None = None
        try:  # a damaged pointer is replaced by the next save; its names are never trusted
            self.history = [
                r for r in read_pointer(run_dir, LATEST).get("history", []) if _valid_record(r) and _run(r) == run
            ]
        except (FileNotFoundError, UserError):
            pass
        try:
            self.best = read_pointer(run_dir, BEST)
        except (FileNotFoundError, UserError):
            pass
        if self.best is not None and _run(self.best) != run:
            self.best = None
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def save(self, state: dict, step: int, epoch: int, best: bool = False, name: str | None = None) -> None:
        """Queue a host-memory state for upload; blocks only while an earlier upload is
        still in flight (at most one at a time)."""
        self._raise_if_failed()
        self._queue.join()
        self._raise_if_failed()
        self._queue.put(_Job(name or f"ckpt-{step}.pt", state, step, epoch, best))

    def wait(self) -> None:
        """Block until every queued checkpoint is published."""
        self._queue.join()
        self._raise_if_failed()

    def close(self) -> None:
        """Publish what is queued and stop the thread (idempotent)."""
        if not self._thread.is_alive():
            return
        self._queue.join()
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._queue.task_done()
                return
            try:
                self._publish(job)
            except BaseException as exc:  # surfaced to the training loop at the next save
                self._error = exc
            finally:
                self._queue.task_done()

    def _publish(self, job: _Job) -> None:
        url = storage.join(self.run_dir, job.name)
        for attempt in range(self.retries + 1):
            hashing = None
            try:
                with storage.open_write(url) as sink:
                    hashing = storage.HashingWriter(sink)
                    torch.save(job.state, cast(IO[bytes], hashing))  # a file object: write, flush
                break
            except storage.StorageUnreachable as exc:
                if attempt == self.retries:
                    raise UserError(f"{url}: checkpoint upload failed {self.retries + 1} times ({exc})") from None
            except UserError:
                raise  # a full or read-only disk, no access: retrying cannot help
            except Exception as exc:  # connection refused, timeouts, 5xx after the library's own retries
                failure = hashing.failure if hashing is not None else None
                if failure is not None and failure.errno in storage.USER_ERRNOS:  # torch.save wraps it
                    raise UserError(f"{url}: cannot write ({failure.strerror})") from None
                if attempt == self.retries:
                    raise RuntimeError(f"{url}: upload failed {self.retries + 1} times ({exc})") from exc
            if attempt < self.retries:
                delay = min(30.0, self.backoff * 2**attempt)
                self.log(f"checkpoint upload of {job.name} failed; retrying in {delay:.0f} s")
                time.sleep(delay)
        assert hashing is not None  # the loop ends written or raises
        record = {
            "name": job.name,
            "size": hashing.size,
            "sha256": hashing.digest.hexdigest(),
            "step": job.step,
            "epoch": job.epoch,
            "run": self.run,
        }
        if job.name == FINAL:
            storage.write_json(storage.join(self.run_dir, FINAL_POINTER), record)
            return
        self.history = [h for h in self.history if h["name"] != job.name] + [record]
        if job.best:
            self.best = record
            storage.write_json(storage.join(self.run_dir, BEST), record)
        keep = {h["name"] for h in self.history[-self.keep :]} | ({self.best["name"]} if self.best else set())
        expired = [h for h in self.history if h["name"] not in keep]
        self.history = [h for h in self.history if h["name"] in keep]
        # publish first, delete after: a pointer never names a deleted object
        storage.write_json(storage.join(self.run_dir, LATEST), {**record, "history": self.history})
        for old in expired:
            if CKPT_NAME.fullmatch(old["name"]):  # only checkpoints we write, never a pointer's fancy
                storage.remove(storage.join(self.run_dir, old["name"]))


def make_checkpoint(model: dict, config: dict, classes: list[str], data_shape: dict, **extra: Any) -> dict:
    """The one checkpoint dict, for training and conversion alike: the weights, the settings
    that built them (at least ``model``, the preset), the class order and clip shape they
    expect; training adds its own state (``optimizer``, ``step``, ...) through ``extra``."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model,
        "config": config,
        "classes": list(classes),
        "data_shape": dict(data_shape),
        "step": 0,
        "epoch": 0,
        "metrics": "[]",
        **extra,
    }


def _run(record: dict) -> str:
    """The run a pointer record or checkpoint belongs to ("" before runs were named)."""
    run = record.get("run", "")
    return run if isinstance(run, str) else "?"


def _valid_record(record: Any) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("name"), str)
        and OBJECT_NAME.fullmatch(record["name"]) is not None
        and isinstance(record.get("size"), int)
        and record["size"] > 0
        and isinstance(record.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", record["sha256"]) is not None
    )


def read_pointer(run_dir: str, name: str) -> dict:
    """A pointer (``latest.json``, ``best.json``, ``final.json``) checked to name one of our
    checkpoints with its size and sha256; FileNotFoundError when absent, UserError when damaged."""
    url = storage.join(run_dir, name)
    if not storage.exists(url):
        raise FileNotFoundError(url)
    record = storage.read_json(url, POINTER_LIMIT)
    if not _valid_record(record):
        raise UserError(
            f"{url}: not a checkpoint pointer of ours (it must name ckpt-<step>.pt or final.pt "
            f"with its size and sha256)"
        )
    return record


def load_object(url: str, record: dict | None = None) -> dict:
    """``torch.load`` of one checkpoint object (weights only), checked against its pointer's
    ``record`` (size, sha256) when given. Anything else is a one-line UserError naming it."""
    if record is not None:
        data = storage.read_bytes(url, record["size"])
        if len(data) != record["size"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise UserError(f"{url}: size or sha256 does not match its pointer (corrupt or partial)")
    else:
        with storage.open_read(url) as handle:  # any file may be named: look at its first bytes first
            if handle.read(4) != ZIP_MAGIC:
                raise UserError(f"{url}: not a pyact-torch checkpoint (not a zip archive, as torch.save writes)")
            data = ZIP_MAGIC + handle.read()
    try:
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        KeyError,
        AttributeError,
        TypeError,
    ) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{url}: not a pyact-torch checkpoint ({reason})") from None
    if (
        not isinstance(state, dict)
        or state.get("format") != CHECKPOINT_FORMAT
        or not isinstance(state.get("model"), dict)
        or not isinstance(state.get("classes"), list)
        or not isinstance(state.get("config"), dict)
    ):
        raise UserError(f"{url}: not a {CHECKPOINT_FORMAT} checkpoint (format, model, classes or config missing)")
    classes, shape, model = state["classes"], state.get("data_shape"), state["config"].get("model")
    if not (
        all(isinstance(c, str) and CLASS_NAME.fullmatch(c) for c in classes)
        and 2 <= len(set(classes)) == len(classes) <= 1000
        and isinstance(model, str)
        and (shape is None or (isinstance(shape, dict) and all(isinstance(v, (int, str)) for v in shape.values())))
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items())
    ):
        raise UserError(f"{url}: its classes, model name, clip shape or weights are malformed")
    bad = nonfinite_weights(state["model"])
    if bad:
        raise UserError(
            f"{url}: {bad[0]} holds NaN or infinite values ({len(bad)} tensors do): a diverged or damaged model"
        )
    return state


def nonfinite_weights(model: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold a NaN or an infinity."""
    return [k for k, v in model.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _scan(run_dir: str) -> list[str]:
    """``ckpt-<step>.pt`` objects in ``run_dir``, newest first (when no pointer can be trusted)."""
    steps = {n: int(m.group(1)) for n in storage.list_files(run_dir) if (m := CKPT_NAME.fullmatch(n))}
    return sorted(steps, key=steps.__getitem__, reverse=True)


def _candidates(
    run_dir: str, pointers: tuple[str, ...], log: Callable[[str], None]
) -> tuple[list[tuple[str, dict | None]], str | None]:
    """``(name, record)`` to try in order: what each pointer names (``latest.json``'s whole
    history of its own run, newest first), then every other ``ckpt-<step>.pt`` newest first (no
    record: loaded unverified, for a damaged pointer); and the run ``latest.json`` names (None
    when it cannot be read)."""
    found: list[tuple[str, dict | None]] = []
    run = None
    for pointer in pointers:
        try:
            record = read_pointer(run_dir, pointer)
        except FileNotFoundError:
            continue
        except UserError as exc:
            log(f"warning: {exc}; ignoring it")
            continue
        history = []
        if pointer == LATEST:
            run = _run(record)
            history = [r for r in record.get("history", []) if _valid_record(r) and _run(r) == run]
        for entry in reversed(history or [record]):
            if entry["name"] not in [name for name, _ in found]:
                found.append((entry["name"], entry))
    listed = {name for name, _ in found}
    return found + [(name, None) for name in _scan(run_dir) if name not in listed], run


def _first_loadable(
    run_dir: str, candidates: list[tuple[str, dict | None]], log: Callable[[str], None], run: str | None = None
) -> tuple[dict, str] | None:
    """The first candidate that loads; with ``run``, an unlisted one (no record) only if it
    belongs to that run (not to one abandoned by ``--resume none``)."""
    for position, (name, record) in enumerate(candidates):
        url = storage.join(run_dir, name)
        try:
            state = load_object(url, record)
        except (FileNotFoundError, UserError) as exc:
            reason = "missing" if isinstance(exc, FileNotFoundError) else str(exc).split(": ", 1)[-1]
            log(f"warning: cannot use checkpoint {name}: {reason}; trying the previous one")
            continue
        if record is None and run is not None and _run(state) != run:
            log(f"warning: cannot use checkpoint {name}: it is of a run started over since (--resume none)")
            continue
        if position:
            log(f"using the older checkpoint {name}")
        return state, url
    return None


def load_checkpoint(url: str, log: Callable[[str], None] = print) -> tuple[dict, str]:
    """A checkpoint to score: ``url`` is an object, or a run directory whose ``best.json``
    (else ``final.json``, else ``latest.json``'s history) names one; a missing or corrupt one
    falls back to the next, as training does. Returns the state and its URL."""
    storage.check_location(url, "--checkpoint")
    if storage.is_file(url):
        return load_object(url), url
    found = _first_loadable(url, _candidates(url, (BEST, FINAL_POINTER, LATEST), log)[0], log)
    if found is None:
        raise UserError(
            f"{url}: neither a checkpoint nor a run directory with an intact checkpoint "
            f"(best.json, final.json, latest.json)"
        )
    return found


def restore(run_dir: str, resume: str, log: Callable[[str], None] = print) -> tuple[dict, str] | None:
    """The state to continue from, with its URL: ``none`` -> None; a path -> that object; ``auto`` -> the
    newest intact checkpoint named by ``latest.json`` (older ones when it is missing or
    corrupt; every ``ckpt-<step>.pt`` when the pointer itself is damaged), or None for a fresh run."""
    if resume == "none":
        return None
    if resume != "auto":
        storage.check_location(resume, "--resume")
        if not storage.is_file(resume):
            raise UserError(f"--resume {resume}: no such checkpoint file")
        return load_object(resume), resume
    candidates, run = _candidates(run_dir, (LATEST,), log)  # run None: the newest checkpoint
    if not candidates:
        return None
    found = _first_loadable(run_dir, candidates, log, run)
    if found is None:
        raise UserError(f"{run_dir}: no intact checkpoint left to resume from (use --resume none to start over)")
    return found


def check_resumable(state: dict, url: str, config: dict, replicas: int, data: str | None = None) -> None:
    """Refuse a checkpoint that cannot continue this run: not a training checkpoint, another
    model, other data (``data``: ``shards.training_data_fingerprint``; a moved copy is the
    same), or any setting that changes which windows a step sees (batch size, seed, shuffle
    buffer, loader count, replica count): the saved position in the epoch would name others."""
    missing = [key for key in TRAINING_KEYS if key not in state]
    if missing:
        raise UserError(
            f"{url}: holds weights but no training state ({', '.join(missing[:3])} missing); "
            f"it can be scored with pyact evaluate, not resumed"
        )
    if data is not None and state.get("data_fingerprint") not in (None, data):
        raise UserError(
            f"{url}: was trained on other data than --data {config['data']} (other shards, windows "
            f"or classes); resume with the data it was trained on, or start over with --resume none"
        )
    saved = {**LATER_SETTINGS, **state["config"]}  # a checkpoint from before a setting ran with its default
    for key, flag in (
        ("model", "--model"),
        ("batch_size", "--batch-size"),
        ("seed", "--seed"),
        ("shuffle_buffer", "--shuffle-buffer"),
        ("workers", "--workers"),
        ("parallel", "--parallel"),
        ("sync_bn", "--sync-bn"),
        ("augment", "--augment"),
        ("dropout", "--dropout"),
        ("weight_decay", "--weight-decay"),
    ):
        if key in saved and key in config and saved[key] != config[key]:
            raise UserError(
                f"{url}: was trained with {flag} {saved[key]}, this run has {flag} {config[key]}; "
                f"resume with the same {flag}, or start over with --resume none"
            )
    if "replicas" in state and state["replicas"] != replicas:
        raise UserError(
            f"{url}: was trained on {state['replicas']} replicas, this run has {replicas}; "
            f"the position in the epoch would name other windows (use --resume none)"
        )


def check_compatible(
    state: dict, classes: list[str], data_shape: dict, what: str = "resume (use another --run-dir or --resume none)"
) -> None:
    """Refuse to use a checkpoint whose classes or clip shape differ from the data's."""
    if list(state["classes"]) != list(classes):
        mine, theirs = list(state["classes"]), list(classes)
        parts = [
            f"only the checkpoint has {', '.join(c for c in mine if c not in theirs)[:300]}"
            if set(mine) - set(theirs)
            else "",
            f"only the data has {', '.join(c for c in theirs if c not in mine)[:300]}"
            if set(theirs) - set(mine)
            else "",
        ]
        differ = "; ".join(p for p in parts if p) or "the same names in another order"
        raise UserError(f"the data's classes differ from the checkpoint's ({differ}); cannot {what}")
    saved = state.get("data_shape")
    if saved is not None and dict(saved) != dict(data_shape):
        flags = {"image_size": "--image-size", "seq_len": "--seq-len", "modality": "--modality"}
        flags_differ = [
            f"{flags[key]} {saved[key]} (this data: {data_shape.get(key)})"
            for key in flags
            if key in saved and saved[key] != data_shape.get(key)
        ]
        if flags_differ:
            raise UserError(
                f"the checkpoint was trained on data made with {', '.join(flags_differ)}; cannot {what}: "
                f"preprocess with {', '.join(d.split(' (')[0] for d in flags_differ)} to match"
            )
        raise UserError(
            f"the data's clip shape {data_shape} differs from the checkpoint's {dict(saved)}; cannot {what}"
        )
