#!/usr/bin/env bash
# Sets up (first run) and runs the test suite under every Keras backend: jax, tensorflow, torch.
# Extra arguments go to pytest (e.g. `bash test.sh -m slow` for the full-size checks).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
.venv/bin/python -m pyflakes keras_gemma2 tests   # unused imports, undefined names
status=0
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend ==="
  # Run from an empty folder so the installed package (not the source tree) is imported.
  (cd tests && KERAS_BACKEND=$backend ../.venv/bin/python -m pytest -q -p no:cacheprovider "$@" .) || status=1
done
exit $status
