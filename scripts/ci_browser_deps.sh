#!/usr/bin/env bash
# Install what the browser test (tests/test_app_browser.py) needs beyond the test extra: Debian's chromium and
# fonts. Idempotent. Playwright's own browser download (`playwright install`) is not used: the test drives
# /usr/bin/chromium through executable_path.
set -euo pipefail
if [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
fi
