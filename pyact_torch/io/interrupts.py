"""How a command other than training stops when asked to (Ctrl-C, SIGTERM): it unwinds, each
step removing what it had half-written, and the command line ends with one line and 130 or
143. Training checkpoints instead (``devices.watch_sigterm``)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Any, Iterator


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
