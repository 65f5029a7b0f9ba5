"""Max |logit difference| against transformers (and keras-hub) on random tiny Gemma 2 models.

    python benchmarks/parity.py            # runs itself under jax, tensorflow and torch

Every weight is random (norm scales included); the transformers model writes a real checkpoint
that keras_gemma2.from_preset loads. Prints one markdown table.
"""

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = {
    "2B-style, window 4 < 24 tokens": "gemma2_tiny_test",
    "27B-style scalar 12 != head_dim 8, 1 kv head": "gemma2_tiny_27b_style_test",
}


def measure():
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import keras
    import numpy as np

    import keras_gemma2
    from reference import hf_logits, random_hf_model, save_hf_checkpoint

    results = {}
    for label, preset in CASES.items():
        config = keras_gemma2.Gemma2Config.from_preset(preset)
        reference = random_hf_model(config, seed=0)
        with tempfile.TemporaryDirectory() as directory:
            model = keras_gemma2.from_preset(save_hf_checkpoint(reference, directory + "/hf"))
        ids = np.random.default_rng(0).integers(0, config.vocabulary_size, (2, 24)).astype("int32")
        mask = np.ones_like(ids)
        mask[1, 17:] = 0
        ours = keras.ops.convert_to_numpy(model({"token_ids": ids, "padding_mask": mask}))
        expected = hf_logits(reference, ids, mask)
        valid = mask.astype(bool)
        results[label] = float(np.abs(ours[valid] - expected[valid]).max())
    print(json.dumps(results))


def main():
    rows = {}
    for backend in ("jax", "tensorflow", "torch"):
        output = subprocess.run(
            [sys.executable, __file__, "--measure"],
            env={**os.environ, "KERAS_BACKEND": backend},
            capture_output=True, text=True, check=True,
        ).stdout.strip().splitlines()[-1]
        rows[backend] = json.loads(output)
    print("| case | " + " | ".join(rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label in CASES:
        print(f"| {label} | " + " | ".join(f"{rows[b][label]:.1e}" for b in rows) + " |")


if __name__ == "__main__":
    measure() if "--measure" in sys.argv else main()
