"""``pyact`` as one torchrun worker whose rank ``PYACT_TEST_NO_WRITES_ON_RANK`` may read storage
but not write it: any write or delete there fails the run. tests/test_distributed.py runs it to
show that only rank 0 writes a run directory (and, with rank 0 guarded, that the guard bites)."""

import os
import sys

from pyact_torch import storage
from pyact_torch.cli import main


def _refuse(*args, **kwargs):
    raise AssertionError(f"rank {os.environ['RANK']} wrote to storage: {args[:1]}")


if os.environ["RANK"] == os.environ["PYACT_TEST_NO_WRITES_ON_RANK"]:
    for name in ("open_write", "write_bytes", "write_json", "remove"):
        setattr(storage, name, _refuse)

sys.exit(main(sys.argv[1:]))
