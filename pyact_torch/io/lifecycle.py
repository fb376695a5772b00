"""Process lifecycle: how each process of a command stops when asked to (Ctrl-C, SIGTERM) and
dies when the process that started it dies.

- A command other than training unwinds (``Terminated``, ``KeyboardInterrupt``), each step removing
  what it had half-written; ``uninterrupted`` holds the signals around a library call that
  cannot be stopped halfway. The command line ends with one line and 130 or 143.
- Training turns SIGTERM (a preemption) and a first Ctrl-C into a stop request
  (``watch_sigterm``, ``preempted``): the step finishes, a checkpoint is written, exit 0 (130
  after Ctrl-C).
- xmp.spawn's launcher passes a stop request on to its replica processes until they end
  (``forwarding_to_replicas``); each replica sets its handlers when its function arrives and
  dies with the launcher (``replica_main``).
- Worker processes die with their parent (``die_with_parent``); loader workers leave
  preemption to the replica they serve (``watch_loader_worker``).

Nothing here sets a handler when imported. A signal travels: the launcher (torchrun or
``xmp.spawn``'s parent) -> every replica's main thread -> the training loop's next step, while
loader workers ignore a SIGTERM that is not their replica's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator

from ..errors import local_rank
from .locks import forget_in_child

# the process that started this one, read when this module is first imported (``python -m
# pyact_torch`` imports it first thing): a launcher killed before a replica asks for it later
# would otherwise read as init (pid 1), and the replica would never learn of its death
PARENT_AT_START = os.getppid()


class Interrupted(KeyboardInterrupt):
    """A Ctrl-C that ended a command in a known state; the message says what a rerun does."""


class Terminated(BaseException):
    """SIGTERM outside training: unwind (removing partial files, stopping workers) and exit."""


def raise_terminated(signum: int, frame: Any) -> None:
    """The SIGTERM handler of every command but ``train``."""
    raise Terminated()


@contextlib.contextmanager
def uninterrupted(what: str) -> Iterator[None]:
    """Hold SIGINT and SIGTERM while a library call that cannot be stopped halfway runs, then
    act on them as usual. torch.save's archive writer turns an exception raised inside it into
    a C++ error (or loses it), and an export stopped inside torch._dynamo leaves it half
    imported. ``what`` is said once when a signal waits. Only the main thread gets signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if not received:
            print(f"stopping once {what}", file=sys.stderr, flush=True)
        received.append(signum)

    handlers = {signum: signal.signal(signum, hold) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        if received:
            signal.raise_signal(received[0])  # the usual handler acts on it now


# --- preemption (SIGTERM) and Ctrl-C (SIGINT) -------------------------------------------------
# A TPU VM's preemption notice is a SIGTERM. Training finishes its step, checkpoints and exits 0.
# The first Ctrl-C does the same and the command exits 130; a second one abandons the run.

_PREEMPTED = threading.Event()
_INTERRUPTED = threading.Event()


def _on_sigterm(signum: int, frame: Any) -> None:
    _PREEMPTED.set()


def _on_sigint(signum: int, frame: Any) -> None:
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt  # the second Ctrl-C: abandon (checkpoints already written stay)
    _INTERRUPTED.set()
    _PREEMPTED.set()
    if not local_rank() and not in_xmp_replica():  # one line per machine
        print(
            "stopping after this step, with a checkpoint (Ctrl-C again to abandon the step)",
            file=sys.stderr,
            flush=True,
        )


def preempted() -> bool:
    """True once this process received SIGTERM or a first Ctrl-C."""
    return _PREEMPTED.is_set()


def interrupted() -> bool:
    """True once this process received a Ctrl-C (SIGINT): the command then exits 130."""
    return _INTERRUPTED.is_set()


def watch_sigterm() -> dict:
    """Turn SIGTERM and a first Ctrl-C into ``preempted()`` for the run starting now (a handler
    can only be set from the main thread): a stop requested of an earlier run in this process
    is not this one's. Returns the handlers replaced, for ``restore_handlers``."""
    _PREEMPTED.clear()
    _INTERRUPTED.clear()
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {
        signal.SIGTERM: signal.signal(signal.SIGTERM, _on_sigterm),
        signal.SIGINT: signal.signal(signal.SIGINT, _on_sigint),
    }


def restore_handlers(previous: dict) -> None:
    """Put back what ``watch_sigterm`` replaced: after training, a Ctrl-C interrupts again (the
    demo goes on to score, and an in-process caller keeps its own handlers)."""
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def in_xmp_replica() -> bool:
    """Whether this process is a replica started by xmp.spawn (its launcher speaks for it)."""
    return os.environ.get("PYACT_LAUNCHER_PID") == str(os.getppid())


def note_interrupt() -> None:
    """A Ctrl-C seen by the process that launched the replicas (xmp.spawn's launcher)."""
    _INTERRUPTED.set()


# --- xmp.spawn's launcher and replicas ----------------------------------------------------------
# Under xmp.spawn a replica runs in a thread of a child process, where no SIGTERM handler can be
# set: the child's main thread sets it while it unpickles the replica's function (``_Arriving``),
# and the launcher passes a SIGTERM it receives on to its children (``forwarding_to_replicas``).

_LAUNCHER_ENV = "PYACT_LAUNCHER_PID"


_ASKING = threading.Event()  # the launcher keeps asking its replicas to stop
REPEAT_S = 1.0


def _send_to_replicas(signum: int) -> None:
    import multiprocessing

    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signum)  # type: ignore[arg-type]  # started: it has a pid
        except ProcessLookupError:  # it ended meanwhile
            pass


def _forward_to_replicas(signum: int, frame: Any) -> None:
    """Pass a stop request on to the replicas, and again every second until they have ended: a
    replica at an epoch's end was seen to lose both the terminal's SIGINT and the SIGTERM passed
    on (3 of 10 tries; its handler never ran, nothing was left pending), and a stop is
    idempotent there (it finishes its step and checkpoints once)."""
    _send_to_replicas(signum)
    if not _ASKING.is_set():
        _ASKING.set()
        threading.Thread(target=_keep_asking, args=(signum,), name="stop-replicas", daemon=True).start()


def _keep_asking(signum: int) -> None:
    import multiprocessing

    while _ASKING.is_set() and multiprocessing.active_children():
        time.sleep(REPEAT_S)
        if _ASKING.is_set():
            _send_to_replicas(signum)


def _interrupt_replicas(signum: int, frame: Any) -> None:
    """The launcher's first Ctrl-C stops the replicas as a SIGTERM does (the replicas of a
    terminal's Ctrl-C have it too: a stop is idempotent); a second abandons the run."""
    if interrupted():
        raise KeyboardInterrupt
    note_interrupt()
    print("stopping after this step, with a checkpoint (Ctrl-C again to abandon the step)", file=sys.stderr, flush=True)
    _forward_to_replicas(signal.SIGTERM, frame)


@contextlib.contextmanager
def forwarding_to_replicas() -> Iterator[None]:
    """While xmp.spawn's replicas run: this process is their launcher, and a SIGTERM or Ctrl-C it
    receives is passed on to them (handlers can only be set from the main thread)."""
    os.environ[_LAUNCHER_ENV] = str(os.getpid())
    forwarding = threading.current_thread() is threading.main_thread()
    if forwarding:
        previous = signal.signal(signal.SIGTERM, _forward_to_replicas)
        previous_int = signal.signal(signal.SIGINT, _interrupt_replicas)
    try:
        yield
    finally:
        _ASKING.clear()
        if forwarding:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGINT, previous_int)
        os.environ.pop(_LAUNCHER_ENV, None)


class Arriving:
    """A replica's function on its way to the replica process, to be passed to xmp.spawn.
    xmp.spawn runs the replica in a thread, where no handler can be set; the process's main
    thread unpickles the function first, and that is when the replica's SIGTERM and Ctrl-C
    handlers are set (``_arrived``). Called without pickling (a replica in this process), it
    is the function."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __reduce__(self) -> tuple:
        return _arrived, (self.fn,)


def _arrived(fn: Callable[..., Any]) -> Callable[..., Any]:
    if in_xmp_replica():
        watch_sigterm()
    return fn


def replica_main(index: int, launcher: int, fn: Callable[..., Any], *args: Any) -> None:
    """A replica process dies with the process that launched it: after a ``kill -9`` of the
    launcher an orphan would otherwise go on holding the TPU (and writing to the run dir)."""
    if os.getpid() != launcher:
        die_with_parent(launcher)
    try:
        fn(index, *args)
    finally:
        if os.getpid() != launcher and threading.current_thread() is threading.main_thread():
            # done: the launcher's repeated stop request must not kill it while it exits (at exit
            # Python gives a signal its default action back, unless it is ignored)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def die_with_parent(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` dies (Linux): after a ``kill -9`` of
    the command, its workers would otherwise go on for minutes, holding files open."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # it died before prctl took effect
            os._exit(1)


def watch_loader_worker(_worker: int) -> None:
    """Loader workers leave preemption and Ctrl-C to the main process: a SIGTERM sent to the whole process
    group (a VM shutdown) is ignored here, since a worker that died of it would fail the step
    being finished. A SIGTERM from the main process itself (how it ends leftover workers when
    it exits) ends the worker, as torch's own handler does. SIGTERM stays blocked (it was when
    the worker was forked, so none slips in before this) and a thread takes each one with its
    sender. A worker dies with its replica (a ``kill -9`` of it), instead of noticing seconds
    later."""
    parent = os.getppid()
    die_with_parent(parent)
    forget_in_child()  # the run dir's lock goes with the replica, not with a worker it forked
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    # a terminal's Ctrl-C reaches the whole process group: the replica stops with a checkpoint,
    # and its workers must live to finish the step (SIGINT was blocked since the fork too)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def watch() -> None:
        while True:
            if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
                os._exit(0)

    threading.Thread(target=watch, name="sigterm-watch", daemon=True).start()
