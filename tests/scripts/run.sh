#!/usr/bin/env bash
# The entry point README gives a newcomer on a fresh Debian/Ubuntu machine:
#   tests/scripts/run.sh demo    # the local demo
#   tests/scripts/run.sh test    # the whole test suite
# as root (a minimal root shell has no sudo), or with sudo in front as another user.
# Installs `make` when missing, then runs `make <target>`; the make targets install the rest
# (tests/scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! command -v make >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "podid: 'make' is missing and installing it needs root: run this as root (or with sudo)" >&2
        exit 1
    fi
    echo "podid: installing make" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends make >/dev/null
fi
# A toolchain installed by install-deps.sh lands here; make and cargo must find it.
export PATH="$HOME/.cargo/bin:$PATH"
exec make "$@"
