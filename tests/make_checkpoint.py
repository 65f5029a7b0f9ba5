"""Write a tiny random Gemma 2 checkpoint in transformers format (with tokenizer) to a folder.

    python tests/make_checkpoint.py DIR

Used by demo.sh until an embedded trained demo model ships: the weights are
random, so the scores are those of an untrained model.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import train_test_sentencepiece  # noqa: E402
from reference import random_hf_model, save_hf_checkpoint  # noqa: E402

from keras_gemma2 import Gemma2Config  # noqa: E402


def main(directory):
    if os.path.exists(os.path.join(directory, "config.json")):
        print(f"{directory} already holds a checkpoint")
        return
    tokenizer = train_test_sentencepiece(os.path.join(directory + ".tokenizer", "tokenizer.model"))
    model = random_hf_model(Gemma2Config.from_preset("gemma2_tiny_test"), seed=0, scale=0.05)
    save_hf_checkpoint(model, directory, tokenizer_path=tokenizer)
    print(f"wrote a transformers Gemma 2 checkpoint to {directory}")


if __name__ == "__main__":
    main(sys.argv[1])
