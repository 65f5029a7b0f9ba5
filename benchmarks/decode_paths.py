"""Decode speed by weight precision and decode path: the evidence for `backend.steps_from_host`.

    KERAS_BACKEND=jax PYTHONPATH=. python benchmarks/decode_paths.py [--batch 1] [--preset DIR --new 9]

The 148.5M-parameter model of benchmarks/generate.py (random weights), or with `--preset` a
preset loaded from disk (the real 2B: the one `benchmarks/export_2b.py` writes), float32,
bfloat16 (`dtype="bfloat16"`) and int8 (`quantize("int8")`), each decoded two ways: the
compiled while loop ("loop") and one compiled step per token driven from the host ("host"),
then the path the library picks by itself ("auto"). Prompt 64, 32 new tokens (`--new`),
greedy; medians of 3 (`--repeats`). Each precision runs in its own process, one after the other.
"""

import argparse
import json
import subprocess
import sys
import time

from generate import MODEL, cpu_flags  # benchmarks/ is on the path when run as a script

PRECISIONS = ("float32", "bfloat16", "int8")
PATHS = ("loop", "host", "auto")


def measure(precision, batch, new=32, prompt=64, repeats=3, preset=None):
    import numpy as np

    import keras_gemma2
    from keras_gemma2 import backend
    from keras_gemma2.model.backbone import Gemma2Backbone


    rng = np.random.default_rng(0)
    if preset:
        options = {"quantize": precision} if precision == "int8" else {"dtype": precision}
        model = keras_gemma2.from_preset(preset, **options)
    else:
        backbone = Gemma2Backbone(keras_gemma2.Gemma2Config(**MODEL),
                                  dtype="bfloat16" if precision == "bfloat16" else "float32")
        for variable in backbone.weights:  # post-norm scales ~5 (applied as 1 + w): varied tokens
            mean = 5.0 if "post" in variable.path and len(variable.shape) == 1 else 0.0
            variable.assign(rng.normal(mean, 0.05, variable.shape).astype("float32"))
        model = keras_gemma2.Gemma2CausalLM(backbone)
        if precision == "int8":
            model.quantize("int8")
    vocabulary = model.backbone.config.vocabulary_size
    ids = [list(rng.integers(3, vocabulary, prompt)) for _ in range(batch)]
    library_choice = backend.steps_from_host
    rows = {}
    for path in PATHS:
        backend.steps_from_host = {"host": lambda model, batch: True,
                                   "loop": lambda model, batch: False}.get(path, library_choice)
        model._generator = None  # rebuild the decode functions for this path

        def timed(count):
            begin = time.perf_counter()
            model.generate(ids, max_new_tokens=count, stop_token_ids=())
            return time.perf_counter() - begin

        try:
            timed(new), timed(1)  # compile
        except Exception as error:  # e.g. out of memory: the row says so, the other paths still run
            rows[path] = {"error": type(error).__name__}
            continue
        firsts, wholes = [], []
        for _ in range(repeats):
            firsts.append(timed(1))
            wholes.append(timed(new))
        first, whole = float(np.median(firsts)), float(np.median(wholes))
        rows[path] = {"ttft_ms": first * 1e3, "tok_s": batch * (new - 1) / (whole - first)}
    backend.steps_from_host = library_choice
    rows["auto"]["picks"] = "host" if library_choice(model, batch) else "loop"
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--preset", help="a preset directory instead of the 148.5M model")
    parser.add_argument("--new", type=int, default=32, help="new tokens per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--worker", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.batch, args.new, repeats=args.repeats, preset=args.preset)))
        return
    import keras

    results = {}
    for precision in args.precisions:
        options = ["--batch", str(args.batch), "--new", str(args.new), "--repeats", str(args.repeats)]
        options += ["--preset", args.preset] if args.preset else []
        out = subprocess.run([sys.executable, __file__, "--worker", precision, *options],
                             check=True, capture_output=True, text=True).stdout
        results[precision] = json.loads(out.strip().splitlines()[-1])
    base = results[args.precisions[0]]["auto"]["tok_s"]
    print(f"{keras.backend.backend()}, batch {args.batch}, CPU flags: {', '.join(cpu_flags()) or 'none'}\n")
    print(f"| weights | loop tok/s | host tok/s | library picks | its tok/s | vs {args.precisions[0]}'s pick | TTFT ms (pick) |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for precision, rows in results.items():
        pick = rows["auto"]
        def speed(row):
            return row["error"] if "error" in row else f"{row['tok_s']:.1f}"

        print(f"| {precision} | {speed(rows['loop'])} | {speed(rows['host'])} | {pick['picks']} | {speed(pick)} | "
              + ("" if "error" in pick else f"{pick['tok_s'] / base:.2f}x | {pick['ttft_ms']:.0f}") + " |")


if __name__ == "__main__":
    main()
