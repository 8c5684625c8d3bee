#!/usr/bin/env bash
# Install what the browser test (tests/test_app_browser.py) needs: Debian's chromium and the playwright
# Python package. Idempotent. Playwright's own browser download (`playwright install`) is not used: the
# test drives /usr/bin/chromium through executable_path.
set -euo pipefail
PY=${PYTHON:-python3}
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
if ! "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  "$PY" -m pip install -q playwright
fi
