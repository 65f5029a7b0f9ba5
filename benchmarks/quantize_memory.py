"""Keras-side quantization (`model.quantize("int8" / "int4")`): memory, agreement, decode speed.

    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/quantize_memory.py [--threads 1] [--layers 12]

One ~150M-parameter Gemma 2 (the MODEL of benchmarks/generate.py) with random float32
weights, built from the same seed in one process per mode (float32, int8, int4), so each
process's RSS holds only that mode's model. Per mode: the bytes of the model's variables
(`model.weight_bytes()`), the process RSS after building (and quantizing), its peak,
top-1 agreement with float32 of the next-token logits at every position of a few random
prompts, and batch-1 greedy decode speed (`generate`, 16 new tokens, jax). Prints one
markdown table and writes it to benchmarks/results/quantize_memory.md.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "quantize_memory.md")

sys.path.insert(0, HERE)
from generate import MODEL  # noqa: E402  (the ~150M-parameter config of benchmarks/generate.py)

SEED = 0
MODES = ("float32", "int8", "int4")
PROMPTS, PROMPT_LENGTH = 8, 64  # agreement: every position of 8 random 64-token prompts
NEW_TOKENS = 16


# ---- the workers: one mode, one process each ------------------------------------------------
def memory_mib():
    """(current RSS, peak RSS) of this process in MiB, from /proc/self/status.

    Freed memory is first handed back to the OS (glibc keeps freed pages otherwise,
    and the float weights a quantization replaced would still count).
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _ = line.split()
                values[key[:-1]] = int(amount) / 1024
    return values["VmRSS"], values["VmHWM"]


def build_model(layers):
    """The random model: generate.py's recipe (post-norm scales ~5 so generations vary)."""
    import numpy as np

    import keras_gemma2

    config = keras_gemma2.Gemma2Config(**{**MODEL, "num_layers": layers})
    model = keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(config, dtype="float32"))
    rng = np.random.default_rng(SEED)
    for variable in model.backbone.weights:
        if len(variable.shape) == 1:
            mean, std = (5.0 if "/post_" in variable.path else 0.0), 0.1
        else:
            mean, std = 0.0, 0.05
        variable.assign(rng.normal(mean, std, variable.shape).astype("float32"))
    return model


def make(args):
    """Build the float32 model, quantize it (int8 / int4), save it as a .keras file."""
    import keras
    import numpy as np

    begin = time.perf_counter()
    model = build_model(args.layers)
    build_s = time.perf_counter() - begin
    checksum = float(np.abs(keras.ops.convert_to_numpy(model.backbone.token_embedding.embeddings)).sum())
    rss_built, _ = memory_mib()
    # One layer's error on random inputs, free of the 12 layers' amplification: the first
    # block's gate projection (Keras' Dense) and the tied output projection (ours).
    x = np.random.default_rng(7).normal(0, 1, (4, 16, MODEL["hidden_dim"])).astype("float32")
    gate = model.backbone.decoder_blocks[0].feedforward.gate
    embedding = model.backbone.token_embedding

    def layer_outputs():
        return [keras.ops.convert_to_numpy(gate(x)), keras.ops.convert_to_numpy(embedding(x, reverse=True))]

    exact = layer_outputs()
    quantize_s = None
    if args.mode != "float32":
        begin = time.perf_counter()
        model.quantize(args.mode)
        quantize_s = time.perf_counter() - begin
    rss_quantized, peak = memory_mib()
    errors = [float(np.linalg.norm(q - f) / np.linalg.norm(f)) for q, f in zip(layer_outputs(), exact)]
    model.save(args.keras_file)
    return {
        "parameters": model.config.parameter_count(),
        "weight_bytes": model.weight_bytes(),
        "checksum": checksum,
        "build_s": build_s,
        "quantize_s": quantize_s,
        "rss_built_mib": rss_built,
        "rss_quantized_mib": rss_quantized,
        "peak_make_mib": peak,
        "gate_error": errors[0],
        "projection_error": errors[1],
        "file_bytes": os.path.getsize(args.keras_file),
    }


def use(args):
    """A fresh process: load the .keras file, then next-token logits and batch-1 decoding."""
    import keras
    import numpy as np

    import jax

    from keras_gemma2 import Gemma2CausalLM  # importing keras_gemma2 registers its classes

    begin = time.perf_counter()
    model = keras.saving.load_model(args.keras_file)
    assert isinstance(model, Gemma2CausalLM)
    load_s = time.perf_counter() - begin
    rss_loaded, _ = memory_mib()
    live_bytes = sum(a.nbytes for a in jax.live_arrays())  # every device buffer: the weights

    rng = np.random.default_rng(1234)
    ids = rng.integers(2, MODEL["vocabulary_size"], (PROMPTS, PROMPT_LENGTH)).astype("int32")
    logits = model.predict_on_batch({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    top1 = np.asarray(logits).argmax(-1)

    prompt = [ids[0].tolist()]

    def generate(new):
        return model.generate(prompt, max_new_tokens=new, stop_token_ids=())[0]

    for new in (1, NEW_TOKENS):  # warm-up: each length is a compilation
        generate(new)
    times = {1: [], NEW_TOKENS: []}
    for _ in range(args.repeats):
        for new in (1, NEW_TOKENS):
            begin = time.perf_counter()
            tokens = generate(new)
            times[new].append(time.perf_counter() - begin)
    t1, tn = median(times[1]), median(times[NEW_TOKENS])
    _, peak = memory_mib()
    return {
        "load_s": load_s,
        "loaded_weight_bytes": model.weight_bytes(),
        "rss_loaded_mib": rss_loaded,
        "live_bytes": live_bytes,
        "peak_use_mib": peak,
        "top1": top1.tolist(),
        "ttft_ms": 1000 * t1,
        "decode_tps": (NEW_TOKENS - 1) / (tn - t1) if tn > t1 else float("nan"),
        "spread": max(times[NEW_TOKENS]) / min(times[NEW_TOKENS]) - 1,
        "tokens": np.asarray(tokens).tolist(),
    }


# ---- the driver (no deep-learning framework imported here) ------------------------------------
def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def busy_cpu_seconds():
    """Machine-wide non-idle CPU time (Linux /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def spawn(role, mode, args, directory):
    output = os.path.join(directory, f"{role}-{mode}.json")
    command = [sys.executable, os.path.abspath(__file__), "--worker", role, "--mode", mode,
               "--output", output, "--keras-file", os.path.join(directory, f"{mode}.keras"),
               "--layers", str(args.layers), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env["KERAS_BACKEND"] = "jax"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[name] = str(args.threads)
    begin, busy, ours = time.perf_counter(), busy_cpu_seconds(), own_cpu_seconds()
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - begin
    foreign = max(0.0, (busy_cpu_seconds() - busy) - (own_cpu_seconds() - ours)) / elapsed
    if process.returncode != 0:
        print("\n".join(process.stderr.strip().splitlines()[-25:]))
        raise SystemExit(f"[{role} {mode}] failed (exit {process.returncode})")
    with open(output) as f:
        result = json.load(f)
    result[f"{role}_foreign_cores"] = foreign
    result[f"{role}_loadavg"] = os.getloadavg()[0]
    print(f"[{role} {mode}] done in {elapsed:.0f} s; other processes used {foreign:.2f} of "
          f"{os.cpu_count()} cores meanwhile (load average {os.getloadavg()[0]:.2f})", flush=True)
    return result


def table(results):
    import numpy as np

    reference = np.asarray(results["float32"]["top1"])
    float_bytes = results["float32"]["weight_bytes"]
    memory = [
        "| mode | weight bytes (MB) | vs float32 | .keras file (MB) | RSS built (MiB) "
        "| RSS quantized (MiB) | RSS loading the .keras (MiB) | its jax buffers (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    quality = [
        "| mode | quantize (s) | gate rel. error | output projection rel. error | top-1 agreement "
        "| TTFT (ms) | decode tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        r = results[mode]
        agreement = float((np.asarray(r["top1"]) == reference).mean())
        quantize_s = "-" if r["quantize_s"] is None else f"{r['quantize_s']:.1f}"
        memory.append(
            f"| {mode} | {r['weight_bytes'] / 1e6:,.1f} | {r['weight_bytes'] / float_bytes:.3f} "
            f"| {r['file_bytes'] / 1e6:,.1f} | {r['rss_built_mib']:,.0f} | {r['rss_quantized_mib']:,.0f} "
            f"| {r['rss_loaded_mib']:,.0f} | {r['live_bytes'] / 2**20:,.1f} |"
        )
        quality.append(
            f"| {mode} | {quantize_s} | {r['gate_error']:.4f} | {r['projection_error']:.4f} "
            f"| {agreement:.3f} | {r['ttft_ms']:.0f} | {r['decode_tps']:.1f} |"
        )
    return "\n".join(memory) + "\n\n" + "\n".join(quality)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="cores per process (default 1)")
    parser.add_argument("--layers", type=int, default=MODEL["num_layers"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=RESULTS, help="markdown file to write")
    parser.add_argument("--worker", choices=("make", "use"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--keras-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        # Before jax starts: XLA sizes its thread pools from the affinity mask.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
        result = {"make": make, "use": use}[args.worker](args)
        with open(args.output, "w") as f:
            json.dump(result, f)
        return

    load_before = os.getloadavg()[0]
    results = {}
    with tempfile.TemporaryDirectory() as directory:
        for mode in MODES:
            results[mode] = spawn("make", mode, args, directory)
            results[mode].update(spawn("use", mode, args, directory))
            os.remove(os.path.join(directory, f"{mode}.keras"))
    sums = {r["checksum"] for r in results.values()}
    if len(sums) != 1:
        raise SystemExit(f"The processes built different weights (embedding checksums {sums}).")
    for mode, r in results.items():
        if r["loaded_weight_bytes"] != r["weight_bytes"]:
            raise SystemExit(f"{mode}: the loaded .keras model holds other bytes than the saved one.")

    r = results["float32"]
    positions = PROMPTS * PROMPT_LENGTH
    foreign = {m: max(results[m]["make_foreign_cores"], results[m]["use_foreign_cores"]) for m in MODES}
    loads = [results[m][f"{role}_loadavg"] for m in MODES for role in ("make", "use")]
    notes = [
        f"`KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/quantize_memory.py --threads {args.threads}"
        + (f" --layers {args.layers}" if args.layers != MODEL["num_layers"] else "") + "`",
        "",
        f"Model: {r['parameters']:,} parameters ({args.layers} layers, hidden {MODEL['hidden_dim']}, "
        f"vocabulary {MODEL['vocabulary_size']:,}), random float32 weights (seed {SEED}, "
        f"generate.py's recipe), jax, each process pinned to {args.threads} core(s). Per mode, one "
        "process builds the float32 model, quantizes it and saves a .keras file; a fresh process "
        "loads that file and runs the model. RSS built: after building the float32 model; RSS "
        "quantized: after `model.quantize(mode)` in that process (float32: at the same point, "
        "nothing quantized); RSS loading the .keras: the fresh process after `keras.saving.load_model`, which "
        "never holds the float weights, and the bytes of every jax buffer alive then. Every RSS is "
        "read after `gc.collect()` and glibc's `malloc_trim(0)` (without it, freed float weights "
        "stay in the process's heap). Rel. error: |quantized - float| / |float| of one layer's "
        "output on random unit inputs (the first block's `gate` Dense, Keras' quantization; the "
        "tied output projection, one scale per vocabulary row). Top-1 "
        f"agreement: next-token argmax vs float32 at all {positions} positions of {PROMPTS} random "
        f"{PROMPT_LENGTH}-token prompts. Decode: batch 1, prompt {PROMPT_LENGTH}, {NEW_TOKENS} new "
        f"tokens, greedy, decode tok/s = {NEW_TOKENS - 1} / (t({NEW_TOKENS}) - t(1)), medians of "
        f"{args.repeats} after a warm-up.",
        "",
        table(results),
        "",
        "Other processes on this machine during each mode (cores busy besides this benchmark, of "
        f"{os.cpu_count()}): " + ", ".join(f"{m} {foreign[m]:.2f}" for m in MODES)
        + f"; load average {load_before:.2f} before the run, {min(loads):.2f} to {max(loads):.2f} after each process.",
    ]
    if max(foreign.values()) > 0.3 or max(loads) > 1.5:
        notes.append(
            "The machine was shared with another heavy job during this run: byte counts, RSS and "
            "agreement are unaffected, but the times (quantize, TTFT, decode tok/s) are slower and "
            "noisier than on an idle machine; compare the modes with each other, not with other tables."
        )
    peaks = ", ".join(
        f"{m} {results[m]['peak_make_mib']:,.0f} / {results[m]['peak_use_mib']:,.0f}" for m in MODES
    )
    notes.append(f"Peak RSS (MiB), quantizing process / loading process: {peaks}.")
    notes.append(
        "RSS also holds the Python / JAX runtime and XLA's compiled code (a few hundred MiB, "
        "varying by tens of MiB between processes); the jax buffers column is the model alone."
    )
    spreads = ", ".join(f"{m} {results[m]['spread']:.0%}" for m in MODES)
    notes.append(f"Spread of the timed {NEW_TOKENS}-token calls (max / min - 1): {spreads}.")
    text = "\n".join(notes) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results, "w") as f:
        f.write("# Keras-side quantization: memory, agreement, decode speed\n\n" + text)


if __name__ == "__main__":
    main()
