#!/usr/bin/env python3
"""Train ConvNet3D on every core of a Cloud TPU VM (or CPU); see `pyact train --help`."""

import sys

from pyact_torch.cli import main

if __name__ == "__main__":
    sys.exit(main(only="train", prog="train_tpu.py"))
