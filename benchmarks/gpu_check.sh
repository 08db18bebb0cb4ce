#!/usr/bin/env bash
# One-shot GPU check for a lent machine (torch 2.11, Triton 3.6, nvcc, ninja, pybind11, pytest;
# no internet). From any directory (it changes to the repository root):
#
#     bash benchmarks/gpu_check.sh OUTDIR
#
# The lent machine gets a copy of the tree without .git: put the commit in the command line, e.g.
#     FASTDISTILL_GIT_SHA=<git rev-parse --short HEAD, plus -dirty if the tree is> bash benchmarks/gpu_check.sh $OUT
# (every CSV row records it; "unknown" otherwise).
#
# Steps (each logged to OUTDIR/NN_<step>.log; a failing step is recorded, later steps still run):
#   00 env     nvidia-smi, versions
#   01 build   pip install --no-build-isolation --no-deps -e .  (FASTDISTILL_FORCE_CUDA_BUILD=1,
#              TORCH_CUDA_ARCH_LIST=9.0a; the full build log is 01_build.log)
#   02 info    python -m fastdistill info
#   03 pytest  python -m pytest tests -m gpu -q -rfE -n 4 (xdist, when installed: 16 cores compile the
#              Triton specialisations in parallel; junit xml: OUTDIR/pytest-junit.xml)
#   04 bench   python -m fastdistill bench --family score --csv OUTDIR/h200.csv
#   05 flkd    python -m fastdistill bench --family flkd --csv OUTDIR/h200.csv (same CSV)
#   06 kd      python -m fastdistill bench --family kd --csv OUTDIR/h200.csv (same CSV)
#   07 attn    python -m fastdistill bench --family attn --csv OUTDIR/h200.csv (same CSV)
#   08 scm     python -m fastdistill bench --family scm --csv OUTDIR/h200.csv (the sCM example's step)
#   09 sweep   python benchmarks/attn_sweep.py --csv OUTDIR/attn_sweep.csv --max-seconds <its timeout - 25>
# then a summary (OUTDIR/summary.txt): step status, the FAILED fastdistill rows (a bench step exits 1
# when one of its fastdistill rows raised or computed a wrong result), the score table, the kd full-mode rows and the
# attn rows (notes shortened), the sweep's best config per (shape, kernel), the pytest summary
# line; its short form (status table and pytest line) is printed again last. Every step has a
# timeout: its cap plus the seconds earlier steps left unused (caps add up to the budget less
# 15 s, so a step never eats into a later step's cap), and the whole run stays under
# GPU_CHECK_BUDGET_S (default 560 s). A step that reaches its timeout gets SIGINT first (pytest
# then writes its summary and junit; the bench keeps the rows measured so far: rows are written
# case by case, and an interrupted case keeps its measured providers), SIGKILL 10 s later. The
# step logs are packed into OUTDIR/logs.tar.gz at the end: OUTDIR holds 5 files (the device
# tool returns at most 8).
#
# Benchmark-only anchors as wheels (the GPU machine has no internet): liger-kernel (kd family)
# and jvp-flash-attention (attn family). If a .whl/ directory exists in the repository root, its
# wheels are first installed with
#     $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
# and PYTHONPATH=/tmp/site is exported. Fetch them on the CPU machine (both are pure Python;
# .whl/ is git-ignored, so a remote run must carry it):
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
#         -d .whl liger-kernel==0.8.5 jvp-flash-attention==0.14.0 wheel==0.45.1
# (wheel: the editable install of step 01 needs it where the image's setuptools is older than 70.1)
# Without them those rows are reported as skipped ("... not installed"). rCM's JVP kernel is
# never vendored: its rows run only when FASTDISTILL_RCM_JVP_PATH names NVlabs/rcm's
# rcm/utils/flash_attention_jvp_triton.py (and its autotune takes about a minute per new shape,
# more than the attn step has).
set -o pipefail
set -u

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2 # the repository root: pip -e ., tests, .whl and benchmarks/ are relative to it
# no internet there: pip must not try an index (or its own version check)
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-$(command -v python3 || command -v python)}
BUDGET=${GPU_CHECK_BUDGET_S:-560}
START=$(date +%s)
export PYTHONUNBUFFERED=1
STATUS=()
FAILED=0
PLANNED=0 # sum of the caps of the steps so far

# step NAME CAP_SECONDS COMMAND: run COMMAND under `timeout` (cap + what earlier steps left unused,
# exported to it as STEP_T), log to OUT/NAME.log, record the outcome
step() {
    local name=$1 cap=$2 cmd=$3
    local elapsed=$(($(date +%s) - START))
    local left=$((BUDGET - elapsed - 15))
    local t=$((PLANNED + cap - elapsed))
    PLANNED=$((PLANNED + cap))
    t=$((t < left ? t : left))
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
    STEP_T=$t timeout -s INT -k 10 "$t" bash -o pipefail -c "$cmd" >>"$log" 2>&1
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

WHEELS="no .whl/ directory: liger and jvp-flash-attn rows skipped"
if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        WHEELS="installed $(cd .whl && ls -- *.whl | tr '\n' ' ')into /tmp/site (PYTHONPATH)"
    else
        WHEELS="FAILED to install .whl/*.whl: liger and jvp-flash-attn rows skipped"
    fi
fi
echo "benchmark wheels: $WHEELS"

step 00_env 10 "echo 'benchmark wheels: $WHEELS'; echo 'commit: ${FASTDISTILL_GIT_SHA:-unknown (FASTDISTILL_GIT_SHA unset)}'; nvidia-smi; echo; $PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0]);
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda); print(\"triton\", triton.__version__);
print(\"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"none\")';
nvcc --version | tail -n 2; echo ninja \$(ninja --version); $PY -m pip list 2>/dev/null |
grep -i -E '^(torch|triton|pybind11|pytest|numpy|ninja) '"

# MAX_JOBS=4: three sources (setup.py would derive it from the free RAM, which a VM may report as small)
step 01_build 80 "MAX_JOBS=4 FASTDISTILL_FORCE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=9.0a \
$PY -m pip install --no-build-isolation --no-deps -v -e ."
# Only the editable install maps fastdistill.kernels to kernels/: if the CUDA build failed or timed out, install
# without the extension, so that the Triton and reference steps below still run (step 01 stays failed)
if ! "$PY" -c "import fastdistill.kernels" 2>/dev/null; then
    echo "=== no install after 01_build: installing without the CUDA extension" | tee -a "$OUT/01_build.log"
    FASTDISTILL_SKIP_CUDA_BUILD=1 timeout 60 "$PY" -m pip install --no-build-isolation --no-deps -e . \
        >>"$OUT/01_build.log" 2>&1
fi
# no install at all (pip or setuptools unable to build an editable wheel): the checkout itself on PYTHONPATH
# (fastdistill registers kernels/ from a source tree), without the CUDA extension
if ! "$PY" -c "import fastdistill.kernels" 2>/dev/null; then
    echo "=== no install: running from the checkout on PYTHONPATH, without the CUDA extension" | tee -a "$OUT/01_build.log"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step 02_info 15 "$PY -m fastdistill info"

XDIST=""
"$PY" -c "import xdist" 2>/dev/null && XDIST="-n 4"
# pytest-timeout >= 2.3: pytest stops itself 20 s before the step's timeout and writes its summary and junit
# (SIGINT to 4 xdist workers may take longer than the 10 s grace before SIGKILL)
PT=""
"$PY" -c "import importlib.metadata as m; v = m.version('pytest-timeout').split('.'); assert (int(v[0]), int(v[1])) >= (2, 3)" \
    2>/dev/null && PT='--session-timeout=$((STEP_T - 20))'
step 03_pytest 135 "$PY -m pytest tests -m gpu -q -rfE $XDIST $PT --junitxml='$OUT/pytest-junit.xml'"

step 04_bench 30 "$PY -m fastdistill bench --family score --csv '$OUT/h200.csv'"

# flkd-128k (fused-linear KD, fkl and jsd, forward + backward): issue 6's targets, before kd's compiles
step 05_flkd 25 "$PY -m fastdistill bench --family flkd --csv '$OUT/h200.csv'"

# kd-128k and kd-152k x 6 divergences x fwd/full; the torch.compile rows (fkl and jsd only: 8 graphs of
# ~4 s each) and the fp64 oracles dominate
step 06_kd 100 "$PY -m fastdistill bench --family kd --csv '$OUT/h200.csv'"

# attn-s4k, attn-s4k-causal, attn-s16k x fwd/full x 8 providers; Triton compiles and the math
# baseline at S = 16384 (~0.3 s a call, ~90 GB) dominate
step 07_attn 85 "$PY -m fastdistill bench --family attn --csv '$OUT/h200.csv'"

# the sCM example's whole student step at a realistic size (~32k video tokens, Wan-1.3B widths, 8 of its
# 30 blocks: the one-forward step keeps ~6 GiB of activations per block):
# per-step time and extra peak memory with fastdistill's jvp_sdpa() and with math SDPA (which may
# run out of memory: then reported as skipped with the reason); a step of seconds is timed over
# 3 calls (the runner's slow-call path), not do_bench's 8+
step 08_scm 40 "$PY -m fastdistill bench --family scm --csv '$OUT/h200.csv'"

# last, so it gets every second the steps before it left: it stops starting new configs 25 s
# before its timeout
step 09_sweep 25 "$PY benchmarks/attn_sweep.py --csv '$OUT/attn_sweep.csv' --max-seconds \$((STEP_T - 25))"

pytest_line() {
    local line
    line=$(grep -E '(passed|failed|error|skipped|deselected|no tests ran|Interrupted)' "$OUT/03_pytest.log" \
        2>/dev/null | tail -n 1)
    echo "${line:-(no pytest summary line; see 03_pytest.log)}"
}

{
    echo
    echo "================ gpu_check summary ($(($(date +%s) - START))s of ${BUDGET}s budget)"
    printf '%s\n' "${STATUS[@]}"
    echo
    echo "---- FAILED fastdistill rows (raised, or an error far above the baseline's; the bench steps exit 1)"
    grep -h -E "^(FAILED|  [a-z]+ .*: (raised|rel_err))|^STOPPED" "$OUT"/0[4-8]_*.log 2>/dev/null || echo "(none)"
    echo
    echo "---- score (04_bench.log, h200.csv)"
    if grep -q "== family" "$OUT/04_bench.log" 2>/dev/null; then
        sed -n '/== family/,$p' "$OUT/04_bench.log" | grep -v '^appended' | cut -c 1-170
    else
        tail -n 15 "$OUT/04_bench.log" 2>/dev/null
    fi
    echo
    echo "---- kd: full-mode rows, notes shortened (all rows: 06_kd.log, h200.csv)"
    if grep -q "== family" "$OUT/06_kd.log" 2>/dev/null; then
        sed -n '/== family/,$p' "$OUT/06_kd.log" | awk 'NR <= 3 || $2 == "full"' |
            sed -E 's/(cpu|quick)-small-shape(; )?|rel_err of s.grad on rows [^;]*(; )?//' | cut -c 1-160
    else
        tail -n 15 "$OUT/06_kd.log" 2>/dev/null
    fi
    echo
    echo "---- attn, notes shortened (all rows: 07_attn.log, h200.csv)"
    if grep -q "== family" "$OUT/07_attn.log" 2>/dev/null; then
        sed -n '/== family/,$p' "$OUT/07_attn.log" | grep -v '^appended' |
            sed -E 's/(cpu|quick)-small-shape(; )?| on query rows [0-9]+-[0-9]+, [0-9]+-[0-9]+//g' | cut -c 1-170
    else
        tail -n 15 "$OUT/07_attn.log" 2>/dev/null
    fi
    echo
    echo "---- attn sweep: best config per (shape, kernel) (all rows: 09_sweep.log, attn_sweep.csv)"
    if grep -q "== best per" "$OUT/09_sweep.log" 2>/dev/null; then
        sed -n '/== best per/,$p' "$OUT/09_sweep.log" | grep -v '^appended'
    else
        tail -n 15 "$OUT/09_sweep.log" 2>/dev/null
    fi
    echo
    echo "---- sCM step, wan-1.3b-like (08_scm.log, h200.csv)"
    grep -E "^scm-" "$OUT/08_scm.log" 2>/dev/null | cut -c 1-170 || tail -n 4 "$OUT/08_scm.log" 2>/dev/null
    echo
    echo "---- flkd (05_flkd.log, h200.csv)"
    if grep -q "== family" "$OUT/05_flkd.log" 2>/dev/null; then
        sed -n '/== family/,$p' "$OUT/05_flkd.log" | grep -v '^appended' | cut -c 1-170
    else
        tail -n 8 "$OUT/05_flkd.log" 2>/dev/null
    fi
    echo
    echo "---- pytest"
    pytest_line
} >"$OUT/summary.txt"
# the detail first; the short form last, where a tail of the output shows it
cat "$OUT/summary.txt"
echo
echo "================ gpu_check status ($(($(date +%s) - START))s of ${BUDGET}s budget; detail above, summary.txt)"
printf '%s\n' "${STATUS[@]}"
pytest_line
( cd "$OUT" && tar -czf logs.tar.gz -- [0-9][0-9]_*.log && rm -f -- [0-9][0-9]_*.log ) ||
    echo "(could not pack the step logs; OUTDIR keeps them)"
echo "OUTDIR: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $FAILED
