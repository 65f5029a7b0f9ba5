"""Peak memory and step time: plain next-token training vs online vs offline distillation.

    KERAS_BACKEND=jax python benchmarks/distillation_memory.py

Each mode runs in its own process (peak RSS is per process) on the same random batch. The
vocabulary is large (32,000) so that [batch, seq, vocab] float32 logits dominate: one such tensor
is batch x seq x 32000 x 4 bytes. "online, unchunked" projects the whole sequence at once (the
memory a naive distillation loss needs); the default chunks 128 positions at a time.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

BATCH, SEQUENCE, VOCABULARY = 8, 512, 32000
TEACHER = dict(vocabulary_size=VOCABULARY, num_layers=4, hidden_dim=256, intermediate_dim=768,
               num_query_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
               sliding_window_size=128, max_sequence_length=1024)
STUDENT = dict(TEACHER, num_layers=2, hidden_dim=128, intermediate_dim=384, num_query_heads=2,
               num_key_value_heads=1)
MODES = ("plain next-token", "online distillation", "online, unchunked", "offline distillation (k=64)")


def run(mode, store):
    import keras
    import numpy as np

    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config
    from keras_gemma2.training.distillation import Distiller
    from keras_gemma2.training.offline_distillation import OfflineDistiller, Store, build_store

    keras.utils.set_random_seed(0)
    stream = np.random.default_rng(0).integers(4, VOCABULARY, 200_000).astype("int32")
    student = Gemma2CausalLM(Gemma2Backbone(Gemma2Config(**STUDENT)))
    if mode == "plain next-token":
        model = student
    elif mode.startswith("offline"):
        teacher = Gemma2CausalLM(Gemma2Backbone(Gemma2Config(**TEACHER)))
        build_store(teacher, stream, store, k=64, num_batches=1, batch_size=BATCH, sequence_length=SEQUENCE)
        del teacher
        model = OfflineDistiller(student)
    else:
        teacher = Gemma2CausalLM(Gemma2Backbone(Gemma2Config(**TEACHER)))
        chunk = SEQUENCE if "unchunked" in mode else 128
        model = Distiller(teacher, student, chunk_size=chunk)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    if mode.startswith("offline"):
        batch = Store(store)(0)
    else:
        ids = stream[: BATCH * SEQUENCE].reshape(BATCH, SEQUENCE)
        batch = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model.train_on_batch(batch)  # compile
    times = []
    for _ in range(3):
        began = time.perf_counter()
        model.train_on_batch(batch)
        times.append(time.perf_counter() - began)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step_s": sorted(times)[1], "peak_mb": peak / 1024, "before_mb": baseline / 1024}))


def main():
    logits_mb = BATCH * SEQUENCE * VOCABULARY * 4 / 2**20
    backend = os.environ.get("KERAS_BACKEND", "jax")
    print(f"command: KERAS_BACKEND={backend} python benchmarks/distillation_memory.py")
    print(f"batch {BATCH} x sequence {SEQUENCE} x vocabulary {VOCABULARY}: one float32 logits "
          f"tensor = {logits_mb:,.0f} MiB")
    print("| mode | step time (s) | peak RSS (MiB) | peak above model set-up (MiB) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as store:
        for mode in MODES:
            done = subprocess.run([sys.executable, __file__, mode, store], capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {mode} | failed: {done.stderr.strip().splitlines()[-1]} | | |")
                continue
            result = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {mode} | {result['step_s']:.2f} | {result['peak_mb']:,.0f} | "
                  f"{result['peak_mb'] - result['before_mb']:,.0f} |", flush=True)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2]) if len(sys.argv) == 3 else main()
