"""Full size on the phone runtime: the real Gemma 2 2B architecture (random weights) as .litertlm
bundles in Google's LiteRT-LM engine, next to llama.cpp on the same weights.

    PYTHONPATH=. .venv/bin/python benchmarks/export_2b.py [--layers 26] [--out DIR]
        [--quantizations int8 int4] [--rounds 3] [--no-llama]

1. Checkpoint: gemma2_2b_en's architecture with random float32 weights (seeded, one tensor
   at a time) written as this library's transformers-format preset (config.json,
   model.safetensors, tokenizer.model), what `save_to_preset` writes. Gemma's 256,000-piece
   vocabulary cannot be downloaded here: the tokenizer is the demo teacher's SentencePiece
   model padded to 256,000 pieces with unused ones, so text tokenizes as with the demo teacher.
2. Export, as a user would: `keras-gemma2 export --preset DIR out.litertlm --quantization Q`
   for each Q, in a KERAS_BACKEND=tensorflow process; wall time, the peak RSS summed over the
   export's process tree (the export process and the converter child), and the machine's
   peak RAM in use (all processes, sampled every 0.2 s, above the level at the start).
3. llama.cpp (when benchmarks/setup_llama_cpp.sh has made .venv-llama): llama.cpp's own
   convert_hf_to_gguf.py turns the same preset into GGUF q8_0, and f16 then
   `llama_model_quantize` gives q4_0.
4. Timing, `--rounds` interleaved rounds; every round runs each artifact in a fresh process
   (as an app starts): a prompt of demo-teacher text of `--prefill` tokens (BOS included),
   then `--decode` greedy tokens, both after one untimed warm-up run in the same process.
   LiteRT-LM (litert-lm-api, CPU backend): the engine's own benchmark info (prefill and
   decode tok/s, time to first token). llama.cpp (llama-cpp-python, n_batch = the prompt):
   wall clock of `eval(prompt)` and of each `eval([token])`; time to first token = prefill +
   one decode step. Both at `--threads` threads; medians over rounds; peak RSS of each process.
5. The decode bound: the machine's read bandwidth (the best float32 matvec over a matrix of
   the largest artifact's size, in a fresh process) over the bytes each artifact reads per
   token (its file size: every weight once, the tied table once).

Prints a markdown table (with the CPU flags of the run) and writes it to
benchmarks/results/export_2b.md (`--layers N` < 26: export_2b_Nlayers.md, a quick trial).
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LLAMA_VENV = os.path.join(ROOT, ".venv-llama")
# LiteRT's published Gemma2-2B-IT (litert-community): int8 file size; S24 Ultra CPU, 4 threads.
PUBLISHED = {"file_mb": 2587, "prefill_tok_s": 134, "decode_tok_s": 10.0}


def peak_rss_mb():
    """This process's peak RSS (VmHWM: unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def ram_in_use_mb():
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, value = line.split(":")
            fields[name] = int(value.split()[0])
    return (fields["MemTotal"] - fields["MemAvailable"]) / 1024


def _rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _tree(pid):
    pids = [pid]
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                children = f.read().split()
        except OSError:
            continue
        for child in children:
            pids += _tree(int(child))
    return pids


class MemorySampler(threading.Thread):
    """Peak RSS summed over a process tree, and the machine's peak RAM in use, every 0.2 s."""

    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.tree_peak = pid, 0.0
        self.baseline = self.machine_peak = ram_in_use_mb()
        self.running = True

    def run(self):
        while self.running:
            self.tree_peak = max(self.tree_peak, sum(_rss_mb(p) for p in _tree(self.pid)))
            self.machine_peak = max(self.machine_peak, ram_in_use_mb())
            time.sleep(0.2)

    def stop(self):
        self.running = False
        self.join()
        return {"tree_peak_mb": self.tree_peak, "machine_peak_mb": self.machine_peak - self.baseline}


# ---- 1. the checkpoint --------------------------------------------------------------------
class RandomWeight:
    """A weight drawn when it is written (save_preset reads `.value` once): one in memory at a time."""

    def __init__(self, shape, scale, seed, dtype="float32"):
        self.shape, self.dtype, self.scale, self.seed = tuple(shape), dtype, scale, seed

    @property
    def value(self):
        import ml_dtypes
        import numpy as np

        rng = np.random.default_rng(self.seed)
        value = rng.standard_normal(self.shape, dtype=np.float32) * np.float32(self.scale)
        return value.astype(ml_dtypes.bfloat16 if self.dtype == "bfloat16" else np.float32)


def checkpoint_step(directory, layers, name="gemma2_2b_en", dtype="float32"):
    """`name`'s architecture with `layers` layers, random `dtype` weights, as a transformers-format preset."""
    import keras

    import keras_gemma2
    from keras_gemma2.checkpoints import presets, transformers_format

    sys.path.insert(0, HERE)
    from litert import DEMO_PRESET, pad_tokenizer

    config = presets.read_preset(name, keras_gemma2.Gemma2Config, load_weights=False)[0]
    if layers != config.num_layers:
        config = config.replace(num_layers=layers)
    shapes = _variable_shapes(config)
    variables = {}
    for seed, (path, _) in enumerate(transformers_format.tensor_names(config)):
        scale = 0.1 if path.endswith("/scale") else 0.02
        variables[path] = RandomWeight(shapes[path], scale, seed, dtype)
    scratch = tempfile.mkdtemp(prefix="tokenizer_", dir=os.path.dirname(directory))
    tokenizer_path = os.path.join(scratch, "tokenizer.model")
    with open(tokenizer_path, "wb") as f:
        f.write(pad_tokenizer(os.path.join(DEMO_PRESET, "tokenizer.model"), config.vocabulary_size))
    start = time.time()
    presets.save_preset(directory, config, variables, keras.dtype_policies.DTypePolicy(dtype),
                        keras_gemma2.Gemma2Tokenizer(tokenizer_path))
    shutil.rmtree(scratch)
    return {"parameters": config.parameter_count(), "layers": layers, "write_s": time.time() - start}


def _variable_shapes(config):
    """{variable path: shape} without building the model (a 2B in float32 is 10.5 GB)."""
    hidden, heads, kv_heads, head = config.hidden_dim, config.num_query_heads, config.num_key_value_heads, config.head_dim
    shapes = {"token_embedding/embeddings": (config.vocabulary_size, hidden), "final_norm/scale": (hidden,)}
    for i in range(config.num_layers):
        k = f"decoder_block_{i}/"
        for norm in ("pre_attention_norm", "post_attention_norm", "pre_feedforward_norm", "post_feedforward_norm"):
            shapes[k + norm + "/scale"] = (hidden,)
        shapes[k + "attention/query/kernel"] = (heads * head, hidden)
        shapes[k + "attention/key/kernel"] = (kv_heads * head, hidden)
        shapes[k + "attention/value/kernel"] = (kv_heads * head, hidden)
        shapes[k + "attention/attention_output/kernel"] = (hidden, heads * head)
        shapes[k + "feedforward/gate/kernel"] = (config.intermediate_dim, hidden)
        shapes[k + "feedforward/up/kernel"] = (config.intermediate_dim, hidden)
        shapes[k + "feedforward/down/kernel"] = (hidden, config.intermediate_dim)
    return shapes


# ---- 2. exports ---------------------------------------------------------------------------
# --quantizations names: the export's quantization, and "+int8-table" for int4 blocks with an int8 token table.
INT8_TABLE = "+int8-table"


def export_step(preset, path, quantization, cache_length, prefill):
    """`keras-gemma2 export` as a user runs it; its wall time and memory."""
    command = [sys.executable, "-m", "keras_gemma2.cli", "export", "--preset", preset, path,
               "--quantization", quantization.removesuffix(INT8_TABLE), "--cache-length", str(cache_length),
               "--prefill-lengths", str(prefill)]
    if quantization.endswith(INT8_TABLE):
        command += ["--embedding-quantization", "int8"]
    environment = {**os.environ, "KERAS_BACKEND": "tensorflow", "PYTHONPATH": ROOT}
    start = time.time()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = MemorySampler(process.pid)
    sampler.start()
    output = process.communicate()[0]
    memory = sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"export {quantization} failed ({process.returncode}):\n{output[-3000:]}")
    return {"export_s": time.time() - start, **memory, "file_mb": os.path.getsize(path) / 1e6, "path": path}


def llama_convert_step(preset, out, keep_f16=False, q8_only=False, name="gemma2_2b"):
    """GGUF q8_0 (the converter's own) and q4_0 (f16, then llama_model_quantize); f16 too if `keep_f16`.

    `q8_only`: q8_0 alone (the 9B's f16 file would not fit beside its preset on this disk).
    """
    converter = os.path.join(LLAMA_VENV, "llama.cpp", "convert_hf_to_gguf.py")
    environment = {**os.environ, "PYTHONPATH": os.path.join(LLAMA_VENV, "llama.cpp", "gguf-py")}
    files = {}
    for outtype in ("q8_0",) if q8_only else ("q8_0", "f16"):
        path = os.path.join(out, f"{name}_{outtype}.gguf")
        if not os.path.exists(path):
            start = time.time()
            subprocess.run([sys.executable, converter, preset, "--outtype", outtype, "--outfile", path],
                           env=environment, check=True, capture_output=True)
            print(f"converted {outtype} in {time.time() - start:.0f} s", flush=True)
        files[outtype] = path
    if q8_only:
        return {kind: {"path": path, "file_mb": os.path.getsize(path) / 1e6} for kind, path in files.items()}
    q4 = os.path.join(out, f"{name}_q4_0.gguf")
    if not os.path.exists(q4):
        code = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0; p.nthread = 2; "
                "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
        subprocess.run([os.path.join(LLAMA_VENV, "bin", "python"), "-c", code, files["f16"], q4], check=True,
                       capture_output=True)
    if not keep_f16:
        os.remove(files.pop("f16"))
    files["q4_0"] = q4
    return {name: {"path": path, "file_mb": os.path.getsize(path) / 1e6} for name, path in files.items()}


# ---- 4. timing workers (fresh processes) ---------------------------------------------------
def engine_worker(path, prefill, decode, threads):
    import litert_lm

    sys.path.insert(0, HERE)
    from litert import prompt_ids

    _, text = prompt_ids(prefill - 1)  # + BOS
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    cache_dir = os.path.join(os.path.dirname(path), "engine-cache")
    os.makedirs(cache_dir, exist_ok=True)
    start = time.time()
    engine = litert_lm.Engine(path, backend=litert_lm.Backend.CPU(thread_count=threads),
                              cache_dir=cache_dir, enable_benchmark=True)
    load_s = time.time() - start
    for _ in range(2):  # the first warms up
        session = engine.create_session(apply_prompt_template=False, max_output_tokens=decode,
                                        sampler_config=litert_lm.SamplerConfig(top_k=1))
        try:
            session.run_prefill([text])
            session.run_decode()
            info = session.get_benchmark_info()
        finally:
            session.close()
    return {
        "prefill_tokens": info.last_prefill_token_count, "prefill_tok_s": info.last_prefill_tokens_per_second,
        "decode_tokens": info.last_decode_token_count, "decode_tok_s": info.last_decode_tokens_per_second,
        "ttft_s": info.time_to_first_token_in_second, "load_s": load_s, "peak_rss_mb": peak_rss_mb(),
    }


def llama_worker(path, prefill, decode, threads):
    import llama_cpp
    import numpy as np

    sys.path.insert(0, HERE)
    from litert import prompt_ids

    ids, _ = prompt_ids(prefill - 1)
    start = time.time()
    llm = llama_cpp.Llama(model_path=path, n_ctx=1024, n_batch=prefill, n_ubatch=prefill, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    load_s = time.time() - start
    tokens = [llm.token_bos()] + list(ids)  # the same ids: the GGUF holds the same SentencePiece model
    for _ in range(2):  # the first warms up
        llm.reset()
        begin = time.perf_counter()
        llm.eval(tokens)
        prefill_s = time.perf_counter() - begin
        steps = []
        for _ in range(decode):
            # The last evaluated position's logits (llama-cpp-python keeps them only with logits_all).
            token = int(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).argmax())
            begin = time.perf_counter()
            llm.eval([token])
            steps.append(time.perf_counter() - begin)
    return {
        "prefill_tokens": len(tokens), "prefill_tok_s": len(tokens) / prefill_s,
        "decode_tokens": len(steps), "decode_tok_s": len(steps) / sum(steps),
        "ttft_s": prefill_s + steps[0], "load_s": load_s, "peak_rss_mb": peak_rss_mb(),
    }


def bandwidth_worker(nbytes):
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


def in_child(python, *arguments):
    command = [python, os.path.abspath(__file__), "--child", *map(str, arguments)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT})
    if result.returncode != 0:
        raise SystemExit(f"{arguments[0]} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])


def cpu_flags():
    sys.path.insert(0, HERE)
    from litert import cpu_facts

    model, present, absent = cpu_facts()
    return f"{model}; flags present: {' '.join(present) or 'none'}; absent: {' '.join(absent) or 'none'}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--quantizations", nargs="+", default=["int8", "int4", "int4" + INT8_TABLE],
                        help=f"int8, int4, int4{INT8_TABLE} (int4 blocks, int8 token table)")
    parser.add_argument("--cache-length", type=int, default=1024)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp even if .venv-llama exists")
    parser.add_argument("--out", default=None, help="working folder, kept and reused (default: a temporary one)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="write the checkpoint, exports and GGUF files into --out, time nothing")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, *rest = args.child
        worker = {"engine": engine_worker, "llama": llama_worker}.get(step)
        result = bandwidth_worker(int(rest[0])) if worker is None else worker(rest[0], *map(int, rest[1:]))
        print("RESULT " + json.dumps(result))
        return
    scratch = None
    if args.out is None:
        scratch = tempfile.TemporaryDirectory(prefix="export_2b_")
        args.out = scratch.name
    os.makedirs(args.out, exist_ok=True)
    state_path = os.path.join(args.out, "state.json")
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}

    def save():
        with open(state_path, "w") as f:
            json.dump(state, f, indent=1)

    preset = os.path.join(args.out, f"preset_{args.layers}")
    if "checkpoint" not in state:
        state["checkpoint"] = checkpoint_step(preset, args.layers)
        save()
    print(json.dumps(state["checkpoint"]), flush=True)
    artifacts = {}  # name -> (runtime, path, file MB)
    for quantization in args.quantizations:
        key = f"export_{quantization}"
        if key not in state:
            state[key] = export_step(preset, os.path.join(args.out, f"gemma2_2b_{quantization}.litertlm"),
                                     quantization, args.cache_length, args.prefill)
            save()
        print(key, json.dumps(state[key]), flush=True)
        artifacts[f"LiteRT-LM {quantization}"] = ("engine", state[key]["path"], state[key]["file_mb"])
    llama = not args.no_llama and os.path.exists(os.path.join(LLAMA_VENV, "llama.cpp", "convert_hf_to_gguf.py"))
    if llama:
        if "gguf" not in state:
            state["gguf"] = llama_convert_step(preset, args.out)
            save()
        for name, gguf in state["gguf"].items():
            artifacts[f"llama.cpp {name}"] = ("llama", gguf["path"], gguf["file_mb"])
    if args.prepare_only:
        return
    runs = {name: [] for name in artifacts}
    names = list(artifacts)
    for round_index in range(args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            runtime, path, _ = artifacts[name]
            python = os.path.join(LLAMA_VENV, "bin", "python") if runtime == "llama" else sys.executable
            runs[name].append(in_child(python, runtime, path, args.prefill, args.decode, args.threads))
            print(round_index, name, json.dumps(runs[name][-1]), flush=True)
    largest = max(mb for _, _, mb in artifacts.values())
    read_gbs = in_child(sys.executable, "bandwidth", int(largest * 1e6))["read_gbs"]

    def median(name, field):
        return statistics.median(run[field] for run in runs[name])

    checkpoint = state["checkpoint"]
    lines = [
        "Command: `PYTHONPATH=. .venv/bin/python benchmarks/export_2b.py"
        + (f" --layers {args.layers}" if args.layers != 26 else "") + "`"
        + ("" if llama else " (llama.cpp not set up: bash benchmarks/setup_llama_cpp.sh)"),
        f"Machine: {os.cpu_count()} CPU cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB RAM; {cpu_flags()}",
        f"Model: gemma2_2b_en architecture, {checkpoint['layers']} layers, {checkpoint['parameters']:,} "
        f"parameters, random float32 weights (one transformers-format preset for every artifact); cache "
        f"{args.cache_length}, prompt {args.prefill} tokens, {args.decode} greedy tokens, {args.threads} threads, "
        f"medians of {args.rounds} interleaved rounds, each artifact in a fresh process",
        "",
        "| artifact | file MB | prefill tok/s | decode tok/s | time to first token (s) | load (s) | peak RSS (MB) "
        "| decode bound (tok/s) | decode / bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (_, _, file_mb) in artifacts.items():
        bound = read_gbs * 1e3 / file_mb
        lines.append(
            f"| {name} | {file_mb:,.0f} | {median(name, 'prefill_tok_s'):,.1f} | {median(name, 'decode_tok_s'):.2f} "
            f"| {median(name, 'ttft_s'):.2f} | {median(name, 'load_s'):.1f} | {median(name, 'peak_rss_mb'):,.0f} "
            f"| {bound:.2f} | {median(name, 'decode_tok_s') / bound:.0%} |"
        )
    lines.append(
        f"| LiteRT published Gemma2-2B-IT int8 (S24 Ultra, 4 threads) | {PUBLISHED['file_mb']:,} "
        f"| {PUBLISHED['prefill_tok_s']} | {PUBLISHED['decode_tok_s']} | | | | | |"
    )
    lines += ["", f"Read bandwidth: {read_gbs:.1f} GB/s (float32 matvec over {largest:,.0f} MB); "
              "decode bound = bandwidth / file size.", ""]
    ratios = []
    for ours, theirs in (("LiteRT-LM int8", "llama.cpp q8_0"), ("LiteRT-LM int4", "llama.cpp q4_0")):
        if ours in artifacts and theirs in artifacts:
            ratios.append(f"{ours} / {theirs}: prefill {median(ours, 'prefill_tok_s') / median(theirs, 'prefill_tok_s'):.2f}x, "
                          f"decode {median(ours, 'decode_tok_s') / median(theirs, 'decode_tok_s'):.2f}x")
    lines += [f"- {r}" for r in ratios]
    lines += ["", "| export (keras-gemma2 export --preset) | wall time (s) | peak RSS, export process tree (MB) "
              "| peak RAM in use, machine (MB) |", "|---|---:|---:|---:|"]
    for quantization in args.quantizations:
        e = state[f"export_{quantization}"]
        lines.append(f"| {quantization} | {e['export_s']:,.0f} | {e['tree_peak_mb']:,.0f} | {e['machine_peak_mb']:,.0f} |")
    table = "\n".join(lines)
    print(table)
    results = os.path.join(HERE, "results", "export_2b.md" if args.layers == 26 else f"export_2b_{args.layers}layers.md")
    with open(results, "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
