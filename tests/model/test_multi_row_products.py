"""bfloat16 products of several rows (a prefill chunk, a decode batch).

XLA:CPU converts a bfloat16 kernel to float32 whole before a product asked for
a bfloat16 result, every call; asked for a float32 result, it reads the
bfloat16 kernel as stored, 2-5x faster (layers.rows_times_transposed).
"""

import keras
import numpy as np
import pytest

from helpers import optimized_hlo
from keras_gemma2 import backend
from keras_gemma2.model.layers import Projection


@pytest.mark.parametrize("rows", [(2, 40), (8, 1)])  # prefill's plain form; a decode batch's kernel-first one
def test_bfloat16_products_read_the_kernel_unconverted(rows):
    layer = Projection.built("projection", 16, 2304, "bfloat16")
    x = keras.ops.cast(np.random.default_rng(0).normal(size=rows + (2304,)), "bfloat16")
    exact = np.einsum("btd,fd->btf", np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")), np.float64),
                      np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(layer.kernel, "float32")), np.float64))
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32")), exact, rtol=2**-7, atol=1e-3)
    if backend.float32_result_products():
        text = optimized_hlo(layer, x)
        assert "f32[16,2304]" not in text, text  # no float32 copy of the kernel
