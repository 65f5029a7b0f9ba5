"""Backbone and causal LM: dtypes, float16 safety, inputs, training, scoring, serialization."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_gemma2
from helpers import TINY, logits_of, tiny
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM
from keras_gemma2.model.layers import TiedEmbedding


def random_ids(shape, seed=0, vocabulary_size=TINY.vocabulary_size):
    return np.random.default_rng(seed).integers(0, vocabulary_size, shape).astype("int32")


# ---- dtypes ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "mixed_bfloat16", "mixed_float16"])
def test_dtype_policies(dtype):
    reference = tiny(dtype="float32")
    model = tiny(dtype=dtype)
    model.set_weights(reference.get_weights())
    policy = keras.dtype_policies.get(dtype)
    assert model.backbone.dtype_policy.name == policy.name
    for variable in model.backbone.weights:
        expected = policy.variable_dtype
        if dtype == "float16" and "feedforward/down" in variable.path:
            expected = "float32"  # kept wide: the gated product can pass float16's range
        assert variable.dtype == expected, variable.path
    token_ids = random_ids((2, 12))
    ours = logits_of(model, token_ids)
    exact = logits_of(reference, token_ids)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    tolerance = 1e-5 if dtype == "float32" else 0.25  # 8-bit (bf16) / 11-bit (f16) mantissas
    assert np.abs(ours - exact).max() <= tolerance


def scale_weights_for_huge_activations(model, factor):
    """Post-norm scales of `factor` make every sublayer add ~factor to the residual."""
    for variable in model.backbone.weights:
        if "/post_" in variable.path and variable.path.endswith("_norm/scale"):
            variable.assign(np.full(variable.shape, factor, "float32"))


def test_float16_stays_finite_where_activations_pass_its_range():
    """Gemma 2's float16 failure mode: residual stream and FFN products above 65504."""
    reference = tiny(dtype="float32")
    scale_weights_for_huge_activations(reference, 3e4)
    token_ids = random_ids((2, 16))

    # The test is meaningful only if float32 activations really exceed float16's range.
    last_block = reference.backbone.decoder_blocks[-1]
    probe = keras.Model(reference.backbone.input, last_block.output)
    residual = keras.ops.convert_to_numpy(
        probe({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
    )
    assert np.abs(residual).max() > np.finfo(np.float16).max

    exact = logits_of(reference, token_ids)
    results = {}
    for dtype in ("bfloat16", "float16", "mixed_float16"):
        model = tiny(dtype=dtype)
        model.set_weights(reference.get_weights())
        results[dtype] = logits_of(model, token_ids)
    assert np.isfinite(results["bfloat16"]).all()
    for dtype in ("float16", "mixed_float16"):
        assert np.isfinite(results[dtype]).all(), dtype
        # Same predictions as float32 almost everywhere, like bfloat16.
        agreement = (results[dtype].argmax(-1) == exact.argmax(-1)).mean()
        assert agreement >= (results["bfloat16"].argmax(-1) == exact.argmax(-1)).mean() - 0.1


def test_embedding_scale_is_cast_to_compute_dtype():
    # bfloat16 rounds sqrt(2304)=48 exactly, sqrt(3584)=59.866 to 59.75, sqrt(4608)=67.88 to 68.
    for hidden, expected in ((2304, 48.0), (3584, 59.75), (4608, 68.0)):
        layer = TiedEmbedding(4, hidden, 30.0, dtype="bfloat16")
        layer.build()
        layer.embeddings.assign(np.ones((4, hidden), "float32"))
        out = keras.ops.convert_to_numpy(keras.ops.cast(layer(np.array([[1]])), "float32"))
        assert out[0, 0, 0] == expected


def test_unknown_dtype_is_rejected():
    with pytest.raises(ValueError, match="Unknown dtype 'float8'"):
        Gemma2Backbone(TINY, dtype="float8")
    with pytest.raises(ValueError, match="Unknown dtype"):
        keras_gemma2.from_preset("gemma2_tiny_test", dtype="int4ish")


# ---- inputs -----------------------------------------------------------------
def test_token_ids_outside_vocabulary_are_rejected(tiny_model):
    model = tiny_model
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 128\); found \[128\]"):
        model({"token_ids": np.array([[1, 2, 128]])})
    with pytest.raises(ValueError, match=r"found \[-1\]"):
        model({"token_ids": np.array([[1, -1, 3]])})


def test_sequence_longer_than_max_is_rejected(tiny_model):
    model = tiny_model
    with pytest.raises(ValueError, match="Sequence length 65 exceeds the model's max_sequence_length 64"):
        model({"token_ids": np.ones((1, 65), "int32")})


def test_bad_input_shapes_are_rejected(tiny_model):
    model = tiny_model
    with pytest.raises(ValueError, match=r"Add a batch axis"):
        model({"token_ids": np.ones((5,), "int32")})
    with pytest.raises(ValueError, match="padding_mask` shape"):
        model({"token_ids": np.ones((1, 5), "int32"), "padding_mask": np.ones((1, 4), "int32")})
    with pytest.raises(ValueError, match="must be integers"):
        model({"token_ids": np.ones((1, 5), "float32")})
    with pytest.raises(ValueError, match="Expected inputs"):
        model({"ids": np.ones((1, 5), "int32")})


def test_missing_padding_mask_means_no_padding(tiny_model):
    model = tiny_model
    token_ids = random_ids((2, 9))
    np.testing.assert_array_equal(
        logits_of(model, token_ids), logits_of(model, token_ids, np.ones_like(token_ids))
    )


def test_right_padding_does_not_change_real_positions(tiny_model):
    model = tiny_model
    token_ids = random_ids((1, 10))
    padded = np.concatenate([token_ids, np.zeros((1, 5), "int32")], axis=1)
    mask = np.concatenate([np.ones((1, 10)), np.zeros((1, 5))], axis=1).astype("int32")
    np.testing.assert_allclose(
        logits_of(model, padded, mask)[:, :10], logits_of(model, token_ids), atol=1e-5
    )


def test_unsupported_backend_is_rejected():
    code = (
        "import keras_gemma2\n"
        "from keras_gemma2 import Gemma2Backbone, Gemma2Config\n"
        "Gemma2Backbone(Gemma2Config.from_preset('gemma2_tiny_test'))\n"
    )
    env = {**os.environ, "KERAS_BACKEND": "numpy"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "does not support KERAS_BACKEND='numpy'" in result.stderr
    assert "jax, tensorflow, torch" in result.stderr


# ---- training -----------------------------------------------------------------
def test_fit_trains_on_next_token_with_padding_masked():
    model = tiny()
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    token_ids = random_ids((8, 12), seed=3)
    padding_mask = np.ones_like(token_ids)
    padding_mask[4:, 9:] = 0
    x = {"token_ids": token_ids, "padding_mask": padding_mask}

    # The reported loss is next-token cross-entropy over non-padded targets only.
    logits = logits_of(model, token_ids, padding_mask)[:, :-1]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    target_lp = np.take_along_axis(log_probs, token_ids[:, 1:, None], -1)[..., 0]
    weights = padding_mask[:, 1:]
    expected = -(target_lp * weights).sum() / weights.sum()
    evaluated = model.evaluate(x, batch_size=8, verbose=0, return_dict=True)
    assert evaluated["loss"] == pytest.approx(expected, rel=1e-4)

    history = model.fit(x, batch_size=8, epochs=15, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert "accuracy" in history.history


# ---- scoring ----------------------------------------------------------------------
def test_score_returns_next_token_log_probs(tiny_model):
    model = tiny_model
    token_ids = random_ids((2, 10), seed=4)
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 6:] = 0
    scores = model.score(token_ids, padding_mask)
    assert scores.shape == (2, 9)
    logits = logits_of(model, token_ids, padding_mask).astype("float64")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = np.take_along_axis(log_probs[:, :-1], token_ids[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(scores[0], expected[0], atol=1e-4)
    np.testing.assert_allclose(scores[1, :5], expected[1, :5], atol=1e-4)
    assert (scores[1, 5:] == 0).all() and (scores[:, :5] < 0).all()


def test_score_text_with_tokenizer(tiny_text_preset):
    _, model = tiny_text_preset
    texts = ["def f(x): return x", "hello world, hello"]
    scores = model.score(texts)
    for text, row in zip(texts, scores):
        ids = model.tokenizer(text)
        assert ids[0] == model.tokenizer.bos_token_id
        expected = model.score(np.array([ids], "int32"))[0]
        np.testing.assert_allclose(row, expected, atol=1e-5)


# ---- serialization -------------------------------------------------------------------
def test_get_config_lists_every_constructor_argument():
    backbone = Gemma2Backbone(TINY, dtype="bfloat16", name="tiny")
    config = backbone.get_config()
    assert set(config) == {"config", "dtype", "name"}
    rebuilt = Gemma2Backbone.from_config(config)
    assert rebuilt.config == TINY and rebuilt.dtype_policy.name == "bfloat16" and rebuilt.name == "tiny"
    for layer in backbone.decoder_blocks[:1]:
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()


def test_keras_file_round_trip(tiny_model, tmp_path):
    model = tiny_model
    token_ids = random_ids((1, 8))
    path = str(tmp_path / "model.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, Gemma2CausalLM)
    np.testing.assert_array_equal(logits_of(restored, token_ids), logits_of(model, token_ids))


def test_summary_runs(tiny_model, capsys):
    tiny_model.summary()
    assert "gemma2_backbone" in capsys.readouterr().out
