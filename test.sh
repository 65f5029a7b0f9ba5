#!/usr/bin/env bash
# Sets up (first run) and runs the test suite under every Keras backend: jax, tensorflow, torch.
# Extra arguments go to pytest (e.g. `bash test.sh -m slow` for the full-size checks).
# Each backend's run uses TEST_WORKERS pytest-xdist processes (default 2, one per core; 0 runs
# in this process), a test file per worker at a time so module fixtures are built once.
# TEST_BACKENDS picks backends (e.g. TEST_BACKENDS=torch bash test.sh).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
.venv/bin/python -m pyflakes keras_gemma2 tests   # unused imports, undefined names
# One thread per worker for the math libraries (OpenMP: PyTorch, oneDNN, OpenBLAS): two
# workers fill the two cores, and OpenMP threads spinning for a busy core made PyTorch's
# eager tests up to 9x slower.
if [ "${TEST_WORKERS:-2}" != 0 ] && [ "${TEST_WORKERS:-2}" != 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# JAX's persistent compilation cache, new for each run and shared by the workers and the child
# processes: the same tiny programs, traced by many tests' models, compile once (measured: the
# generation, conversation and quantization tests 182 -> 141 s under JAX).
if [ -z "${JAX_COMPILATION_CACHE_DIR:-}" ]; then
  JAX_COMPILATION_CACHE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/keras_gemma2-jax-cache.XXXXXX")
  export JAX_COMPILATION_CACHE_DIR
  trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
fi
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
status=0
times=()
for backend in ${TEST_BACKENDS:-jax tensorflow torch}; do
  echo "=== KERAS_BACKEND=$backend ==="
  start=$SECONDS
  # Run from an empty folder so the installed package (not the source tree) is imported.
  rc=0
  (cd tests && KERAS_BACKEND=$backend ../.venv/bin/python -m pytest -q -p no:cacheprovider \
     -n "${TEST_WORKERS:-2}" --dist loadfile --durations=25 "$@" .) || rc=$?
  # 5 is pytest's "no test selected": `-m slow` selects only backend-agnostic checks, which run under jax.
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then status=1; fi
  times+=("$backend $((SECONDS - start)) s")
done
echo "=== test time per backend: ${times[*]}"
exit $status
