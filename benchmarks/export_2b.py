"""Full-size edge export: the real Gemma 2 2B architecture (random weights) to an int8 .litertlm.

    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/export_2b.py [--layers 26] [--out DIR]

Step 1 (this process, TensorFlow backend): build gemma2_2b_en's architecture in float32
with random weights and a tokenizer (Gemma's 256,000-piece vocabulary cannot be
downloaded here: the demo teacher's SentencePiece model padded to 256,000 pieces with
unused ones, so text tokenizes as with the demo teacher), export it with
`keras_gemma2.export(model, "gemma2_2b_int8.litertlm", quantization="int8")`, and record
wall time and memory: this process's peak RSS (the model, tracing, the SavedModel and the
weight stitching), the converter child's peak RSS, and the machine's peak RAM in use (all
processes, sampled every 0.2 s, above the idle level at the start). Step 2 (a fresh
process, as on a phone): load the bundle in Google's LiteRT-LM engine (litert-lm-api, CPU,
2 threads) and run a 128-token prompt and 32 decoded tokens, twice (the first warms up);
prefill / decode tok/s and time to first token are the engine's own benchmark info, with
the process's peak RSS. Step 3 (a fresh process): the machine's memory read bandwidth
(a float32 matvec over a matrix of the bundle's size), for the decode bound
bandwidth / bytes read per token. `--layers` builds fewer blocks for a quick trial of the
same path. Prints a markdown table and writes it to benchmarks/results/export_2b.md.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PUBLISHED_MB = 2587  # LiteRT's Gemma2-2B-IT int8 .tflite
PHONE = "S24 Ultra, 4 threads: prefill 134 tok/s, decode 10.0 tok/s (published LiteRT figures)"


def peak_rss_mb():
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ram_in_use_mb():
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":")
            fields[name] = int(value.split()[0])
    return (fields["MemTotal"] - fields["MemAvailable"]) / 1024


class RamSampler(threading.Thread):
    """Peak machine RAM in use (MemTotal - MemAvailable) while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.baseline = self.peak = ram_in_use_mb()
        self.running = True

    def run(self):
        while self.running:
            self.peak = max(self.peak, ram_in_use_mb())
            time.sleep(0.2)

    def stop(self):
        self.running = False
        self.join()
        return self.peak - self.baseline


def padded_tokenizer(path, size):
    sys.path.insert(0, HERE)
    from litert import DEMO_PRESET, pad_tokenizer

    with open(path, "wb") as f:
        f.write(pad_tokenizer(os.path.join(DEMO_PRESET, "tokenizer.model"), size))
    return path


def export_step(args):
    import keras

    import keras_gemma2
    from keras_gemma2.edge.export import export

    assert keras.backend.backend() == "tensorflow", "run with KERAS_BACKEND=tensorflow"
    overrides = {} if args.layers == 26 else {"num_layers": args.layers}
    sampler = RamSampler()
    sampler.start()
    start = time.time()
    keras.utils.set_random_seed(0)
    backbone = keras_gemma2.Gemma2Backbone.from_preset(
        "gemma2_2b_en", dtype="float32", load_weights=False, **overrides
    )
    vocabulary = backbone.config.vocabulary_size
    tokenizer = keras_gemma2.Gemma2Tokenizer(padded_tokenizer(os.path.join(args.out, "tokenizer.model"), vocabulary))
    model = keras_gemma2.Gemma2CausalLM(backbone, tokenizer=tokenizer)
    built = time.time() - start
    parameters = model.count_params()
    print(f"built {parameters:,} parameters in {built:.0f} s, peak RSS {peak_rss_mb():,.0f} MB", flush=True)
    path = os.path.join(args.out, "gemma2_2b_int8.litertlm")
    start = time.time()
    export(model, path, quantization="int8", cache_length=args.cache_length,
           prefill_lengths=tuple(args.prefill_lengths))
    exported = time.time() - start
    machine_peak = sampler.stop()
    return {
        "machine_peak_mb": machine_peak,
        "converter_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "parameters": parameters,
        "layers": args.layers,
        "build_s": built,
        "export_s": exported,
        "peak_rss_mb": peak_rss_mb(),
        "file_mb": os.path.getsize(path) / 1e6,
        "path": path,
    }


def engine_step(path, prefill_length, decode_steps, threads):
    """In a clean process: the LiteRT-LM engine's prefill and decode speed, and its peak RSS."""
    import litert_lm

    sys.path.insert(0, HERE)
    from litert import prompt_ids

    _, text = prompt_ids(prefill_length - 1)  # + BOS
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    cache_dir = os.path.join(os.path.dirname(path), "engine-cache")
    os.makedirs(cache_dir, exist_ok=True)
    start = time.time()
    engine = litert_lm.Engine(path, backend=litert_lm.Backend.CPU(thread_count=threads),
                              cache_dir=cache_dir, enable_benchmark=True)
    load_s = time.time() - start
    runs = []
    for _ in range(2):  # the first warms up
        session = engine.create_session(apply_prompt_template=False, max_output_tokens=decode_steps,
                                        sampler_config=litert_lm.SamplerConfig(top_k=1))
        try:
            session.run_prefill([text])
            session.run_decode()
            info = session.get_benchmark_info()
        finally:
            session.close()
        runs.append({
            "prefill_tokens": info.last_prefill_token_count,
            "prefill_tok_s": info.last_prefill_tokens_per_second,
            "decode_tokens": info.last_decode_token_count,
            "decode_tok_s": info.last_decode_tokens_per_second,
            "ttft_s": info.time_to_first_token_in_second,
        })
    return {**runs[-1], "warmup": runs[0], "load_s": load_s, "peak_rss_mb": peak_rss_mb(), "threads": threads}


def bandwidth_step(nbytes):
    """The machine's read bandwidth (GB/s): the best float32 matvec over an nbytes matrix."""
    import numpy as np

    columns = 4096
    matrix = np.random.default_rng(0).standard_normal((max(1, nbytes // 4 // columns), columns), dtype="float32")
    vector = np.ones(columns, "float32")
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        matrix @ vector
        best = min(best, time.perf_counter() - begin)
    return {"read_gbs": matrix.nbytes / best / 1e9}


def cpu_flags():
    sys.path.insert(0, HERE)
    from litert import cpu_facts

    model, present, absent = cpu_facts()
    return f"{model}; flags present: {' '.join(present) or 'none'}; absent: {' '.join(absent) or 'none'}"


def in_child(step, *arguments):
    command = [sys.executable, os.path.abspath(__file__), "--child", step, *map(str, arguments)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--cache-length", type=int, default=1024)
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[128])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--reuse", default=None,
                        help="the JSON line step 1 printed: skip the export and time that bundle")
    args = parser.parse_args()
    if args.child:
        step, *rest = args.child
        if step == "engine":
            result = engine_step(rest[0], *map(int, rest[1:]))
        else:
            result = bandwidth_step(int(rest[0]))
        print("RESULT " + json.dumps(result))
        return
    scratch = None
    if args.out is None:
        scratch = tempfile.TemporaryDirectory(prefix="export_2b_")
        args.out = scratch.name
    os.makedirs(args.out, exist_ok=True)
    exported = json.loads(args.reuse) if args.reuse else export_step(args)
    print(json.dumps(exported), flush=True)
    ran = in_child("engine", exported["path"], args.prefill_lengths[0], args.decode_steps, args.threads)
    print(json.dumps(ran), flush=True)
    bandwidth = in_child("bandwidth", int(exported["file_mb"] * 1e6))
    bound = bandwidth["read_gbs"] * 1e3 / exported["file_mb"]  # tok/s if every byte is read once per token
    lines = [
        "Command: `KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/export_2b.py"
        + (f" --layers {args.layers}" if args.layers != 26 else "") + "`",
        f"Machine: {os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; {cpu_flags()}",
        f"Model: gemma2_2b_en architecture, {exported['layers']} layers, "
        f"{exported['parameters']:,} parameters, random float32 weights; int8 .litertlm "
        f"(int8 weights, float32 activations), cache {args.cache_length}, prefill bucket "
        f"{args.prefill_lengths[0]}; run in LiteRT-LM (litert-lm-api, CPU backend, {ran['threads']} threads)",
        "",
        "| measure | keras_gemma2 | LiteRT published Gemma2-2B-IT int8 |",
        "|---|---:|---:|",
        f"| .litertlm size (MB) | {exported['file_mb']:,.0f} | {PUBLISHED_MB:,} |",
        f"| export wall time (s) | {exported['export_s']:,.0f} (+ {exported['build_s']:.0f} s to build the model) | |",
        f"| peak RAM in use on the machine, all processes (MB) | {exported['machine_peak_mb']:,.0f} | (peers: 32-80 GB) |",
        f"| peak RSS: export process / converter child (MB) | {exported['peak_rss_mb']:,.0f} / "
        f"{exported['converter_peak_rss_mb']:,.0f} | |",
        f"| engine prefill tok/s ({ran['prefill_tokens']} tokens, this CPU) | {ran['prefill_tok_s']:.1f} | "
        "134 (S24 Ultra, 4 threads) |",
        f"| engine decode tok/s ({ran['decode_tokens']} tokens, this CPU) | {ran['decode_tok_s']:.2f} | "
        "10.0 (S24 Ultra, 4 threads) |",
        f"| engine time to first token (s) | {ran['ttft_s']:.2f} | |",
        f"| engine process: load (s), peak RSS (MB) | {ran['load_s']:.1f}, {ran['peak_rss_mb']:,.0f} | |",
        f"| read bandwidth (GB/s, float32 matvec) -> decode bound (tok/s) | {bandwidth['read_gbs']:.1f} -> "
        f"{bound:.2f} | |",
        f"| decode / bound | {ran['decode_tok_s'] / bound:.0%} | |",
    ]
    table = "\n".join(lines)
    print(table)
    results = os.path.join(HERE, "results", "export_2b.md" if args.layers == 26 else f"export_2b_{args.layers}layers.md")
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
