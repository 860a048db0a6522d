#!/usr/bin/env bash
# Installs Debian's Chromium (/usr/bin/chromium) for tests/test_web.py, non-interactively, only if it is missing.
# Playwright drives this browser; it never downloads its own. Needs root (or sudo) and Debian's package repositories.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    echo "chromium is already installed: $(/usr/bin/chromium --version)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "error: installing chromium needs root; run: sudo $0" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium
/usr/bin/chromium --version
