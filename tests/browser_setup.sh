#!/usr/bin/env bash
# Installs what the browser test (tests/test_web_ui.py) drives: Debian's chromium + chromedriver (apt) and
# selenium (pip, into the interpreter given as $1 or the project's .venv).  Idempotent: a second call
# installs nothing.  Browsers never come from a tool's own download (that host is unreachable here).
# Exit status 0 = ready; anything else = not installable here (the test skips with this script's output).
set -euo pipefail
PYTHON="${1:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}"

if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    if ! command -v apt-get >/dev/null; then
        echo "no /usr/bin/chromium and no apt-get to install Debian's chromium" >&2
        exit 3
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "no /usr/bin/chromium, and installing Debian's chromium needs root (run: sudo $0)" >&2
        exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    # An old or empty package list finds nothing: refresh it once, then install.
    if ! apt-get install -y -q --no-install-recommends chromium chromium-driver >/tmp/browser_setup.apt.log 2>&1; then
        apt-get update -q >>/tmp/browser_setup.apt.log 2>&1 || true
        apt-get install -y -q --no-install-recommends chromium chromium-driver >>/tmp/browser_setup.apt.log 2>&1 || {
            tail -n 20 /tmp/browser_setup.apt.log >&2
            echo "apt-get could not install chromium chromium-driver" >&2
            exit 4
        }
    fi
fi

if ! "$PYTHON" -c "import selenium" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "selenium>=4.20" >&2 || {
        echo "pip could not install selenium" >&2
        exit 5
    }
fi
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null | head -n1); selenium $("$PYTHON" -c 'import selenium; print(selenium.__version__)')"
