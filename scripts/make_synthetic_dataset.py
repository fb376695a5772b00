#!/usr/bin/env python3
"""Write a synthetic dataset in the real Hand Action layout (see `pyact synth --help`)."""

import sys

from pyact_torch.cli import main

if __name__ == "__main__":
    sys.exit(main(only="synth", prog="make_synthetic_dataset.py"))
