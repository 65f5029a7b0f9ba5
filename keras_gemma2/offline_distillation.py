"""Offline distillation: the teacher's top-k next-token distributions, precomputed to disk.

`build_store` runs the teacher once over the same reproducible batches that
training will draw (`data.batch_at`) and writes, per batch, a safetensors
shard with the token ids, padding mask and, for every position, the teacher's
k most likely next tokens and their log-probabilities. Shards are written
atomically, so an interrupted build resumes by skipping the shards present.

Truncated mass: the teacher distribution is restricted to its top k tokens
and renormalised over them, P'(x) = P(x) / sum_{top k} P. The student's
log-probabilities are over the full vocabulary, so the loss is
sum_{x in top k} -P'(x) log P_S(x); with k = vocabulary size it equals the
online loss exactly (a test checks that).
"""

import json
import os

import keras
import numpy as np
from keras import ops

from keras_gemma2.causal_lm import Gemma2CausalLM
from keras_gemma2.checkpoints import safetensors_io
from keras_gemma2.distillation import StudentTrainer
from keras_gemma2.data import batch_at
from keras_gemma2.files import atomic_write

MANIFEST = "manifest.json"


def _shard_path(directory, step):
    return os.path.join(directory, f"batch_{step:07d}.safetensors")


def build_store(teacher, stream, directory, k, num_batches, batch_size, sequence_length, seed=0, log=None):
    """Write (or complete) a store of `num_batches` batches; returns its manifest."""
    vocabulary = teacher.config.vocabulary_size
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocabulary:
        raise ValueError(f"k must be an integer in [1, {vocabulary}] (the vocabulary size), got {k!r}.")
    if sequence_length > teacher.config.max_sequence_length:
        raise ValueError(
            f"sequence length {sequence_length} exceeds the teacher's max_sequence_length "
            f"{teacher.config.max_sequence_length}."
        )
    manifest = {
        "k": k,
        "vocabulary_size": vocabulary,
        "batch_size": batch_size,
        "sequence_length": sequence_length,
        "seed": seed,
        "teacher_config": teacher.config.to_dict(),
        "num_batches": num_batches,
    }
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, MANIFEST)
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        same = {key: existing.get(key) for key in manifest if key != "num_batches"}
        if same != {key: value for key, value in manifest.items() if key != "num_batches"}:
            raise ValueError(
                f"{directory} holds a store built with other settings (k, batch, length, seed or "
                "teacher); use a new directory."
            )
        manifest["num_batches"] = max(num_batches, existing["num_batches"])
    with atomic_write(path, "w") as f:
        json.dump(manifest, f, indent=2)

    for step in range(num_batches):
        shard = _shard_path(directory, step)
        if os.path.exists(shard):
            continue  # written atomically, so complete
        batch = batch_at(stream, step, batch_size, sequence_length, seed)
        logits = teacher.predict_on_batch(batch)[:, :-1]
        log_probs = keras.ops.log_softmax(ops.convert_to_tensor(logits, "float32"), axis=-1)
        top_logprobs, top_ids = ops.top_k(log_probs, k, sorted=True)
        safetensors_io.write_file(shard, {
            "token_ids": batch["token_ids"].astype("int32"),
            "padding_mask": batch["padding_mask"].astype("int32"),
            "topk_ids": np.asarray(ops.convert_to_numpy(top_ids), "int32"),
            "topk_logprobs": np.asarray(ops.convert_to_numpy(top_logprobs), "float32"),
        })
        if log is not None:
            print(f"\rteacher store: {step + 1}/{num_batches}", end="", file=log, flush=True)
    return manifest


class Store:
    """Reads a store; `store(step)` is the batch for a training step (cycling over the shards)."""

    def __init__(self, directory):
        path = os.path.join(directory, MANIFEST)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} is not a teacher store (no {MANIFEST}).")
        with open(path) as f:
            self.manifest = json.load(f)
        self.directory = directory
        missing = [s for s in range(self.manifest["num_batches"]) if not os.path.exists(_shard_path(directory, s))]
        if missing:
            raise FileNotFoundError(
                f"{directory} misses {len(missing)} of {self.manifest['num_batches']} batches "
                f"(first: {missing[0]}); run build_store again to complete it."
            )

    def __call__(self, step):
        shard = safetensors_io.SafetensorsFile(_shard_path(self.directory, step % self.manifest["num_batches"]))
        return {name: np.array(shard.get(name)) for name in shard.keys()}


def truncated_soft_cross_entropy(student_logits, topk_ids, topk_logprobs):
    """Per position sum over the teacher's top k of -P'(x) log P_S(x), P' renormalised."""
    student = ops.log_softmax(ops.cast(student_logits, "float32"), axis=-1)
    chosen = ops.take_along_axis(student, ops.cast(topk_ids, "int32"), axis=-1)
    teacher = ops.softmax(ops.cast(topk_logprobs, "float32"), axis=-1)  # renormalise over top k
    return -ops.sum(teacher * chosen, axis=-1)


@keras.saving.register_keras_serializable(package="keras_gemma2")
class OfflineDistiller(StudentTrainer):
    """Trains a student Gemma2CausalLM on batches from a `Store` (no teacher in memory)."""

    def __init__(self, student, vocabulary_size=None, chunk_size=128, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(student, Gemma2CausalLM):
            raise TypeError(f"`student` must be a Gemma2CausalLM, got {type(student).__name__}.")
        if vocabulary_size is not None and vocabulary_size != student.config.vocabulary_size:
            raise ValueError(
                f"The store's teacher has a {vocabulary_size}-token vocabulary but the student has "
                f"{student.config.vocabulary_size}; they must share one tokenizer."
            )
        self.student = student
        self.chunk_size = chunk_size

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        def per_token(student_logits, start, stop):
            return truncated_soft_cross_entropy(
                student_logits, x["topk_ids"][:, start:stop], x["topk_logprobs"][:, start:stop]
            )

        return self.chunked_mean(x, y_pred, per_token, sample_weight)

    def get_config(self):
        return {
            "student": keras.saving.serialize_keras_object(self.student),
            "chunk_size": self.chunk_size,
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(config["student"])
        return cls(**config)
