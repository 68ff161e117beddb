#!/usr/bin/env bash
# Installs Debian's PostgreSQL server for tests/test_postgres.py when no initdb is on this machine.
# Idempotent: with a server already installed it does nothing.  The test starts its own throw-away
# cluster (initdb into a temporary folder, pg_ctl on a free loopback port); this only brings the binaries.
# Exit status 0 = binaries present; anything else = not installable here (the test skips with this output).
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "no PostgreSQL server binaries (initdb) and no apt-get to install them" >&2
    exit 3
fi
if [ "$(id -u)" != 0 ]; then
    echo "no PostgreSQL server binaries (initdb); installing Debian's postgresql needs root (run: sudo $0)" >&2
    exit 3
fi
export DEBIAN_FRONTEND=noninteractive
log=/tmp/postgres_setup.apt.log
if ! apt-get install -y -q --no-install-recommends postgresql >"$log" 2>&1; then
    apt-get update -q >>"$log" 2>&1 || true
    apt-get install -y -q --no-install-recommends postgresql >>"$log" 2>&1 || {
        tail -n 20 "$log" >&2
        echo "apt-get could not install postgresql" >&2
        exit 4
    }
fi
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || { echo "postgresql installed but no initdb found" >&2; exit 4; }
