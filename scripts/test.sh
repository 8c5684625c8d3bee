#!/usr/bin/env bash
# Install the package with its test extra and run the test suite.
# On Linux, torch must be a CPU build: `pip install torch==2.13.0` takes one from local disk on our machines;
# installed first, it satisfies the test extra so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "$(uname -s)" = Linux ] && ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
if [ "$(uname -s)" = Linux ]; then bash scripts/ci_browser_deps.sh; fi  # chromium + playwright for the browser test
"$PY" -m pytest -q "$@"
