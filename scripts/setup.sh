#!/usr/bin/env bash
# Set up a virtualenv in .venv with everything fastdistill needs, then install it (editable).
#  - torch: an already-importable torch is kept (e.g. the CUDA build on a GPU machine, seen
#    through --system-site-packages); otherwise torch==2.13.0 is installed. On the CPU machines
#    of this project that pin resolves to a local CPU build (a bare `torch` would pull a
#    multi-GB CUDA build).
#  - the CUDA extension is built only where torch has CUDA and nvcc exists (see setup.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv --system-site-packages .venv
fi
VPY=.venv/bin/python
# every install is retried from scratch: a download cut off mid-file (seen in CI: triton's 286 MB wheel
# stopped at the same byte through all of pip's own resume attempts) fails one attempt, not the setup
export PIP_RETRIES=${PIP_RETRIES:-10}
pip_install() {
  local attempt
  for attempt in 1 2 3 4; do
    "$VPY" -m pip install -q "$@" && return 0
    [ "$attempt" = 4 ] && break
    echo "setup: 'pip install $*' failed (attempt $attempt of 4); retrying in $((attempt * 20)) s" >&2
    sleep $((attempt * 20))
  done
  echo "error: 'pip install $*' failed 4 times" >&2
  return 1
}
pip_install --upgrade pip setuptools wheel
# a kept torch / triton must meet pyproject.toml's bounds (torch>=2.6, triton>=3.2): an older one is replaced
at_least() {  # module, minimum "major.minor": importable and at least that version
  "$VPY" -c "import sys, $1 as m; v = tuple(int(x) for x in m.__version__.split('+')[0].split('.')[:2]); \
sys.exit(0 if v >= tuple(int(x) for x in '$2'.split('.')) else 1)" 2>/dev/null
}
if ! at_least torch 2.6; then
  "$VPY" -c "import torch; print('setup: torch', torch.__version__, 'is older than 2.6: installing torch==2.13.0')" \
    2>/dev/null || true
  pip_install "torch==2.13.0"
fi
if ! at_least triton 3.2; then
  pip_install "triton==3.9.0"
fi
pip_install "pytest>=7" "pytest-xdist>=3" "hypothesis>=6" numpy ninja "pybind11>=2.10"
# test-only extras: unmodified models for the SDPA drop-in and the examples (random weights, no downloads)
pip_install "transformers==5.24.0" "diffusers==0.42.1" matplotlib tqdm
pip_install --no-build-isolation --no-deps -e .
"$VPY" -c "import torch, triton, fastdistill; print('fastdistill', fastdistill.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"
