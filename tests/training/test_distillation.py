"""Distillation (paper section 3.2): the loss, training, and its bad inputs."""

import keras
import numpy as np
import pytest

from helpers import randomize_weights
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config
from keras_gemma2.training.distillation import Distiller

TEACHER = Gemma2Config.from_preset("gemma2_tiny_test")
# Shallower, narrower, different heads: only the vocabulary must match.
STUDENT = TEACHER.replace(num_layers=2, hidden_dim=24, intermediate_dim=32, num_query_heads=2,
                          num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8)


def models(seed=0):
    teacher = randomize_weights(Gemma2CausalLM(Gemma2Backbone(TEACHER)), seed=seed)
    student = Gemma2CausalLM(Gemma2Backbone(STUDENT))
    return teacher, student


def batch(seed=0):
    token_ids = np.random.default_rng(seed).integers(0, 128, (4, 11)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[2:, 7:] = 0
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def numpy_log_softmax(logits):
    logits = logits.astype("float64")
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def expected_loss(teacher, student, x, temperature, hard_weight):
    t = keras.ops.convert_to_numpy(teacher(x))[:, :-1]
    s = keras.ops.convert_to_numpy(student(x))[:, :-1]
    soft = -(np.exp(numpy_log_softmax(t / temperature)) * numpy_log_softmax(s / temperature)).sum(-1)
    hard = -np.take_along_axis(numpy_log_softmax(s), x["token_ids"][:, 1:, None], -1)[..., 0]
    per_token = (1 - hard_weight) * soft * temperature**2 + hard_weight * hard
    weights = x["padding_mask"][:, 1:]
    return (per_token * weights).sum() / weights.sum()


@pytest.mark.parametrize("temperature, hard_weight", [(1.0, 0.0), (2.0, 0.3), (1.0, 1.0)])
def test_loss_is_the_chunked_soft_cross_entropy(temperature, hard_weight):
    teacher, student = models()
    distiller = Distiller(teacher, student, temperature=temperature, hard_label_weight=hard_weight,
                          chunk_size=3)  # 10 target positions: chunks of 3, 3, 3, 1
    distiller.compile()
    x = batch()
    loss = distiller.evaluate(x, batch_size=4, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(expected_loss(teacher, student, x, temperature, hard_weight), rel=1e-4)


def test_hard_labels_only_is_next_token_cross_entropy():
    teacher, student = models()
    distiller = Distiller(teacher, student, hard_label_weight=1.0)
    distiller.compile()
    student.compile()
    x = batch()
    ours = distiller.evaluate(x, batch_size=4, verbose=0, return_dict=True)["loss"]
    plain = student.evaluate(x, batch_size=4, verbose=0, return_dict=True)["loss"]
    assert ours == pytest.approx(plain, rel=1e-4)


def test_fit_moves_the_student_to_the_teacher_and_leaves_the_teacher_alone():
    teacher, student = models()
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    distiller = Distiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.Adam(3e-3))
    x = batch(1)
    history = distiller.fit(x, batch_size=4, epochs=40, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] - 0.3
    for before, after in zip(teacher_weights, teacher.get_weights()):
        np.testing.assert_array_equal(before, after)
    assert not any(w.trainable for w in teacher.weights)


def test_bad_inputs():
    teacher, student = models()
    other_vocab = Gemma2CausalLM(Gemma2Backbone(STUDENT.replace(vocabulary_size=96)))
    with pytest.raises(ValueError, match=r"vocabularies differ \(128 vs 96 tokens\)"):
        Distiller(teacher, other_vocab)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Distiller(teacher, student, temperature=0)
    with pytest.raises(ValueError, match=r"hard_label_weight must be in \[0, 1\]"):
        Distiller(teacher, student, hard_label_weight=1.5)
    with pytest.raises(TypeError, match="must be a Gemma2CausalLM"):
        Distiller(teacher.backbone, student)
