#!/usr/bin/env python3
"""Same as `pyact export`; run with --help for the flags."""

import sys

from pyact_torch.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], only="export", prog="export_model.py"))
