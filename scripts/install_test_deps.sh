#!/usr/bin/env bash
# System packages the tests need (idempotent, quiet; run by `make test`): Debian's headless Chromium and its
# WebDriver, which tests/test_review.py drives with Selenium. Nothing is downloaded outside apt.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
echo "installed: $(/usr/bin/chromium --version 2>/dev/null)"
