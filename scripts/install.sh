#!/usr/bin/env bash
# Install pgttt and its test tools into ./.venv, from nothing.
#
# torch: a torch that is already importable (a GPU pod's CUDA build) is kept and pinned, so no
# install ever replaces it; otherwise the CPU build torch==2.13.0 is installed (an unpinned torch
# would pull a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  # System site packages stay visible so that a pre-installed CUDA torch is found and kept.
  "$PY" -m venv --system-site-packages .venv
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
if existing=$(.venv/bin/python -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  echo "install: keeping the installed torch $existing"
else
  .venv/bin/python -m pip install -q torch==2.13.0
  existing=$(.venv/bin/python -c 'import torch; print(torch.__version__)')
fi
echo "torch==${existing}" > "$constraints"
.venv/bin/python -m pip install -q -c "$constraints" -e ".[test]"
echo "install: done (.venv/bin/pgttt, torch ${existing})"
if ! command -v lrzip >/dev/null; then
  # Not installable here without root; only PGRP (per-group lrzip) artifacts need it.
  echo "install: WARNING: the lrzip program is missing; PGRP (2026-04-27 record) artifacts will be refused." >&2
  echo "install:   install it with: sudo apt-get install lrzip   (Debian/Ubuntu; 0.651 is known to work)" >&2
fi
