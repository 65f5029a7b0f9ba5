"""`keras-gemma2` command line: presets, scoring, streaming generation and chat."""

import argparse
import json
import sys


def _presets(args):
    from keras_gemma2 import list_presets

    for name, description in list_presets().items():
        print(f"{name:32s} {description}")


def _info(args):
    from keras_gemma2 import Gemma2Config

    config = Gemma2Config.from_preset(args.preset)
    print(json.dumps({**config.to_dict(), "parameter_count": config.parameter_count()}, indent=2))


def _score(args):
    import numpy as np

    import keras_gemma2

    model = keras_gemma2.from_preset(args.preset, dtype=args.dtype)
    if model.tokenizer is None:
        raise SystemExit(f"error: preset {args.preset!r} has no tokenizer; scoring text needs one.")
    for text in args.texts:
        ids = model.tokenizer(text)
        logprobs = model.score(np.array([ids], "int32"))[0]
        pieces = [model.tokenizer.id_to_piece(i) for i in ids[1:]]
        if args.verbose:
            for piece, lp in zip(pieces, logprobs):
                print(f"  {piece!r:>20s} {lp:9.4f}")
        total = float(logprobs.sum())
        perplexity = float(np.exp(-total / max(len(logprobs), 1)))
        print(json.dumps({"text": text, "tokens": len(ids), "log_prob": round(total, 4),
                          "perplexity": round(perplexity, 4)}))


def _generation_kwargs(args):
    return {
        "max_new_tokens": args.max_new_tokens,
        "sampler": args.sampler,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "seed": args.seed,
        "sliding_window_size": args.sliding_window_size,
    }


def _load_for_text(args):
    import keras_gemma2

    model = keras_gemma2.from_preset(args.preset, dtype=args.dtype)
    if model.tokenizer is None:
        raise ValueError(f"Preset {args.preset!r} has no tokenizer; text generation needs one.")
    return model


def _generate(args):
    model = _load_for_text(args)
    for piece in model.generate(args.prompt, stream=True, **_generation_kwargs(args)):
        print(piece, end="", flush=True)
    print()


def _export(args):
    import keras_gemma2

    model = keras_gemma2.from_preset(args.preset, dtype="float32")
    path = keras_gemma2.export(
        model, args.path, format=args.format, quantization=args.quantization,
        cache_length=args.cache_length, prefill_lengths=tuple(args.prefill_lengths),
    )
    print(f"wrote {path}")


def _chat(args):
    model = _load_for_text(args)
    messages = []
    print("Chat with Gemma 2. /reset starts over, /exit (or Ctrl-D) quits.", flush=True)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        print("model> ", end="", flush=True)
        reply = []
        for piece in model.generate(prompt, stream=True, **_generation_kwargs(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "model", "content": "".join(reply)})


def _merge(args):
    from keras_gemma2 import merging

    if args.base is not None:
        if len(args.presets) != 1:
            raise ValueError("--base interpolates one preset toward a base; pass exactly one preset.")
        model = merging.interpolate(args.presets[0], args.base, args.alpha, dtype=args.dtype)
    else:
        weights = [float(w) for w in args.weights.split(",")] if args.weights else None
        model = merging.average_checkpoints(args.presets, weights=weights, dtype=args.dtype)
    model.save_to_preset(args.out)
    print(f"wrote merged model to {args.out}")


def _model_with_tokenizer(preset, tokenizer_path, dtype, role="model", fallback=None):
    """A causal LM from a preset or a JSON config file, with a tokenizer attached."""
    import json
    import os

    import keras_gemma2

    if preset.endswith(".json") and os.path.isfile(preset):
        with open(preset) as f:
            config = keras_gemma2.Gemma2Config.from_dict(json.load(f))
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


def _run_training(args, model, student, batches=None):
    from keras_gemma2 import data, training

    if batches is None:
        batches = data.token_stream(student.tokenizer, data.read_texts(args.data))
    eval_batches = None
    if args.eval_data:
        eval_stream = data.token_stream(student.tokenizer, data.read_texts(args.eval_data))
        eval_batches = data.evaluation_batches(eval_stream, args.batch_size, args.sequence_length,
                                               max_batches=args.eval_batches)
    history = training.train(
        model, batches, args.steps, args.batch_size, args.sequence_length,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
        eval_batches=eval_batches, eval_every=args.eval_every, seed=args.seed or 0,
    )
    if args.plot:
        training.plot_history(history, args.plot, title=f"keras-gemma2 {args.command}")
        print(f"wrote {args.plot}")
    if args.out:
        student.save_to_preset(args.out)
        print(f"wrote {args.out}")


def _train(args):
    import keras

    model = _model_with_tokenizer(args.preset, args.tokenizer, args.dtype)
    model.compile(optimizer=keras.optimizers.AdamW(args.learning_rate, weight_decay=0.01))
    _run_training(args, model, model)


def _distill(args):
    import keras

    from keras_gemma2.distillation import Distiller

    teacher = _model_with_tokenizer(args.teacher, args.tokenizer, args.dtype, role="teacher")
    # The student shares the teacher's tokenizer (distillation needs one vocabulary).
    student = _model_with_tokenizer(args.student, None, args.dtype, fallback=teacher.tokenizer)
    optimizer = keras.optimizers.AdamW(args.learning_rate, weight_decay=0.01)
    if args.offline_store:
        from keras_gemma2 import data, offline_distillation

        stream = data.token_stream(teacher.tokenizer, data.read_texts(args.data))
        offline_distillation.build_store(
            teacher, stream, args.offline_store, args.top_k, args.steps, args.batch_size,
            args.sequence_length, seed=args.seed, log=sys.stdout,
        )
        print()
        distiller = offline_distillation.OfflineDistiller(student, teacher.config.vocabulary_size)
        distiller.compile(optimizer=optimizer)
        _run_training(args, distiller, student, offline_distillation.Store(args.offline_store))
        return
    distiller = Distiller(teacher, student, temperature=args.temperature,
                          hard_label_weight=args.hard_label_weight)
    distiller.compile(optimizer=optimizer)
    _run_training(args, distiller, student)


def _add_training_options(parser):
    parser.add_argument("--data", nargs="+", required=True, help="training text files")
    parser.add_argument("--eval-data", nargs="*", default=None, help="held-out text files")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--eval-batches", type=int, default=None)
    parser.add_argument("--tokenizer", default=None, help="SentencePiece model if the preset has none")
    parser.add_argument("--plot", default=None, help="write the loss curve to this PNG")
    parser.add_argument("--out", default=None, help="save the trained model as a preset here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None)


def _add_generation_options(parser):
    parser.add_argument("--preset", required=True, help="name, directory, kaggle:// or hf:// handle")
    parser.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16, ...")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sampler", default="greedy",
                        help="greedy, temperature, top_k, top_p, min_p or beam")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--sliding-window-size", type=int, default=None,
                        help="inference-time window override (e.g. 2048)")


def build_parser():
    parser = argparse.ArgumentParser(prog="keras-gemma2", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("presets", help="list registered presets").set_defaults(run=_presets)

    info = commands.add_parser("info", help="architecture and parameter count of a preset")
    info.add_argument("--preset", required=True)
    info.set_defaults(run=_info)

    score = commands.add_parser("score", help="log-probability and perplexity of texts")
    score.add_argument("--preset", required=True, help="name, directory, kaggle:// or hf:// handle")
    score.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16, ...")
    score.add_argument("-v", "--verbose", action="store_true", help="print every token's log-prob")
    score.add_argument("texts", nargs="+")
    score.set_defaults(run=_score)

    generate = commands.add_parser("generate", help="continue a prompt, streaming the text")
    _add_generation_options(generate)
    generate.add_argument("prompt")
    generate.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="interactive multi-turn chat (instruction-tuned presets)")
    _add_generation_options(chat)
    chat.set_defaults(run=_chat)

    train = commands.add_parser("train", help="next-token training on text files")
    train.add_argument("--preset", required=True, help="preset, directory, or JSON config file")
    _add_training_options(train)
    train.set_defaults(run=_train)

    distill = commands.add_parser("distill", help="train a student on a teacher's distributions")
    distill.add_argument("--teacher", required=True, help="teacher preset or directory")
    distill.add_argument("--student", required=True, help="student preset, directory, or JSON config")
    distill.add_argument("--temperature", type=float, default=1.0)
    distill.add_argument("--hard-label-weight", type=float, default=0.0)
    distill.add_argument("--offline-store", default=None,
                         help="precompute the teacher's top-k to this folder, then train from it")
    distill.add_argument("--top-k", type=int, default=64, help="tokens kept per position offline")
    _add_training_options(distill)
    distill.set_defaults(run=_distill)

    export = commands.add_parser(
        "export", help="LiteRT (.tflite) or SavedModel with prefill/decode signatures"
    )
    export.add_argument("--preset", required=True)
    export.add_argument("path", help="a .tflite file (litert) or a new directory (saved_model)")
    export.add_argument("--format", default="litert", help="litert (default) or saved_model")
    export.add_argument("--quantization", default=None, help="int8 or int4 (default: float32)")
    export.add_argument("--cache-length", type=int, default=1024)
    export.add_argument("--prefill-lengths", type=int, nargs="+", default=[32, 128, 512])
    export.set_defaults(run=_export)

    merge = commands.add_parser(
        "merge", help="average checkpoints of one architecture, or interpolate toward a base"
    )
    merge.add_argument("presets", nargs="+")
    merge.add_argument("--out", required=True, help="new preset directory (must not exist)")
    merge.add_argument("--weights", default=None, help="comma-separated, e.g. 0.5,0.3,0.2")
    merge.add_argument("--base", default=None, help="interpolate: base + alpha * (preset - base)")
    merge.add_argument("--alpha", type=float, default=0.5)
    merge.add_argument("--dtype", default=None)
    merge.set_defaults(run=_merge)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
