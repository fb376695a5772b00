#!/usr/bin/env bash
# GPU check for a machine with no network: the tests marked `cuda`, then the accelerator
# benchmark (bench/accelerator.py), in under 8 minutes, installing nothing.
#
#   bash bench/gpu_check.sh [OUT_DIR]      (default: gpu-check/)
#
# Needs python3 with torch (CUDA) and the project's runtime imports (numpy, OpenCV, matplotlib,
# ...); the repository is used in place (PYTHONPATH). pytest is optional: without it the tests
# are skipped and the benchmark still runs. Everything printed goes to OUT_DIR/gpu-check.log,
# every figure to OUT_DIR/bench-accelerator.json. Exits non-zero when any part failed (failed
# tests do not stop the benchmark).
set -euo pipefail

TOTAL_S=${GPU_CHECK_TOTAL_S:-460}  # the whole run: under 8 minutes
TESTS_S=${GPU_CHECK_TESTS_S:-180}  # at most this much of it for the tests

# the whole script under `timeout`, as a last resort (each part below has its own, shorter, limit)
if [ -z "${GPU_CHECK_BOUNDED:-}" ]; then
    GPU_CHECK_BOUNDED=1 exec timeout -k 10 "$TOTAL_S" bash "$0" "$@"
fi

OUT_DIR=${1:-gpu-check}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu-check.log"
OUT_FILE="$OUT_DIR/bench-accelerator.json"
cd "$(dirname "$0")/.."  # the repository root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MPLBACKEND=Agg PYTHONUNBUFFERED=1

check() {  # the whole check (its body is not indented: it holds a heredoc)
DEADLINE=$((SECONDS + TOTAL_S - 20))  # leaves time to report
failed=()
left() { echo $((DEADLINE - SECONDS)); }

echo "== gpu check: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), repository $PWD"
echo "== nvidia-smi"
# the driver too: torch's CUDA 13 wheels need driver 580 or later, else torch sees no GPU
if ! timeout -k 5 60 nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_mode --format=csv; then
    echo "nvidia-smi failed"
    failed+=("nvidia-smi")
fi

echo "== torch / CUDA"
# bounded: a GPU that does not answer must not use up the tests' and the benchmark's time
if ! timeout -k 5 120 python3 - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"cuda available: {torch.cuda.is_available()}, GPUs: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB, compute capability {p.major}.{p.minor}")
raise SystemExit(0 if torch.cuda.is_available() else "torch sees no GPU")
PY
then
    echo "the torch/CUDA probe failed or timed out"
    failed+=("torch-cuda")
fi

echo "== tests marked cuda"
if python3 -m pytest --version >/dev/null 2>&1; then
    limit=$(( $(left) - 240 < TESTS_S ? $(left) - 240 : TESTS_S ))  # keeps 4 minutes for the benchmark
    rc=0
    if [ "$limit" -lt 30 ]; then
        echo "tests: skipped (GPU_CHECK_TOTAL_S=$TOTAL_S leaves no time for them)"; rc=-1
    else
        # test_devices.py holds them; other test files import packages a bare GPU box lacks (psutil, onnx)
        # -v: each result on its own line as it ends, so a run cut off by the timeout still says which passed
        timeout -k 10 "$limit" python3 -m pytest -v -rA --durations=10 -m cuda -p no:cacheprovider \
            tests/training/test_devices.py || rc=$?
    fi
    case $rc in
        -1) failed+=("tests (no time)") ;;
        0) echo "tests: passed" ;;
        5) echo "tests: none is marked cuda (pytest collected nothing)" ;;
        124|137) echo "tests: stopped after ${limit} s"; failed+=("tests (timeout)") ;;
        *) echo "tests: failed (pytest exit $rc)"; failed+=("tests") ;;
    esac
else
    echo "pytest is not installed (python3 -m pytest fails): tests skipped, running the benchmark only"
fi

echo "== benchmark: bench/accelerator.py --device cuda --out $OUT_FILE"
limit=$(left)
rc=0
# --budget-s: arms not started by then are skipped, so the table is printed before the timeout
timeout -k 10 "$limit" python3 bench/accelerator.py --device cuda --out "$OUT_FILE" \
    --budget-s $((limit > 150 ? limit - 120 : limit / 2)) || rc=$?
case $rc in
    0) ;;
    124|137) echo "benchmark: stopped after ${limit} s (the figures measured so far are in $OUT_FILE)"
             failed+=("benchmark (timeout)") ;;
    *) echo "benchmark: failed (exit $rc)"; failed+=("benchmark") ;;
esac

echo "== done in ${SECONDS} s: log $LOG, figures $OUT_FILE"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all parts passed"
}

# a pipe, not exec > >(tee): the script ends only once tee has written the log's last line
check 2>&1 | tee "$LOG"
