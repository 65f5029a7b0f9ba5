"""Generation speed of keras_gemma2 (jax / tensorflow / torch) against keras-hub and transformers.

    PYTHONPATH=. python benchmarks/generate.py [--repeats 3] [--prompt 64] [--new 32] [--threads auto]
        [--baseline DIR]

`--baseline DIR` (a source tree of another revision, e.g. from `git worktree add DIR REV`)
adds that revision's keras_gemma2 on every backend to the same interleaved rounds, so a
change is measured against what it replaced under the same machine drift; such a run writes
benchmarks/results/generate-vs-baseline.md instead of generate.md.

One ~150M-parameter Gemma 2 with random float32 weights (vocabulary 32000, so it fits a
small CPU) is written once, in a temporary directory, as a KerasHub preset. Every system
loads those same weights:

* keras_gemma2 reads the KerasHub preset (`keras_gemma2.from_preset(dir)`), once per Keras
  backend, each in its own process (a process has one backend);
* keras-hub builds `GemmaBackbone.from_preset(dir)` and a `GemmaCausalLM` without a
  preprocessor (jax backend), fed already tokenized, right-padded prompts;
* transformers loads the transformers-format copy that keras_gemma2's `save_to_preset`
  writes (`Gemma2ForCausalLM`, eager attention, torch.no_grad).

Same method for every system: TTFT is the median wall time of `generate` with one new
token (prefill + first token); decode speed is rows * (N - 1) / (t(N) - t(1)). The first
call of each shape is a warm-up (compilation for the jitted systems) and is reported on its
own. keras_gemma2 additionally reports its own prefill / decode-loop split. Prints one
markdown table, writes it to benchmarks/results/generate.md, and checks that greedy tokens
agree across systems.

Interleaved rounds: every system (and the memory-bandwidth probe) is a process that loads
and warms up once, then waits. Each round asks every process in turn, in a rotating order,
for one timed call of each shape; medians are over rounds. A shared 2-core VM drifts (its
bandwidth was seen to move between 15 and 29 GB/s within minutes), and measuring systems
one after another let that drift into the ratios; interleaving spreads it over all of them.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "generate.md")
BASELINE_RESULTS = os.path.join(HERE, "results", "generate-vs-baseline.md")  # --baseline runs

# ~150M parameters: 24.6M embedding (tied) + 12 x 10.3M.
MODEL = dict(
    vocabulary_size=32000,
    num_layers=12,
    hidden_dim=768,
    intermediate_dim=3456,  # per branch (keras-hub stores 2 x 3456)
    num_query_heads=8,
    num_key_value_heads=4,
    head_dim=128,
    query_pre_attn_scalar=128,
    sliding_window_size=64,  # < prompt + new tokens: the ring cache is exercised
)
SEED = 0
BATCHES = (1, 8)

# (label, process kind, keras backend or None). "ours-<variant>": keras_gemma2 with
# torch.compile'd decode steps, bfloat16 weights or int8 weights; "llama-<type>": llama.cpp
# (benchmarks/setup_llama_cpp.sh) on a GGUF of the same weights, batch 1 only.
SYSTEMS = (
    ("keras_gemma2 jax (jit)", "ours", "jax"),
    ("keras_gemma2 tensorflow (XLA)", "ours", "tensorflow"),
    ("keras_gemma2 torch (eager)", "ours", "torch"),
    ("keras_gemma2 torch (torch.compile)", "ours-compiled", "torch"),
    ("keras_gemma2 jax, bfloat16 weights", "ours-bfloat16", "jax"),
    ("keras_gemma2 jax, int8 weights", "ours-int8", "jax"),
    ("keras-hub GemmaCausalLM jax (jit)", "kerashub", "jax"),
    ("transformers Gemma2ForCausalLM torch (eager)", "transformers", None),
    ("llama.cpp f32 (llama-cpp-python)", "llama-f32", None),
    ("llama.cpp q8_0 (llama-cpp-python)", "llama-q8_0", None),
)
KERASHUB = "keras-hub GemmaCausalLM jax (jit)"
TRANSFORMERS = "transformers Gemma2ForCausalLM torch (eager)"
OURS_JAX = SYSTEMS[0][0]
# Systems whose float32 greedy tokens must agree exactly (lower precision may differ).
FLOAT32_KINDS = ("ours", "ours-compiled", "baseline", "kerashub", "transformers")
LLAMA_VENV = os.path.join(ROOT, ".venv-llama")
LLAMA_CONVERTER = os.path.join(LLAMA_VENV, "llama.cpp", "convert_hf_to_gguf.py")
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")
BANDWIDTH = "memory bandwidth probe"
CEILING = "XLA weight-products-only loop"


def cpu_flags():
    """The CPU features (of CPU_FLAGS) this machine has, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [flag for flag in CPU_FLAGS if flag in flags]


# ---- helpers shared by the worker processes ---------------------------------------
def batches_of(kind):
    """The batch sizes a system is timed at: llama-cpp-python's generation is one sequence."""
    return (1,) if kind.startswith("llama") else BATCHES


def prompts(batch, length, vocabulary_size):
    """The same random prompts for every system (row 0 is the batch-1 prompt)."""
    import numpy as np

    rng = np.random.default_rng(1234)
    return rng.integers(2, vocabulary_size, (max(BATCHES), length)).astype("int32")[:batch]


def warm_up(generate, args, vocabulary_size, compiled=True):
    """First calls per batch: {batch: {new: seconds}}.

    Compiled systems warm up on both shapes (1 and N new tokens: each is a compilation);
    eager ones on one short call (their first call only initializes kernels).
    """
    warm = {}
    for batch in batches_of(args.worker):
        ids = prompts(batch, args.prompt, vocabulary_size)
        warm[batch] = {}
        for new in (1, args.new) if compiled else (2,):
            begin = time.perf_counter()
            generate(ids, new)
            warm[batch][new] = time.perf_counter() - begin
    return warm


def timed_round(generate, args, vocabulary_size):
    """One timed call of each shape per batch: {batch: {"t1_s", "tN_s", "tokens"}}."""
    import numpy as np

    out = {}
    for batch in batches_of(args.worker):
        ids = prompts(batch, args.prompt, vocabulary_size)
        times = {}
        for new in (1, args.new):
            begin = time.perf_counter()
            tokens = generate(ids, new)
            times[new] = time.perf_counter() - begin
        out[batch] = {"t1_s": times[1], "tN_s": times[args.new],
                      "tokens": np.asarray(tokens).astype(int).tolist()}
    return out


def serve(args, ready, timed, finish=None):
    """A worker's life after loading: report `ready`, answer each "round" line on stdin
    with `timed()`, then "finish" with `finish()`.

    Messages go, one JSON line each, to the channel file descriptor the driver passed
    (stdout stays free for the frameworks' own logging).
    """
    channel = os.fdopen(args.channel_fd, "w")

    def send(message):
        channel.write(json.dumps(message) + "\n")
        channel.flush()

    send({"ready": True, **ready})
    for line in sys.stdin:
        if line.strip() != "round":
            break
        send(timed())
    send(finish() if finish else {})


def serve_generate(args, generate, vocabulary_size, compiled=True, finish=None, **facts):
    """`serve` for a system's `generate(ids, new)`: warm-up first, then timed rounds."""
    warmup = warm_up(generate, args, vocabulary_size, compiled)
    serve(args, {"compiled": compiled, "warmup_s": warmup, **facts},
          lambda: timed_round(generate, args, vocabulary_size), finish)


def worker_ours(args):
    import keras
    import numpy as np

    import keras_gemma2

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(args.threads)

    variant = args.worker.partition("-")[2]  # "", "compiled", "bfloat16", "int8"
    begin = time.perf_counter()
    model = keras_gemma2.from_preset(
        args.kerashub_dir, dtype="bfloat16" if variant == "bfloat16" else "float32",
        **({"quantize": "int8"} if variant == "int8" else {}),
    )
    if variant == "compiled":
        model.jit_compile = True  # Keras' switch: torch.compile'd decode steps
    load_s = time.perf_counter() - begin
    config = model.config

    def generate(ids, new):
        rows = model.generate([list(r) for r in ids], max_new_tokens=new, stop_token_ids=())
        return np.stack(rows)

    def finish():
        compilations = model.generator.compilations
        return {"compilations": compilations, "split": own_split(model, args),
                **({} if args.worker != "ours" else
                   {"varied": own_varied_requests(model, args), "chat": own_chat(model, args),
                    "speculative": own_speculative(model, args)})}

    compiled = keras.backend.backend() != "torch" or variant == "compiled"
    serve_generate(args, generate, config.vocabulary_size, compiled, finish, load_s=load_s)


def own_split(model, args):
    """keras_gemma2's own split: the prefill function, then the compiled decode loop."""
    import keras
    import numpy as np

    try:
        from keras_gemma2.generation import generator as generation
        from keras_gemma2.generation.samplers import Sampler
    except ImportError:  # a --baseline tree from before the package had folders
        from keras_gemma2 import generation
        from keras_gemma2.samplers import Sampler

    config = model.config
    split = {}
    sampler = Sampler(greedy=True)
    for batch in BATCHES:
        ids = prompts(batch, args.prompt, config.vocabulary_size)
        padded, padding, bucket = generation.left_pad(
            [list(r) for r in ids], args.new, config.max_sequence_length
        )
        seed = keras.ops.convert_to_tensor(np.int32(0))
        if hasattr(model.generator, "prepare"):  # programs keyed by cache bucket, runtime settings
            start, decode, inputs = model.generator.prepare(
                [list(r) for r in ids], args.new, sampler, (), config.sliding_window_size
            )
            inputs = (*inputs, seed)
        else:  # a --baseline tree: one program per budget
            start, decode = model.generator.functions(
                batch, bucket, args.new, sampler, (), config.sliding_window_size
            )
            inputs = (keras.ops.convert_to_tensor(padded), keras.ops.convert_to_tensor(padding), seed)
        stop_at = keras.ops.convert_to_tensor(np.int32(args.new))
        prefill_s, decode_s = [], []
        for _ in range(args.split_repeats):
            t0 = time.perf_counter()
            state = start(*inputs)
            keras.ops.convert_to_numpy(state["tokens"])
            t1 = time.perf_counter()
            state = decode(state, seed, stop_at)
            keras.ops.convert_to_numpy(state["tokens"])
            t2 = time.perf_counter()
            prefill_s.append(t1 - t0)
            decode_s.append(t2 - t1)
        split[batch] = {"bucket": bucket, "prefill_s": prefill_s, "decode_s": decode_s}
    return split


VARIED_REQUESTS = 10


def own_varied_requests(model, args):
    """Compilations and seconds over VARIED_REQUESTS calls that vary what a user varies.

    Budget (args.new // 2 .. args.new), stop ids and, for half, the temperature of a
    sampled request: one prompt and cache bucket, so at most one program pair per
    sampler kind (greedy, temperature) should compile, however many calls.
    """
    import numpy as np

    config = model.config
    ids = [list(prompts(1, args.prompt, config.vocabulary_size)[0])]
    before, begin = model.generator.compilations, time.perf_counter()
    for call in range(VARIED_REQUESTS):
        budget = args.new // 2 + (call * 7) % (args.new // 2 + 1)
        sampled = {"sampler": "temperature", "temperature": 0.5 + 0.1 * call, "seed": call} if call % 2 else {}
        model.generate(ids, max_new_tokens=budget, stop_token_ids=[int(np.int32(3 + call))], **sampled)
    return {"calls": VARIED_REQUESTS, "compilations": model.generator.compilations - before,
            "seconds": time.perf_counter() - begin}


CHAT_TURNS = 8


def chat_messages(tokenizer, count, length):
    """`count` user messages of about `length` tokens: lines of the demo preset's held-out text."""

    path = os.path.join(ROOT, "presets", "gemma2_demo", "held_out.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    words = text.split()
    messages, start = [], 0
    for _ in range(count):
        end = start + 1
        while len(tokenizer.tokenize(" ".join(words[start:end]), add_bos=False)) < length:
            end += 1
        messages.append(" ".join(words[start:end]))
        start = end
    return messages


def chat_tokenizer(path):
    """A SentencePiece model with the benchmark model's 32000 ids and Gemma's turn markers.

    BPE pieces learned from the demo preset's held-out text, the rest of the
    ids filled with `<unusedN>` symbols (Gemma's own vocabulary has such), so
    every id the random model samples detokenizes to text.
    """
    import io

    import sentencepiece as spm

    with open(os.path.join(ROOT, "presets", "gemma2_demo", "held_out.txt"), encoding="utf-8") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=MODEL["vocabulary_size"],
        model_type="bpe", pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", hard_vocab_limit=False, minloglevel=2,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>", "\n"]
        + [f"<unused{i}>" for i in range(MODEL["vocabulary_size"] - 2000)],
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        split_digits=True, byte_fallback=True, character_coverage=1.0, num_threads=1,
    )
    with open(path, "wb") as f:
        f.write(model.getvalue())


def own_chat(model, args):
    """Time to first token of each of CHAT_TURNS chat turns: the kept conversation vs re-prefilling.

    Each user message is about args.prompt tokens, each reply args.new tokens (no
    stop). `conversation.send` prefills only the new turn; the re-prefill column is
    what chat() without a kept cache costs: generate(max_new_tokens=1) over the same
    transcript ids from an empty cache. A first conversation compiles (cache and chunk
    buckets) and is not timed; then args.split_repeats conversations, medians per turn.
    """
    from keras_gemma2 import Gemma2Tokenizer

    model.tokenizer = Gemma2Tokenizer(args.chat_tokenizer)
    messages = chat_messages(model.tokenizer, CHAT_TURNS, args.prompt)

    def conversation():
        chat = model.start_chat(max_new_tokens=args.new, stop_token_ids=())
        ttft = []
        for message in messages:
            begin, first = time.perf_counter(), []
            chat.send(message, stream=lambda piece: first or first.append(time.perf_counter() - begin))
            ttft.append(first[0])
        return ttft, [turn.prompt_ids.tolist() for turn in chat.turns], len(chat.token_ids)

    def reprefill(prompt):
        begin = time.perf_counter()
        model.generate([prompt], max_new_tokens=1, stop_token_ids=())
        return time.perf_counter() - begin

    _, transcripts, _ = conversation()  # compiles
    for prompt in transcripts:
        reprefill(prompt)
    kept, again = [], []
    for _ in range(args.split_repeats):
        ttft, transcripts, length = conversation()
        kept.append(ttft)
        again.append([reprefill(prompt) for prompt in transcripts])
    return {"kept_s": kept, "reprefill_s": again, "prompt_tokens": [len(p) for p in transcripts],
            "transcript_tokens": length}


DRAFT_TOKENS = (2, 4)
SPECULATIVE_NEW = 64


def early_exit_draft(model, layers):
    """A draft made of the target's own first `layers` blocks, embedding and final norm (no training)."""
    import keras_gemma2

    config = model.config.replace(num_layers=layers)
    kept = {v.path: v for v in model.backbone.weights}
    backbone = keras_gemma2.Gemma2Backbone.from_weights(
        config, {path: kept[path] for path in _paths_of(config)}, dtype="float32"
    )
    return keras_gemma2.Gemma2CausalLM(backbone)


def _paths_of(config):
    import keras_gemma2

    return [v.path for v in keras_gemma2.Gemma2Backbone(config, dtype="float32").weights]


def pass_seconds(model, positions, at):
    """Median seconds of one compiled cached forward of `positions` tokens at cache index `at`
    (full-length cache, as speculative decoding holds it), logits included."""
    import keras

    from keras_gemma2 import backend
    from keras_gemma2.model import kv_cache

    backbone = model.backbone
    layout = kv_cache.CacheLayout.full(model.config, 2 * at)
    caches = layout.new_caches(model.config, 1, backbone.compute_dtype)

    def step(caches, tokens, index):
        positions_ = index + keras.ops.arange(positions, dtype="int32")[None, :]
        hidden, caches = backbone.forward_pass(tokens, positions_, caches, index, layout)
        return backbone.logits(hidden), caches

    function = backend.compile_function(step, backbone.variables)
    tokens = keras.ops.ones((1, positions), "int32")
    index = keras.ops.convert_to_tensor(at, "int32")
    keras.ops.convert_to_numpy(function(caches, tokens, index)[0])
    times = []
    for _ in range(7):
        begin = time.perf_counter()
        keras.ops.convert_to_numpy(function(caches, tokens, index)[0])
        times.append(time.perf_counter() - begin)
    return median(times)


def own_speculative(model, args):
    """Batch-1 greedy decode with a draft against plain decode: acceptance, speed-up, cost model.

    Pairs: the shipped gemma2_demo (distilled) drafting for gemma2_demo_teacher, on
    held-out text; and this benchmark's random 148M model drafting for itself with its
    own first 2 of 12 blocks (an early-exit draft: no training; a random model gives
    a distilled draft nothing to learn). Speed = (N - 1) / (t(N) - t(1)), N =
    SPECULATIVE_NEW; every speculative output is checked equal to plain greedy.
    """
    import numpy as np

    import keras_gemma2

    teacher = keras_gemma2.from_preset("gemma2_demo_teacher", dtype="float32")
    student = keras_gemma2.from_preset("gemma2_demo", dtype="float32")
    with open(os.path.join(ROOT, "presets", "gemma2_demo", "held_out.txt"), encoding="utf-8") as f:
        demo_prompt = teacher.tokenizer(f.read()[:2000])[: args.prompt]
    pairs = [
        ("gemma2_demo -> gemma2_demo_teacher", teacher, student, demo_prompt),
        ("148M: own first 2 blocks -> itself", model, early_exit_draft(model, 2),
         [int(x) for x in prompts(1, args.prompt, model.config.vocabulary_size)[0]]),
    ]
    out = []
    for name, target, draft, prompt in pairs:
        def timed(generating, new, **kwargs):
            begin = time.perf_counter()
            tokens = generating.generate(prompt, max_new_tokens=new, stop_token_ids=(), **kwargs)
            return time.perf_counter() - begin, tokens

        def decode_speed(generating, **kwargs):
            for new in (1, SPECULATIVE_NEW):
                timed(generating, new, **kwargs)  # compiles
            t1 = median([timed(generating, 1, **kwargs)[0] for _ in range(args.split_repeats + 1)])
            tn = median([timed(generating, SPECULATIVE_NEW, **kwargs)[0] for _ in range(args.split_repeats + 1)])
            return (SPECULATIVE_NEW - 1) / (tn - t1)

        plain_tokens = timed(target, SPECULATIVE_NEW)[1]
        entry = {"pair": name, "target_tps": decode_speed(target), "draft_tps": decode_speed(draft), "k": {}}
        one = pass_seconds(target, 1, len(prompt) + SPECULATIVE_NEW)
        for k in DRAFT_TOKENS:
            speed = decode_speed(target, draft_model=draft, num_draft_tokens=k)
            _, tokens = timed(target, SPECULATIVE_NEW, draft_model=draft, num_draft_tokens=k)
            stats = target.generator.last_speculation
            entry["k"][k] = {"tps": speed, "rate": stats["rate"], "rounds": stats["rounds"],
                             "identical": bool(np.array_equal(tokens, plain_tokens)),
                             "verify": pass_seconds(target, k + 1, len(prompt) + SPECULATIVE_NEW) / one}
        out.append(entry)
    return out


def _zero_initializers():
    """Random initializers replaced by zeros while keras-hub builds (all weights get assigned)."""
    import contextlib

    import keras

    @contextlib.contextmanager
    def patched():
        original = keras.initializers.VarianceScaling.__call__
        keras.initializers.VarianceScaling.__call__ = lambda self, shape, dtype=None: keras.ops.zeros(
            shape, dtype=dtype
        )
        try:
            yield
        finally:
            keras.initializers.VarianceScaling.__call__ = original

    return patched()


def kerashub_kwargs():
    return dict(
        vocabulary_size=MODEL["vocabulary_size"],
        num_layers=MODEL["num_layers"],
        num_query_heads=MODEL["num_query_heads"],
        num_key_value_heads=MODEL["num_key_value_heads"],
        hidden_dim=MODEL["hidden_dim"],
        intermediate_dim=2 * MODEL["intermediate_dim"],
        head_dim=MODEL["head_dim"],
        query_head_dim_normalize=True,  # query_pre_attn_scalar = head_dim
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        use_sliding_window_attention=True,
        sliding_window_size=MODEL["sliding_window_size"],
    )


def prepare(args):
    """(jax) Write the random KerasHub preset, its transformers copy, and static facts."""
    import keras_hub
    import numpy as np

    import keras_gemma2
    from keras_gemma2.model import kv_cache

    with _zero_initializers():
        backbone = keras_hub.models.GemmaBackbone(dtype="float32", **kerashub_kwargs())
    # With small random weights the tied embedding makes every greedy generation repeat the
    # last prompt token (the residual stream is mostly the input embedding), which would make
    # the agreement check trivial. Large post-norm scales (applied as 1 + w) let the blocks
    # dominate the residual stream, so the generations are varied and use the ring cache.
    rng = np.random.default_rng(SEED)
    for variable in backbone.weights:
        if variable.path.endswith("embeddings"):
            mean, std = 0.0, 0.05
        elif len(variable.shape) == 1:
            mean, std = (5.0 if "/post_" in variable.path else 0.0), 0.1
        else:
            mean, std = 0.0, 0.05
        variable.assign(rng.normal(mean, std, variable.shape).astype("float32"))
    backbone.save_to_preset(args.kerashub_dir)
    parameters = int(sum(np.prod(v.shape) for v in backbone.weights))
    del backbone

    model = keras_gemma2.from_preset(args.kerashub_dir, dtype="float32")
    model.save_to_preset(args.hf_dir)
    chat_tokenizer(args.chat_tokenizer)
    config = model.config
    real = keras_gemma2.Gemma2Config.from_preset("gemma2_2b_en")
    context = 8192
    return {
        "config": config.to_dict(),
        "parameter_count": config.parameter_count(),
        "kerashub_parameters": parameters,
        "weight_bytes": config.parameter_count() * 4,
        "kv_2b": {
            "layers": real.num_layers,
            "window": real.sliding_window_size,
            "context": context,
            "sliding": kv_cache.CacheLayout.rings(real, context).bytes(real, 1, "bfloat16"),
            "full": kv_cache.CacheLayout.full(real, context).bytes(real, 1, "bfloat16"),
        },
    }


def worker_kerashub(args):
    import keras_hub
    import numpy as np

    begin = time.perf_counter()
    backbone = keras_hub.models.GemmaBackbone.from_preset(args.kerashub_dir)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    model.compile(sampler="greedy")
    load_s = time.perf_counter() - begin

    def generate(ids, new):
        batch, length = ids.shape
        token_ids = np.zeros((batch, length + new), "int32")  # max_length = prompt + new
        token_ids[:, :length] = ids
        padding_mask = np.zeros_like(token_ids)
        padding_mask[:, :length] = 1
        out = model.generate(
            {"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None
        )
        return np.asarray(out["token_ids"])[:, length:]

    serve_generate(args, generate, MODEL["vocabulary_size"], load_s=load_s)


def worker_transformers(args):
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    model = transformers.Gemma2ForCausalLM.from_pretrained(
        args.hf_dir, attn_implementation="eager", dtype=torch.float32
    )
    model.eval()
    load_s = time.perf_counter() - begin

    def generate(ids, new):
        input_ids = torch.from_numpy(ids.astype("int64"))
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
                eos_token_id=None,  # the others ignore stop tokens too; nothing suppressed
            )
        return out[:, ids.shape[1]:].numpy()

    serve_generate(args, generate, MODEL["vocabulary_size"], False, load_s=load_s,
          threads=torch.get_num_threads(),
          cache=str(getattr(model.generation_config, "cache_implementation", None)))


def worker_llama(args):
    """(.venv-llama) llama.cpp on the GGUF of the same weights: greedy, batch 1 only.

    The prompt is evaluated in one batch (n_batch = the prompt), then one token per
    step, the argmax of the last position's logits, as the other systems do.
    """
    import llama_cpp
    import numpy as np

    begin = time.perf_counter()
    llm = llama_cpp.Llama(model_path=args.gguf, n_ctx=256, n_batch=args.prompt, n_ubatch=args.prompt,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    load_s = time.perf_counter() - begin

    def generate(ids, new):
        rows = []
        for row in ids:  # called with one row only (batches_of)
            llm.reset()
            llm.eval([int(t) for t in row])
            tokens = []
            for step in range(new):
                # The last evaluated position's logits (kept without logits_all).
                logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
                tokens.append(int(logits.argmax()))
                if step + 1 < new:
                    llm.eval([tokens[-1]])
            rows.append(tokens)
        return np.asarray(rows)

    serve_generate(args, generate, MODEL["vocabulary_size"], False, load_s=load_s,
                   system_info=llama_cpp.llama_print_system_info().decode())


def limit_threads(threads):
    """Run on `threads` CPUs: every framework sizes its thread pools from the affinity mask."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if cpus and threads < len(cpus):
        os.sched_setaffinity(0, cpus[:threads])
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)


def worker_bandwidth(args):
    """The probe as a worker: one (matvec read, copy) bandwidth measurement per round."""
    probe = Bandwidth(args.weight_bytes)
    serve(args, {}, lambda: {"read_gbs_copy_gbs": probe.measure()})


def worker_matmul_ceiling(args):
    """XLA's own speed on the decode step's weight products alone (jax, default XLA options).

    A jitted loop of `args.new` steps; each step multiplies [batch, hidden] rows by every
    [out, in] weight matrix of the model (q, k, v, attention output, gate, up, down per
    layer, then the tied vocabulary table), each read as the decode step reads it (kernel
    as the left operand, layers.rows_times_transposed), with a cheap norm between
    layers and nothing else: no attention, cache, sampling or soft-caps. Its tok/s bounds
    any XLA decode loop that reads these weight matrices in these layouts on this machine.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    m = MODEL
    hidden, width = m["hidden_dim"], m["intermediate_dim"]
    q, kv = m["num_query_heads"] * m["head_dim"], m["num_key_value_heads"] * m["head_dim"]
    rng = np.random.default_rng(0)

    def matrix(outputs, inputs):
        return jnp.asarray(rng.standard_normal((outputs, inputs), dtype="float32") / np.sqrt(inputs))

    layers = [
        [matrix(q, hidden), matrix(kv, hidden), matrix(kv, hidden), matrix(hidden, q),
         matrix(width, hidden), matrix(width, hidden), matrix(hidden, width)]
        for _ in range(m["num_layers"])
    ]
    table = matrix(m["vocabulary_size"], hidden)

    def product(kernel, x):  # x @ kernel^T, kernel first as in the model
        return jnp.einsum("fd,bd->fb", kernel, x).T

    def steps(layers, table, x):
        def step(_, x):
            for wq, wk, wv, wo, gate, up, down in layers:
                x = x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
                h = product(wq, x) + jnp.sum(product(wk, x)) + jnp.sum(product(wv, x))
                x = x + product(wo, h)
                x = x + product(down, jax.nn.gelu(product(gate, x)) * product(up, x))
            return x + jnp.mean(product(table, x)) * 1e-9
        return jax.lax.fori_loop(0, args.new, step, x)

    run = jax.jit(steps)
    rows = {batch: jnp.ones((batch, hidden), "float32") for batch in BATCHES}
    for batch in BATCHES:
        run(layers, table, rows[batch]).block_until_ready()

    def timed():
        speeds = {}
        for batch in BATCHES:
            begin = time.perf_counter()
            run(layers, table, rows[batch]).block_until_ready()
            speeds[batch] = batch * args.new / (time.perf_counter() - begin)
        return {"tok_s": speeds}

    serve(args, {}, timed)


def worker(args):
    kind = args.worker
    limit_threads(args.threads)
    if kind == "prepare":
        with open(args.output, "w") as f:
            json.dump(prepare(args), f)
        return
    family = kind.partition("-")[0]
    {"ours": worker_ours, "baseline": worker_ours, "kerashub": worker_kerashub,
     "transformers": worker_transformers, "llama": worker_llama,
     "bandwidth": worker_bandwidth, "ceiling": worker_matmul_ceiling}[family](args)


# ---- the driver (no deep-learning framework imported here) ---------------------------
class Bandwidth:
    """Memory read bandwidth (GB/s): a float32 matvec over a weight-sized matrix."""

    def __init__(self, weight_bytes):
        import numpy as np

        columns = 4096
        rows = max(1, weight_bytes // 4 // columns)
        self.matrix = np.random.default_rng(0).standard_normal((rows, columns), dtype="float32")
        self.vector = np.ones(columns, "float32")
        self.target = np.empty_like(self.matrix)

    def measure(self):
        """(best matvec read GB/s, best copy read+write GB/s) of a few tries."""
        import numpy as np

        best_matvec = min(_timed(lambda: self.matrix @ self.vector) for _ in range(5))
        best_copy = min(_timed(lambda: np.copyto(self.target, self.matrix)) for _ in range(3))
        return self.matrix.nbytes / best_matvec / 1e9, 2 * self.matrix.nbytes / best_copy / 1e9


def _timed(fn):
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def worker_command(kind, backend, args, output=None):
    python = os.path.join(LLAMA_VENV, "bin", "python") if kind.startswith("llama") else sys.executable
    command = [python, os.path.abspath(__file__), "--worker", kind,
               "--kerashub-dir", args.kerashub_dir, "--hf-dir", args.hf_dir, "--chat-tokenizer", args.chat_tokenizer,
               "--threads", str(args.threads), "--weight-bytes", str(args.weight_bytes),
               "--split-repeats", str(args.split_repeats), "--prompt", str(args.prompt), "--new", str(args.new)]
    if output:
        command += ["--output", output]
    if kind.startswith("llama"):
        command += ["--gguf", args.gguf[kind.partition("-")[2]]]
    env = dict(os.environ)
    root = args.baseline if kind == "baseline" else ROOT
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if backend:
        env["KERAS_BACKEND"] = backend
    return command, env


def prepare_weights(args, directory):
    output = os.path.join(directory, "prepare.json")
    command, env = worker_command("prepare", "jax", args, output)
    process = subprocess.run(command, env=env, capture_output=True, text=True)
    if process.returncode != 0:
        print("[prepare weights] FAILED:\n" + "\n".join(process.stderr.strip().splitlines()[-25:]), flush=True)
        return None
    with open(output) as f:
        return json.load(f)


class Worker:
    """One system's process, alive from its warm-up to the last round."""

    def __init__(self, kind, backend, args, directory, label):
        self.label = label
        self.log_path = os.path.join(directory, f"{kind}-{backend}.log")
        command, env = worker_command(kind, backend, args)
        read_end, write_end = os.pipe()
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                command + ["--channel-fd", str(write_end)], env=env, stdin=subprocess.PIPE,
                stdout=log, stderr=subprocess.STDOUT, text=True, pass_fds=(write_end,),
            )
        os.close(write_end)
        self.channel = os.fdopen(read_end)

    def receive(self):
        line = self.channel.readline()
        if not line:
            self.process.wait()
            with open(self.log_path) as log:
                tail = "\n".join(log.read().strip().splitlines()[-25:])
            raise RuntimeError(f"[{self.label}] worker exited ({self.process.returncode}):\n{tail}")
        return json.loads(line)

    def ask(self, command):
        try:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            pass  # it died while idle: receive() reports its exit and log like any other death
        return self.receive()

    def finish(self):
        message = self.ask("finish")
        self.process.stdin.close()
        self.process.wait()
        return message

    def cpu_seconds(self):
        """CPU time of the worker process (all its threads), from /proc; 0 elsewhere."""
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def convert_gguf(args, directory):
    """{"f32": path, "q8_0": path}: llama.cpp's converter on the transformers-format copy, or {}.

    The converter (from the same llama-cpp-python sdist, benchmarks/setup_llama_cpp.sh)
    runs under this interpreter (it needs torch and safetensors); the 32000-piece
    SentencePiece model of the chat benchmark stands in as the GGUF's vocabulary.
    """
    if args.no_llama or not os.path.exists(LLAMA_CONVERTER):
        print("[llama.cpp] skipped: run benchmarks/setup_llama_cpp.sh to include it", flush=True)
        return {}
    shutil.copy(args.chat_tokenizer, os.path.join(args.hf_dir, "tokenizer.model"))
    environment = {**os.environ, "PYTHONPATH": os.path.join(LLAMA_VENV, "llama.cpp", "gguf-py")}
    files = {}
    for outtype in ("f32", "q8_0"):
        path = os.path.join(directory, f"model-{outtype}.gguf")
        process = subprocess.run([sys.executable, LLAMA_CONVERTER, args.hf_dir, "--outtype", outtype,
                                  "--outfile", path], env=environment, capture_output=True, text=True)
        if process.returncode != 0:
            print(f"[llama.cpp] converting to {outtype} FAILED:\n" + process.stderr[-3000:], flush=True)
            return {}
        files[outtype] = path
    return files


def run_rounds(args, directory):
    """Warm every system up one at a time, then time them in interleaved rounds.

    Returns ({label: result or None}, bandwidth samples, {batch: ceiling tok/s} or None,
    cores other processes used during the rounds).
    """
    entries = [entry for entry in SYSTEMS if not entry[1].startswith("llama") or args.gguf]
    entries += [(BANDWIDTH, "bandwidth", None), (CEILING, "ceiling", "jax")]
    workers, ready = {}, {}
    for label, kind, backend in entries:
        begin = time.perf_counter()
        try:
            workers[label] = Worker(kind, backend, args, directory, label)
            ready[label] = workers[label].receive()
            print(f"[{label}] loaded and warmed up in {time.perf_counter() - begin:.0f} s", flush=True)
        except RuntimeError as error:
            print(error, flush=True)
            workers.pop(label, None)
    rounds = {label: [] for label in workers}
    busy, own = busy_cpu_seconds(), own_cpu_seconds()
    cpu = {label: worker.cpu_seconds() for label, worker in workers.items()}
    begin = time.perf_counter()
    for round_index in range(args.repeats):
        labels = list(workers)
        shift = round_index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            try:
                rounds[label].append(workers[label].ask("round"))
            except RuntimeError as error:
                print(error, flush=True)
                workers.pop(label)
        print(f"round {round_index + 1}/{args.repeats} done", flush=True)
    elapsed = time.perf_counter() - begin
    ours = sum(worker.cpu_seconds() - cpu[label] for label, worker in workers.items())
    foreign = max(0.0, busy_cpu_seconds() - busy - ours - (own_cpu_seconds() - own)) / elapsed
    finished = {}
    for label, worker in workers.items():
        try:
            finished[label] = worker.finish()
        except RuntimeError as error:
            print(error, flush=True)
    results = {}
    for label, kind, _ in SYSTEMS:
        if label not in finished:
            results[label] = None
            continue
        first = ready[label]
        results[label] = {**first, **finished[label], "batches": {
            str(batch): {
                "compiled": first["compiled"],
                "warmup_s": first["warmup_s"][str(batch)],
                "t1_s": [r[str(batch)]["t1_s"] for r in rounds[label]],
                "tN_s": [r[str(batch)]["tN_s"] for r in rounds[label]],
                "tokens": rounds[label][-1][str(batch)]["tokens"],
            } for batch in batches_of(kind)}}
    samples = [r["read_gbs_copy_gbs"] for r in rounds.get(BANDWIDTH, [])] if BANDWIDTH in finished else []
    ceiling = {batch: median([r["tok_s"][str(batch)] for r in rounds[CEILING]])
               for batch in BATCHES} if CEILING in finished else None
    return results, samples, ceiling, foreign


def foreign_cores(seconds):
    """Cores other processes keep busy, sampled over `seconds` while this one sleeps."""
    busy, ours = busy_cpu_seconds(), own_cpu_seconds()
    time.sleep(seconds)
    return max(0.0, (busy_cpu_seconds() - busy) - (own_cpu_seconds() - ours)) / seconds


def busy_cpu_seconds():
    """Machine-wide non-idle CPU time (Linux /proc/stat), in seconds; 0 elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    """CPU time of this process and its finished children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def median(values):
    values = sorted(values)
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def summarize(result, batch, new):
    entry = result["batches"][str(batch)]
    t1, tn = median(entry["t1_s"]), median(entry["tN_s"])
    return {
        "ttft_ms": 1000 * t1,
        "decode_tps": batch * (new - 1) / (tn - t1) if tn > t1 else float("nan"),
        "warmup_s": (
            entry["warmup_s"][str(1)] + entry["warmup_s"][str(new)] - t1 - tn
            if entry["compiled"] else None
        ),
        "tokens": entry["tokens"],
        "spread": max(entry["tN_s"]) / min(entry["tN_s"]) - 1,
    }


def agreement(tokens, reference):
    """(total matching tokens, total tokens, shortest matching prefix over rows)."""
    matching = total = 0
    prefix = None
    for row, ref in zip(tokens, reference):
        same = [a == b for a, b in zip(row, ref)]
        matching += sum(same)
        total += len(ref)
        first_diff = same.index(False) if False in same else len(same)
        prefix = first_diff if prefix is None else min(prefix, first_diff)
    return matching, total, prefix


def atomic_write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".generate-", suffix=".md", dir=os.path.dirname(path))
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.chmod(temporary, 0o644)  # mkstemp creates 0600
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def main(args):
    lines = []

    def say(line=""):
        print(line, flush=True)
        lines.append(line)

    global SYSTEMS
    if args.baseline:
        args.baseline = os.path.abspath(args.baseline)
        revision = subprocess.run(["git", "-C", args.baseline, "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True).stdout.strip() or args.baseline
        ours = [entry for entry in SYSTEMS if entry[1] == "ours"]
        SYSTEMS = (*ours, *[(f"{label} [baseline {revision}]", "baseline", backend)
                            for label, _, backend in ours], *SYSTEMS[len(ours):])
    started = time.perf_counter()
    command = "cd " + shlex.quote(os.getcwd()) + " && " + " ".join(
        shlex.quote(part) for part in ([("PYTHONPATH=" + os.environ["PYTHONPATH"])] if os.environ.get("PYTHONPATH") else [])
        + [sys.executable] + sys.argv
    )
    say(f"Command: `{command}`")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    foreign = foreign_cores(2.0)
    if args.threads == "auto":
        args.threads = max(1, min(cores, round(cores - foreign)))
        why = f"auto: other processes were using {foreign:.2f} cores"
    else:
        args.threads = int(args.threads)
        why = f"--threads; other processes were using {foreign:.2f} cores"
    say(f"Machine: {cores} CPU cores, load average at start "
        + " / ".join(f"{x:.2f}" for x in os.getloadavg())
        + f"; every system (and the bandwidth probe) runs on {args.threads} CPU(s) ({why}); "
        + f"CPU flags: {', '.join(cpu_flags()) or 'none of ' + ', '.join(CPU_FLAGS)}")
    say(f"Model: {json.dumps(MODEL)}, float32, random weights (seed {SEED})")
    say(f"Workload: prompt {args.prompt} tokens (same random prompts), {args.new} new tokens, greedy, "
        f"no stop tokens, batch {' and '.join(map(str, BATCHES))}; median of {args.repeats} interleaved "
        "rounds after a warm-up (each round times every system once, in a rotating order)")
    print(flush=True)

    if args.from_raw:  # render a saved run's measurements again (the header lines above are this call's)
        with open(args.from_raw) as f:
            raw = json.load(f)
    else:
        with tempfile.TemporaryDirectory(prefix="gemma2-generate-bench-") as directory:
            args.kerashub_dir = os.path.join(directory, "kerashub")
            args.hf_dir = os.path.join(directory, "hf")
            args.chat_tokenizer = os.path.join(directory, "chat_tokenizer.model")
            args.weight_bytes = 0
            facts = prepare_weights(args, directory)
            if facts is None:
                sys.exit(1)
            args.weight_bytes = facts["weight_bytes"]
            args.gguf = convert_gguf(args, directory)
            results, samples, ceiling, foreign_rounds = run_rounds(args, directory)
        raw = {"facts": facts, "results": results, "samples": samples, "ceiling": ceiling,
               "foreign": foreign_rounds}
        # The measurements before any rendering: `--from-raw` renders them again.
        with open(args.raw_output, "w") as f:
            json.dump(raw, f)
        print(f"Measurements saved to {args.raw_output}", flush=True)
    facts, results, samples, foreign_rounds = raw["facts"], raw["results"], raw["samples"], raw["foreign"]
    ceiling = {int(b): v for b, v in raw["ceiling"].items()} if raw["ceiling"] else None
    if not samples:
        sys.exit("The memory-bandwidth probe failed; see the messages above.")
    read_gbs = median([read for read, _ in samples])
    copy_gbs = median([copy for _, copy in samples])
    print(flush=True)

    say(f"Parameters: {facts['parameter_count'] / 1e6:.1f}M (Gemma2Config.parameter_count(); keras-hub "
        f"backbone holds {facts['kerashub_parameters'] / 1e6:.1f}M), "
        f"{facts['weight_bytes'] / 1e6:.0f} MB of float32 weights")
    say()

    summary = {
        label: {int(b): summarize(r, int(b), args.new) for b in r["batches"]} if r else None
        for label, r in results.items()
    }

    def ratio(label, batch, reference):
        mine, theirs = summary[label], summary.get(reference)
        if not mine or not theirs or batch not in mine or batch not in theirs:
            return "n/a"
        if label == reference:
            return "1.00x / 1.00x"
        m, t = mine[batch], theirs[batch]
        return f"{m['decode_tps'] / t['decode_tps']:.2f}x / {t['ttft_ms'] / m['ttft_ms']:.2f}x"

    say("| system | batch | TTFT (ms) | decode tok/s | vs keras-hub (decode / TTFT) | "
        "vs transformers (decode / TTFT) | warm-up incl. compile (s) | own split: prefill ms, decode tok/s |")
    say("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, _, _ in SYSTEMS:
        for batch in BATCHES:
            s = summary[label]
            if s is None:
                say(f"| {label} | {batch} | failed | | | | | |")
                continue
            if batch not in s:
                continue  # llama.cpp: batch 1 only
            row = s[batch]
            warmup = "eager" if row["warmup_s"] is None else f"{row['warmup_s']:.1f}"
            split = ""
            result = results[label]
            if "split" in result:
                entry = result["split"][str(batch)]
                split = (f"{1000 * median(entry['prefill_s']):.0f} ms (bucket {entry['bucket']}), "
                         f"{batch * (args.new - 1) / median(entry['decode_s']):.1f} tok/s")
            say(f"| {label} | {batch} | {row['ttft_ms']:.0f} | {row['decode_tps']:.1f} | "
                f"{ratio(label, batch, KERASHUB)} | {ratio(label, batch, TRANSFORMERS)} | "
                f"{warmup} | {split} |")
    say()
    say(f"TTFT = median time of generate(max_new_tokens=1); decode tok/s = batch x {args.new - 1} / "
        f"(t({args.new}) - t(1)), the same method for every system. Ratios > 1 mean keras_gemma2 (row) "
        "is faster: decode = row tok/s / reference tok/s, TTFT = reference TTFT / row TTFT. "
        "Warm-up = first calls (1 and N new tokens) minus the timed medians: XLA compilation for "
        "the jitted systems. The split column is keras_gemma2's own prefill function (prompt "
        f"and first token) and its decode loop ({args.new - 1} forward steps). keras-hub prefills "
        "its whole max_length (prompt + new) and recomputes the last prompt token, so part of its prefill lands in its decode figure.")
    say()

    def decode(label, batch):
        entry = summary.get(label)
        return entry[batch]["decode_tps"] if entry and batch in entry else None

    def versus(label, reference, batch=1):
        mine, theirs = decode(label, batch), decode(reference, batch)
        return f"{mine / theirs:.2f}x" if mine and theirs else "n/a"

    by_kind = {kind: label for label, kind, _ in SYSTEMS}
    torch_eager, torch_compiled = SYSTEMS[2][0], by_kind["ours-compiled"]
    say("PyTorch against JAX (decode tok/s ratio, batch 1 / batch 8): eager "
        f"{versus(torch_eager, OURS_JAX)} / {versus(torch_eager, OURS_JAX, 8)}, torch.compile "
        f"{versus(torch_compiled, OURS_JAX)} / {versus(torch_compiled, OURS_JAX, 8)} (its warm-up column is the "
        "compile time: keras_gemma2 compiles the decode step when `model.jit_compile = True`).")
    say("Lower-precision weights, batch-1 decode against this library's float32 (jax) and keras-hub: "
        + "; ".join(f"{by_kind[kind].split(', ')[1]} {versus(by_kind[kind], OURS_JAX)} / "
                    f"{versus(by_kind[kind], KERASHUB)} (batch 8: {versus(by_kind[kind], OURS_JAX, 8)})"
                    for kind in ("ours-bfloat16", "ours-int8")) + ".")
    if results.get(by_kind["llama-f32"]) or results.get(by_kind["llama-q8_0"]):
        say("llama.cpp, batch 1 decode, this library against it (same weights): jax float32 vs f32 "
            f"{versus(OURS_JAX, by_kind['llama-f32'])}, torch.compile float32 vs f32 "
            f"{versus(torch_compiled, by_kind['llama-f32'])}, jax int8 vs q8_0 "
            f"{versus(by_kind['ours-int8'], by_kind['llama-q8_0'])}, jax bfloat16 vs q8_0 "
            f"{versus(by_kind['ours-bfloat16'], by_kind['llama-q8_0'])} (< 1: llama.cpp is faster). "
            "llama.cpp's system info: " + (results.get(by_kind["llama-f32"]) or {}).get("system_info", "n/a"))
    say()

    ours = [label for label, kind, _ in SYSTEMS if kind == "ours" and results.get(label)]
    if any("varied" in results[label] for label in ours):
        say(f"Compile once: {VARIED_REQUESTS} calls after the timed rounds (batch 1, prompt {args.prompt}, "
            f"max_new_tokens {args.new // 2}-{args.new}, a different stop id each, every other call "
            "sampled with another temperature and seed); programs compiled during those calls, and their "
            "total time:")
        for label in ours:
            varied = results[label].get("varied")
            if varied:
                say(f"- {label}: {varied['compilations']} compilations over {varied['calls']} calls, "
                    f"{varied['seconds']:.1f} s (programs compiled before them, by the warm-up and rounds: {results[label]['compilations']})")
        say()
    if any("chat" in results[label] for label in ours):
        say(f"Chat: time to first token of turn k (ms; user messages of about {args.prompt} tokens, replies "
            f"of {args.new} tokens; median of {args.split_repeats} conversations after one that compiles). "
            "Kept = `start_chat()` / `send()`, which prefills only the new turn; re-prefill = generate over "
            "the same transcript ids from an empty cache (what a chat without a kept cache does each turn).")
        say()
        shown = [k for k in (1, 4, CHAT_TURNS)]
        say("| system | " + " | ".join(f"turn {k}: kept / re-prefill (transcript tokens)" for k in shown) + " |")
        say("|---|" + "---:|" * len(shown))
        for label in ours:
            chat = results[label].get("chat")
            if not chat:
                continue
            cells = []
            for k in shown:
                kept = 1000 * median([run[k - 1] for run in chat["kept_s"]])
                again = 1000 * median([run[k - 1] for run in chat["reprefill_s"]])
                cells.append(f"{kept:.0f} / {again:.0f} ({chat['prompt_tokens'][k - 1]}; {again / kept:.1f}x)")
            say(f"| {label} | " + " | ".join(cells) + " |")
        say()

    if any("speculative" in results[label] for label in ours):
        say(f"Speculative decoding: batch 1, greedy, {SPECULATIVE_NEW} new tokens, decode tok/s = "
            f"{SPECULATIVE_NEW - 1} / (t({SPECULATIVE_NEW}) - t(1)), median of {args.split_repeats + 1} runs after "
            "a warm-up. Cost model: c = draft step / target step (their plain decode speeds), v = the target's "
            "(k + 1)-token pass / its one-token pass (timed alone), a = acceptance rate, tokens per round = "
            "(1 - a^(k+1)) / (1 - a), predicted speed-up = tokens per round / (k c + v). Where weight reads "
            "dominate, v is about 1; on 2 CPU cores the products of k + 1 rows are partly compute-bound.")
        say()
        say("| system | pair | target tok/s | draft tok/s (c) | k | v | acceptance | tok/s with draft | speed-up "
            "(predicted) | same tokens |")
        say("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
        for label in ours:
            for entry in results[label].get("speculative") or []:
                c = entry["target_tps"] / entry["draft_tps"]
                for k, row in entry["k"].items():
                    a = row["rate"]
                    per_round = (1 - a ** (int(k) + 1)) / (1 - a) if a < 1 else int(k) + 1
                    predicted = per_round / (int(k) * c + row["verify"])
                    say(f"| {label} | {entry['pair']} | {entry['target_tps']:.1f} | {entry['draft_tps']:.1f} "
                        f"({c:.2f}) | {k} | {row['verify']:.2f} | {a:.2f} | {row['tps']:.1f} | "
                        f"{row['tps'] / entry['target_tps']:.2f}x "
                        f"({predicted:.2f}x) | {row['identical']} |")
        say()

    loads = [f"{label} {results[label]['load_s']:.1f}" for label, _, _ in SYSTEMS
             if results.get(label) and "load_s" in results[label]]
    say("Load from the prepared weights (s; one process at a time, weights in the page cache; "
        "keras_gemma2 builds its variables as zeros before reading the checkpoint, keras-hub "
        "draws random ones first): " + ", ".join(loads))
    say()

    # Memory-bandwidth bound of batch-1 decode: every weight read once per token.
    bound = read_gbs * 1e9 / facts["weight_bytes"]
    reads = sorted(read for read, _ in samples)
    say(f"Memory bandwidth (measured here, once per round; median, range {reads[0]:.1f}-{reads[-1]:.1f}): "
        f"float32 matvec read {read_gbs:.1f} GB/s "
        f"(numpy copy, read+write: {copy_gbs:.1f} GB/s). Batch-1 decode bound = "
        f"{read_gbs:.1f} GB/s / {facts['weight_bytes'] / 1e6:.0f} MB per token = {bound:.1f} tok/s.")
    for label, _, backend in SYSTEMS:
        if summary[label]:
            speed = summary[label][1]["decode_tps"]
            say(f"- {label}: batch-1 decode {speed:.1f} tok/s = {speed / bound:.2f} of the bound")
    if summary.get(KERASHUB):
        # Every float32 weight is read once per batch-1 token, so no decode beats the bound.
        needed = 2 * summary[KERASHUB][1]["decode_tps"]
        say(f"- 2x keras-hub at batch 1 would be {needed:.1f} tok/s = {needed / bound:.2f} of the bound"
            + (" (above it: no float32 decode can reach it on this machine)" if needed > bound else ""))
    if ceiling:
        say(f"XLA weight-products loop (jax, default XLA options): a jitted {args.new}-step loop of only "
            "the weight products of a decode step (q, k, v, output, gate, up, down per layer and the "
            "vocabulary table; no attention, cache, sampling or soft-caps) runs at "
            + ", ".join(f"{ceiling[b]:.1f} tok/s at batch {b}" for b in BATCHES) + ".")
        for label, _, _ in SYSTEMS:
            if summary[label]:
                say(f"- {label}: " + ", ".join(
                    f"batch {b} {summary[label][b]['decode_tps'] / ceiling[b]:.2f}" for b in summary[label])
                    + " of that loop")
    kv = facts["kv_2b"]
    say(f"KV cache at {kv['context']} tokens, real gemma2_2b_en config ({kv['layers']} layers, window "
        f"{kv['window']}), bfloat16, batch 1: sliding ring cache {kv['sliding'] / 2**20:.0f} MiB vs "
        f"full-length {kv['full'] / 2**20:.0f} MiB, ratio {kv['sliding'] / kv['full']:.3f}")
    say()

    # Greedy agreement on the batch-8 generations (row 0 is the batch-1 prompt).
    reference = summary.get(TRANSFORMERS)
    if reference:
        say(f"Greedy agreement with transformers, batch 8 x {args.new} tokens "
            "(matching tokens; shortest matching prefix over rows):")
        for label, _, _ in SYSTEMS:
            if summary[label] and label != TRANSFORMERS and 8 in summary[label]:
                matching, total, prefix = agreement(summary[label][8]["tokens"], reference[8]["tokens"])
                verdict = "agree" if matching == total else "DIFFER"
                say(f"- {label}: {matching}/{total} ({verdict}); prefix {prefix}/{args.new}")
        distinct = [len(set(row)) for row in reference[8]["tokens"]]
        say(f"- (transformers' rows hold {min(distinct)}-{max(distinct)} distinct tokens out of {args.new})")
        batch1 = [summary[l][1]["tokens"][0] for l, kind, _ in SYSTEMS if summary[l] and kind in FLOAT32_KINDS]
        same = all(tokens == batch1[0] for tokens in batch1)
        say(f"- batch 1, all float32 Keras / transformers systems identical: {same}")
        for label, kind, _ in SYSTEMS:
            if summary[label] and kind not in FLOAT32_KINDS:
                matching, total, prefix = agreement([summary[label][1]["tokens"][0]], [reference[1]["tokens"][0]])
                say(f"- batch 1, {label}: {matching}/{total} tokens as transformers float32; prefix {prefix}/{args.new}")
    noisy = [f"{label} batch {b}: {summary[label][b]['spread']:.0%}"
             for label, _, _ in SYSTEMS if summary[label] for b in summary[label]
             if summary[label][b]["spread"] > 0.10]
    say("Noise (max/min - 1 of the timed N-token runs > 10%): " + ("; ".join(noisy) if noisy else "none"))
    say(f"Other processes' CPU use during the timed rounds: {foreign_rounds:.2f} of {os.cpu_count()} cores")
    say(f"Load average at end {' / '.join(f'{x:.2f}' for x in os.getloadavg())}; "
        f"total run {time.perf_counter() - started:.0f} s")

    path = BASELINE_RESULTS if args.baseline else RESULTS
    atomic_write(path, "\n".join(lines) + "\n")
    print(f"\nWrote {os.path.relpath(path, os.getcwd())}")


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--split-repeats", type=int, default=2,
                        help="runs of keras_gemma2's own prefill/decode split (median)")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=32, help="new tokens")
    parser.add_argument("--threads", default="auto",
                        help="CPUs per system: 'auto' = the cores other processes leave free "
                        "(sampled at start; oversubscribed torch slows down ~10x), or a number")
    parser.add_argument("--baseline", help="source tree of another revision to time alongside")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--weight-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--channel-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--kerashub-dir", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", help=argparse.SUPPRESS)
    parser.add_argument("--chat-tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--gguf", help=argparse.SUPPRESS)
    parser.add_argument("--raw-output", default=os.path.join(tempfile.gettempdir(), "gemma2-generate-raw.json"),
                        help="where the measurements are saved before rendering")
    parser.add_argument("--from-raw", help="render saved measurements (--raw-output of a run) instead of measuring")
    parser.add_argument("--no-llama", action="store_true", help="skip llama.cpp even if .venv-llama exists")
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.worker:
        arguments.threads = os.cpu_count() if arguments.threads == "auto" else int(arguments.threads)
        worker(arguments)
    else:
        main(arguments)
