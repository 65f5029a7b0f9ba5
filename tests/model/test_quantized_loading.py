"""from_preset(..., quantize="int8" / "int4"): quantized while the checkpoint streams in.

The model it gives must be the one `from_preset(...)` then `model.quantize(mode)`
gives, byte for byte; the float model never exists (the embedding table is read
a slice of rows at a time). The memory this saves on the real 2B architecture is
measured by benchmarks/quantized_loading.py.
"""

import os

import keras
import numpy as np
import pytest

import keras_gemma2
from helpers import logits_of, randomize_weights
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config
from keras_gemma2.checkpoints.presets import read_checkpoint
from keras_gemma2.model import quantization
from keras_gemma2.model.layers import Projection, TiedEmbedding, weights_from_checkpoint

TINY = Gemma2Config.from_preset("gemma2_tiny_test")
MODES = ("int8", "int4")


def weights_of(model):
    return {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}


@pytest.fixture(scope="module")
def token_ids():
    return np.random.default_rng(0).integers(0, TINY.vocabulary_size, (1, 16)).astype("int32")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_same_model_as_load_then_quantize(tiny_text_preset, token_ids, mode, dtype):
    path, _ = tiny_text_preset
    reference = keras_gemma2.from_preset(path, dtype=dtype)
    reference.quantize(mode)
    streamed = keras_gemma2.from_preset(path, dtype=dtype, quantize=mode)

    assert quantization.quantization_modes(streamed.backbone) == [mode]
    config = lambda model: {**model.backbone.get_config(), "name": None}  # noqa: E731
    assert config(streamed) == config(reference)  # the same policies, saved alike
    expected, got = weights_of(reference), weights_of(streamed)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(logits_of(streamed, token_ids), logits_of(reference, token_ids))
    assert streamed.tokenizer is not None
    if (mode, dtype) != ("int8", "float32"):
        return  # generate once: the logits above are its whole input
    prompt = dict(max_new_tokens=3, stop_token_ids=())
    np.testing.assert_array_equal(
        streamed.generate([[2, 5, 9]], **prompt), reference.generate([[2, 5, 9]], **prompt)
    )


def rows_only(loader, requested):
    """`loader` that may only be read by row slices, recording them."""

    def whole():
        raise AssertionError("the whole tensor was read; only row slices should be")

    whole.read_rows = lambda start, stop: requested.append((start, stop)) or loader.read_rows(start, stop)
    whole.source_shape = loader.source_shape
    return whole


def assert_same_variables(layer, reference):
    assert [v.name for v in layer.weights] == [v.name for v in reference.weights]
    for variable, expected in zip(layer.weights, reference.weights):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable), keras.ops.convert_to_numpy(expected), err_msg=variable.path
        )


@pytest.mark.parametrize("mode", MODES)
def test_table_read_in_row_slices_gives_the_same_codes(tiny_text_preset, mode):
    """Row slices smaller than the table (several chunks) against TiedEmbedding.quantize on the whole."""
    path, model = tiny_text_preset
    _, tensors, _ = read_checkpoint(path, Gemma2Config)
    requested = []
    float_layer = TiedEmbedding(TINY.vocabulary_size, TINY.hidden_dim, 30.0, dtype="float32")
    float_layer.build()
    float_layer.embeddings.assign(model.backbone.token_embedding.embeddings.value)
    float_layer.quantize(mode)
    with weights_from_checkpoint(quantization=mode):
        layer = TiedEmbedding(TINY.vocabulary_size, TINY.hidden_dim, 30.0, dtype="float32")
        layer.build()
    loader = rows_only(tensors["token_embedding/embeddings"], requested)
    quantization.fill_quantized(layer, loader, ValueError, chunk_bytes=48 * TINY.hidden_dim * 4)
    assert requested == [(0, 48), (48, 96), (96, 128)]
    assert_same_variables(layer, float_layer)


@pytest.mark.parametrize("mode", MODES)
def test_projection_read_in_row_slices_gives_the_same_codes(tiny_text_preset, mode):
    """int8: slices of output rows, one Keras quantize each; int4 (Keras groups the flattened kernel): whole."""
    path, model = tiny_text_preset
    _, tensors, _ = read_checkpoint(path, Gemma2Config)
    name = "decoder_block_0/feedforward/gate"
    float_layer = model.backbone.get_layer("decoder_block_0").feedforward.gate
    with weights_from_checkpoint():
        reference = Projection.built("gate", float_layer.units, TINY.hidden_dim, "float32")
    reference.kernel.assign(float_layer.kernel.value)
    reference.quantize(mode)
    with weights_from_checkpoint(quantization=mode):
        layer = Projection.built("gate", float_layer.units, TINY.hidden_dim, "float32")
    requested = []
    quantization.fill_quantized(layer, rows_only(tensors[name + "/kernel"], requested), ValueError, chunk_bytes=16 * TINY.hidden_dim * 4)
    units = float_layer.units
    assert requested == ([(0, 16), (16, 32), (32, units)] if mode == "int8" else [(0, units)])
    assert_same_variables(layer, reference)


def test_streamed_model_saves_and_loads(tiny_text_preset, token_ids, tmp_path):
    path, _ = tiny_text_preset
    streamed = keras_gemma2.from_preset(path, quantize="int4")
    file = str(tmp_path / "int4.keras")
    streamed.save(file)
    loaded = keras.saving.load_model(file)
    np.testing.assert_array_equal(logits_of(loaded, token_ids), logits_of(streamed, token_ids))


def test_backbone_and_causal_lm_entry_points(tiny_text_preset):
    path, _ = tiny_text_preset
    backbone = Gemma2Backbone.from_preset(path, quantize="int8")
    model = Gemma2CausalLM.from_preset(path, quantize="int8")
    assert quantization.quantization_modes(backbone) == quantization.quantization_modes(model.backbone) == ["int8"]


def test_from_weights_names_a_bad_shape(tiny_text_preset):
    path, _ = tiny_text_preset
    _, tensors, _ = read_checkpoint(path, Gemma2Config)
    name = "decoder_block_0/feedforward/gate/kernel"
    tensors[name] = np.zeros((3, 3), "float32")
    expects = rf"expects \({TINY.intermediate_dim}, {TINY.hidden_dim}\)"
    with pytest.raises(ValueError, match=r"shape \(3, 3\).*" + expects + ".*gate/kernel"):
        Gemma2Backbone.from_weights(TINY, tensors, quantize="int8")
    tensors = dict(tensors)
    del tensors[name]
    with pytest.raises(ValueError, match="missing.*gate/kernel"):
        Gemma2Backbone.from_weights(TINY, tensors, quantize="int8")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantize": "int3"}, r"Unknown quantize='int3'.*'int8' or 'int4'"),
        ({"quantize": "int8", "load_weights": False}, r"load_weights=False.*model.quantize\('int8'\)"),
        ({"quantize": "int8", "dtype": "float16"}, "float16"),
        ({"quantize": "int4", "dtype": "int8_from_float32"}, "already a quantized policy"),
    ],
)
def test_bad_requests_fail_before_any_download(monkeypatch, kwargs, match):
    from keras_gemma2.checkpoints import download

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded before checking the arguments")

    monkeypatch.setattr(download, "fetch_any", no_download)
    monkeypatch.setattr(download, "fetch", no_download)
    with pytest.raises(ValueError, match=match):
        keras_gemma2.from_preset("gemma2_2b_en", **kwargs)


def test_safetensors_row_slices(tmp_path):
    import ml_dtypes

    from keras_gemma2.io.safetensors_files import SafetensorsFile, write_file

    table = np.arange(5 * 3, dtype="float32").reshape(5, 3).astype(ml_dtypes.bfloat16)
    file = os.path.join(tmp_path, "t.safetensors")
    write_file(file, {"a": np.ones(2, "float32"), "t": table})
    reader = SafetensorsFile(file)
    np.testing.assert_array_equal(reader.get("t", rows=(1, 3)), table[1:3])
    np.testing.assert_array_equal(reader.get("t", rows=(4, 9)), table[4:])  # clipped, as slicing is
    assert reader.get("t", rows=(5, 7)).shape == (0, 3)
    assert reader.get("t", rows=(2, 4)).dtype == table.dtype


def test_random_model_quantized_then_saved_loads_streamed_identically(tmp_path, token_ids):
    """A preset written in bfloat16 (as Kaggle ships), loaded into float32 while quantizing."""
    model = randomize_weights(Gemma2CausalLM(Gemma2Backbone(TINY, dtype="bfloat16")), seed=3)
    path = str(tmp_path / "bf16")
    model.save_to_preset(path)
    reference = Gemma2CausalLM.from_preset(path, dtype="float32")
    reference.quantize("int8")
    streamed = Gemma2CausalLM.from_preset(path, dtype="float32", quantize="int8")
    np.testing.assert_array_equal(logits_of(streamed, token_ids), logits_of(reference, token_ids))
