#!/usr/bin/env bash
# llama.cpp for benchmarks/export_2b.py (benchmark only, never a dependency): a venv of its own
# with llama-cpp-python built from its sdist (~11 min on 2 cores) and llama.cpp's converter
# (convert_hf_to_gguf.py, its conversion/ package and gguf-py) from the same sdist.
# gcc 12 on AMX machines builds a llama.cpp that dies with SIGILL on quantized prompts:
# the AMX instructions are turned off (harmless elsewhere).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
VENV=.venv-llama
FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
if [ ! -x "$VENV/bin/python" ]; then python3.11 -m venv "$VENV"; fi
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=ON -DCMAKE_C_FLAGS='$FLAGS' -DCMAKE_CXX_FLAGS='$FLAGS'" CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$VENV/bin/pip" install --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
fi
if [ ! -f "$VENV/llama.cpp/convert_hf_to_gguf.py" ]; then
  scratch=$(mktemp -d)
  "$VENV/bin/pip" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$scratch" -q
  tar xzf "$scratch"/llama_cpp_python-$VERSION.tar.gz -C "$scratch" \
    llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py \
    llama_cpp_python-$VERSION/vendor/llama.cpp/conversion llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py
  mkdir -p "$VENV/llama.cpp"
  cp -r "$scratch"/llama_cpp_python-$VERSION/vendor/llama.cpp/. "$VENV/llama.cpp/"
  rm -rf "$scratch"
fi
"$VENV/bin/pip" install -q sentencepiece  # the benchmark's prompt, tokenized as for the engine
echo "llama.cpp ready: $VENV (converter in $VENV/llama.cpp)"
