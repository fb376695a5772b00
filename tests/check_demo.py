"""``python tests/check_demo.py DEMO_DIR LABEL``: the demo test's checks on a demo made outside
the suite (``make demo`` in .ci/run, the container's demo in docker/ci.sh)."""

import sys

from helpers import check_demo_output

if __name__ == "__main__":
    out, label = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "demo"
    metrics = check_demo_output(out)
    print(f"{label}: test accuracy {metrics['accuracy']:.3f} over {metrics['windows']} windows; outputs checked")
