"""A command's outputs published together: written to a staging folder of our own beside
them, then moved into place only when every one is complete, so that a stop (Ctrl-C,
SIGTERM, a full disk) leaves the earlier outputs whole and never a mix of two runs. On gs://
(no rename there) each object is replaced whole, one by one: a failure removes the new ones
again, and the earlier versions of those names are then gone (the others stay)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from typing import Iterator

from . import storage
from ..errors import UserError
from .lifecycle import uninterrupted


@contextlib.contextmanager
def staging(out: str, command: str, created: bool) -> Iterator[str]:
    """A new hidden folder inside the local folder ``out`` (created if needed), removed with
    whatever was not published when the block ends; ``""`` for gs://, where objects are
    written whole. ``out`` itself is removed too if it is empty and ``created`` (the command
    made it: its checks before any work do)."""
    if storage.is_gcs(out):
        yield ""
        return
    os.makedirs(out, exist_ok=True)
    folder = tempfile.mkdtemp(prefix=f".pyact-{command}-", dir=out)
    try:
        yield folder
    finally:
        if any(name.startswith("earlier-") for name in os.listdir(folder)):
            # a rollback that failed (it cannot be stopped): the earlier outputs are kept here
            print(f"warning: the earlier outputs could not all be put back; they are in {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # made by mkdtemp above: ours
        remove_if_empty(out, created)


def topmost_missing(path: str) -> str:
    """The highest folder of ``path`` that does not exist yet ("" when it exists): what a
    command that creates ``path`` has to remove again after a failure."""
    path, missing = os.path.abspath(path), ""
    while not os.path.lexists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def remove_empty_up_to(folder: str, top: str, below: bool = False) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty (``top`` "": none);
    with ``below``, first every empty folder inside ``folder`` (files are never removed)."""
    if not top:
        return
    folder = os.path.abspath(folder)
    if below:
        for inner, _, _ in os.walk(folder, topdown=False):
            if inner != folder and not os.listdir(inner):
                os.rmdir(inner)
    while folder.startswith(top):
        try:
            os.rmdir(folder)  # only an empty folder
        except FileNotFoundError:
            pass  # removed meanwhile by another process doing the same (torchrun's workers)
        except OSError:
            break  # not empty, or not a folder
        if folder == top:
            break
        folder = os.path.dirname(folder)


def remove_if_empty(folder: str, created: bool) -> None:
    """Remove ``folder`` when this command ``created`` it (its checks before work do) and a
    failure left it empty."""
    if created and not storage.is_gcs(folder):
        remove_empty_up_to(folder, os.path.abspath(folder))


def publish(out: str, files: dict[str, bytes], staged: dict[str, str], folder: str) -> None:
    """Put every output in ``out`` only once all of them are complete. Locally, ``files``
    (name -> bytes) are written to the staging ``folder`` beside ``staged`` (name -> path
    there); each one replaces its earlier version, which is kept in ``folder`` until all are in
    place and put back if any fails. On gs:// (``folder`` empty) the objects are written one by
    one and removed again if one fails."""
    if not folder:
        _publish_objects(out, files)
        return
    staged = dict(staged)
    for name, data in files.items():
        staged[name] = os.path.join(folder, name)
        storage.write_bytes(staged[name], data)
    for name in staged:
        target = os.path.join(out, name)
        if os.path.lexists(target) and (os.path.islink(target) or not os.path.isfile(target)):
            raise UserError(f"{target}: exists and is not a file; move it away to write the outputs")
    existed = {name: os.path.lexists(os.path.join(out, name)) for name in staged}
    with uninterrupted("the outputs are in place"):  # a second stop must not cut the rollback short
        _place(out, staged, folder, existed)


def _place(out: str, staged: dict[str, str], folder: str, existed: dict[str, bool]) -> None:
    try:
        for name, path in staged.items():
            target = os.path.join(out, name)
            if existed[name]:
                os.replace(target, os.path.join(folder, "earlier-" + name))
            os.replace(path, target)
    except BaseException:
        # a stop may come between any two steps: each output's state is read, not remembered
        for name, path in staged.items():
            target, kept = os.path.join(out, name), os.path.join(folder, "earlier-" + name)
            if os.path.lexists(kept):
                os.replace(kept, target)
            elif not existed[name] and not os.path.lexists(path) and os.path.lexists(target):
                os.remove(target)  # ours: it was moved there from the staging folder
        raise
    for name in staged:  # all in place: the earlier versions go
        kept = os.path.join(folder, "earlier-" + name)
        if os.path.lexists(kept):
            os.remove(kept)


def _publish_objects(out: str, files: dict[str, bytes]) -> None:
    written: list[str] = []
    try:
        for name, data in files.items():
            storage.write_bytes(storage.join(out, name), data)
            written.append(storage.join(out, name))
    except BaseException:
        try:
            for url in written:
                storage.remove(url)
        except Exception:
            raise UserError(
                f"{out}: writing the outputs failed, and {', '.join(written)} could not be removed "
                f"again; delete them or run again"
            ) from None
        raise
