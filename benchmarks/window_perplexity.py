"""Perplexity on held-out text at several inference-time sliding windows, same weights.

    python benchmarks/window_perplexity.py --preset PRESET --text FILE [--windows 4096,2048,1024]
        [--context 8192]

Paper Table 10 (9B): 1.63 / 1.63 / 1.64 at windows 4096 / 2048 / 1024. The text is split into
chunks of `--context` tokens (BOS first); each chunk is scored by the full forward with the
window overridden (`from_preset(..., sliding_window_size=W)`), and token log-probs are pooled.
"""

import argparse
import math
import time

import numpy as np


def perplexity(model, token_ids, context):
    total, count = 0.0, 0
    bos = model.tokenizer.bos_token_id
    step = context - 1
    for start in range(0, len(token_ids), step):
        chunk = [bos] + token_ids[start : start + step]
        if len(chunk) < 2:
            break
        logprobs = model.score(np.array([chunk], "int32"))[0]
        total += float(logprobs.sum())
        count += len(logprobs)
    return math.exp(-total / count), count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--text", required=True, help="a held-out text file")
    parser.add_argument("--windows", default="4096,2048,1024")
    parser.add_argument("--context", type=int, default=None, help="tokens per scored chunk (default: model max)")
    parser.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens")
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args(argv)

    import keras_gemma2

    text = open(args.text, encoding="utf-8").read()
    windows = [int(w) for w in args.windows.split(",")]
    print(f"command: python benchmarks/window_perplexity.py --preset {args.preset} --text {args.text} "
          f"--windows {args.windows}" + (f" --context {args.context}" if args.context else ""))
    print("| window | perplexity | tokens scored | seconds |")
    print("|---|---|---|---|")
    for window in windows:
        model = keras_gemma2.from_preset(args.preset, dtype=args.dtype, sliding_window_size=window)
        token_ids = model.tokenizer(text, add_bos=False)[: args.max_tokens]
        context = args.context or model.config.max_sequence_length
        began = time.time()
        value, count = perplexity(model, token_ids, context)
        print(f"| {window} | {value:.4f} | {count} | {time.time() - began:.1f} |", flush=True)


if __name__ == "__main__":
    main()
