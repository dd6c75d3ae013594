#!/usr/bin/env bash
# Refresh requirements.lock: resolve pyproject.toml's dependencies (with the dev extras) afresh in a
# throw-away virtual environment and record every version it installed. install.sh uses the lock as pip
# constraints, so an install is the one tested; run this after changing a dependency, then run the tests.
#
#   bash scripts/lock.sh              # with the system's python3 (PYTHON=... for another)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade "pip>=23.1"
"$tmp/venv/bin/python" -m pip install -q ".[dev]"
{
  echo "# The exact versions one resolution of pyproject.toml's dependencies (extras: dev) installed, on"
  echo "# Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())') ($(date -u +%Y-%m-%d))."
  echo "# scripts/install.sh installs with these as constraints. Refresh: bash scripts/lock.sh"
  "$tmp/venv/bin/python" -m pip freeze --exclude-editable --all | grep -v -i -E '^(rlm-pipelines|pip)[=@ ]'
} > requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) pinned packages" >&2
