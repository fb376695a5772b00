"""``pyact`` as one torchrun worker, as if each rank were a machine of its own: ``{rank}`` in an
argument becomes the worker's rank (its own data folder, say), and the rank named by
``PYACT_TEST_NO_WRITES_ON_RANK`` may read storage but not write it: any write or delete there
fails the run. tests/training/test_distributed.py runs it to show that only rank 0 writes a run
directory (and, with rank 0 guarded, that the guard bites), and that a failure on one rank
alone is reported by that rank. ``PYACT_TEST_RANK0_LATE_S`` makes rank 0 start that many
seconds late."""

import os
import sys
import time

from pyact_torch.io import storage
from pyact_torch.cli import main


def _refuse(*args, **kwargs):
    raise AssertionError(f"rank {os.environ['RANK']} wrote to storage: {args[:1]}")


if os.environ["RANK"] == os.environ.get("PYACT_TEST_NO_WRITES_ON_RANK"):
    for name in ("open_write", "write_bytes", "write_json", "remove"):
        setattr(storage, name, _refuse)

if os.environ["RANK"] == "0" and os.environ.get("PYACT_TEST_RANK0_LATE_S"):  # a slow start (imports, disk)
    time.sleep(float(os.environ["PYACT_TEST_RANK0_LATE_S"]))

sys.exit(main([arg.replace("{rank}", os.environ["RANK"]) for arg in sys.argv[1:]]))
