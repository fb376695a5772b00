"""Checkpoints in a run directory (local path or gs://), written in the background.

Only the host copy of the state blocks training. A background thread streams ``torch.save``
bytes straight into ``ckpt-<step>.pt`` (a resumable upload on GCS, no local temporary file),
hashing as it goes, retries when storage fails, and only after the object is complete publishes
``latest.json`` (and ``best.json``) naming it with its size and sha256. At most one upload is in
flight; the last ``keep`` checkpoints plus the best are kept. Restoring verifies the sha256
and falls back to the previous checkpoint when an object is missing or corrupt. Everything
loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from . import storage
from .errors import UserError

LATEST, BEST, FINAL = "latest.json", "best.json", "final.pt"
CHECKPOINT_FORMAT = "pyact-torch-checkpoint/1"


@dataclass
class _Job:
    name: str
    state: dict
    step: int
    epoch: int
    best: bool


class CheckpointWriter:
    """Background checkpoint uploads for one run directory (used by the master replica)."""

    def __init__(self, run_dir: str, keep: int = 3, log: Callable[[str], None] = print,
                 retries: int = 8, backoff: float = 1.0):
        self.run_dir, self.keep, self.log = run_dir, keep, log
        self.retries, self.backoff = retries, backoff
        self.history: list[dict] = []
        self.best: dict | None = None
        if storage.exists(storage.join(run_dir, LATEST)):
            pointer = storage.read_json(storage.join(run_dir, LATEST))
            self.history = pointer.get("history", [])
        if storage.exists(storage.join(run_dir, BEST)):
            self.best = storage.read_json(storage.join(run_dir, BEST))
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
            try:
                with storage.open_write(url) as sink:
                    hashing = storage.HashingWriter(sink)
                    torch.save(job.state, hashing)
                break
            except UserError:
                raise
            except Exception as exc:  # connection refused, timeouts, 5xx after the library's own retries
                if attempt == self.retries:
                    raise RuntimeError(f"{url}: upload failed {self.retries + 1} times ({exc})") from exc
                delay = min(30.0, self.backoff * 2 ** attempt)
                self.log(f"checkpoint upload of {job.name} failed ({type(exc).__name__}); retrying in {delay:.0f} s")
                time.sleep(delay)
        record = {"name": job.name, "size": hashing.size, "sha256": hashing.digest.hexdigest(),
                  "step": job.step, "epoch": job.epoch}
        if job.name == FINAL:
            storage.write_json(storage.join(self.run_dir, "final.json"), record)
            return
        self.history = [h for h in self.history if h["name"] != job.name] + [record]
        if job.best:
            self.best = record
            storage.write_json(storage.join(self.run_dir, BEST), record)
        keep = {h["name"] for h in self.history[-self.keep:]} | ({self.best["name"]} if self.best else set())
        expired = [h for h in self.history if h["name"] not in keep]
        self.history = [h for h in self.history if h["name"] in keep]
        # publish first, delete after: a pointer never names a deleted object
        storage.write_json(storage.join(self.run_dir, LATEST), {**record, "history": self.history})
        for old in expired:
            storage.remove(storage.join(self.run_dir, old["name"]))


def load_object(url: str, sha256: str | None = None) -> dict:
    """``torch.load`` of one checkpoint object (weights only), checked against ``sha256``."""
    data = storage.read_bytes(url)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{url}: sha256 does not match its pointer (corrupt or partial)")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def load_checkpoint(url: str) -> tuple[dict, str]:
    """A checkpoint to score: ``url`` is an object, or a run directory whose ``best.json``
    (else ``final.json``, else ``latest.json``) names one; returns the state and its URL."""
    if storage.is_file(url):
        return load_object(url), url
    for pointer in (BEST, "final.json", LATEST):
        pointer_url = storage.join(url, pointer)
        if storage.exists(pointer_url):
            record = storage.read_json(pointer_url)
            object_url = storage.join(url, record["name"])
            if not storage.exists(object_url):
                raise UserError(f"{pointer_url} names {record['name']}, which is missing")
            return load_object(object_url, record["sha256"]), object_url
    raise UserError(f"{url}: neither a checkpoint nor a run directory with best.json, final.json or latest.json")


def restore(run_dir: str, resume: str, log: Callable[[str], None] = print) -> dict | None:
    """The state to continue from: ``none`` -> None; a path -> that object; ``auto`` -> the
    newest intact checkpoint named by ``latest.json`` (older ones when it is missing or
    corrupt), or None for a fresh run."""
    if resume == "none":
        return None
    if resume != "auto":
        if not storage.exists(resume):
            raise UserError(f"--resume {resume}: no such checkpoint")
        return load_object(resume)
    pointer_url = storage.join(run_dir, LATEST)
    if not storage.exists(pointer_url):
        return None
    history = storage.read_json(pointer_url).get("history", [])
    for record in reversed(history):
        url = storage.join(run_dir, record["name"])
        try:
            state = load_object(url, record["sha256"])
        except (FileNotFoundError, UserError, ValueError, RuntimeError) as exc:
            log(f"warning: cannot use checkpoint {record['name']}: {str(exc).splitlines()[0]}; trying the previous one")
            continue
        if record is not history[-1]:
            log(f"resuming from the older checkpoint {record['name']}")
        return state
    if history:
        raise UserError(f"{run_dir}: no intact checkpoint left to resume from (use --resume none to start over)")
    return None


def check_compatible(state: dict, classes: list[str], data_shape: dict,
                     what: str = "resume (use another --run-dir or --resume none)") -> None:
    """Refuse to use a checkpoint whose classes or clip shape differ from the data's."""
    if list(state["classes"]) != list(classes):
        raise UserError(f"the data's classes differ from the checkpoint's: {state['classes']} vs {classes}; "
                        f"cannot {what}")
    saved = state.get("data_shape")
    if saved is not None and dict(saved) != dict(data_shape):
        raise UserError(f"the data's clip shape {data_shape} differs from the checkpoint's {dict(saved)}; "
                        f"cannot {what}")

