#!/usr/bin/env bash
# Sets up (first run) and runs the main job: load a Gemma 2 checkpoint from disk and score text.
# Pass a checkpoint folder (KerasHub or transformers format) to use your own, e.g. a downloaded
# google/gemma-2-2b: `bash demo.sh /path/to/gemma-2-2b`.
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
checkpoint=${1:-}
if [ -z "$checkpoint" ]; then
  checkpoint=.demo/tiny_gemma2
  .venv/bin/python tests/make_checkpoint.py "$checkpoint"
fi
.venv/bin/keras-gemma2 info --preset gemma2_2b_en | head -n 20
.venv/bin/keras-gemma2 score --preset "$checkpoint" -v "def add(a, b): return a + b" "Hello, world!"
