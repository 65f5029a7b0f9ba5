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

import hashlib
import json
import os

import keras
import numpy as np
from keras import ops

from keras_gemma2.causal_lm import Gemma2CausalLM
from keras_gemma2.io import safetensors_files
from keras_gemma2.io.atomic import atomic_write
from keras_gemma2.training.data import batch_at
from keras_gemma2.training.distillation import StudentTrainer

MANIFEST = "manifest.json"


def _shard_path(directory, step):
    return os.path.join(directory, f"batch_{step:07d}.safetensors")


def _stream_fingerprint(stream):
    """sha256 of the token stream: catches other data files and other tokenizers alike."""
    stream = np.ascontiguousarray(stream, "int32")
    return {"tokens": int(stream.size), "sha256": hashlib.sha256(stream.tobytes()).hexdigest()}


def weights_fingerprint(model, samples=257):
    """sha256 over every weight's path, shape and `samples` evenly spaced values.

    The values are gathered on the device, so a 27B teacher is not copied to
    the host; a retrained or differently loaded teacher changes them.
    """
    digest = hashlib.sha256()
    for variable in sorted(model.weights, key=lambda v: v.path):
        size = int(np.prod(variable.shape))
        digest.update(f"{variable.path}:{tuple(variable.shape)}:{variable.dtype};".encode())
        if size == 0:
            continue
        indices = np.unique(np.linspace(0, size - 1, min(size, samples)).round().astype("int32"))
        values = ops.take(ops.reshape(variable.value, (-1,)), ops.convert_to_tensor(indices))
        digest.update(np.asarray(ops.convert_to_numpy(ops.cast(values, "float32"))).tobytes())
    return digest.hexdigest()


_FIELD_NAMES = {
    "k": "top-k",
    "vocabulary_size": "vocabulary size",
    "batch_size": "batch size",
    "sequence_length": "sequence length",
    "seed": "seed",
    "teacher_config": "teacher architecture",
    "teacher_weights": "teacher weights",
    "data": "token stream (other data files or tokenizer)",
}


def _describe(value):
    if isinstance(value, dict) and "sha256" in value:
        return f"{value.get('tokens')} tokens, sha256 {str(value['sha256'])[:12]}"
    return repr(value)


def _mismatch(existing, manifest, directory):
    """The fields of an existing store that differ from this build's, as one clear error.

    `sources` entries are compared only where both builds recorded them (a
    library call may record none); the token stream hash always is.
    """
    differences = []
    for key, value in manifest.items():
        old = existing.get(key)
        if key == "num_batches" or old == value:
            continue
        label = _FIELD_NAMES.get(key, key)
        if key == "sources":
            old = old if isinstance(old, dict) else {}
            differences += [f"{name}: different" for name in sorted(set(old) & set(value))
                            if old[name] != value[name]]
        elif old is None:
            differences.append(f"{label}: not recorded there (a store from an older version)")
        elif key == "teacher_config" and isinstance(old, dict):
            differences += [f"teacher {name}: {old.get(name)!r} there vs {value.get(name)!r} now"
                            for name in sorted(set(old) | set(value)) if old.get(name) != value.get(name)]
        elif key == "teacher_weights":
            differences.append(f"{label}: different (another checkpoint or dtype)")
        else:
            differences.append(f"{label}: {_describe(old)} there vs {_describe(value)} now")
    if differences:
        raise ValueError(
            f"The teacher store {directory} was built from other inputs ({'; '.join(differences)}); "
            "its batches would not match this run. Use a new store folder, or delete this one to "
            "rebuild it."
        )


def build_store(teacher, stream, directory, k, num_batches, batch_size, sequence_length, seed=0,
                log=None, sources=None):
    """Write (or complete) a store of `num_batches` batches; returns its manifest.

    The manifest records what the store is built from: the settings, the
    teacher's architecture and a fingerprint of its weights, a hash of the
    token stream, and `sources` (e.g. hashes of the data and tokenizer files,
    recorded to name what changed). Building into a folder whose manifest
    differs is an error; the same inputs resume a partly built store.
    """
    vocabulary = teacher.config.vocabulary_size
    for name, value, minimum in (("num_batches", num_batches, 1), ("batch_size", batch_size, 1),
                                 ("sequence_length", sequence_length, 2), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
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
        "teacher_weights": weights_fingerprint(teacher),
        "data": _stream_fingerprint(stream),
        "sources": dict(sources or {}),
        "num_batches": num_batches,
    }
    path = os.path.join(directory, MANIFEST)
    if os.path.exists(path):
        try:
            with open(path) as f:
                existing = json.load(f)
            previous = int(existing["num_batches"])
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f"The teacher store manifest {path} is damaged ({error}); delete {directory} "
                "to rebuild it, or use a new store folder."
            ) from error
        _mismatch(existing, manifest, directory)
        manifest["num_batches"] = max(num_batches, previous)
        if isinstance(existing.get("sources"), dict):  # keep what an earlier build recorded
            manifest["sources"] = {**existing["sources"], **manifest["sources"]}
    os.makedirs(directory, exist_ok=True)
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
        safetensors_files.write_file(shard, {
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
        shard = safetensors_files.SafetensorsFile(_shard_path(self.directory, step % self.manifest["num_batches"]))
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
