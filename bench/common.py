"""Helpers shared by the benchmarks: measurements that need a fresh process (XLA runtime, clean
counters) run as ``<script> --child ...`` and hand back one JSON object."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable

CHILD_STRINGS = ("--data", "--preset", "--device", "--result")
CHILD_INTS = ("--batch", "--warmup", "--steps")


def add_child_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden flags of a benchmark's child mode."""
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in CHILD_STRINGS:
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name in CHILD_INTS:
        parser.add_argument(name, type=int, default=0, help=argparse.SUPPRESS)


def run_child(script: str, **flags: object) -> dict:
    """Run ``script --child --flag value ...`` with PJRT_DEVICE=CPU; returns its JSON result."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = handle.name
    command = [sys.executable, os.path.abspath(script), "--child", "--result", result]
    for name, value in flags.items():
        command += [f"--{name}", str(value)]
    try:
        subprocess.run(
            command,
            check=True,
            env=dict(os.environ, PJRT_DEVICE="CPU"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with open(result) as handle:
            return json.load(handle)
    finally:
        os.remove(result)


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls of ``run`` (the least disturbed by other load)."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best
