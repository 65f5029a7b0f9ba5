"""`keras-gemma2` command line: presets, scoring, streaming generation and chat.

Exit status: 0 done; 1 an unexpected error (--debug or KERAS_GEMMA2_DEBUG=1
shows its traceback); 2 a rejected argument or input, or a failed file
operation (the message names the fix); 130 Ctrl-C; 141 the reader of stdout
went away (`keras-gemma2 generate ... | head -1`), the status a shell reports
for any command stopped that way (128 + SIGPIPE).
"""

import argparse
import errno
import json
import os
import sys
import time

import keras_gemma2
from keras_gemma2 import cli_startup
from keras_gemma2.edge import litertlm_engine
from keras_gemma2.edge import plan as export_plan
from keras_gemma2.edge.export import CHILD_OPTION, EMBEDDING_OPTION, STOP_IDS_OPTION, run_export_child
from keras_gemma2.io import atomic
from keras_gemma2.training import data, merging, offline_distillation, trainer
from keras_gemma2.training.distillation import Distiller
from keras_gemma2.version import __version__

EXIT_UNEXPECTED = 1
EXIT_REJECTED = 2
EXIT_INTERRUPTED = cli_startup.EXIT_INTERRUPTED
EXIT_PIPE_CLOSED = 141
DEBUG_VARIABLE = "KERAS_GEMMA2_DEBUG"


def _presets(args):
    for name, description in keras_gemma2.list_presets().items():
        print(f"{name:32s} {description}")


def _info(args):
    config = keras_gemma2.Gemma2Config.from_preset(args.preset)
    print(json.dumps({**config.to_dict(), "parameter_count": config.parameter_count()}, indent=2))


def _score(args):
    import numpy as np

    model = keras_gemma2.from_preset(args.preset, dtype=args.dtype, quantize=args.quantize)
    if model.tokenizer is None:
        raise ValueError(f"preset {args.preset!r} has no tokenizer; scoring text needs one.")
    for text in args.texts:
        ids = model.tokenizer(text)
        logprobs = model.score(np.array([ids], "int32"))[0]
        pieces = [model.tokenizer.id_to_piece(i) for i in ids[1:]]
        if args.verbose:
            for piece, lp in zip(pieces, logprobs):
                print(f"  {piece!r:>20s} {lp:9.4f}")
        total = float(logprobs.sum())
        perplexity = float(np.exp(-total / max(len(logprobs), 1)))
        # Flushed line by line: a Ctrl-C (which exits at once) keeps the lines already scored.
        print(json.dumps({"text": text, "tokens": len(ids), "log_prob": round(total, 4),
                          "perplexity": round(perplexity, 4)}), flush=True)


# The sampler the sampling flags imply when --sampler is not given, in this order.
_SAMPLER_FLAGS = (("top_p", "--top-p"), ("top_k", "--top-k"), ("min_p", "--min-p"),
                  ("temperature", "--temperature"))


def _choose_sampler(args):
    """--sampler, or the one the sampling flags ask for (said on stderr), else greedy.

    `--temperature 0.8` alone used to be silently greedy; the library now
    refuses sampling settings without a sampler, and the command picks the
    sampler they imply instead: --top-p -> top_p, --top-k -> top_k, --min-p
    -> min_p, --temperature alone -> temperature (each applies all the flags given).
    """
    if args.sampler is not None:
        return args.sampler
    for name, flag in _SAMPLER_FLAGS:
        if getattr(args, name) is not None:
            print(f"sampler: {name} (from {flag}; pass --sampler to choose another)",
                  file=sys.stderr, flush=True)
            return name
    return "greedy"


def _generation_kwargs(args):
    return {
        "max_new_tokens": args.max_new_tokens,
        "sampler": _choose_sampler(args),
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "seed": args.seed,
        "sliding_window_size": args.sliding_window_size,
    }


def _load_for_text(args):
    model = keras_gemma2.from_preset(args.preset, dtype=args.dtype, quantize=args.quantize)
    if model.tokenizer is None:
        raise ValueError(f"Preset {args.preset!r} has no tokenizer; text generation needs one.")
    return model


def _generate(args):
    options = _generation_kwargs(args)
    if args.num_draft_tokens is not None and args.draft is None:
        raise ValueError("--num-draft-tokens is for speculative decoding: give --draft PRESET too.")
    model = _load_for_text(args)
    if args.draft is not None:
        options["draft_model"] = keras_gemma2.from_preset(args.draft, dtype=args.dtype, quantize=args.quantize)
        options["num_draft_tokens"] = args.num_draft_tokens
    for piece in model.generate(args.prompt, stream=True, **options):
        print(piece, end="", flush=True)
    print()


def _export(args):
    if args.tensorflow_child:  # started by an export under JAX or PyTorch (edge/export.py)
        run_export_child(args.preset, args.path, args.format, args.quantization, args.cache_length,
                         args.prefill_lengths, args.stop_ids, args.embedding_quantization)
        return None  # the status main() returns: 0 (the path is not an exit status)
    progress = _ExportProgress()
    progress.note(f"loading {args.preset}")
    model = keras_gemma2.from_preset(args.preset, dtype="float32")
    # Unset lengths come from the model (export_lengths, as for the library's export()).
    cache_length, prefill_lengths = export_plan.export_lengths(
        model.config, args.cache_length, args.prefill_lengths
    )
    progress.note(f"cache length {cache_length}, prefill buckets {' '.join(map(str, prefill_lengths))}")
    path = keras_gemma2.export(
        model, args.path, format=args.format, quantization=args.quantization,
        cache_length=cache_length, prefill_lengths=prefill_lengths, progress=progress,
        embedding_quantization=args.embedding_quantization,
    )
    print(f"wrote {path}")


class _ExportProgress:
    """export's `progress(stage, step, steps)` on stderr: a bar of the steps done, the time so far."""

    WIDTH = 24

    def __init__(self):
        self._start = time.monotonic()

    def note(self, text):
        print(f"export: {text}", file=sys.stderr, flush=True)

    def __call__(self, stage, step, steps):
        filled = round(self.WIDTH * (step - 1) / steps)
        bar = "#" * filled + "." * (self.WIDTH - filled)
        print(f"export [{bar}] {step}/{steps} {stage} ({time.monotonic() - self._start:.0f} s)",
              file=sys.stderr, flush=True)


def _bundle_options(args):
    """The engine's sampling options from run/chat's flags (the ones it has)."""
    unused = [flag for flag, value in (("--dtype", getattr(args, "dtype", None)),
                                       ("--quantize", getattr(args, "quantize", None)),
                                       ("--min-p", getattr(args, "min_p", None)),
                                       ("--sliding-window-size", getattr(args, "sliding_window_size", None)))
              if value is not None]
    sampler = getattr(args, "sampler", None)
    if sampler not in (None, "greedy", "temperature", "top_k", "top_p"):
        unused.append(f"--sampler {sampler}")
    if unused:
        raise ValueError(f"{', '.join(unused)}: not available in the LiteRT-LM engine; drop them "
                         "(it samples with --temperature, --top-k, --top-p, --seed).")
    greedy = sampler == "greedy"
    return {"temperature": None if greedy else args.temperature, "top_k": None if greedy else args.top_k,
            "top_p": None if greedy else args.top_p, "seed": args.seed}


def _run_bundle(args):
    options = _bundle_options(args)
    engine = litertlm_engine.BundleEngine(args.bundle, threads=args.threads)
    try:
        for piece in engine.stream(args.prompt, max_new_tokens=args.max_new_tokens, **options):
            print(piece, end="", flush=True)
        print()
    finally:
        engine.close()


def _chat(args):
    if (args.bundle is None) == (args.preset is None):
        raise ValueError("chat needs a model: --preset NAME (Keras) or a .litertlm bundle path (LiteRT-LM), "
                         "not both.")
    if args.bundle is not None:
        return _chat_with_bundle(args)
    options = _generation_kwargs(args)
    model = _load_for_text(args)
    # The conversation keeps its KV cache: each turn prefills only the new message.
    conversation = model.start_chat(**options, on_overflow="drop_oldest")

    def reply(line):
        dropped = conversation.dropped_turns
        yield from conversation.send(line, stream=True)
        if conversation.dropped_turns > dropped:
            print(f"\n(dropped the {conversation.dropped_turns - dropped} oldest turn(s) to stay within the "
                  f"model's context of {model.config.max_sequence_length} tokens)", file=sys.stderr, flush=True)

    _chat_loop("Chat with Gemma 2.", reply, conversation.reset)


def _chat_with_bundle(args):
    options = _bundle_options(args)
    engine = litertlm_engine.BundleEngine(args.bundle, threads=args.threads)
    chats = [engine.start_chat(max_new_tokens=args.max_new_tokens, **options)]

    def reset():  # a new session: an empty cache
        chats.pop().close()
        chats.append(engine.start_chat(max_new_tokens=args.max_new_tokens, **options))

    def reply(line):
        yield from chats[-1].send(line)
        if chats[-1].cache_full:
            print(f"\n(the bundle's cache of {engine.cache_length} tokens is full: /reset to start over, or "
                  "export with a larger --cache-length)", file=sys.stderr, flush=True)

    try:
        _chat_loop("Chat with the LiteRT-LM engine.", reply, reset)
    finally:
        chats[-1].close()
        engine.close()


def _chat_loop(greeting, reply, reset):
    """Read lines until /exit or end of input; /reset starts over; stream each reply's pieces.

    A line refused before its reply starts (not UTF-8, too long for what is
    left of the context) is one `error:` line on stderr; the conversation goes on.
    """
    print(f"{greeting} /reset starts over, /exit (or Ctrl-D) quits.", flush=True)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as surrogates, line by line
        sys.stdin.reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        except UnicodeDecodeError as error:  # a strict stdin decoder
            _refuse_line(f"that line is not valid UTF-8 (byte {error.start + 1} of it); type it again")
            continue
        undecodable = next((i for i, c in enumerate(line) if "\udc80" <= c <= "\udcff"), None)
        if undecodable is not None:  # surrogateescape'd bytes: the line was not UTF-8
            _refuse_line(f"that line is not valid UTF-8 (character {undecodable + 1} of it); type it again")
            continue
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            reset()
            continue
        if not line.strip():
            continue
        pieces = reply(line)
        try:
            first = next(pieces, "")
        except ValueError as error:  # refused before any text: the conversation is as it was
            _refuse_line(_one_line(str(error)))
            continue
        print("model> " + first, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print(flush=True)


def _refuse_line(message):
    print(f"error: {message}", file=sys.stderr, flush=True)


def _merge(args):

    _check_new_preset_path(args.out, "--out")  # before reading any checkpoint
    if args.base is not None:
        if len(args.presets) != 1:
            raise ValueError("--base interpolates one preset toward a base; pass exactly one preset.")
        if args.weights is not None:
            raise ValueError("--weights is for averaging; with --base use --alpha (drop one of them).")
        _check_number(args.alpha, "--alpha", "e.g. --alpha 0.5; outside [0, 1] extrapolates")
        model = merging.interpolate(args.presets[0], args.base, args.alpha, dtype=args.dtype)
    else:
        weights = _parse_merge_weights(args.weights, len(args.presets))
        model = merging.average_checkpoints(args.presets, weights=weights, dtype=args.dtype)
    model.save_to_preset(args.out)
    print(f"wrote merged model to {args.out}")


def _parse_merge_weights(text, count):
    """--weights "0.5,0.3,0.2" -> floats, one per preset, finite and non-negative."""
    import math

    if text is None:
        return None
    example = ",".join(["1"] * count)
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(
            f"--weights must be comma-separated numbers, got {text!r} (e.g. --weights {example})"
        ) from None
    if len(weights) != count:
        raise ValueError(
            f"--weights has {len(weights)} values for {count} presets (pass one per preset, "
            f"e.g. --weights {example})"
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"--weights must be finite, non-negative and not all zero, got {text!r} "
            f"(e.g. --weights {example})"
        )
    return weights


def _check_number(value, option, fix, minimum=None, maximum=None, above=None):
    """A finite float option within its range, else ValueError '<option> ... (<fix>)'."""
    import math

    wrong = (not math.isfinite(value) or (minimum is not None and value < minimum)
             or (maximum is not None and value > maximum) or (above is not None and value <= above))
    if wrong:
        bounds = []
        if above is not None:
            bounds.append(f"> {above:g}")
        if minimum is not None:
            bounds.append(f">= {minimum:g}")
        if maximum is not None:
            bounds.append(f"<= {maximum:g}")
        needed = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
        raise ValueError(f"{option} must be {needed}, got {value:g} ({fix})")


def _check_count(value, option, fix, minimum=1):
    if value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}, got {value} ({fix})")


def _check_training_args(args):
    """Every number and combination of train/distill options, before any model is loaded."""
    _check_count(args.steps, "--steps", "the total number of training steps, e.g. --steps 1000")
    _check_count(args.batch_size, "--batch-size", "e.g. --batch-size 8")
    _check_count(args.sequence_length, "--sequence-length",
                 "tokens per example, at least 2 for one next-token target; e.g. --sequence-length 128",
                 minimum=2)
    _check_count(args.checkpoint_every, "--checkpoint-every", "steps between checkpoints, e.g. 100")
    _check_count(args.seed, "--seed", "e.g. --seed 0", minimum=0)
    _check_number(args.learning_rate, "--learning-rate", "e.g. --learning-rate 1e-4", above=0)
    for value, option in ((args.eval_every, "--eval-every"), (args.eval_batches, "--eval-batches")):
        if value is None:
            continue
        _check_count(value, option, "e.g. 100")
        if not args.eval_data:
            raise ValueError(f"{option} needs held-out text (add --eval-data FILE, or drop {option})")
    if args.eval_data is not None and not args.eval_data:
        raise ValueError("--eval-data needs at least one file (e.g. --eval-data held_out.txt)")
    if args.command == "distill":
        _check_number(args.temperature, "--temperature", "e.g. --temperature 1.0", above=0)
        _check_number(args.hard_label_weight, "--hard-label-weight", "a weight such as 0.1",
                      minimum=0, maximum=1)
        _check_count(args.top_k, "--top-k", "tokens kept per position, e.g. --top-k 64")
        if args.offline_store and (args.temperature != 1.0 or args.hard_label_weight != 0.0):
            raise ValueError(
                "--temperature and --hard-label-weight apply to online distillation only; the "
                "offline store's loss uses temperature 1 and no hard labels (drop them, or drop "
                "--offline-store)"
            )


def _check_new_preset_path(path, option):
    """A preset is written only to a new (or empty) folder: fail now, not after the work."""
    import os

    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(
            f"{option} {path} already exists and is not an empty folder (choose a new path or "
            "remove it; this is checked before any work so nothing is thrown away)"
        )
    atomic.check_writable_directory(path, option)


def _check_output_paths(args):
    """Every path a train/distill run writes, checked before the first step."""
    import importlib.util
    import os

    folders = {}
    if args.out:
        _check_new_preset_path(args.out, "--out")
        folders["--out"] = os.path.abspath(args.out)
    for option, path in (("--checkpoint-dir", args.checkpoint_dir),
                         ("--offline-store", getattr(args, "offline_store", None))):
        if path:
            folders[option] = atomic.check_writable_directory(path, option)
    names = list(folders)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            a, b = folders[first], folders[second]
            if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
                raise ValueError(
                    f"{first} {a} and {second} {b} overlap (give each its own folder)"
                )
    if args.plot:
        plot = atomic.check_writable_file(args.plot, "--plot")
        for option, folder in folders.items():
            if plot == folder:
                raise ValueError(f"--plot {plot} is also the {option} folder (choose another file)")
        if importlib.util.find_spec("matplotlib") is None:
            raise ValueError("--plot needs matplotlib (pip install matplotlib, or drop --plot)")


def _check_resume(args):
    """A checkpoint beyond --steps (steps are a total) is refused before any model is loaded."""

    saved = trainer.checkpoint_step(args.checkpoint_dir)
    if saved is not None and saved > args.steps:
        raise ValueError(
            f"--checkpoint-dir {args.checkpoint_dir} holds a checkpoint at step {saved}, beyond "
            f"--steps {args.steps} (--steps is the total: pass --steps {saved} or more to continue, "
            "or use a new --checkpoint-dir)"
        )


def _check_vocabulary(model, role, preset, tokenizer_path):
    """A tokenizer with more pieces than the model's embedding gives ids it cannot look up."""
    have, size = model.tokenizer.vocabulary_size, model.config.vocabulary_size
    if have > size:
        source = f"tokenizer {tokenizer_path}" if tokenizer_path else "its tokenizer"
        raise ValueError(
            f"the {role} {preset!r} has a {size}-token vocabulary but {source} has {have} pieces: "
            f"token ids >= {size} cannot be trained on (pass a --tokenizer with at most {size} "
            f"pieces, or a model/config whose vocabulary_size is at least {have})"
        )


def _model_with_tokenizer(preset, tokenizer_path, dtype, role="model", fallback=None):
    """A causal LM from a preset or a JSON config file, with a tokenizer attached."""
    import json
    import os

    if preset.endswith(".json") and os.path.isfile(preset):
        try:
            with open(preset) as f:
                config = keras_gemma2.Gemma2Config.from_dict(json.load(f))
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(
                f"the {role} config {preset} is not a valid Gemma 2 config ({type(error).__name__}: "
                f"{error}; write all of Gemma2Config's fields, e.g. from `keras-gemma2 info`)"
            ) from error
        model = keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(config, dtype=dtype))
    else:
        model = keras_gemma2.from_preset(preset, dtype=dtype)
    if tokenizer_path:
        model.tokenizer = keras_gemma2.Gemma2Tokenizer(tokenizer_path)
    if model.tokenizer is None:
        model.tokenizer = fallback
    if model.tokenizer is None:
        raise ValueError(f"The {role} {preset!r} has no tokenizer; pass --tokenizer PATH.")
    return model


def _run_training(args, model, student, batches=None, texts=None):

    if batches is None:
        batches = data.token_stream(student.tokenizer, texts or data.read_texts(args.data))
    eval_batches = None
    if args.eval_data:
        eval_stream = data.token_stream(student.tokenizer, data.read_texts(args.eval_data))
        eval_batches = data.evaluation_batches(eval_stream, args.batch_size, args.sequence_length,
                                               max_batches=args.eval_batches)
    if not args.out and not args.checkpoint_dir:
        print("note: neither --out nor --checkpoint-dir is given: the trained model will not be "
              "saved.", file=sys.stderr, flush=True)
    notice = "Ctrl-C: stopping after this step and saving what was trained (Ctrl-C again quits now)."
    try:
        with cli_startup.defer_interrupts(notice):
            history = trainer.train(
                model, batches, args.steps, args.batch_size, args.sequence_length,
                checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                eval_batches=eval_batches, eval_every=args.eval_every, seed=args.seed,
                stop_requested=cli_startup.stop_requested,
            )
    except trainer.TrainingStopped as stopped:  # Ctrl-C: keep what was trained, exit 130
        if stopped.checkpoint_dir:
            where = "run the same command to resume"
        else:
            where = _rescue(args, student)
        print(f"{stopped} ({where})", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except OSError as error:  # e.g. a full disk while checkpointing: keep what was trained
        raise RuntimeError(f"training stopped: {error}; {_rescue(args, student)}") from error
    _finish(args, student, history)


def _finish(args, student, history):
    """Save the model first, then the plot; if either fails the model still ends up on disk."""

    problems, saved = [], False
    if args.out:
        try:
            student.save_to_preset(args.out)
            saved = True
            print(f"wrote {args.out}", flush=True)
        except Exception as error:  # noqa: BLE001 - any failure here must not lose the model
            problems.append(f"saving --out {args.out} failed: {error}")
    if args.plot:
        try:
            trainer.plot_history(history, args.plot, title=f"keras-gemma2 {args.command}")
            print(f"wrote {args.plot}", flush=True)
        except Exception as error:  # noqa: BLE001
            problems.append(f"writing --plot {args.plot} failed: {error}")
    if problems:
        where = f"the trained model is saved in {args.out}" if saved else _rescue(args, student)
        raise RuntimeError(f"{'; '.join(problems)}; {where}")


def _rescue(args, student):
    """Save `student` to a new folder beside the checkpoint dir, --out, or in the temp dir; say where."""
    import os
    import tempfile
    import time

    parents = [os.path.dirname(os.path.abspath(p)) for p in (args.checkpoint_dir, args.out) if p]
    name = f"keras-gemma2-{args.command}-rescued-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for parent in [*parents, tempfile.gettempdir()]:
        path = os.path.join(parent, name)
        try:
            student.save_to_preset(path)
        except Exception:  # noqa: BLE001 - try the next place
            continue
        return f"the trained model was saved to {path} instead (load it from there, or move it)"
    if args.checkpoint_dir:
        return f"it could not be saved elsewhere either; the last checkpoint in {args.checkpoint_dir} holds it"
    return "it could not be saved anywhere else either"


def _train(args):
    import keras


    _check_training_args(args)
    _check_output_paths(args)
    _check_resume(args)
    texts = data.read_texts(args.data)
    model = _model_with_tokenizer(args.preset, args.tokenizer, args.dtype)
    _check_vocabulary(model, "model", args.preset, args.tokenizer)
    model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.01))
    return _run_training(args, model, model, texts=texts)


def _distill(args):
    import hashlib

    import keras


    _check_training_args(args)
    _check_output_paths(args)
    _check_resume(args)
    texts = data.read_texts(args.data)
    teacher = _model_with_tokenizer(args.teacher, args.tokenizer, args.dtype, role="teacher")
    _check_vocabulary(teacher, "teacher", args.teacher, args.tokenizer)
    # The student shares the teacher's tokenizer (distillation needs one vocabulary).
    student = _model_with_tokenizer(args.student, None, args.dtype, fallback=teacher.tokenizer)
    if student.config.vocabulary_size != teacher.config.vocabulary_size:
        raise ValueError(
            f"the teacher has a {teacher.config.vocabulary_size}-token vocabulary and the student "
            f"{student.config.vocabulary_size}: distillation compares distributions over one "
            "vocabulary (give the student the teacher's vocabulary_size)"
        )
    if student.tokenizer.proto_bytes != teacher.tokenizer.proto_bytes:
        raise ValueError(
            f"the student {args.student!r} has its own tokenizer, different from the teacher's: it "
            "would be trained on the teacher's token ids (use a student with the teacher's tokenizer, "
            "or one without a tokenizer, which then takes the teacher's)"
        )
    for role, model in (("teacher", teacher), ("student", student)):
        if args.sequence_length > model.config.max_sequence_length:
            raise ValueError(
                f"--sequence-length {args.sequence_length} exceeds the {role}'s max_sequence_length "
                f"{model.config.max_sequence_length} (pass --sequence-length "
                f"{model.config.max_sequence_length} or less)"
            )
    optimizer = keras.optimizers.AdamW(args.learning_rate, weight_decay=0.01)
    if args.offline_store:

        if args.top_k > teacher.config.vocabulary_size:
            raise ValueError(
                f"--top-k {args.top_k} exceeds the teacher's {teacher.config.vocabulary_size}-token "
                f"vocabulary (pass --top-k {teacher.config.vocabulary_size} or less)"
            )
        stream = data.token_stream(teacher.tokenizer, texts)
        sources = {
            "data files": [hashlib.sha256(text.encode("utf-8")).hexdigest() for text in texts],
            "tokenizer": hashlib.sha256(teacher.tokenizer.proto_bytes).hexdigest(),
        }
        offline_distillation.build_store(
            teacher, stream, args.offline_store, args.top_k, args.steps, args.batch_size,
            args.sequence_length, seed=args.seed, log=sys.stdout, sources=sources,
        )
        print()
        distiller = offline_distillation.OfflineDistiller(student, teacher.config.vocabulary_size)
        distiller.compile(optimizer=optimizer)
        return _run_training(args, distiller, student, offline_distillation.Store(args.offline_store))
    distiller = Distiller(teacher, student, temperature=args.temperature,
                          hard_label_weight=args.hard_label_weight)
    distiller.compile(optimizer=optimizer)
    return _run_training(args, distiller, student, texts=texts)


def _add_training_options(parser):
    parser.add_argument("--data", nargs="+", required=True, help="training text files")
    parser.add_argument("--eval-data", nargs="*", default=None,
                        help="held-out text files (default: none, no evaluation)")
    parser.add_argument("--steps", type=int, required=True,
                        help="total training steps (a resumed run continues up to it)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per step")
    parser.add_argument("--sequence-length", type=int, default=128, help="tokens per example")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW's learning rate")
    parser.add_argument("--checkpoint-dir", default=None,
                        help="keep crash-safe checkpoints here (default: none, no checkpoints)")
    parser.add_argument("--checkpoint-every", type=int, default=100,
                        help="steps between checkpoints in --checkpoint-dir")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="steps between evaluations (default: at the last step only)")
    parser.add_argument("--eval-batches", type=int, default=None,
                        help="held-out batches per evaluation (default: all of --eval-data)")
    parser.add_argument("--tokenizer", default=None,
                        help="SentencePiece model if the preset has none (default: the preset's)")
    parser.add_argument("--plot", default=None,
                        help="write the loss curve to this PNG (default: none, no plot)")
    parser.add_argument("--out", default=None,
                        help="save the trained model as a preset here (default: none, not saved)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for the order of the training examples")
    parser.add_argument("--dtype", default=None, help=_DTYPE_HELP)


_DTYPE_HELP = "float32, bfloat16, float16 or a mixed policy such as mixed_bfloat16 (default: float32)"
_QUANTIZE_HELP = "quantize the weights as they load, memory near the quantized size (default: none, float)"


def _add_generation_options(parser, preset_required=True):
    parser.add_argument("--preset", required=preset_required, default=None,
                        help="name, directory, kaggle:// or hf:// handle"
                             + ("" if preset_required else " (default: none; give it or a .litertlm)"))
    parser.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"], help=_QUANTIZE_HELP)
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="tokens to generate at most (fewer if a stop token comes)")
    parser.add_argument(
        "--sampler", default=None,
        help="greedy, temperature, top_k, top_p, min_p or beam (default: the one the sampling "
             "flags imply: --top-p top_p, --top-k top_k, --min-p min_p, --temperature alone "
             "temperature; greedy without them)",
    )
    parser.add_argument("--temperature", type=float, default=None,
                        help="divide the logits by this (default: 1.0 when sampling)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample among the k most likely tokens (default: off; 50 with --sampler top_k)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample from the smallest set reaching this probability "
                             "(default: off; 0.9 with --sampler top_p)")
    parser.add_argument("--min-p", type=float, default=None,
                        help="drop tokens below this fraction of the top one's probability "
                             "(default: off; 0.05 with --sampler min_p)")
    parser.add_argument("--seed", type=int, default=None,
                        help="random seed for sampling (default: none, a different draw each run)")
    parser.add_argument("--sliding-window-size", type=int, default=None,
                        help="inference-time window override, e.g. 2048 (default: the model's)")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help states its default ("(default: ...)") or says it is required."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.required:
            return text if "required" in text else f"{text} (required)".strip()
        if "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _add_global_options(parser, top_level):
    """--debug and --backend-logs, before or after the command name."""
    # A subcommand's default would overwrite the top-level value: SUPPRESS leaves it alone.
    default = False if top_level else argparse.SUPPRESS
    parser.add_argument(
        "--debug", action="store_true", default=default,
        help=f"on failure, raise with the full traceback instead of the one-line error "
             f"(or set {DEBUG_VARIABLE}=1) (default: off)",
    )
    parser.add_argument(
        cli_startup.SHOW_BACKEND_LOGS, action="store_true", default=default,
        help="show the TensorFlow/JAX/absl start-up and C++ logs the command hides; a "
             "TF_CPP_MIN_LOG_LEVEL of your own is always respected (default: off, hidden)",
    )


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-gemma2", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_global_options(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", required=True)

    class commands:  # every subcommand: the help formatter and the global options
        @staticmethod
        def add_parser(name, help):
            command = subparsers.add_parser(name, help=help, description=help,
                                            formatter_class=_HelpFormatter)
            _add_global_options(command, top_level=False)
            return command

    commands.add_parser("presets", help="list registered presets").set_defaults(run=_presets)

    info = commands.add_parser("info", help="architecture and parameter count of a preset")
    info.add_argument("--preset", required=True, help="name, directory, kaggle:// or hf:// handle")
    info.set_defaults(run=_info)

    score = commands.add_parser("score", help="log-probability and perplexity of texts")
    score.add_argument("--preset", required=True, help="name, directory, kaggle:// or hf:// handle")
    score.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    score.add_argument("--quantize", default=None, choices=["int8", "int4"], help=_QUANTIZE_HELP)
    score.add_argument("-v", "--verbose", action="store_true", help="print every token's log-prob")
    score.add_argument("texts", nargs="+")
    score.set_defaults(run=_score)

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text")
    _add_generation_options(generate)
    generate.add_argument("prompt")
    generate.add_argument("--draft", default=None,
                          help="speculative decoding: a smaller preset with the same tokenizer proposes "
                               "tokens that --preset checks, same output (default: none)")
    generate.add_argument("--num-draft-tokens", type=int, default=None,
                          help="tokens the draft proposes per pass of the model (default: 4 with --draft)")
    generate.set_defaults(run=_generate)

    chat = commands.add_parser(
        "chat", help="interactive multi-turn chat (instruction-tuned presets, or a .litertlm bundle)"
    )
    chat.add_argument("bundle", nargs="?", default=None,
                      help="a .litertlm to chat with in the LiteRT-LM engine, instead of --preset")
    _add_generation_options(chat, preset_required=False)
    chat.add_argument("--threads", type=int, default=None,
                      help="CPU threads of the LiteRT-LM engine (default: the engine's choice)")
    chat.set_defaults(run=_chat)

    run = commands.add_parser(
        "run", help="continue a prompt with a .litertlm bundle in LiteRT-LM, the phone runtime, streaming"
    )
    run.add_argument("bundle", help="a .litertlm written by export")
    run.add_argument("prompt")
    run.add_argument("--max-new-tokens", type=int, default=128,
                     help="tokens to generate at most (fewer if a stop token comes)")
    run.add_argument("--temperature", type=float, default=None,
                     help="sample at this temperature (default: greedy unless a sampling flag is given)")
    run.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: off)")
    run.add_argument("--top-p", type=float, default=None,
                     help="sample from the smallest set reaching this probability (default: off)")
    run.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: 0)")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads of the LiteRT-LM engine (default: the engine's choice)")
    run.set_defaults(run=_run_bundle)

    train = commands.add_parser("train", help="next-token training on text files")
    train.add_argument("--preset", required=True, help="preset, directory, or JSON config file")
    _add_training_options(train)
    train.set_defaults(run=_train)

    distill = commands.add_parser("distill", help="train a student on a teacher's distributions")
    distill.add_argument("--teacher", required=True, help="teacher preset or directory")
    distill.add_argument("--student", required=True, help="student preset, directory, or JSON config")
    distill.add_argument("--temperature", type=float, default=1.0,
                         help="softens both distributions before they are compared")
    distill.add_argument("--hard-label-weight", type=float, default=0.0,
                         help="weight of the next-token loss on the data, against the teacher's")
    distill.add_argument("--offline-store", default=None,
                         help="precompute the teacher's top-k to this folder, then train from it "
                              "(default: none, the teacher runs at every step)")
    distill.add_argument("--top-k", type=int, default=64, help="tokens kept per position offline")
    _add_training_options(distill)
    distill.set_defaults(run=_distill)

    export = commands.add_parser(
        "export", help="LiteRT-LM (.litertlm), LiteRT (.tflite) or SavedModel with prefill/decode signatures"
    )
    export.add_argument("--preset", required=True, help="name, directory, kaggle:// or hf:// handle")
    # Defaults and help texts: edge/plan.py's, the library export()'s.
    export.add_argument("path", help=export_plan.HELP["path"])
    export.add_argument("--format", default=export_plan.DEFAULT_FORMAT, help=export_plan.HELP["format"])
    export.add_argument("--quantization", default=export_plan.DEFAULT_QUANTIZATION,
                        help=export_plan.HELP["quantization"])
    export.add_argument("--cache-length", type=int, default=None, help=export_plan.HELP["cache_length"])
    export.add_argument("--prefill-lengths", type=int, nargs="+", default=None,
                        help=export_plan.HELP["prefill_lengths"])
    export.add_argument(EMBEDDING_OPTION, default=None, help=export_plan.HELP["embedding_quantization"])
    # Hidden: what only the TensorFlow child of an export under another backend needs.
    export.add_argument(CHILD_OPTION, action="store_true", help=argparse.SUPPRESS)
    export.add_argument(STOP_IDS_OPTION, type=int, nargs="*", default=None, help=argparse.SUPPRESS)
    export.set_defaults(run=_export)

    merge = commands.add_parser(
        "merge", help="average checkpoints of one architecture, or interpolate toward a base"
    )
    merge.add_argument("presets", nargs="+")
    merge.add_argument("--out", required=True, help="new preset directory (must not exist)")
    merge.add_argument("--weights", default=None,
                       help="comma-separated, one per preset, e.g. 0.5,0.3,0.2 (default: equal weights)")
    merge.add_argument("--base", default=None,
                       help="interpolate: base + alpha * (preset - base) (default: none, average)")
    merge.add_argument("--alpha", type=float, default=0.5, help="how far from --base toward the preset")
    merge.add_argument("--dtype", default=None, help=_DTYPE_HELP)
    merge.set_defaults(run=_merge)
    return parser


def main(argv=None):
    """Run one command; return its exit status (see the module docstring).

    `main()` (the `keras-gemma2` process) owns the process: Ctrl-C exits 130 at
    once and the backends' start-up logs are hidden (cli_startup; the package's
    import already did this for the console script). `main([...])` runs a
    command inside another program, such as the tests, and changes nothing
    process-wide. Every failure is one line on stderr, `error: <what> (<fix>)`,
    never a traceback, unless --debug or KERAS_GEMMA2_DEBUG=1 asks for one.
    """
    if argv is None:
        cli_startup.prepare(sys.argv[1:])
        cli_startup.imports_done()
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    if sys.stdout is None:  # started with stdout closed (`>&-`): print() would drop everything silently
        return _report(ValueError("standard output is closed, so nothing this command prints could be "
                                  "written: drop the >&-, or send it to a file or /dev/null"), args)
    try:
        status = args.run(args)  # None, or a command's own exit status (training stopped by Ctrl-C)
        sys.stdout.flush()  # a write that fails now (a full disk) is this command's failure too
    except BrokenPipeError as error:
        if not _stdout_closed():  # another pipe broke: a failure like any other
            if debug:
                raise
            return _report(error, args)
        # Whoever read stdout has gone (`| head -1`): stop quietly. Later writes, and the
        # interpreter's final flush, go to /dev/null instead of printing another BrokenPipeError.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE_CLOSED
    except Exception as error:  # noqa: BLE001 - every failure becomes one line
        if debug:
            raise
        return _report(error, args)
    return status or 0


def _stdout_closed():
    """Whether stdout is a pipe whose reader has gone (without poll(), assume so)."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (captured): not this pipe
        return False
    if not hasattr(select, "poll"):  # Windows
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(event & select.POLLERR for _, event in poller.poll(0))


# The fix for a failed file operation, by errno.
_ERRNO_FIXES = {
    errno.ENOSPC: "free some space on that disk, or write to another one",
    getattr(errno, "EDQUOT", -1): "free some of your disk quota, or write to another disk",
    errno.EROFS: "that file system is read-only: choose a path on a writable one",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path: part of it is a file, not a folder",
    errno.EISDIR: "give a file's path, not a folder's",
    errno.EEXIST: "choose a new path, or remove the existing one",
    errno.EPIPE: "a process it talked to went away",
}
_DEBUG_FIX = f"run with --debug or {DEBUG_VARIABLE}=1 to see the traceback"


def _report(error, args):
    """Print `error: <what> (<fix>)` on stderr; return the exit status."""
    status, message = _describe(error, args)
    try:
        print(f"error: {message}", file=sys.stderr, flush=True)
    except OSError:  # stderr itself is gone: the status still tells
        pass
    return status


def _describe(error, args):
    """(exit status, one line) for a failure."""
    text = _one_line(str(error))
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        what = error.strerror
        if error.filename is not None:
            what += f": {error.filename}"
            if error.filename2 is not None:
                what += f" -> {error.filename2}"
        else:  # e.g. a write() on a full disk names no file: name what this command writes
            outputs = [str(p) for p in (getattr(args, "out", None), getattr(args, "checkpoint_dir", None),
                                        getattr(args, "path", None)) if p]
            if outputs:
                what += f" (writing {', '.join(outputs)})"
        return EXIT_REJECTED, f"{what} ({_ERRNO_FIXES.get(error.errno, _DEBUG_FIX)})"
    if isinstance(error, (ValueError, OSError, ImportError, RuntimeError)) and text:
        # The library's messages name the argument and the fix.
        return EXIT_REJECTED, text
    what = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return EXIT_UNEXPECTED, f"unexpected {what} ({_DEBUG_FIX})"


def _one_line(text):
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} [{len(lines) - 1} more lines: run with --debug to see them]"


if __name__ == "__main__":
    sys.exit(main())
