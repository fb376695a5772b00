"""One writer per run directory or dataset: a lock object ``.pyact-lock.json`` inside it, local
or ``gs://``, naming its holder (host, pid, command, since when).

Local folders: the lock file is held with ``flock`` for as long as the holder lives. The
kernel releases it when the holder dies (``kill -9``, a crash), so a dead holder never blocks
(its file stays until the next holder takes it). The holder unlinks the file before letting go,
and a taker checks that the file it locked is still the one named, so two never both hold it.

``gs://``: the lock object is created with the precondition ``if_generation_match=0`` (only
when absent), the usual GCS lock: of two runs starting together exactly one creates it. The
holder rewrites it every ``HEARTBEAT`` seconds, each time on the condition that it still holds
the generation it wrote; a lock whose heartbeat is older than ``STALE_AFTER`` (its holder was
preempted or killed) is taken over with a precondition on that stale generation, so of two
takers one wins. A holder that finds its lock taken (it was stalled for longer than
``STALE_AFTER``) stops writing (``check``). Releasing deletes the object on the condition that
it is still ours.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Any

from . import storage
from ..errors import UserError

LOCK_NAME = ".pyact-lock.json"
HEARTBEAT = float(os.environ.get("PYACT_LOCK_HEARTBEAT", "60"))
STALE_AFTER = float(os.environ.get("PYACT_LOCK_STALE_AFTER", "600"))
_LIMIT = 64 * 1024


class Lock:
    """The lock of ``location`` (a folder or ``gs://`` prefix) for ``command``."""

    def __init__(self, location: str, command: str):
        self.location, self.command = location, command
        self.url = storage.join(location, LOCK_NAME)
        self.since = time.time()
        self.token = os.urandom(8).hex()
        self._fd: int | None = None
        self._generation: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def _record(self) -> bytes:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "command": self.command,
                "since": self.since,
                "heartbeat": time.time(),
                "token": self.token,
            }
        ).encode()

    def acquire(self) -> "Lock":
        """Take the lock, or a UserError naming its live holder."""
        if storage.is_gcs(self.url):
            self._acquire_gcs()
        else:
            self._acquire_local()
        return self

    def __enter__(self) -> "Lock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # --- local: flock ---------------------------------------------------------------------

    def _acquire_local(self) -> None:
        import fcntl

        import errno
        import stat

        storage.check_writable(self.location)  # a read-only or missing folder: its own one-line message
        for _ in range(10):
            with storage.write_errors(self.url):
                os.makedirs(self.location, exist_ok=True)
                try:
                    fd = os.open(self.url, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
                        raise
                    fd = -1
            info = os.fstat(fd) if fd >= 0 else None
            if info is None or not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
                if fd >= 0:
                    os.close(fd)  # a link, folder, FIFO or a hard link to another file: not ours to write
                raise UserError(
                    f"{self.url}: not a lock file pyact-torch wrote (a link, folder or special file); "
                    f"remove it and run again"
                )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, _LIMIT, 0))
                os.close(fd)
                raise UserError(
                    f"{self.location}: in use by {_describe(holder)}; wait for it to finish, stop it, "
                    f"or use another location"
                ) from None
            try:  # the holder before us unlinks the file as it lets go: ours must still be the named one
                if os.stat(self.url, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        else:
            raise UserError(f"{self.location}: its lock file keeps changing; is another run starting there?")
        try:
            with storage.write_errors(self.url):
                record = self._record()
                os.ftruncate(fd, 0)
                if os.pwrite(fd, record, 0) != len(record):
                    raise OSError(28, "short write", self.url)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        _HELD.add(fd)

    # --- gs://: generation preconditions and a heartbeat ------------------------------------

    def _acquire_gcs(self) -> None:
        from google.api_core.exceptions import PreconditionFailed

        storage.check_writable(self.location)  # a missing bucket: its own one-line message
        blob = storage.gcs_blob(self.url)
        with storage.gcs_errors(self.url):
            try:
                blob.upload_from_string(self._record(), if_generation_match=0, **storage.gcs_bounded())
            except PreconditionFailed:
                self._take_over_if_stale(blob)
            self._generation = blob.generation
        self._thread = threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True)
        self._thread.start()

    def _take_over_if_stale(self, blob: Any) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        try:
            blob.reload(**storage.gcs_bounded())
            holder = _parse(
                blob.download_as_bytes(if_generation_match=blob.generation, **storage.gcs_bounded())[:_LIMIT]
            )
        except (NotFound, PreconditionFailed):  # released or renewed meanwhile: look again next time
            raise UserError(f"{self.location}: its lock changed hands while this run started; run it again") from None
        age = time.time() - float(
            holder.get("heartbeat", 0) if isinstance(holder.get("heartbeat"), (int, float)) else 0
        )
        if age < STALE_AFTER and not _gone(holder):
            raise UserError(
                f"{self.location}: in use by {_describe(holder)} (its last heartbeat {age:.0f} s ago); "
                f"wait for it to finish, stop it, or use another location"
            )
        try:
            blob.upload_from_string(self._record(), if_generation_match=blob.generation, **storage.gcs_bounded())
        except PreconditionFailed:
            raise UserError(f"{self.location}: another run took over its stale lock first") from None
        print(f"note: took over the lock of {self.location} from {_describe(holder)}, silent for {age:.0f} s")

    def _heartbeat(self) -> None:
        from google.api_core.exceptions import NotFound, PreconditionFailed

        while not self._stop.wait(HEARTBEAT):
            blob = storage.gcs_blob(self.url)
            try:
                blob.upload_from_string(self._record(), if_generation_match=self._generation, **storage.gcs_bounded())
                self._generation = blob.generation
            except (PreconditionFailed, NotFound):
                self.lost = True
                return
            except Exception:  # a passing network fault: the next beat tries again
                continue

    def check(self) -> None:
        """A UserError when another run took the lock over (this one was silent too long)."""
        if self.lost:
            raise UserError(
                f"{self.location}: another run took over this run's lock (this run was silent for over "
                f"{STALE_AFTER:.0f} s); stopping without writing more"
            )

    def release(self) -> None:
        """Give the lock up (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._fd is not None:
            try:  # unlinked while still held (so a new taker never locks a file going away), if still ours
                named = os.stat(self.url, follow_symlinks=False)
                mine = os.fstat(self._fd)
                if (named.st_ino, named.st_dev) == (mine.st_ino, mine.st_dev):
                    os.unlink(self.url)
            except OSError:
                pass
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing drops the flock
            self._fd = None
        if self._generation is not None and not self.lost:
            from google.api_core.exceptions import NotFound, PreconditionFailed

            try:
                storage.gcs_blob(self.url).delete(if_generation_match=self._generation, **storage.gcs_bounded())
            except (NotFound, PreconditionFailed):
                pass
            except Exception:  # unreachable now: another process waits for it to go stale, this one need not
                _ABANDONED.add(self.token)
            self._generation = None


_HELD: set[int] = set()  # this process's local lock descriptors
_ABANDONED: set[str] = set()  # tokens of bucket locks this process let go of but could not delete


def forget_in_child() -> None:
    """In a forked child (a loader worker): close the inherited lock descriptors, so that the
    lock goes with its holder and not with a child that outlives it."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


def _gone(holder: dict) -> bool:
    """Whether the holder is known dead without waiting for its heartbeat to age: a process of
    this machine that no longer runs, or this very process (a run of it that could not delete
    its lock, say during a storage outage)."""
    if holder.get("token") in _ABANDONED:
        return True
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        return False  # a lock of this process's that it still holds
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def _parse(data: bytes) -> dict:
    try:
        value = json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _describe(holder: dict) -> str:
    """``pyact train (pid 123 on host-a, since 2026-11-30 14:01:09)``, from what the lock says."""

    def text(key: str) -> str:
        return str(holder.get(key, "?"))[:80]

    since = holder.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    return f"pyact {text('command')} (pid {text('pid')} on {text('host')}, since {when})"
