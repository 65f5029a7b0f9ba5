"""Generation at real size: the gemma2_2b_en architecture (random weights) in keras_gemma2 on JAX
and TensorFlow at each precision, next to keras-hub and llama.cpp on the same weights.

    PYTHONPATH=. .venv/bin/python benchmarks/generate_2b.py [--out DIR] [--rounds 2]
        [--systems ...] [--prompt 128] [--new 9] [--batches 1 8] [--model 2b|9b]

The method of benchmarks/generate.py, at 2.61B parameters: TTFT is the wall time of
`generate(ids, max_new_tokens=1)` (prefill + first token), decode speed
rows * (N - 1) / (t(N) - t(1)); each the best of two timed calls after one untimed
warm-up call of each shape (compilation). The prompt is `--prompt` tokens of demo-teacher
text (BOS included). Two float32 2B copies do not fit in 24 GB together, so every system
runs in a fresh process of its own, one at a time, in `--rounds` interleaved rounds
(alternating order); the table gives medians over rounds. llama.cpp
(benchmarks/setup_llama_cpp.sh) runs f16, q8_0 and q4_0 GGUF files of the same preset,
batch 1 (prefill of the prompt, then one token at a time: export_2b.llama_worker). keras-hub's
`GemmaCausalLM.from_preset(dir)` reads the same preset with its own transformers loader (float32,
JAX, greedy sampler; it builds random weights first, then assigns the checkpoint's). The
decode bound of each row is the machine's read bandwidth, measured in the same run (a
float32 matvec over 2 GB, in a fresh process, once per round), over the bytes its weights
hold (each weight read once per token, the tied table once).

`--model 9b`: the gemma2_9b_en architecture (9.24B parameters) written in bfloat16 (float32 would
be 37 GB), loaded straight into int8 (`quantize="int8"`, which fits 24 GB where a float copy does
not), next to llama.cpp q8_0 (converted directly: an f16 file would not fit beside the preset);
its table is benchmarks/results/generate_9b.md.

The checkpoint, GGUF files and every system's results (runs.json) are kept in `--out`
(default /tmp/generate_2b) and reused: a later invocation (`--systems ...`) adds its runs,
and the table (benchmarks/results/generate_2b.md) shows every system measured there.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import export_2b  # noqa: E402  (benchmarks/ on the path: its checkpoint, llama.cpp and bandwidth steps)

# name -> (runtime, keras backend, precision); precision: float32 / bfloat16 (dtype) or int8 / int4
# (quantize= at load), or a GGUF type for llama.cpp.
SYSTEMS = {
    "keras_gemma2 jax float32": ("ours", "jax", "float32"),
    "keras_gemma2 jax bfloat16": ("ours", "jax", "bfloat16"),
    "keras_gemma2 jax int8": ("ours", "jax", "int8"),
    "keras_gemma2 jax int4": ("ours", "jax", "int4"),
    "keras_gemma2 tensorflow float32": ("ours", "tensorflow", "float32"),
    "keras_gemma2 tensorflow bfloat16": ("ours", "tensorflow", "bfloat16"),
    "keras_gemma2 tensorflow int8": ("ours", "tensorflow", "int8"),
    "keras-hub jax float32": ("kerashub", "jax", "float32"),
    "llama.cpp f16": ("llama", None, "f16"),
    "llama.cpp q8_0": ("llama", None, "q8_0"),
    "llama.cpp q4_0": ("llama", None, "q4_0"),
}
# --model: (architecture, checkpoint dtype, the systems run by default)
MODELS = {
    "2b": ("gemma2_2b_en", "float32", list(SYSTEMS)),
    "9b": ("gemma2_9b_en", "bfloat16", ["keras_gemma2 jax int8", "keras_gemma2 tensorflow int8", "llama.cpp q8_0"]),
}
# The llama.cpp row each of ours is compared with (same bits per weight, or the nearest).
PEER = {"float32": "llama.cpp f16", "bfloat16": "llama.cpp f16", "int8": "llama.cpp q8_0", "int4": "llama.cpp q4_0"}


def weight_bytes(config, precision):
    """Bytes of weights a decode step reads: every projection and the tied table once."""
    table = config.vocabulary_size * config.hidden_dim
    projections = config.parameter_count() - table  # norms (float32 in every mode) are a rounding error
    bits = {"float32": 32, "bfloat16": 16, "int8": 8, "int4": 4}[precision]
    scales = 0 if precision in ("float32", "bfloat16") else 4 * config.vocabulary_size  # the table's row scales
    return (table + projections) * bits // 8 + scales


def timed_batches(generate, load_s, new, batches):
    """The benchmark's method for one loaded model: `generate(batch, count)` runs `count` new tokens
    for `batch` rows; per batch one untimed warm-up of each shape, then the best of two of each."""
    result = {"load_s": load_s, "batches": {}}
    for batch in batches:
        def timed(count):
            begin = time.perf_counter()
            generate(batch, count)
            return time.perf_counter() - begin

        try:
            warm = timed(1) + timed(new)  # compiles prefill and the decode loop
        except Exception as error:  # e.g. out of memory: the table says so, the other batches still run
            result["batches"][str(batch)] = {"error": type(error).__name__}
            continue
        first = min(timed(1) for _ in range(2))
        whole = min(timed(new) for _ in range(2))
        result["batches"][str(batch)] = {
            "ttft_s": first, "decode_tok_s": batch * (new - 1) / (whole - first), "warmup_s": warm,
        }
    result["peak_rss_mb"] = export_2b.peak_rss_mb()
    return result


def ours_worker(preset, backend, precision, prompt, new, batches):
    import keras_gemma2
    from litert import prompt_ids

    ids, _ = prompt_ids(prompt - 1)
    tokens = [2] + list(ids)  # BOS first, as the tokenizer adds it
    options = {"quantize": precision} if precision in ("int8", "int4") else {"dtype": precision}
    start = time.time()
    model = keras_gemma2.from_preset(preset, **options)
    load_s = time.time() - start

    def generate(batch, count):
        model.generate([tokens] * batch, max_new_tokens=count, stop_token_ids=())
    return timed_batches(generate, load_s, new, batches)


def kerashub_worker(preset, prompt, new, batches):
    """keras-hub's GemmaCausalLM on the same transformers-format preset (its own loader), greedy."""
    import keras_hub
    import numpy as np
    from litert import prompt_ids

    ids, _ = prompt_ids(prompt - 1)
    tokens = np.asarray([2] + list(ids), "int32")
    start = time.time()
    model = keras_hub.models.GemmaCausalLM.from_preset(preset, preprocessor=None, dtype="float32")
    model.compile(sampler="greedy")
    load_s = time.time() - start

    def generate(batch, count):
        token_ids = np.zeros((batch, len(tokens) + count), "int32")  # max_length = prompt + count
        token_ids[:, :len(tokens)] = tokens
        model.generate({"token_ids": token_ids, "padding_mask": token_ids != 0}, stop_token_ids=None)
    return timed_batches(generate, load_s, new, batches)


def in_child(environment, *arguments):
    python = os.path.join(export_2b.LLAMA_VENV, "bin", "python") if arguments[0] == "llama" else sys.executable
    command = [python, os.path.abspath(__file__), "--child", *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **environment, "PYTHONPATH": ROOT})
    if result.returncode != 0:
        raise SystemExit(f"{arguments[:3]} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])


def child(arguments):
    kind, *rest = arguments
    if kind == "ours":
        preset, backend, precision, prompt, new, batches = rest
        result = ours_worker(preset, backend, precision, int(prompt), int(new), [int(b) for b in batches.split(",")])
    elif kind == "kerashub":
        preset, prompt, new, batches = rest
        result = kerashub_worker(preset, int(prompt), int(new), [int(b) for b in batches.split(",")])
    elif kind == "llama":
        path, prompt, new, threads = rest
        result = export_2b.llama_worker(path, int(prompt), int(new), int(threads))
    else:
        result = export_2b.bandwidth_worker(int(rest[0]))
    print("RESULT " + json.dumps(result), flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/generate_2b")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="2b", choices=list(MODELS))
    parser.add_argument("--systems", nargs="+", default=None, choices=list(SYSTEMS), metavar="SYSTEM")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=9)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    import keras_gemma2
    from keras_gemma2.checkpoints import presets

    os.makedirs(args.out, exist_ok=True)
    architecture, checkpoint_dtype, default_systems = MODELS[args.model]
    suffix = "" if args.model == "2b" else f"_{args.model}"  # the 2B's file names predate --model
    args.systems = args.systems or default_systems
    preset = os.path.join(args.out, "preset_26" if args.model == "2b" else f"preset{suffix}")
    if not os.path.exists(os.path.join(preset, "config.json")):
        layers = presets.read_preset(architecture, keras_gemma2.Gemma2Config, load_weights=False)[0].num_layers
        print(json.dumps(export_2b.checkpoint_step(preset, layers, architecture, checkpoint_dtype)), flush=True)
    config = presets.read_preset(preset, keras_gemma2.Gemma2Config, load_weights=False)[0]
    llama_ready = os.path.exists(os.path.join(export_2b.LLAMA_VENV, "llama.cpp", "convert_hf_to_gguf.py"))
    systems = [s for s in args.systems if SYSTEMS[s][0] != "llama" or llama_ready]
    gguf = {}
    state_path = os.path.join(args.out, f"gguf{suffix}.json")  # also read for the table's earlier llama rows
    if any(SYSTEMS[s][0] == "llama" for s in systems):
        if not os.path.exists(state_path):
            converted = export_2b.llama_convert_step(preset, args.out, keep_f16=True, q8_only=args.model != "2b",
                                                     name=architecture.removesuffix("_en"))
            with open(state_path, "w") as f:
                json.dump(converted, f)
    if os.path.exists(state_path):
        gguf = json.load(open(state_path))
    # Results accumulate in --out/runs.json over invocations (a run cut short keeps what it measured).
    runs_path = os.path.join(args.out, f"runs{suffix}.json")
    saved = json.load(open(runs_path)) if os.path.exists(runs_path) else {"runs": {}, "bandwidth": []}
    runs = {name: saved["runs"].get(name, []) for name in SYSTEMS if name in systems or saved["runs"].get(name)}
    bandwidth = saved["bandwidth"]

    def save():
        with open(runs_path + ".tmp", "w") as f:
            json.dump({"runs": runs, "bandwidth": bandwidth}, f)
        os.replace(runs_path + ".tmp", runs_path)
    threads = os.cpu_count()
    for round_index in range(args.rounds):
        order = systems if round_index % 2 == 0 else systems[::-1]
        for name in order:
            runtime, backend, precision = SYSTEMS[name]
            if runtime == "ours":
                result = in_child({"KERAS_BACKEND": backend}, "ours", preset, backend, precision, args.prompt,
                                  args.new, ",".join(map(str, args.batches)))
            elif runtime == "kerashub":
                result = in_child({"KERAS_BACKEND": backend}, "kerashub", preset, args.prompt, args.new,
                                  ",".join(map(str, args.batches)))
            else:
                result = in_child({}, "llama", gguf[precision]["path"], args.prompt, args.new, threads)
                result = {"load_s": result["load_s"], "peak_rss_mb": result["peak_rss_mb"], "batches": {"1": result}}
            runs[name].append(result)
            print(round_index, name, json.dumps(result), flush=True)
            save()
        bandwidth.append(in_child({}, "bandwidth", 2 * 10**9)["read_gbs"])
        print(round_index, "bandwidth", bandwidth[-1], flush=True)
        save()
    write_table(args, config, [name for name in SYSTEMS if runs.get(name)], runs, bandwidth, gguf,
                architecture, checkpoint_dtype)


def write_table(args, config, systems, runs, bandwidth, gguf, architecture, checkpoint_dtype):
    read_gbs = statistics.median(bandwidth)

    def median(name, batch, field):
        values = [run["batches"][str(batch)].get(field) for run in runs[name] if str(batch) in run["batches"]]
        values = [value for value in values if value is not None]
        return statistics.median(values) if values else None

    def failed(name, batch):
        errors = {run["batches"].get(str(batch), {}).get("error") for run in runs[name]} - {None}
        return ", ".join(sorted(errors))

    def bytes_of(name):
        runtime, _, precision = SYSTEMS[name]
        return gguf[precision]["file_mb"] * 1e6 if runtime == "llama" else weight_bytes(config, precision)

    lines = [
        "Command: `PYTHONPATH=. .venv/bin/python benchmarks/generate_2b.py"
        + (f" --model {args.model}" if args.model != "2b" else "")
        + (f" --rounds {args.rounds}" if args.rounds != 2 else "") + "`",
        f"Machine: {os.cpu_count()} CPU cores; {export_2b.cpu_flags()}",
        f"Model: {architecture} architecture, {config.parameter_count():,} parameters, random {checkpoint_dtype} weights "
        f"(one transformers-format preset for every system); prompt {args.prompt} tokens, {args.new} greedy "
        f"tokens; best of 2 calls per process, medians over rounds (runs per system: "
        f"{max(len(r) for r in runs.values())}), each system in a fresh process; read bandwidth {read_gbs:.1f} GB/s (median of {', '.join(f'{b:.1f}' for b in bandwidth)}).",
        "",
        "| system | weights GB | batch-1 decode tok/s | decode bound tok/s | decode / bound | vs llama.cpp "
        "| TTFT, batch 1 (s) | " + " | ".join(f"batch-{b} decode tok/s | TTFT, batch {b} (s)" for b in args.batches if b != 1)
        + " | load (s) | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---|---:|" + "---:|---:|" * sum(b != 1 for b in args.batches) + "---:|---:|",
    ]
    for name in systems:
        decode = median(name, 1, "decode_tok_s")
        bound = read_gbs * 1e9 / bytes_of(name)
        runtime, _, precision = SYSTEMS[name]
        peer = PEER.get(precision)
        versus = ""
        if runtime == "ours" and peer in runs and decode:
            versus = f"{decode / median(peer, 1, 'decode_tok_s'):.2f}x {peer.split()[-1]}"
        cells = [name, f"{bytes_of(name) / 1e9:.2f}", f"{decode:.2f}", f"{bound:.2f}", f"{decode / bound:.0%}",
                 versus, f"{median(name, 1, 'ttft_s'):.2f}"]
        for batch in args.batches:
            if batch == 1:
                continue
            rate, ttft = median(name, batch, "decode_tok_s"), median(name, batch, "ttft_s")
            cells += [failed(name, batch) if rate is None else f"{rate:.2f}", "" if ttft is None else f"{ttft:.2f}"]
        cells += [f"{statistics.median(r['load_s'] for r in runs[name]):.0f}",
                  f"{statistics.median(r['peak_rss_mb'] for r in runs[name]):,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "llama.cpp's TTFT is its prompt evaluation plus one decode step (batch 1 only)."]
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(HERE, "results", f"generate_{args.model}.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
