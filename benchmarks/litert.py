"""On-device speed: keras_gemma2's int8 LiteRT-LM export against Google's litert-torch, same weights.

    PYTHONPATH=. .venv/bin/python benchmarks/litert.py [--quick] [--fresh] [--rounds 15] [--new 64]
        [--threads 2] [--models demo 150m] [--scratch DIR]

Two models, each exported twice with the same weights, int8, cache length 512, one
prefill bucket of 128 tokens, attention masks built inside the graph:

* `demo`: the shipped gemma2_demo_teacher preset (2.2M parameters, vocabulary 2048);
* `150m`: benchmarks/generate.py's MODEL (~150M parameters, vocabulary 32000), random
  float32 weights drawn with generate.py's seed and recipe, written with
  `Gemma2CausalLM.save_to_preset` as a transformers-format folder (config.json +
  model.safetensors, which litert-torch's loader reads). Its tokenizer.model is the demo
  teacher's 2048-piece SentencePiece model padded to 32000 pieces with user-defined
  `<unused_N>` pieces that never occur in text: the prompt tokenizes exactly as with the
  demo teacher, and every id the model can emit has a piece to detokenize to.

Exports (cached under --scratch, one folder per model and per exporter, keyed by a hash
of what produced it: keras_gemma2's sources for ours, litert_torch_export.py and the
litert-torch version for the peer, so a code change re-exports; `--fresh` re-exports
anyway):

* ours: `keras_gemma2.export(model, "model.litertlm", quantization="int8",
  cache_length=512, prefill_lengths=(128,))` in a KERAS_BACKEND=tensorflow process; the
  plain-interpreter runs use the .tflite section of that bundle (the same bytes the
  engine runs), extracted with litert-lm-builder's reader;
* peer: benchmarks/litert_torch_export.py in .venv-litert-torch (litert-torch's own
  Gemma 2 re-authoring, dynamic_int8, mask inside the graph, its default transposed
  cache layout), which writes its .tflite and the .litertlm bundling it.

Timing: every system is a process that loads its file, warms up once (one untimed call
of everything it times) and waits; then `--rounds` interleaved rounds, each asking the
processes in turn (ours and peer alternate which goes first), medians over rounds, all at
`--threads` threads:

* LiteRT-LM engine (litert-lm-api, CPU backend, enable_benchmark=True): one session per
  round (apply_prompt_template=False, greedy top_k=1, max_output_tokens=--new):
  `run_prefill` of a prompt of demo-teacher text whose token count (with BOS) is the
  bucket, then `run_decode`. Prefill and decode tok/s are the engine's own benchmark info
  (`session.get_benchmark_info()`: last prefill / decode turn); the wall clock of the two
  calls is recorded beside it as a cross-check, and the decoded token count is checked
  (a stop token would end a run early: reported, never hidden);
* plain LiteRT interpreter (ai_edge_litert.interpreter.Interpreter, num_threads, the
  signature runners, as export/runner.py drives them): one `prefill_128` call over 128
  real tokens (BOS + 127) -> 128 / seconds; then --new `decode` steps, greedy, each
  feeding the caches the previous call returned (each file's cache shapes are read from
  its signature) -> steps / seconds. Cache bytes are the same for both files, so the
  copies in and out of the runner cost both the same.

Also reported: file sizes, the op count of each file's decode subgraph (the subgraph the
`decode` signature names, read from the flatbuffer; ops inside composite-op
decompositions counted apart), the greedy agreement of the two exports (same weights,
different int8 schemes), export wall times, the CPU flags of the run. Prints one markdown
table and writes it to benchmarks/results/litert.md (`--quick`: 1 round, 8 new tokens,
a smoke test whose numbers mean nothing).

Cost on 2 cores: the four exports take ~4 min the first time (ours 17 s + 72 s, the peer
41 s + 84 s, plus ~20 s to write the 150M preset); a default round (both models, both
runtimes, both exporters, 64 new tokens) takes ~10 s.
"""

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "litert.md")
PEER_PYTHON = os.path.join(ROOT, ".venv-litert-torch", "bin", "python")
PEER_EXPORT = os.path.join(HERE, "litert_torch_export.py")
DEMO_PRESET = os.path.join(ROOT, "presets", "gemma2_demo_teacher")
DEFAULT_SCRATCH = os.path.join(os.environ.get("TMPDIR", "/tmp"), "keras_gemma2-litert-bench")

CACHE_LENGTH = 512
BUCKET = 128
QUANTIZATION = "int8"
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
PREPARE_VERSION = 1  # bump when prepare_150m's weights or tokenizer change

sys.path.insert(0, HERE)
from generate import MODEL as MODEL_150M, SEED, serve  # noqa: E402  (stdlib-only at import)

MODELS = {
    "demo": "gemma2_demo_teacher (shipped preset)",
    "150m": "benchmarks/generate.py MODEL (random weights, seed {})".format(SEED),
}
SYSTEMS = ("ours", "peer")
RUNTIMES = ("engine", "interpreter")
LABELS = {"ours": "keras_gemma2", "peer": "litert-torch"}


# ---- small helpers -------------------------------------------------------------------
def cpu_facts():
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model == "unknown CPU":
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    present = [f for f in CPU_FLAGS if f in flags]
    absent = [f for f in CPU_FLAGS if f not in flags]
    return model, present, absent


def files_hash(paths, extra=""):
    digest = hashlib.sha256(extra.encode())
    for path in sorted(paths):
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def sources(folder):
    found = []
    for directory, _, names in os.walk(folder):
        found += [os.path.join(directory, n) for n in names if n.endswith(".py")]
    return found


def peer_version():
    if not os.path.exists(PEER_PYTHON):
        raise SystemExit(f"{PEER_PYTHON} is missing: create .venv-litert-torch as "
                         "benchmarks/litert_torch_export.py's docstring says.")
    out = subprocess.run([PEER_PYTHON, "-c", "import importlib.metadata as m; print(m.version('litert-torch'))"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def version(name):
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def log_tail(path, lines=25):
    try:
        with open(path) as f:
            return "\n".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return ""


def run_logged(command, env, log_path, what):
    """Run a child with its output in log_path; a failure shows the log's tail and stops the run."""
    begin = time.perf_counter()
    with open(log_path, "w") as log:
        code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"[{what}] failed ({code}); {log_path}:\n{log_tail(log_path)}")
    return time.perf_counter() - begin


def child_env(backend=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if backend:
        env["KERAS_BACKEND"] = backend
    return env


def tflite_section(bundle, output):
    """Write the .tflite model section of a .litertlm bundle to `output` (the engine's bytes)."""
    from litert_lm_builder import litertlm_core, litertlm_peek
    from litert_lm_builder import litertlm_header_schema_py_generated as schema

    header = litertlm_peek.read_litertlm_header(bundle, io.StringIO())
    sections = header.SectionMetadata()
    found = [sections.Objects(i) for i in range(sections.ObjectsLength())
             if sections.Objects(i).DataType() == schema.AnySectionDataType.TFLiteModel]
    if len(found) != 1:
        raise SystemExit(f"{bundle}: expected one TFLite model section, found {len(found)}")
    section = found[0]
    with litertlm_core.open_file(bundle, "rb") as f:
        f.seek(section.BeginOffset())
        data = f.read(section.EndOffset() - section.BeginOffset())
    with open(output + ".partial", "wb") as f:
        f.write(data)
    os.replace(output + ".partial", output)


def decode_ops(path):
    """{"ops", "composite_inner", "types"} of the subgraph the `decode` signature runs."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        buffer = f.read()
    model = schema.Model.GetRootAs(buffer, 0)
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    index = None
    for i in range(model.SignatureDefsLength()):
        signature = model.SignatureDefs(i)
        if signature.SignatureKey().decode() == "decode":
            index = signature.SubgraphIndex()
    if index is None:
        raise ValueError(f"{path} has no decode signature")

    def op_name(op):
        code = model.OperatorCodes(op.OpcodeIndex())
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == schema.BuiltinOperator.CUSTOM:
            return "CUSTOM:" + code.CustomCode().decode()
        return names.get(builtin, str(builtin))

    def count(subgraph_index):
        """({op name: count} of a subgraph, ops inside its composites' decompositions)."""
        subgraph = model.Subgraphs(subgraph_index)
        types, inner = {}, 0
        for j in range(subgraph.OperatorsLength()):
            op = subgraph.Operators(j)
            name = op_name(op)
            types[name] = types.get(name, 0) + 1
            if op.BuiltinOptions2Type() == schema.BuiltinOptions2.StableHLOCompositeOptions:
                options = schema.StableHLOCompositeOptions()
                table = op.BuiltinOptions2()
                options.Init(table.Bytes, table.Pos)
                nested, nested_inner = count(options.DecompositionSubgraphIndex())
                inner += sum(nested.values()) + nested_inner
        return types, inner

    types, inner = count(index)
    return {"ops": sum(types.values()), "composite_inner": inner, "types": types}


# ---- exports ---------------------------------------------------------------------------
def pad_tokenizer(source, size):
    """The SentencePiece model `source` with user-defined pieces up to `size` pieces (bytes)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(source, "rb") as f:
        proto.ParseFromString(f.read())
    start = len(proto.pieces)
    for i in range(start, size):
        piece = proto.pieces.add()
        piece.piece, piece.score = f"<unused_{i}>", 0.0
        piece.type = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    proto.trainer_spec.vocab_size = size
    return proto.SerializeToString()


def worker_prepare(args):
    """(any Keras backend) The 150M preset: generate.py's MODEL, seeded random weights."""
    import numpy as np

    import keras_gemma2
    from keras_gemma2.model.backbone import Gemma2Backbone

    tokenizer = pad_tokenizer(os.path.join(DEMO_PRESET, "tokenizer.model"), MODEL_150M["vocabulary_size"])
    backbone = Gemma2Backbone(keras_gemma2.Gemma2Config(**MODEL_150M), dtype="float32")
    # generate.py's recipe: small random weights would make every greedy generation repeat
    # the last prompt token; large post-norm scales (1 + w) keep the generations varied.
    rng = np.random.default_rng(SEED)
    for variable in backbone.weights:
        if variable.path.endswith("embeddings"):
            mean, std = 0.0, 0.05
        elif len(variable.shape) == 1:
            mean, std = (5.0 if "/post_" in variable.path else 0.0), 0.1
        else:
            mean, std = 0.0, 0.05
        variable.assign(rng.normal(mean, std, variable.shape).astype("float32"))
    model = keras_gemma2.Gemma2CausalLM(backbone, tokenizer=keras_gemma2.Gemma2Tokenizer(tokenizer))
    model.save_to_preset(args.output)
    print(f"{model.count_params():,} parameters written to {args.output}", flush=True)


def worker_export_ours(args):
    """(KERAS_BACKEND=tensorflow) keras_gemma2.export of the preset to a .litertlm."""
    import keras

    import keras_gemma2

    assert keras.backend.backend() == "tensorflow"
    model = keras_gemma2.from_preset(args.preset, dtype="float32")
    keras_gemma2.export(model, args.output, quantization=QUANTIZATION, cache_length=CACHE_LENGTH,
                        prefill_lengths=(BUCKET,),
                        progress=lambda stage, step, steps: print(f"[{step}/{steps}] {stage}", flush=True))


def prepare_model(name, args, log):
    """{"preset", "ours": {...}, "peer": {...}} with every file of one model, exported if needed."""
    base = os.path.join(args.scratch, name)
    if args.fresh and os.path.isdir(base):
        shutil.rmtree(base)
    os.makedirs(base, exist_ok=True)

    if name == "demo":
        preset = DEMO_PRESET
        preset_key = files_hash([os.path.join(DEMO_PRESET, f) for f in ("config.json", "model.safetensors",
                                                                        "tokenizer.model")])
    else:
        preset_key = hashlib.sha256(json.dumps([MODEL_150M, SEED, PREPARE_VERSION], sort_keys=True)
                                    .encode()).hexdigest()[:12]
        preset = os.path.join(base, f"preset-{preset_key}")
        if not os.path.isdir(preset):
            log(f"[{name}] writing the random-weight preset")
            staging = preset + ".partial"
            shutil.rmtree(staging, ignore_errors=True)
            command = [sys.executable, os.path.abspath(__file__), "--worker", "prepare", "--output", staging]
            run_logged(command, child_env("tensorflow"), os.path.join(base, "prepare.log"), f"{name} prepare")
            os.replace(staging, preset)

    keys = {
        "ours": files_hash(sources(os.path.join(ROOT, "keras_gemma2")), preset_key),
        "peer": files_hash([PEER_EXPORT], preset_key + args.peer_version),
    }
    out = {"preset": preset}
    for system in SYSTEMS:
        folder = os.path.join(base, f"{system}-{keys[system]}")
        if not os.path.isdir(folder):
            staging = folder + ".partial"
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
            log(f"[{name}] exporting with {LABELS[system]} (int8, cache {CACHE_LENGTH}, bucket {BUCKET})")
            bundle = os.path.join(staging, "model.litertlm")
            tflite = os.path.join(staging, "model.tflite")
            if system == "ours":
                command = [sys.executable, os.path.abspath(__file__), "--worker", "export-ours",
                           "--preset", preset, "--output", bundle]
                seconds = run_logged(command, child_env("tensorflow"), os.path.join(staging, "export.log"),
                                     f"{name} ours export")
                tflite_section(bundle, tflite)
            else:
                command = [PEER_PYTHON, PEER_EXPORT, "--preset-dir", preset, "--output", tflite,
                           "--litertlm", bundle, "--cache-length", str(CACHE_LENGTH),
                           "--prefill-lengths", str(BUCKET), "--quantize", QUANTIZATION]
                seconds = run_logged(command, child_env(), os.path.join(staging, "export.log"),
                                     f"{name} peer export")
            with open(os.path.join(staging, "export.json"), "w") as f:
                json.dump({"export_s": seconds}, f)
            os.replace(staging, folder)
            log(f"[{name}] {LABELS[system]} export took {seconds:.0f} s")
            for stale in os.listdir(base):  # this exporter's files from older sources
                if stale.startswith(f"{system}-") and os.path.join(base, stale) != folder:
                    shutil.rmtree(os.path.join(base, stale), ignore_errors=True)
        with open(os.path.join(folder, "export.json")) as f:
            facts = json.load(f)
        facts.update({
            "folder": folder,
            "litertlm": os.path.join(folder, "model.litertlm"),
            "tflite": os.path.join(folder, "model.tflite"),
            "engine_cache": os.path.join(folder, "engine-cache"),
        })
        facts["litertlm_mb"] = os.path.getsize(facts["litertlm"]) / 1e6
        facts["tflite_mb"] = os.path.getsize(facts["tflite"]) / 1e6
        facts["decode_ops"] = decode_ops(facts["tflite"])
        out[system] = facts
    with open(os.path.join(preset, "config.json")) as f:
        out["config"] = json.load(f)
    return out


def prompt_ids(count):
    """`count` token ids (no BOS) of the demo teacher's held-out text that survive a text round trip."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(DEMO_PRESET, "tokenizer.model"))
    with open(os.path.join(DEMO_PRESET, "held_out.txt")) as f:
        text = f.read(20000)
    ids = sp.encode(text)
    for start in range(0, 2000):
        piece = ids[start:start + count]
        if len(piece) == count and sp.encode(sp.decode(piece)) == piece:
            return piece, sp.decode(piece)
    raise SystemExit("no prompt of held-out text round-trips through the tokenizer")


# ---- timing workers (.venv: litert-lm-api and ai-edge-litert) --------------------------
def worker_engine(args):
    import litert_lm

    with open(args.prompt_file) as f:
        prompt = json.load(f)
    litert_lm.set_min_log_severity(litert_lm.LogSeverity.ERROR)
    os.makedirs(args.cache_dir, exist_ok=True)
    begin = time.perf_counter()
    engine = litert_lm.Engine(args.file, backend=litert_lm.Backend.CPU(thread_count=args.threads),
                              cache_dir=args.cache_dir, enable_benchmark=True)
    load_s = time.perf_counter() - begin
    prompt_tokens = len(engine.tokenize(prompt["engine_text"]))

    def timed():
        session = engine.create_session(apply_prompt_template=False,
                                        sampler_config=litert_lm.SamplerConfig(top_k=1),
                                        max_output_tokens=args.new)
        try:
            begin = time.perf_counter()
            session.run_prefill([prompt["engine_text"]])
            prefilled = time.perf_counter()
            responses = session.run_decode()
            decoded = time.perf_counter()
            info = session.get_benchmark_info()
        finally:
            session.close()
        return {
            "prefill_tokens": info.last_prefill_token_count,
            "prefill_tok_s": info.last_prefill_tokens_per_second,
            "decode_tokens": info.last_decode_token_count,
            "decode_tok_s": info.last_decode_tokens_per_second,
            "ttft_s": info.time_to_first_token_in_second,
            "wall_prefill_s": prefilled - begin,
            "wall_decode_s": decoded - prefilled,
            "text": "".join(responses.texts),
        }

    warm = timed()
    serve(args, {"load_s": load_s, "text_tokens": prompt_tokens, "bos": engine.bos_token_id,
                 "warmup": warm}, timed)


def worker_interpreter(args):
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    with open(args.prompt_file) as f:
        prompt = json.load(f)
    begin = time.perf_counter()
    interpreter = Interpreter(model_path=args.file, num_threads=args.threads)
    prefill = interpreter.get_signature_runner(f"prefill_{BUCKET}")
    decode = interpreter.get_signature_runner("decode")
    load_s = time.perf_counter() - begin
    details = {"prefill": prefill.get_input_details(), "decode": decode.get_input_details()}
    for signature, inputs in details.items():
        unknown = [n for n in inputs if n not in ("tokens", "input_pos") and not n.startswith("kv_cache_")]
        if unknown:
            raise SystemExit(f"{args.file}: {signature} has inputs beyond the engine contract: {unknown}")
    cache_inputs = {n: d for n, d in details["decode"].items() if n.startswith("kv_cache_")}
    ids = np.asarray(prompt["interpreter_ids"], np.int32)  # BOS + BUCKET tokens

    def timed():
        caches = {n: np.zeros(d["shape"], d["dtype"]) for n, d in cache_inputs.items()}
        begin = time.perf_counter()
        out = prefill(tokens=ids[None, :BUCKET], input_pos=np.arange(BUCKET, dtype=np.int32), **caches)
        prefill_s = time.perf_counter() - begin
        caches = {n: out[n] for n in caches}
        token, tokens = int(ids[BUCKET]), []
        begin = time.perf_counter()
        for step in range(args.new):
            out = decode(tokens=np.array([[token]], np.int32),
                         input_pos=np.array([BUCKET + step], np.int32), **caches)
            caches = {n: out[n] for n in caches}
            token = int(np.argmax(out["logits"].reshape(-1)))
            tokens.append(token)
        decode_s = time.perf_counter() - begin
        return {"prefill_tok_s": BUCKET / prefill_s, "decode_tok_s": args.new / decode_s,
                "prefill_s": prefill_s, "decode_s": decode_s, "tokens": tokens}

    warm = timed()
    shapes = {n: list(map(int, d["shape"])) for n, d in cache_inputs.items() if n.endswith("_0")}
    serve(args, {"load_s": load_s, "cache_shapes": shapes, "warmup": warm}, timed)


class Worker:
    """One system on one runtime in its own process, alive from its warm-up to the last round."""

    def __init__(self, label, command, log_path):
        self.label, self.log_path = label, log_path
        read_end, write_end = os.pipe()
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                command + ["--channel-fd", str(write_end)], env=child_env(), stdin=subprocess.PIPE,
                stdout=log, stderr=subprocess.STDOUT, text=True, pass_fds=(write_end,))
        os.close(write_end)
        self.channel = os.fdopen(read_end)

    def receive(self):
        line = self.channel.readline()
        if not line:
            self.process.wait()
            raise SystemExit(f"[{self.label}] worker exited ({self.process.returncode}):\n"
                             f"{log_tail(self.log_path)}")
        return json.loads(line)

    def ask(self, command):
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass
        return self.receive()

    def close(self):
        try:
            self.process.stdin.write("finish\n")
            self.process.stdin.close()
        except (BrokenPipeError, ValueError):
            pass
        self.process.wait()


# ---- the driver ------------------------------------------------------------------------
def median(values):
    return statistics.median(values) if values else float("nan")


def spread(values, digits=1):
    if not values:
        return "n/a"
    text = f"{median(values):,.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):,.{digits}f}-{max(values):,.{digits}f})"
    return text


def ratio(ours, peer):
    return f"{ours / peer:.2f}x" if peer else "n/a"


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def run(args):
    log = lambda message: print(message, flush=True)  # noqa: E731
    start = time.time()
    cpu, present, absent = cpu_facts()
    log(f"CPU: {cpu}; flags present: {', '.join(present) or 'none'}; absent: {', '.join(absent) or 'none'}")
    args.peer_version = peer_version()
    os.makedirs(args.scratch, exist_ok=True)

    exports = {name: prepare_model(name, args, log) for name in args.models}
    ids, text = prompt_ids(BUCKET)
    # Engine: BOS + (BUCKET - 1) text tokens = one full bucket; interpreter: BOS + BUCKET
    # tokens, the first BUCKET prefilled, the last fed to the first decode step.
    prompt = {"engine_text": prompt_ids(BUCKET - 1)[1], "interpreter_ids": [2] + ids}
    prompt_file = os.path.join(args.scratch, "prompt.json")
    with open(prompt_file, "w") as f:
        json.dump(prompt, f)

    workers, ready = {}, {}
    for name in args.models:
        for runtime in RUNTIMES:
            for system in SYSTEMS:
                key = (name, runtime, system)
                facts = exports[name][system]
                command = [sys.executable, os.path.abspath(__file__), "--worker", runtime,
                           "--file", facts["litertlm" if runtime == "engine" else "tflite"],
                           "--cache-dir", facts["engine_cache"], "--prompt-file", prompt_file,
                           "--threads", str(args.threads), "--new", str(args.new)]
                label = f"{name} {runtime} {LABELS[system]}"
                begin = time.perf_counter()
                workers[key] = Worker(label, command, os.path.join(args.scratch, f"{name}-{runtime}-{system}.log"))
                ready[key] = workers[key].receive()
                log(f"[{label}] loaded and warmed up in {time.perf_counter() - begin:.0f} s")

    results = {key: [] for key in workers}
    pairs = [(name, runtime) for name in args.models for runtime in RUNTIMES]
    try:
        for round_index in range(args.rounds):
            begin = time.perf_counter()
            order = SYSTEMS if round_index % 2 == 0 else SYSTEMS[::-1]
            for name, runtime in pairs:
                for system in order:
                    results[(name, runtime, system)].append(workers[(name, runtime, system)].ask("round"))
            log(f"round {round_index + 1}/{args.rounds} in {time.perf_counter() - begin:.0f} s")
    finally:
        for worker in workers.values():
            worker.close()

    table = report(args, exports, ready, results, cpu, present, absent, time.time() - start)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        f.write(table + "\n")
    print(table)


def report(args, exports, ready, results, cpu, present, absent, seconds):
    command = "PYTHONPATH=. .venv/bin/python benchmarks/litert.py" + (" --quick" if args.quick else "")
    if not args.quick and (args.rounds, args.new, args.threads) != (15, 64, 2):
        command += f" --rounds {args.rounds} --new {args.new} --threads {args.threads}"
    if args.models != list(MODELS):
        command += " --models " + " ".join(args.models)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        f"Command: `{command}`" + (" (SMOKE RUN: 1 round, few tokens; not a result)" if args.quick else ""),
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM; CPU flags present: "
        f"{', '.join(present) or 'none'}; absent: {', '.join(absent) or 'none'}. Python {platform.python_version()}.",
        f"Runtimes: litert-lm-api {version('litert-lm-api')} (CPU backend), ai-edge-litert "
        f"{version('ai-edge-litert')} (Interpreter, signature runners); peer exporter litert-torch "
        f"{args.peer_version}. {args.threads} threads, {args.rounds} interleaved rounds, medians "
        f"(min-max); {args.new} decoded tokens per round; run took {seconds / 60:.1f} min.",
        f"Exports: int8 (keras_gemma2: per-channel int8 weights; litert-torch: dynamic_int8), cache "
        f"{CACHE_LENGTH}, one prefill bucket of {BUCKET}, masks in the graph. ours/peer > 1 means "
        "keras_gemma2 is faster (speeds), or slower / larger (times, sizes, op counts).",
    ]
    for name in args.models:
        config = exports[name]["config"]
        ours, peer = exports[name]["ours"], exports[name]["peer"]
        parameters = config_parameters(config)
        lines += [
            "",
            f"### {name}: {MODELS[name]}",
            "",
            f"{parameters / 1e6:.1f}M parameters: vocabulary {config['vocab_size']}, "
            f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, intermediate "
            f"{config['intermediate_size']}, heads {config['num_attention_heads']}/"
            f"{config['num_key_value_heads']} x {config['head_dim']}, window {config['sliding_window']}."
            + (f" Tokenizer: the demo teacher's padded to {config['vocab_size']} pieces."
               if name == "150m" else ""),
            "",
            f"| measure | {LABELS['ours']} | {LABELS['peer']} | ours/peer |",
            "|---|---:|---:|---:|",
        ]
        engine = {s: results[(name, "engine", s)] for s in SYSTEMS}
        interp = {s: results[(name, "interpreter", s)] for s in SYSTEMS}

        def row(label, series, digits=1):
            values = {s: [r[k] for r in series[s]] for s, k in (("ours", label[1]), ("peer", label[1]))}
            return (f"| {label[0]} | {spread(values['ours'], digits)} | {spread(values['peer'], digits)} | "
                    f"{ratio(median(values['ours']), median(values['peer']))} |")

        for s in SYSTEMS:
            for r in engine[s]:
                r["wall_prefill_tok_s"] = r["prefill_tokens"] / r["wall_prefill_s"] if r["wall_prefill_s"] else 0
                r["wall_decode_tok_s"] = r["decode_tokens"] / r["wall_decode_s"] if r["wall_decode_s"] else 0
        prefill_tokens = sorted({r["prefill_tokens"] for s in SYSTEMS for r in engine[s]})
        decode_tokens = {s: sorted({r["decode_tokens"] for r in engine[s]}) for s in SYSTEMS}
        lines += [
            row((f"LiteRT-LM engine: prefill tok/s ({'/'.join(map(str, prefill_tokens))} tokens, "
                 "engine benchmark info)", "prefill_tok_s"), engine),
            row(("LiteRT-LM engine: decode tok/s (engine benchmark info)", "decode_tok_s"), engine),
            row(("LiteRT-LM engine: prefill tok/s, wall clock of run_prefill", "wall_prefill_tok_s"), engine),
            row(("LiteRT-LM engine: decode tok/s, wall clock of run_decode", "wall_decode_tok_s"), engine),
            row(("LiteRT-LM engine: time to first token (s, benchmark info)", "ttft_s"), engine, 3),
            row((f"LiteRT interpreter: prefill_{BUCKET} tok/s (one call, {BUCKET} tokens)", "prefill_tok_s"), interp),
            row((f"LiteRT interpreter: decode tok/s ({args.new} steps, caches fed back)", "decode_tok_s"), interp),
            f"| .litertlm size (MB) | {ours['litertlm_mb']:,.2f} | {peer['litertlm_mb']:,.2f} | "
            f"{ratio(ours['litertlm_mb'], peer['litertlm_mb'])} |",
            f"| .tflite size (MB) | {ours['tflite_mb']:,.2f} | {peer['tflite_mb']:,.2f} | "
            f"{ratio(ours['tflite_mb'], peer['tflite_mb'])} |",
            f"| decode subgraph ops (+ ops inside composite decompositions) | {ours['decode_ops']['ops']} "
            f"(+{ours['decode_ops']['composite_inner']}) | {peer['decode_ops']['ops']} "
            f"(+{peer['decode_ops']['composite_inner']}) | {ratio(ours['decode_ops']['ops'], peer['decode_ops']['ops'])} |",
            f"| export wall time (s, when it was exported) | {ours['export_s']:.0f} | {peer['export_s']:.0f} | "
            f"{ratio(ours['export_s'], peer['export_s'])} |",
        ]
        notes = []
        for s in SYSTEMS:
            if any(t != args.new for t in decode_tokens[s]):
                notes.append(f"{LABELS[s]}'s engine decoded {decode_tokens[s]} tokens, not {args.new} "
                             "(a stop token ended a run)")
        ours_tokens = [r["tokens"] for r in interp["ours"]]
        peer_tokens = [r["tokens"] for r in interp["peer"]]
        if ours_tokens and peer_tokens:
            agree = common_prefix(ours_tokens[0], peer_tokens[0])
            notes.append(f"greedy interpreter tokens: the two exports agree on the first {agree} of {args.new}")
        ours_text, peer_text = engine["ours"][0]["text"], engine["peer"][0]["text"]
        notes.append("engine texts " + ("identical" if ours_text == peer_text else
                                        f"agree on the first {common_prefix(ours_text, peer_text)} characters"))
        shapes = {s: ready[(name, "interpreter", s)]["cache_shapes"] for s in SYSTEMS}
        notes.append("layer-0 cache inputs: " + "; ".join(
            f"{LABELS[s]} " + ", ".join(f"{k} {v}" for k, v in sorted(shapes[s].items())) for s in SYSTEMS))
        top = {s: sorted(exports[name][s]["decode_ops"]["types"].items(), key=lambda kv: -kv[1])[:8]
               for s in SYSTEMS}
        notes.append("decode op types: " + "; ".join(
            f"{LABELS[s]} " + ", ".join(f"{k} {v}" for k, v in top[s]) for s in SYSTEMS))
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def config_parameters(config):
    v, d, f = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    q, kv, h = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    block = d * h * (2 * q + 2 * kv) + 3 * d * f + 4 * d
    return v * d + config["num_hidden_layers"] * block + d


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 round, 8 new tokens")
    parser.add_argument("--fresh", action="store_true", help="re-export even if the scratch has the files")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (the small models vary by +-30%% between rounds on 2 shared cores)")
    parser.add_argument("--new", type=int, default=64, help="decoded tokens per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--scratch", default=DEFAULT_SCRATCH, help="export cache (kept between runs)")
    # worker processes
    parser.add_argument("--worker", choices=("prepare", "export-ours", "engine", "interpreter"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-file", help=argparse.SUPPRESS)
    parser.add_argument("--channel-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        {"prepare": worker_prepare, "export-ours": worker_export_ours,
         "engine": worker_engine, "interpreter": worker_interpreter}[args.worker](args)
        return
    if args.quick:
        args.rounds, args.new = 1, 8
    args.models = [m for m in MODELS if m in args.models]
    run(args)


if __name__ == "__main__":
    main()
