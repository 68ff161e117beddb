#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for tests/test_postgres.py when no initdb is on this machine.
# Idempotent: with a server already installed it does nothing.  The test starts its own throw-away
# cluster (initdb into a temporary folder, pg_ctl on a free loopback port); this only brings the binaries.
# Exit status 0 = binaries present; anything else = not installable here (the test skips with this output).
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
    exit 0
fi
bash "$(dirname "$0")/apt_install.sh" "no PostgreSQL server binaries (initdb)" postgresql
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || { echo "postgresql installed but no initdb found" >&2; exit 4; }
