#!/usr/bin/env bash
# One-shot GPU check for a lent machine (torch 2.11, Triton 3.6, nvcc, ninja, pybind11, pytest;
# no internet). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# Steps (each logged to OUTDIR/NN_<step>.log; a failing step is recorded, later steps still run):
#   00 env     nvidia-smi, versions
#   01 build   pip install --no-build-isolation --no-deps -e .  (FASTDISTILL_FORCE_CUDA_BUILD=1,
#              TORCH_CUDA_ARCH_LIST=9.0a; the full build log is 01_build.log)
#   02 info    python -m fastdistill info
#   03 pytest  python -m pytest tests -m gpu -q -rs   (junit xml: OUTDIR/pytest-junit.xml)
#   04 bench   python -m fastdistill bench --family score --csv OUTDIR/h200.csv
# then a summary (OUTDIR/summary.txt, also printed last): step status, the bench table, the
# pytest summary line. Every step has a timeout and the whole run stays under GPU_CHECK_BUDGET_S
# (default 450 s); OUTDIR ends up with 8 files at most.
set -o pipefail
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
export PYTHONUNBUFFERED=1
STATUS=()
FAILED=0

# step NAME CAP_SECONDS COMMAND: run COMMAND under `timeout`, log to OUT/NAME.log, record the outcome
step() {
    local name=$1 cap=$2 cmd=$3
    local left=$((BUDGET - ($(date +%s) - START) - 15))
    local t=$((cap < left ? cap : left))
    local log="$OUT/$name.log"
    if [ "$t" -lt 5 ]; then
        echo "not run: out of time budget (${BUDGET}s)" >"$log"
        STATUS+=("$(printf '%-10s %-14s %5s' "$name" "NOT RUN" "0s")")
        FAILED=1
        return
    fi
    echo "=== [$name] (timeout ${t}s) $cmd"
    local t0 rc
    t0=$(date +%s)
    { echo "\$ $cmd"; echo; } >"$log"
    timeout -k 10 "$t" bash -o pipefail -c "$cmd" >>"$log" 2>&1
    rc=$?
    local dt=$(($(date +%s) - t0))
    local what="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        what="TIMEOUT"
    elif [ "$rc" -ne 0 ]; then
        what="FAIL rc=$rc"
    fi
    [ "$rc" -ne 0 ] && FAILED=1
    echo "    -> $what (${dt}s); last lines:"
    tail -n 5 "$log" | sed 's/^/    | /'
    STATUS+=("$(printf '%-10s %-14s %5ss' "$name" "$what" "$dt")")
}

step 00_env 15 "nvidia-smi; echo; $PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0]);
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"triton\", triton.__version__);
print(\"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"none\")';
nvcc --version | tail -n 2; echo ninja \$(ninja --version); $PY -m pip list 2>/dev/null |
grep -i -E '^(torch|triton|pybind11|pytest|numpy|ninja) '"

# MAX_JOBS: setup.py derives it from cores and free RAM unless it is set in the environment
step 01_build 140 "FASTDISTILL_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=9.0a \
$PY -m pip install --no-build-isolation --no-deps -v -e ."

step 02_info 30 "$PY -m fastdistill info"

step 03_pytest 90 "$PY -m pytest tests -m gpu -q -rs --junitxml='$OUT/pytest-junit.xml'"

step 04_bench 160 "$PY -m fastdistill bench --family score --csv '$OUT/h200.csv'"

{
    echo
    echo "================ gpu_check summary ($(($(date +%s) - START))s of ${BUDGET}s budget)"
    printf '%s\n' "${STATUS[@]}"
    echo
    echo "---- bench (tail of 04_bench.log)"
    if grep -q "== family" "$OUT/04_bench.log" 2>/dev/null; then
        sed -n '/== family/,$p' "$OUT/04_bench.log" | tail -n 45
    else
        tail -n 15 "$OUT/04_bench.log" 2>/dev/null
    fi
    echo
    echo "---- pytest"
    grep -E '(passed|failed|error|skipped|deselected|no tests ran)' "$OUT/03_pytest.log" 2>/dev/null | tail -n 1 ||
        echo "(no pytest summary line; see 03_pytest.log)"
} | tee "$OUT/summary.txt"
exit $FAILED
