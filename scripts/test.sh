#!/usr/bin/env bash
# Set up .venv (idempotent) and run lint and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The browser test (tests/test_app_browser.py) drives Debian's Chromium: install it when it
# is missing and this machine allows it (root with apt-get); otherwise that test says what
# to install (a failure in CI, a skip elsewhere).
if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver for the browser test" >&2
    if ! { apt-get update -qq >/dev/null \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
            >/dev/null; }; then
        echo "could not install chromium; the browser test will say what is missing" >&2
    fi
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest "$@"
