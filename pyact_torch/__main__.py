"""``python -m pyact_torch COMMAND ...``: the ``pyact`` command (what torchrun's ``-m`` runs)."""

import sys

from .io import lifecycle  # noqa: F401  (first: it records the launcher's pid before the slow imports)
from .cli import main

sys.exit(main())
