"""Full-size edge export: the real Gemma 2 2B architecture (random weights) to int8 LiteRT.

    KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/export_2b.py [--layers 26] [--out DIR]

Step 1 (this process, TensorFlow backend): build gemma2_2b_en's architecture in float32
with random weights, export it with `keras_gemma2.export(..., quantization="int8")`, and
record wall time and memory: this process's peak RSS (the model, tracing, the SavedModel
and the weight stitching), the converter child's peak RSS, and the machine's peak RAM in
use (all processes, sampled every 0.2 s, above the idle level at the start). Step 2 (a fresh process: only numpy, sentencepiece-free ids
and ai_edge_litert, as on a phone): load the .tflite with export/runner.py and time
prefill (one bucket) and decode (tokens/s) at 2 threads. `--layers` builds fewer blocks
for a quick trial of the same code path. Prints a markdown table and writes it to
benchmarks/results/export_2b.md.
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
    model = keras_gemma2.from_preset("gemma2_2b_en", dtype="float32", load_weights=False, **overrides)
    built = time.time() - start
    parameters = model.count_params()
    print(f"built {parameters:,} parameters in {built:.0f} s, peak RSS {peak_rss_mb():,.0f} MB", flush=True)
    path = os.path.join(args.out, "gemma2_2b_int8.tflite")
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


def run_step(path, prefill_length, decode_steps, threads):
    """In a clean process: LiteRT prefill and decode speed through the reference runner."""
    sys.path.insert(0, os.path.join(ROOT, "export"))
    import numpy as np
    from runner import Runner

    start = time.time()
    runner = Runner.load(path, num_threads=threads)
    prompt = list(np.random.default_rng(0).integers(4, 1000, prefill_length - 1))
    prompt = [2] + [int(t) for t in prompt]
    # Warm-up (first invocations allocate tensors), then the timed generation.
    runner.generate(prompt[:8], max_new_tokens=2)
    load_s = time.time() - start
    runner.stop_ids = set()  # random weights: never stop early
    tokens = runner.generate(prompt, max_new_tokens=decode_steps + 1)
    stats = runner.stats
    return {
        "load_s": load_s,
        "prefill_tokens": len(prompt),
        "bucket": stats["bucket"],
        "prefill_tok_s": len(prompt) / stats["prefill_s"],
        "decode_tok_s": stats["decode_steps"] / stats["decode_s"],
        "generated": len(tokens),
        "runner_peak_rss_mb": peak_rss_mb(),
        "threads": threads,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--cache-length", type=int, default=1024)
    parser.add_argument("--prefill-lengths", type=int, nargs="+", default=[128])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--run-only", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_only:
        result = run_step(args.run_only, args.prefill_lengths[0], args.decode_steps, args.threads)
        print("RESULT " + json.dumps(result))
        return
    scratch = None
    if args.out is None:
        scratch = tempfile.TemporaryDirectory(prefix="export_2b_")
        args.out = scratch.name
    os.makedirs(args.out, exist_ok=True)
    exported = export_step(args)
    print(json.dumps(exported), flush=True)
    command = [sys.executable, os.path.abspath(__file__), "--run-only", exported["path"],
               "--prefill-lengths", str(args.prefill_lengths[0]),
               "--decode-steps", str(args.decode_steps), "--threads", str(args.threads)]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    ran = json.loads(next(l for l in output.splitlines() if l.startswith("RESULT "))[7:])
    lines = [
        "Command: `KERAS_BACKEND=tensorflow PYTHONPATH=. python benchmarks/export_2b.py"
        + (f" --layers {args.layers}" if args.layers != 26 else "") + "`",
        f"Machine: {os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM",
        f"Model: gemma2_2b_en architecture, {exported['layers']} layers, "
        f"{exported['parameters']:,} parameters, random float32 weights; int8 export "
        f"(int8 weights, float32 activations), cache {args.cache_length}, prefill bucket "
        f"{args.prefill_lengths[0]}",
        "",
        "| measure | keras_gemma2 | LiteRT published Gemma2-2B-IT int8 |",
        "|---|---:|---:|",
        f"| .tflite size (MB) | {exported['file_mb']:,.0f} | {PUBLISHED_MB:,} |",
        f"| export wall time (s) | {exported['export_s']:,.0f} (+ {exported['build_s']:.0f} s to build the model) | |",
        f"| peak RAM in use on the machine, all processes (MB) | {exported['machine_peak_mb']:,.0f} | (peers: 32-80 GB) |",
        f"| peak RSS: export process / converter child (MB) | {exported['peak_rss_mb']:,.0f} / "
        f"{exported['converter_peak_rss_mb']:,.0f} | |",
        f"| prefill tok/s ({ran['prefill_tokens']} tokens, {ran['threads']} threads, this CPU) | "
        f"{ran['prefill_tok_s']:.1f} | 134 (S24 Ultra, 4 threads) |",
        f"| decode tok/s ({ran['generated']} tokens, {ran['threads']} threads, this CPU) | "
        f"{ran['decode_tok_s']:.2f} | 10.0 (S24 Ultra, 4 threads) |",
        f"| runner load + warm-up (s), peak RSS (MB) | {ran['load_s']:.1f}, {ran['runner_peak_rss_mb']:,.0f} | |",
    ]
    table = "\n".join(lines)
    print(table)
    results = os.path.join(HERE, "results", "export_2b.md" if args.layers == 26 else f"export_2b_{args.layers}layers.md")
    os.makedirs(os.path.dirname(results), exist_ok=True)
    with open(results, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
