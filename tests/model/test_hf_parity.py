"""Logits parity with transformers' Gemma2ForCausalLM, through the real loading path.

Each test writes a transformers checkpoint to disk (save_pretrained) and loads
it with `keras_gemma2.from_preset(path)`; this runs under every KERAS_BACKEND.
"""

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import Gemma2Config
from reference import hf_logits, random_hf_model, save_hf_checkpoint

TINY = Gemma2Config.from_preset("gemma2_tiny_test")

TOLERANCE = 1e-4

CONFIGS = {
    # GQA, window 4 much shorter than the 24-token test sequences.
    "gqa_window_shorter_than_sequence": TINY,
    # 27B-style: query_pre_attn_scalar = hidden/heads (12) != head_dim (8); one kv head.
    "27b_style_scalar_one_kv_head": Gemma2Config(
        vocabulary_size=128, num_layers=4, hidden_dim=48, intermediate_dim=64,
        num_query_heads=4, num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=12,
        sliding_window_size=5, max_sequence_length=64,
    ),
    # Multi-head (kv heads == query heads), window 1 (each query sees only itself on sliding layers).
    "mha_window_one": Gemma2Config(
        vocabulary_size=96, num_layers=2, hidden_dim=32, intermediate_dim=40,
        num_query_heads=2, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        sliding_window_size=1, max_sequence_length=32,
    ),
}


def load_from_disk(tmp_path, config, seed=0):
    reference = random_hf_model(config, seed=seed)
    directory = save_hf_checkpoint(reference, str(tmp_path / "hf"))
    return reference, keras_gemma2.from_preset(directory)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    config = CONFIGS[name]
    reference, model = load_from_disk(tmp_path, config)
    token_ids = np.random.default_rng(1).integers(0, config.vocabulary_size, (2, 24)).astype("int32")
    expected = hf_logits(reference, token_ids)
    actual = keras.ops.convert_to_numpy(model({"token_ids": token_ids}))
    assert actual.dtype == np.float32
    assert np.abs(actual - expected).max() <= TOLERANCE
    # The final soft-cap is applied: |logit| < 30.
    assert np.abs(actual).max() < config.final_logit_soft_cap


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_matches_transformers(tmp_path, side):
    reference, model = load_from_disk(tmp_path, TINY, seed=3)
    rng = np.random.default_rng(2)
    token_ids = rng.integers(0, TINY.vocabulary_size, (3, 20)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    lengths = [20, 13, 6]
    for row, length in enumerate(lengths):
        pad = slice(length, None) if side == "right" else slice(0, 20 - length)
        padding_mask[row, pad] = 0
        token_ids[row, pad] = 0
    expected = hf_logits(reference, token_ids, padding_mask)
    actual = keras.ops.convert_to_numpy(
        model({"token_ids": token_ids, "padding_mask": padding_mask})
    )
    valid = padding_mask.astype(bool)
    assert np.isfinite(actual).all()  # padded query rows must not be NaN
    assert np.abs(actual[valid] - expected[valid]).max() <= TOLERANCE


def test_sliding_window_changes_logits_past_the_window(tmp_path):
    """A test that would fail if the window were ignored or off by one."""
    reference, model = load_from_disk(tmp_path, TINY, seed=4)
    token_ids = np.random.default_rng(5).integers(0, 128, (1, 16)).astype("int32")
    ours = keras.ops.convert_to_numpy(model({"token_ids": token_ids}))
    for window in (TINY.sliding_window_size - 1, TINY.sliding_window_size + 1):
        shifted = keras_gemma2.Gemma2CausalLM(
            keras_gemma2.Gemma2Backbone(TINY.replace(sliding_window_size=window))
        )
        shifted.set_weights(model.get_weights())
        other = keras.ops.convert_to_numpy(shifted({"token_ids": token_ids}))
        # Identical inside the first window, different once the window matters.
        first = min(window, TINY.sliding_window_size)
        assert np.abs(other[:, :first] - ours[:, :first]).max() <= TOLERANCE
        assert np.abs(other[:, first + 1 :] - ours[:, first + 1 :]).max() > 1e-3
    assert np.abs(ours - hf_logits(reference, token_ids)).max() <= TOLERANCE


def test_sharded_checkpoint_and_tokenizer(tmp_path, sentencepiece_path):
    reference = random_hf_model(TINY, seed=6)
    directory = save_hf_checkpoint(
        reference, str(tmp_path / "hf"), tokenizer_path=sentencepiece_path, max_shard_size="20KB"
    )
    import os

    assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    model = keras_gemma2.from_preset(directory)
    assert model.tokenizer is not None
    token_ids = np.array([model.tokenizer("def add(a, b): return a + b")], dtype="int32")
    expected = hf_logits(reference, token_ids)
    actual = keras.ops.convert_to_numpy(model({"token_ids": token_ids}))
    assert np.abs(actual - expected).max() <= TOLERANCE
