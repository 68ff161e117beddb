#!/usr/bin/env bash
# Installs Debian packages for a test's setup script: apt_install.sh "<what is missing>" PACKAGE...
# Exit 3 = no apt-get or not root (the message says what is missing and how to fix it), 4 = apt-get failed
# (its log's tail on stderr).  An old or empty package list finds nothing: refresh it once, then retry.
set -euo pipefail
missing="$1"
shift
if ! command -v apt-get >/dev/null; then
    echo "$missing, and no apt-get to install $*" >&2
    exit 3
fi
if [ "$(id -u)" != 0 ]; then
    echo "$missing; installing $* needs root (run: sudo $0 \"$missing\" $*)" >&2
    exit 3
fi
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp /tmp/apt_install.XXXXXX.log)"
if ! apt-get install -y -q --no-install-recommends "$@" >"$log" 2>&1; then
    apt-get update -q >>"$log" 2>&1 || true
    apt-get install -y -q --no-install-recommends "$@" >>"$log" 2>&1 || {
        tail -n 20 "$log" >&2
        echo "apt-get could not install $*" >&2
        exit 4
    }
fi
rm -f "$log"
