#!/usr/bin/env bash
# Install the project with its test extra and the system packages the tests use (PostgreSQL,
# Chromium, promtool), then run the whole test suite. Needs root (or sudo) for apt on a fresh
# machine.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)  # promtool: tests/test_alerts.py
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
EXTRAS="test" source scripts/_venv.sh
exec .venv/bin/python -m pytest "$@"
