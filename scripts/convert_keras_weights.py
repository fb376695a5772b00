#!/usr/bin/env python3
"""Same as `pyact convert-keras`; run with --help for the flags."""

import sys

from pyact_torch.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], only="convert-keras", prog="convert_keras_weights.py"))
