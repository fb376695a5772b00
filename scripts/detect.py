#!/usr/bin/env python3
"""Same as `pyact detect`; run with --help for the flags."""

import sys

from pyact_torch.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], only="detect", prog="detect.py"))
