#!/usr/bin/env bash
# Installs what the browser test (tests/test_web_ui.py) drives: Debian's chromium + chromedriver (apt) and
# selenium (pip, into the interpreter given as $1 or the project's .venv).  Idempotent: a second call
# installs nothing.  Browsers never come from a tool's own download (that host is unreachable here).
# Exit status 0 = ready; anything else = not installable here (the test skips with this script's output).
set -euo pipefail
PYTHON="${1:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}"

if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    bash "$(dirname "$0")/apt_install.sh" "no /usr/bin/chromium" chromium chromium-driver
fi

if ! "$PYTHON" -c "import selenium" 2>/dev/null; then
    "$PYTHON" -m pip install --quiet "selenium>=4.20" >&2 || {
        echo "pip could not install selenium" >&2
        exit 5
    }
fi
echo "chromium: $(/usr/bin/chromium --version 2>/dev/null | head -n1); selenium $("$PYTHON" -c 'import selenium; print(selenium.__version__)')"
