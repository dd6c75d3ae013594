#!/usr/bin/env bash
# Everything rlm-pipelines needs on a fresh Debian/Ubuntu machine: the system packages the local sandbox
# uses (bubblewrap, git, util-linux for prlimit/setpriv), python3-venv, Chromium for the viewer tests;
# then a virtual environment (.venv in the checkout, or $VENV) with the project and its test extras,
# pinned by requirements.lock. A distro Python refuses `pip install` outside a venv (PEP 668).
#
#   PYTHON=/path/to/python3 bash scripts/install.sh    # another interpreter (default: the system's python3)
#   VENV=~/venvs/rlm bash scripts/install.sh           # the environment somewhere else
#   EXTRAS=dev,bench bash scripts/install.sh           # other extras (default: dev)
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bubblewrap git util-linux chromium \
    python3-venv >/dev/null
else
  echo "install.sh: no apt-get here; install bubblewrap, git, util-linux, chromium and Python's venv module" \
       "with your package manager" >&2
fi
if [ -z "${PYTHON:-}" ]; then
  if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade "pip>=23.1"
"$VENV/bin/python" -m pip install -q -c requirements.lock -e ".[${EXTRAS:-dev}]"
echo "installed into $VENV: activate it (source $VENV/bin/activate) or call $VENV/bin/python" >&2
