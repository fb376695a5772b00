"""Run a function over items in worker processes, yielding results as they finish."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Generator, Sequence, TypeVar

from .lifecycle import die_with_parent

T = TypeVar("T")
R = TypeVar("R")


def map_unordered(
    fn: Callable[[T], R], items: Sequence[T], processes: int, initializer: Callable | None = None, initargs: tuple = ()
) -> Generator[R, None, None]:
    """``fn`` over ``items`` in ``processes`` spawned workers (in this process when 1), in
    completion order. A worker that dies raises ``BrokenProcessPool`` instead of hanging, and
    stopping early (an error, Ctrl-C) cancels the tasks not yet started."""
    if processes <= 1 or len(items) <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold threads (progress bars, storage clients)
    executor = ProcessPoolExecutor(
        min(processes, len(items)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs),
    )
    try:
        futures = [executor.submit(fn, item) for item in items]
        for future in as_completed(futures):
            yield future.result()
    except BaseException:
        # stopped early: the running tasks too, and they are gone before the caller cleans up
        # (a worker still writing into a folder being removed would leave files behind)
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            process.terminate()
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _start_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)
