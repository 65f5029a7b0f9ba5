"""`keras-gemma2` command line: inspect presets and score text."""

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
