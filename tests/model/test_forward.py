"""The one cached forward: a chunk at any position of an existing cache matches the full forward."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_gemma2
from helpers import TINY, randomize_weights
from keras_gemma2.model import kv_cache
from keras_gemma2.model.kv_cache import CacheLayout
from keras_gemma2.model.layers import product_plan, rows_times_transposed

WINDOW = TINY.sliding_window_size  # 4
LENGTH = 14


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return randomize_weights(keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(TINY)))


@pytest.fixture(scope="module")
def sequences(model):
    """Two rows, the second left-padded by 3, and the full forward's logits of each real token."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, TINY.vocabulary_size, (2, LENGTH)).astype("int32")
    padding = np.array([0, 3], "int32")
    tokens[1, :3] = 0
    expected = np.zeros((2, LENGTH, TINY.vocabulary_size), "float32")
    for row in range(2):
        real = tokens[row, padding[row]:][None]
        expected[row, padding[row]:] = ops.convert_to_numpy(model(real))[0]
    return tokens, padding, expected


def run_in_chunks(model, layout, tokens, padding, chunks, tensor_index):
    """Logits of every index, fed chunk by chunk into one cache."""
    backbone = model.backbone
    caches = layout.new_caches(TINY, tokens.shape[0], "float32")
    logits, start = [], 0
    for length in chunks:
        index = np.arange(start, start + length, dtype="int32")
        positions = index[None, :] - padding[:, None]
        cache_index = ops.convert_to_tensor(np.int32(start)) if tensor_index else start
        hidden, caches = backbone.forward_pass(tokens[:, start:start + length], positions, caches, cache_index, layout)
        logits.append(ops.convert_to_numpy(backbone.logits(hidden)))
        start += length
    return np.concatenate(logits, axis=1)


@pytest.mark.parametrize("layout_name", ["window rings", "window + 3 rings", "full length"])
@pytest.mark.filterwarnings("ignore:You are using a softmax over axis -1")  # a 1-token chunk at index 0
@pytest.mark.parametrize("chunks", [[1, 1, 1, 1, 1, 3, 1, 5], [5, 1, 1, 7], [3, 9, 2]])
def test_chunks_at_any_position_match_the_full_forward(model, sequences, layout_name, chunks):
    tokens, padding, expected = sequences
    layout = {
        "window rings": CacheLayout.rings(TINY, LENGTH),
        "window + 3 rings": CacheLayout.rings(TINY, LENGTH, extra=3),
        "full length": CacheLayout.full(TINY, LENGTH),
    }[layout_name]
    for tensor_index in (False, True):  # a static start, and a traced one (the gather write)
        actual = run_in_chunks(model, layout, tokens, padding, chunks, tensor_index)
        for row in range(2):
            real = slice(padding[row], None)
            np.testing.assert_allclose(actual[row, real], expected[row, real], atol=2e-5, rtol=0)


def test_layouts_hold_what_they_say():
    assert CacheLayout.rings(TINY, 22).slots == (4, 22, 4)
    assert CacheLayout.rings(TINY, 22, extra=3).slots == (7, 22, 7)
    assert CacheLayout.rings(TINY, 3).slots == (3, 3, 3)
    full = CacheLayout.full(TINY, 22)
    assert full.slots == (22, 22, 22) and full.windows == (WINDOW, None, WINDOW)
    # A chunk of T needs window + T - 1 ring slots to be written before it is read.
    assert CacheLayout.rings(TINY, 22).writes_before_reading(0, 1)
    assert not CacheLayout.rings(TINY, 22).writes_before_reading(0, 2)
    assert CacheLayout.rings(TINY, 22, extra=3).writes_before_reading(0, 4)
    assert CacheLayout.rings(TINY, 22).writes_before_reading(1, 22)  # a global layer


def test_the_ring_rule():
    # After indices 0..9, slot s of 4 holds the latest t < 10 with t % 4 == s.
    assert list(kv_cache.held_indices(10, 4)) == [8, 9, 6, 7]
    assert list(kv_cache.held_indices(2, 4)) == [0, 1, -2, -1]  # negative: empty
    traced = ops.convert_to_numpy(kv_cache.held_indices(ops.convert_to_tensor(np.int32(10)), 4))
    assert traced.tolist() == [8, 9, 6, 7]
    fresh = np.arange(6, dtype="float32").reshape(1, 1, 6, 1)  # indices 7..12 into 4 slots
    cache = -np.ones((1, 1, 4, 1), "float32")
    for start in (7, ops.convert_to_tensor(np.int32(7))):
        written = ops.convert_to_numpy(kv_cache.write(cache, fresh, start))[0, 0, :, 0]
        assert written.tolist() == [5, 2, 3, 4]  # index 12 in slot 0, 9 in slot 1, ...


def test_a_full_length_cache_keeps_index_t_in_slot_t_and_drops_rows_past_its_end():
    """ring=False (CacheLayout.full): a chunk padded past the end never wraps onto slot 0."""
    fresh = 10 + np.arange(4, dtype="float32").reshape(1, 1, 4, 1)  # indices 4..7 into 6 slots
    cache = -np.ones((1, 1, 6, 1), "float32")
    for start in (4, ops.convert_to_tensor(np.int32(4))):
        written = ops.convert_to_numpy(kv_cache.write(cache, fresh, start, ring=False))[0, 0, :, 0]
        assert written.tolist() == [-1, -1, -1, -1, 10, 11]
    for start in (1, ops.convert_to_tensor(np.int32(1))):
        written = ops.convert_to_numpy(kv_cache.write(cache, fresh, start, ring=False))[0, 0, :, 0]
        assert written.tolist() == [-1, 10, 11, 12, 13, -1]


# ---- the shapes of a weight product ---------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(1, 1), (4, 1), (2, 5), (1, 40)])
def test_every_form_of_the_weight_product_is_inputs_times_kernel_transposed(shape, dtype):
    """One row (a 2-D product under XLA), a few positions (kernel first) and long chunks
    (the plain einsum) compute the same x @ W^T; export's plan changes only the form."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(*shape, 16)).astype("float32")
    kernel = rng.normal(size=(24, 16)).astype("float32")
    expected = np.einsum("btd,fd->btf", x, kernel)
    tolerance = 1e-5 if dtype == "float32" else 5e-2

    def product():
        out = rows_times_transposed(ops.cast(x, dtype), ops.cast(kernel, dtype))
        assert tuple(out.shape) == (*shape, 24)
        return ops.convert_to_numpy(ops.cast(out, "float32"))

    np.testing.assert_allclose(product(), expected, rtol=tolerance, atol=tolerance * 4)
    with product_plan(kernel_first_positions=1, one_row=False):
        np.testing.assert_allclose(product(), expected, rtol=tolerance, atol=tolerance * 4)
