"""Offline distillation: the teacher's top-k store, its resumption, and the truncated loss."""

import os

import keras
import numpy as np
import pytest

from helpers import randomize_weights
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config
from keras_gemma2.training import trainer
from keras_gemma2.training.distillation import Distiller
from keras_gemma2.training.offline_distillation import OfflineDistiller, Store, build_store

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): bad store requests are refused
# before any work.

TEACHER = Gemma2Config.from_preset("gemma2_tiny_test")
STUDENT = TEACHER.replace(num_layers=2, hidden_dim=16, intermediate_dim=24)
STREAM = np.random.default_rng(0).integers(4, 128, 3000).astype("int32")


def teacher_and_student():
    teacher = randomize_weights(Gemma2CausalLM(Gemma2Backbone(TEACHER)), seed=0)
    keras.utils.set_random_seed(1)
    return teacher, Gemma2CausalLM(Gemma2Backbone(STUDENT))


def test_full_k_store_gives_the_online_loss(tmp_path):
    teacher, student = teacher_and_student()
    directory = str(tmp_path / "store")
    build_store(teacher, STREAM, directory, k=TEACHER.vocabulary_size, num_batches=1,
                batch_size=3, sequence_length=12)
    batch = Store(directory)(0)
    offline = OfflineDistiller(student, chunk_size=5)
    offline.compile()
    online = Distiller(teacher, student, chunk_size=5)
    online.compile()
    ours = offline.evaluate(batch, batch_size=3, verbose=0, return_dict=True)["loss"]
    reference = online.evaluate(
        {"token_ids": batch["token_ids"], "padding_mask": batch["padding_mask"]},
        batch_size=3, verbose=0, return_dict=True,
    )["loss"]
    assert ours == pytest.approx(reference, rel=1e-4)


def test_top_k_store_renormalises_the_truncated_mass(tmp_path):
    teacher, student = teacher_and_student()
    directory = str(tmp_path / "store")
    build_store(teacher, STREAM, directory, k=4, num_batches=1, batch_size=2, sequence_length=10)
    batch = Store(directory)(0)
    assert batch["topk_ids"].shape == (2, 9, 4) and batch["topk_logprobs"].shape == (2, 9, 4)
    logits = keras.ops.convert_to_numpy(teacher({"token_ids": batch["token_ids"]}))[:, :-1].astype("float64")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_ids = np.argsort(-log_probs, axis=-1)[..., :4]
    np.testing.assert_array_equal(batch["topk_ids"], expected_ids)
    np.testing.assert_allclose(batch["topk_logprobs"], np.take_along_axis(log_probs, expected_ids, -1), atol=1e-4)

    offline = OfflineDistiller(student)
    offline.compile()
    loss = offline.evaluate(batch, batch_size=2, verbose=0, return_dict=True)["loss"]
    s = keras.ops.convert_to_numpy(student({"token_ids": batch["token_ids"]}))[:, :-1].astype("float64")
    s = s - np.log(np.exp(s).sum(-1, keepdims=True))
    p = np.exp(batch["topk_logprobs"]) / np.exp(batch["topk_logprobs"]).sum(-1, keepdims=True)
    expected = -(p * np.take_along_axis(s, expected_ids, -1)).sum(-1).mean()
    assert loss == pytest.approx(expected, rel=1e-4)


def test_store_resumes_and_training_from_it_learns(tmp_path):
    teacher, student = teacher_and_student()
    directory = str(tmp_path / "store")
    build_store(teacher, STREAM, directory, k=8, num_batches=3, batch_size=2, sequence_length=12)
    kept = os.path.join(directory, "batch_0000000.safetensors")
    before = os.stat(kept).st_mtime_ns
    reference = Store(directory)(1)
    os.remove(os.path.join(directory, "batch_0000001.safetensors"))
    with pytest.raises(FileNotFoundError, match="misses 1 of 3 batches"):
        Store(directory)
    build_store(teacher, STREAM, directory, k=8, num_batches=3, batch_size=2, sequence_length=12)
    assert os.stat(kept).st_mtime_ns == before  # complete shards are not recomputed
    for name, value in Store(directory)(1).items():
        np.testing.assert_allclose(value, reference[name], atol=1e-6)

    offline = OfflineDistiller(student)
    offline.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = trainer.train(offline, Store(directory), steps=24, batch_size=2, sequence_length=12,
                             log=open(os.devnull, "w"))
    losses = [r["loss"] for r in history]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


@pytest.mark.backend_agnostic
def test_bad_store_requests(tmp_path):
    teacher, student = teacher_and_student()
    directory = str(tmp_path / "store")
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 128\]"):
        build_store(teacher, STREAM, directory, k=129, num_batches=1, batch_size=2, sequence_length=8)
    with pytest.raises(ValueError, match="exceeds the teacher's max_sequence_length"):
        build_store(teacher, STREAM, directory, k=4, num_batches=1, batch_size=2, sequence_length=65)
    build_store(teacher, STREAM, directory, k=4, num_batches=1, batch_size=2, sequence_length=8)
    with pytest.raises(ValueError, match="built from other inputs .top-k: 4 there vs 5 now"):
        build_store(teacher, STREAM, directory, k=5, num_batches=1, batch_size=2, sequence_length=8)
    with pytest.raises(FileNotFoundError, match="not a teacher store"):
        Store(str(tmp_path))
    other = Gemma2CausalLM(Gemma2Backbone(STUDENT.replace(vocabulary_size=96)))
    with pytest.raises(ValueError, match="128-token vocabulary but the student has 96"):
        OfflineDistiller(other, vocabulary_size=128)


# ---- the manifest records what a store was built from -------------------------------------
def other_teacher(**changes):
    return randomize_weights(Gemma2CausalLM(Gemma2Backbone(TEACHER.replace(**changes))), seed=0)


STORE_MISMATCHES = [
    ({"k": 5}, r"top-k: 4 there vs 5 now"),
    ({"batch_size": 3}, r"batch size: 2 there vs 3 now"),
    ({"sequence_length": 10}, r"sequence length: 8 there vs 10 now"),
    ({"seed": 7}, r"seed: 0 there vs 7 now"),
    ({"stream": STREAM[::-1].copy()}, r"token stream \(other data files or tokenizer\): 3000 tokens, "
                                      r"sha256 \w+ there vs 3000 tokens, sha256 \w+ now"),
    ({"stream": STREAM[:2000]}, r"token stream .*3000 tokens.* vs 2000 tokens"),
    ({"teacher": "other weights"}, r"teacher weights: different"),
    ({"teacher": "other dtype"}, r"teacher weights: different"),
    ({"teacher": "other architecture"}, r"teacher num_layers: 3 there vs 2 now"),
    ({"sources": {"tokenizer": "def"}}, r"tokenizer: different"),
    ({"sources": {"data files": ["b"]}}, r"data files: different"),
]


@pytest.mark.parametrize("change, message", STORE_MISMATCHES)
def test_store_reused_with_other_inputs_names_what_differs(change, message, tmp_path):
    teacher, _ = teacher_and_student()
    directory = str(tmp_path / "store")
    settings = dict(k=4, num_batches=2, batch_size=2, sequence_length=8, seed=0,
                    sources={"tokenizer": "abc", "data files": ["a"]})
    build_store(teacher, STREAM, directory, **settings)
    before = {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in os.listdir(directory)}
    stream = change.pop("stream", STREAM)
    kind = change.pop("teacher", None)
    if kind == "other weights":
        teacher = randomize_weights(Gemma2CausalLM(Gemma2Backbone(TEACHER)), seed=1)
    elif kind == "other dtype":
        teacher = randomize_weights(Gemma2CausalLM(Gemma2Backbone(TEACHER, dtype="bfloat16")), seed=0)
    elif kind == "other architecture":
        teacher = other_teacher(num_layers=2)
    settings.update(change)
    with pytest.raises(ValueError, match=f"store .* was built from other inputs .*{message}.*"
                                         "Use a new store folder, or delete this one"):
        build_store(teacher, stream, directory, **settings)
    after = {name: os.stat(os.path.join(directory, name)).st_mtime_ns for name in os.listdir(directory)}
    assert after == before  # the store is left as it was


def test_same_inputs_resume_and_old_manifests_are_refused(tmp_path):
    teacher, _ = teacher_and_student()
    directory = str(tmp_path / "store")
    build_store(teacher, STREAM, directory, k=4, num_batches=2, batch_size=2, sequence_length=8,
                sources={"tokenizer": "abc"})
    os.remove(os.path.join(directory, "batch_0000001.safetensors"))
    # Same inputs (a library call recording no sources): resumes, keeps the recorded sources.
    manifest = build_store(teacher, STREAM, directory, k=4, num_batches=3, batch_size=2, sequence_length=8)
    assert manifest["num_batches"] == 3 and manifest["sources"] == {"tokenizer": "abc"}
    assert Store(directory).manifest["num_batches"] == 3
    # A manifest from before fingerprints were recorded cannot be trusted.
    import json

    path = os.path.join(directory, "manifest.json")
    old = {k: v for k, v in json.load(open(path)).items() if k not in ("data", "teacher_weights")}
    json.dump(old, open(path, "w"))
    with pytest.raises(ValueError, match=r"teacher weights: not recorded there .*token stream .*"
                                         r"not recorded there"):
        build_store(teacher, STREAM, directory, k=4, num_batches=3, batch_size=2, sequence_length=8)


def test_training_from_a_store_of_another_shape_is_refused(tmp_path):
    teacher, student = teacher_and_student()
    directory = str(tmp_path / "store")
    build_store(teacher, STREAM, directory, k=4, num_batches=1, batch_size=2, sequence_length=8)
    offline = OfflineDistiller(student)
    offline.compile()
    with pytest.raises(ValueError, match=r"store holds batches of batch_size=2, sequence_length=8 but "
                                         r"training asks for batch_size=3, sequence_length=8"):
        trainer.train(offline, Store(directory), steps=1, batch_size=3, sequence_length=8)


@pytest.mark.parametrize("name, value", [("num_batches", 0), ("batch_size", 0), ("sequence_length", 1),
                                         ("seed", -1)])
@pytest.mark.backend_agnostic
def test_store_numbers_are_checked(name, value, tmp_path):
    teacher, _ = teacher_and_student()
    settings = dict(k=4, num_batches=1, batch_size=2, sequence_length=8, seed=0)
    settings[name] = value
    with pytest.raises(ValueError, match=f"{name} must be an integer >= "):
        build_store(teacher, STREAM, str(tmp_path / "store"), **settings)
    assert not (tmp_path / "store").exists()
