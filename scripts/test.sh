#!/usr/bin/env bash
# The test command (README, CI): the CPU tier runs every Triton kernel through Triton's
# interpreter; the GPU tier (marker `gpu`) runs where a CUDA device is visible and is skipped
# with a reason elsewhere. Extra arguments go to pytest. "No tests collected" is a failure.
# With pytest-xdist installed (scripts/setup.sh installs it) the tests run in FD_TEST_WORKERS
# processes (default 2, the CI machine's cores; 0 runs them in this one).
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
[ -x "$VPY" ] || VPY=python3
XDIST=()
if "$VPY" -c "import xdist" 2>/dev/null; then
  XDIST=(-n "${FD_TEST_WORKERS:-2}")
fi
TRITON_INTERPRET=${TRITON_INTERPRET:-1} "$VPY" -m pytest tests -q ${XDIST[@]+"${XDIST[@]}"} "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
