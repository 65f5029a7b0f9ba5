"""Batch-1 decode's one-row products: the plain product's values, and (XLA) no copy of the kernel.

XLA:CPU keeps a one-row product fused (the kernel read once, cast in place) only
while the row is under 16 KiB; the real 2B's down projection (9216 inputs) and
any kernel cast from bfloat16 or int8 past that size were copied, transposed and
cast whole every step (layers.one_row_product). The kernels here are small in
rows and real in the sizes that decide the form.
"""

import re

import keras
import numpy as np
import pytest

from helpers import optimized_hlo
from keras_gemma2.model.layers import (
    FUSED_ROW_FEATURES, Projection, TiedEmbedding, column_blocks, has_column_blocks, one_row_chunks, one_row_product,
)

WIDE = FUSED_ROW_FEATURES + 905  # past the fused size: two chunks of 2500


def test_chunks_cover_the_features_below_the_fused_size():
    for features in (FUSED_ROW_FEATURES, WIDE, 9216, 14336, 36864):
        chunks = one_row_chunks(features)
        assert sum(width for _, width in chunks) == features
        assert [start for start, _ in chunks] == list(np.cumsum([0] + [w for _, w in chunks[:-1]]))
        assert max(width for _, width in chunks) <= FUSED_ROW_FEATURES
    assert one_row_chunks(9216) == [(0, 3072), (3072, 3072), (6144, 3072)]


@pytest.mark.parametrize("features", [64, WIDE])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_one_row_product_is_the_plain_product(features, dtype):
    rng = np.random.default_rng(0)
    row = rng.normal(size=(1, features)).astype("float32")
    codes = rng.integers(-127, 128, size=(8, features))
    kernel = codes.astype(dtype if dtype != "bfloat16" else "float32")
    kernel = keras.ops.cast(kernel, dtype)
    expected = row.astype("float64") @ codes.T.astype("float64")
    got = keras.ops.convert_to_numpy(one_row_product(keras.ops.convert_to_tensor(row), kernel))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    scale = rng.uniform(0.5, 2.0, size=(1, 8)).astype("float32")
    scaled = one_row_product(keras.ops.convert_to_tensor(row), kernel, keras.ops.convert_to_tensor(scale))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scaled), expected * scale, rtol=1e-5,
                               atol=1e-5 * np.abs(expected * scale).max())
    if has_column_blocks(kernel):  # the contiguous blocks a decode step reads: the same sums
        assert features == WIDE and dtype != "float32"
        for chunk_scale in (None, keras.ops.convert_to_tensor(scale)):
            blocked = one_row_product(keras.ops.convert_to_tensor(row), kernel, chunk_scale, column_blocks(kernel))
            plain = one_row_product(keras.ops.convert_to_tensor(row), kernel, chunk_scale)
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(blocked), keras.ops.convert_to_numpy(plain))


def largest_entry_buffer(text):
    """Elements of the largest array an instruction of the entry computation makes (parameters aside)."""
    entry = text[text.index("\nENTRY"):]
    entry = entry[: entry.index("\n}")]
    largest = 0
    for line in entry.splitlines()[1:]:
        if "parameter(" in line or "= (" in line:
            continue
        shape = re.search(r"= [a-z0-9]+\[([0-9,]*)\]", line)
        if shape and shape.group(1):
            largest = max(largest, int(np.prod([int(d) for d in shape.group(1).split(",")])))
    return largest


def kernel_copies(layer, x, kernel_elements, **kwargs):
    text = optimized_hlo(layer, keras.ops.convert_to_tensor(x), **kwargs)
    return largest_entry_buffer(text) >= kernel_elements, text


def test_column_blocks_are_the_chunks_made_contiguous():
    kernel = np.arange(3 * 9216).reshape(3, 9216)
    blocks = keras.ops.convert_to_numpy(column_blocks(keras.ops.convert_to_tensor(kernel)))
    assert blocks.shape == (3, 3, 3072) and blocks.flags.c_contiguous
    for index, (start, width) in enumerate(one_row_chunks(9216)):
        np.testing.assert_array_equal(blocks[index], kernel[:, start : start + width])
    assert not has_column_blocks(keras.ops.ones((3, 9216), "float32"))  # read whole, kernel first
    assert not has_column_blocks(keras.ops.ones((3, 2304), "bfloat16"))  # one chunk
    assert has_column_blocks(keras.ops.ones((3, 9216), "bfloat16"))


@pytest.mark.parametrize("features", [2304, 9216])
@pytest.mark.parametrize("mode", ["float32", "bfloat16", "int8"])
def test_one_row_projection_reads_its_kernel_in_place(features, mode):
    """The 2B's projections at their real input sizes (2304, and the down projection's 9216)."""
    layer = Projection.built("projection", 16, features, "bfloat16" if mode == "bfloat16" else "float32")
    if mode == "int8":
        layer.quantize("int8")
    x = np.random.default_rng(0).normal(size=(1, 1, features)).astype(layer.compute_dtype)
    copied, text = kernel_copies(layer, x, 16 * features)
    assert not copied, text
    if layer.reads_column_blocks():  # a decode step's form: the blocks read in place too
        assert features == 9216 and mode != "float32"
        blocks = column_blocks(layer.stored_kernel)
        copied, text = kernel_copies(layer, x, 16 * features, blocks=blocks)
        assert not copied and "3,16,3072" in text, text


@pytest.mark.parametrize("mode", ["float32", "int8"])
def test_one_row_logits_read_the_256k_table_in_place(mode):
    """The tied 256,000-row table is never copied, transposed or cast whole in a decode step."""
    table = TiedEmbedding(256000, 64, 30.0)
    table.build()
    if mode == "int8":
        table.quantize("int8")
    x = np.random.default_rng(0).normal(size=(1, 1, 64)).astype("float32")
    copied, text = kernel_copies(table, x, 256000 * 64 // 2, reverse=True)  # int8 codes: a float copy is 4x
    assert not copied, text
