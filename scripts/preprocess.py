#!/usr/bin/env python3
"""Raw Hand Action dataset -> WebDataset shards (see `pyact preprocess --help`)."""

import sys

from pyact_torch.cli import main

if __name__ == "__main__":
    sys.exit(main(only="preprocess", prog="preprocess.py"))
