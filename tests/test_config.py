"""Gemma2Config validation, presets and parameter counts."""

import keras
import pytest

import keras_gemma2
from keras_gemma2 import Gemma2Config

# Backend-agnostic: runs once, under conftest.AGNOSTIC_BACKEND (jax): configs, presets and parameter
# counts are plain Python (the built model only counts its variables).
pytestmark = pytest.mark.backend_agnostic

# From the Gemma 2 paper / model cards.
PAPER_SIZES = {
    # name: (layers, hidden, per-branch FFN, q heads, kv heads, head_dim, query_pre_attn_scalar, params)
    "gemma2_2b_en": (26, 2304, 9216, 8, 4, 256, 256, 2_614_341_888),
    "gemma2_9b_en": (42, 3584, 14336, 16, 8, 256, 256, 9_241_705_984),
    "gemma2_27b_en": (46, 4608, 36864, 32, 16, 128, 144, 27_227_128_320),
}


@pytest.mark.parametrize("name", list(PAPER_SIZES))
@pytest.mark.parametrize("instruct", [False, True])
def test_registered_architectures_match_the_paper(name, instruct):
    if instruct:
        name = name.replace("gemma2_", "gemma2_instruct_")
    layers, hidden, ffn, heads, kv_heads, head_dim, scalar, params = PAPER_SIZES[
        name.replace("instruct_", "")
    ]
    config = Gemma2Config.from_preset(name)
    assert (
        config.num_layers, config.hidden_dim, config.intermediate_dim, config.num_query_heads,
        config.num_key_value_heads, config.head_dim, config.query_pre_attn_scalar,
    ) == (layers, hidden, ffn, heads, kv_heads, head_dim, scalar)
    assert config.vocabulary_size == 256000
    assert config.sliding_window_size == 4096 and config.max_sequence_length == 8192
    assert config.attention_logit_soft_cap == 50 and config.final_logit_soft_cap == 30
    assert config.rope_max_wavelength == 10000 and config.layer_norm_epsilon == 1e-6
    assert config.parameter_count() == params


def test_parameter_count_matches_a_built_model():
    for name in ("gemma2_tiny_test", "gemma2_tiny_27b_style_test"):
        model = keras_gemma2.from_preset(name)
        assert model.count_params() == Gemma2Config.from_preset(name).parameter_count()


@pytest.mark.slow
def test_full_2b_builds_with_the_paper_parameter_count():
    model = keras_gemma2.from_preset("gemma2_2b_en", load_weights=False, dtype="bfloat16")
    assert model.count_params() == 2_614_341_888
    del model
    keras.backend.clear_session()


def test_list_presets():
    presets = keras_gemma2.list_presets()
    for name in (
        "gemma2_2b_en", "gemma2_instruct_2b_en", "gemma2_9b_en", "gemma2_instruct_9b_en",
        "gemma2_27b_en", "gemma2_instruct_27b_en", "gemma2_tiny_test",
    ):
        assert name in presets and presets[name]


def test_layer_pattern_even_layers_slide():
    config = Gemma2Config.from_preset("gemma2_2b_en")
    assert [config.is_sliding(i) for i in range(4)] == [True, False, True, False]
    backbone = keras_gemma2.from_preset("gemma2_tiny_test").backbone
    windows = [block.attention.sliding_window_size for block in backbone.decoder_blocks]
    assert windows == [4, None, 4]


def tiny(**changes):
    return Gemma2Config.from_preset("gemma2_tiny_test").replace(**changes)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_query_heads": 6, "num_key_value_heads": 4}, r"num_query_heads` \(6\) must be divisible"),
        ({"hidden_dim": 0}, "`hidden_dim` must be a positive integer"),
        ({"num_layers": -2}, "`num_layers` must be a positive integer"),
        ({"vocabulary_size": 12.5}, "`vocabulary_size` must be a positive integer"),
        ({"sliding_window_size": 65}, r"`sliding_window_size` \(65\) must not exceed `max_sequence_length` \(64\)"),
        ({"head_dim": 15}, "`head_dim` must be even"),
        ({"attention_logit_soft_cap": 0}, "`attention_logit_soft_cap` must be a positive number"),
        ({"query_pre_attn_scalar": -1}, "`query_pre_attn_scalar` must be a positive number"),
    ],
)
def test_invalid_configs_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


def test_config_round_trips_through_dict_and_json():
    import json

    config = Gemma2Config.from_preset("gemma2_27b_en")
    assert Gemma2Config.from_dict(config.to_dict()) == config
    assert Gemma2Config.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="Unknown Gemma2Config fields"):
        Gemma2Config.from_dict({**config.to_dict(), "rope_scaling": 2})
