#!/usr/bin/env bash
# Creates .venv and installs keras-gemma2 with its dev extra (all three backends, the peers,
# pytest). Idempotent: re-installs only when pyproject.toml or the package changed.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=$(cat pyproject.toml $(git ls-files keras_gemma2 presets 2>/dev/null || find keras_gemma2 presets -type f) | sha1sum | cut -c1-16)
if [ "$(cat .venv/.installed 2>/dev/null)" != "$stamp" ]; then
  # Non-editable on purpose: tests run against what `pip install .` ships (presets as package data).
  .venv/bin/pip install -q ".[dev]"
  echo "$stamp" > .venv/.installed
fi
