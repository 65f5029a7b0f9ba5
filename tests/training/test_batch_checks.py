"""Training never loses the model: bad batches are refused before their step, and a failed
call leaves every weight as it was (Keras' JAX trainer detaches them while it trains)."""

import keras
import numpy as np
import pytest

from helpers import tiny
from keras_gemma2 import Gemma2Config
from keras_gemma2.training.distillation import Distiller

TINY = Gemma2Config.from_preset("gemma2_tiny_test")


def trainable(seed=0):
    """A fresh tiny model compiled with Adam: these tests train it."""
    model = tiny(seed=seed)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    return model


@pytest.fixture(scope="module")
def trained_model():
    """One compiled model the tests share (each rejected call must leave it as it was)."""
    model = trainable()
    model.fit(batch(), batch_size=4, epochs=1, verbose=0)
    return model


def batch(seed=0, rows=4, length=10):
    ids = np.random.default_rng(seed).integers(0, TINY.vocabulary_size, (rows, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


def weights(model):
    return [np.array(keras.ops.convert_to_numpy(v.value)) for v in model.weights]


def assert_same_weights(model, expected):
    for value, want in zip(weights(model), expected):
        np.testing.assert_array_equal(value, want)


def with_ids(x, row, column, value):
    ids = x["token_ids"].copy()
    ids[row, column] = value
    return {"token_ids": ids, "padding_mask": x["padding_mask"]}


BAD_BATCHES = {
    "id_at_vocabulary": (lambda x: with_ids(x, 1, 3, TINY.vocabulary_size), r"\[128\] in `token_ids`"),
    "negative_id": (lambda x: with_ids(x, 0, 0, -1), r"\[-1\] in `token_ids`"),
    "mask_shape": (
        lambda x: {"token_ids": x["token_ids"], "padding_mask": x["padding_mask"][:, :-1]},
        "`padding_mask` shape",
    ),
}


@pytest.mark.parametrize("bad", sorted(BAD_BATCHES))
def test_a_rejected_fit_after_a_good_one_leaves_the_model_working(bad, trained_model):
    make_bad, message = BAD_BATCHES[bad]
    model = trained_model
    model.fit(batch(), batch_size=4, epochs=1, verbose=0)
    trained = weights(model)
    with pytest.raises(ValueError, match=message):
        model.fit(make_bad(batch(1)), batch_size=4, verbose=0)
    assert_same_weights(model, trained)
    # Everything still runs (on JAX this raised "'NoneType' object is not callable").
    assert np.isfinite(model.score(batch(2)["token_ids"])).all()
    model.generate([[3, 4, 5]], max_new_tokens=2)
    model.fit(batch(3), batch_size=4, epochs=1, verbose=0)


@pytest.mark.parametrize("call", ["fit", "train_on_batch", "evaluate", "test_on_batch", "predict"])
def test_out_of_range_ids_are_refused_before_any_step(call, trained_model):
    model = trained_model
    before = weights(model)
    bad = with_ids(batch(), 2, 5, TINY.vocabulary_size + 7)
    with pytest.raises(ValueError, match=r"must lie in \[0, 128\); found \[135\] in `token_ids`"):
        getattr(model, call)(bad, **({"verbose": 0} if call in ("fit", "evaluate", "predict") else {}))
    assert_same_weights(model, before)


def test_explicit_labels_outside_the_vocabulary_are_refused(trained_model):
    x = batch()
    labels = x["token_ids"].copy()
    labels[0, 0] = TINY.vocabulary_size
    before = weights(trained_model)
    with pytest.raises(ValueError, match="in `labels \\(y\\)`"):
        trained_model.fit(x, labels, batch_size=4, verbose=0)
    assert_same_weights(trained_model, before)


def _stream_with_a_bad_second_batch():
    yield (batch(0),)
    yield (with_ids(batch(1), 0, 0, 999),)


class _PyDataset(keras.utils.PyDataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        return (batch(index),) if index == 0 else (with_ids(batch(1), 0, 0, 999),)


def _tf_dataset():
    tf = pytest.importorskip("tensorflow")
    good, bad = batch(0), with_ids(batch(1), 0, 0, 999)
    return tf.data.Dataset.from_tensor_slices(
        {k: np.concatenate([good[k], bad[k]]) for k in good}
    ).batch(4)


@pytest.mark.parametrize("source", ["generator", "py_dataset", "tf_dataset"])
def test_streamed_batches_are_checked_one_by_one(source, trained_model):
    model = trained_model
    data = {
        "generator": _stream_with_a_bad_second_batch,
        "py_dataset": _PyDataset,
        "tf_dataset": _tf_dataset,
    }[source]()
    with pytest.raises(Exception, match=r"found \[999\] in `token_ids`"):
        model.fit(data, epochs=1, verbose=0)
    # Keras may read batches ahead of their steps, so the good batch may or may not have
    # been trained on; the bad one never was, and the weights are all there.
    assert all(np.isfinite(value).all() for value in weights(model))
    assert np.isfinite(model.score(batch(2)["token_ids"])).all()


def test_distiller_refuses_out_of_range_ids():
    teacher, student = trainable(1), trainable(2)
    distiller = Distiller(teacher, student)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-3))
    before = weights(student)
    with pytest.raises(ValueError, match=r"found \[128\] in `token_ids`"):
        distiller.fit(with_ids(batch(), 0, 1, 128), batch_size=4, verbose=0)
    with pytest.raises(ValueError, match=r"found \[128\] in `token_ids`"):
        distiller.train_on_batch(with_ids(batch(), 0, 1, 128))
    assert_same_weights(student, before)
    distiller.fit(batch(), batch_size=4, verbose=0)  # still trains


class _FailingFirstStep(keras.callbacks.Callback):
    """Replaces the compiled step with one that fails, after Keras has taken the variables."""

    def on_train_begin(self, logs=None):
        def fail(*args, **kwargs):
            raise KeyboardInterrupt

        self.model.train_function = fail


def test_a_step_that_fails_gives_the_weights_back(trained_model):
    model = trained_model
    trained = weights(model)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.fit(batch(1), batch_size=4, epochs=1, verbose=0, callbacks=[_FailingFirstStep()])
    finally:
        model.train_function = None  # the next fit compiles the real step again
    assert all(v.value is not None for v in model.weights)
    assert_same_weights(model, trained)
    assert np.isfinite(model.score(batch(2)["token_ids"])).all()
    model.fit(batch(3), batch_size=4, epochs=1, verbose=0)  # and trains again
