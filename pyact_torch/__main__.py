"""``python -m pyact_torch COMMAND ...``: the ``pyact`` command (what torchrun's ``-m`` runs)."""

import sys

from .cli import main

sys.exit(main())
