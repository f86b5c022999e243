#!/usr/bin/env bash
# What the browser tests (pytest -m browser, tests/test_web_browser.py) need on top of the test
# environment: Debian's headless Chromium and the Playwright Python package. Playwright's own
# browser download (`playwright install`) is NOT used: the tests launch /usr/bin/chromium.
#
#   .ci/browser-setup.sh [PYTHON]     # PYTHON: the interpreter of the test venv (default: python3)
set -euo pipefail

PYTHON="${1:-python3}"

if [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
/usr/bin/chromium --version

if ! "$PYTHON" -c "import playwright" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "playwright>=1.40"
fi
"$PYTHON" -c "import playwright, importlib.metadata as m; print('playwright', m.version('playwright'))"
