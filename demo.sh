#!/usr/bin/env bash
# Sets up (first run) and runs the main job: the shipped, distilled demo Gemma 2 (trained on Python's
# standard library, ships inside the package) continues a prompt, offline, streaming.
# `bash demo.sh "prompt"` uses your prompt; `bash demo.sh "prompt" --preset /path/to/gemma-2-2b`
# uses a real checkpoint folder (KerasHub or transformers format).
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
prompt=${1:-"def "}
shift || true
.venv/bin/keras-gemma2 generate --preset gemma2_demo --max-new-tokens 80 "$@" "$prompt"
