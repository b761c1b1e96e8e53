#!/usr/bin/env bash
# What a lent GPU machine runs, from the repository root: install the project with its GPU extra into a venv
# (CUDA torch from the index the machine has; flash-attn builds against it), then run bench/gpu_check.py,
# one line per check. Prepared for the device tool: `run` with a timeout that leaves room to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install --quiet --upgrade pip
  .venv-gpu/bin/python -m pip install --quiet torch
  .venv-gpu/bin/python -m pip install --quiet -e . bitsandbytes
  # flash-attn compiles for minutes without a matching wheel: optional, its check reports SKIP without it
  .venv-gpu/bin/python -m pip install --quiet --no-build-isolation flash-attn || echo "flash-attn: not installed"
fi
exec .venv-gpu/bin/python bench/gpu_check.py
