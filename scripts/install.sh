#!/usr/bin/env bash
# Everything rlm-pipelines needs on a fresh Debian/Ubuntu machine: the system packages the local sandbox
# uses (bubblewrap, git, util-linux for prlimit/setpriv), Chromium for the viewer tests, then the project
# with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
if command -v apt-get >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq bubblewrap git util-linux chromium >/dev/null
else
  echo "install.sh: no apt-get here; install bubblewrap, git, util-linux and chromium with your package manager" >&2
fi
"${PYTHON:-python3}" -m pip install -q -e ".[dev]"
