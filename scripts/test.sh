#!/usr/bin/env bash
# Run the test suite in the project's own virtual environment, .venv in the repository (made on first use), so
# that nothing is installed into the system's or Homebrew's Python (PEP 668 refuses that anyway).
# On Linux torch must be a CPU build: `pip install torch==2.13.0` takes one from local disk on our machines;
# installed first, it satisfies the test extra, so pip never pulls a multi-GB CUDA build there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
PY=.venv/bin/python
if [ "$(uname -s)" = Linux ] && ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[test]"
if [ "$(uname -s)" = Linux ]; then bash scripts/ci_browser_deps.sh; fi  # Debian's chromium for the browser test
"$PY" -m pytest -q "$@"
