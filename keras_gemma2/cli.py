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
