#!/usr/bin/env bash
# Installs the system packages the tests need (redis-server), when they are missing.
# Uses apt-get (Debian/Ubuntu), through sudo when not root. Safe to run again.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-deps: redis-server is missing and apt-get is not available; install Redis yourself" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo="sudo -n"; else
        echo "install-deps: need root or sudo to install redis-server" >&2
        exit 1
    fi
fi
echo "install-deps: installing redis-server with apt-get" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q redis-server >/dev/null 2>&1 || {
    $sudo apt-get update -q >/dev/null
    $sudo apt-get install -y -q redis-server >/dev/null
}
# The tests start their own servers on free ports; the packaged service is not needed.
command -v redis-server >/dev/null
echo "install-deps: $(redis-server --version | head -c 60)" >&2
