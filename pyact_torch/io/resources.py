"""What the machine can hold: settings that would need more memory or disk than there is are
refused before any work, with the estimate, instead of failing (or swapping) halfway."""

from __future__ import annotations

import os
import shutil

from ..errors import UserError


def human(count: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1024, as free and df print them)."""
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(count) < 1024 or unit == "PB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PB"


def available_memory() -> int:
    """Bytes of memory that can be allocated without swapping: the machine's MemAvailable, or
    less where a container's memory limit (cgroup v2 or v1) leaves less; all of it where
    neither says."""
    machine = _meminfo_available()
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as limit, open(usage_file) as usage:
                text = limit.read().strip()
                if text != "max" and int(text) < 1 << 60:  # v1 writes a huge number for "no limit"
                    return min(machine, max(int(text) - int(usage.read().strip()), 0))
        except (OSError, ValueError):
            continue
    return machine


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: nothing is refused


def check_memory(needed: int, what: str, change: str) -> None:
    """Refuse when ``what`` needs more than the available memory: "``what`` needs at least
    N of memory, this machine has M available; ``change``"."""
    available = available_memory()
    if needed > available:
        raise UserError(
            f"{what} needs at least {human(needed)} of memory, this machine has {human(available)} available; {change}"
        )


def existing_ancestor(path: str) -> str:
    """``path``, or its nearest folder that exists: where it would be created."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def free_space(path: str) -> int:
    """Free bytes on the file system that holds ``path`` (or would, once created)."""
    return shutil.disk_usage(existing_ancestor(path)).free


def device_of(path: str) -> int:
    """The file system that holds ``path`` (or would, once created)."""
    return os.stat(existing_ancestor(path)).st_dev


def size_of(path: str) -> int:
    """Bytes in the files under ``path`` (0 when absent): space a rerun gets back or reuses."""
    if not os.path.isdir(path):
        return os.lstat(path).st_blocks * 512 if os.path.isfile(path) else 0
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:  # blocks in use, not the apparent size: a sparse cache file is mostly holes
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def duration(seconds: float) -> str:
    """``125`` -> ``"2 min 05 s"``: a length of time as a person reads it."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
