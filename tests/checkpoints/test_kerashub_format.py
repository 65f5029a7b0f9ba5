"""KerasHub presets: keras-hub itself writes them, keras_gemma2 loads them.

The presets here are real keras-hub artifacts (`GemmaBackbone.save_to_preset`
with Gemma 2 flags and every weight randomized, norm scales included), not
hand-made h5 files, so the h5 naming, sharding and layouts are keras-hub's own.
"""

import json
import os
import shutil

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config  # noqa: E402
from keras_gemma2.checkpoints.kerashub_format import read_kerashub_preset  # noqa: E402
from keras_gemma2.checkpoints.presets import KERASHUB_TOKENIZER_FILE, read_checkpoint  # noqa: E402

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): the config mapping and
# the refusals of other architectures and broken files are parsing, before any tensor.

VOCAB = 128  # the test SentencePiece model's size
WINDOW = 4
SEQUENCE = 12  # longer than the window, so the window changes the logits
NUM_LAYERS = 12  # > 10, so block "_10" sorting after "_1" lexicographically matters

GEMMA2_2B_STYLE = dict(
    vocabulary_size=VOCAB,
    num_layers=NUM_LAYERS,
    num_query_heads=4,
    num_key_value_heads=2,
    hidden_dim=32,
    intermediate_dim=96,  # keras-hub: both branches; ours: 48 each
    head_dim=16,
    query_head_dim_normalize=True,
    use_post_ffw_norm=True,
    use_post_attention_norm=True,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
    use_sliding_window_attention=True,
    sliding_window_size=WINDOW,
)

# 27B-style: no head-dim normalization, and hidden // heads (8) != head_dim (16).
# Same shapes as above, so the backends reuse their compiled ops (fast tests).
GEMMA2_27B_STYLE = dict(GEMMA2_2B_STYLE, num_layers=2, query_head_dim_normalize=False)


def _zeros(self, shape, dtype=None):
    return keras.ops.zeros(shape, dtype=dtype)


def _kerashub_backbone(**kwargs):
    """keras_hub.models.GemmaBackbone with zero-initialized weights, to be overwritten.

    keras' random initializers cost an XLA compile each on JAX (~0.6 s per
    shape and dtype), and every weight is assigned afterwards anyway.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(keras.initializers.VarianceScaling, "__call__", _zeros)
        return keras_hub.models.GemmaBackbone(**kwargs)


def _randomized_backbone(seed, dtype=None, **kwargs):
    """A keras-hub GemmaBackbone with every weight random (scales too, default 0)."""
    backbone = _kerashub_backbone(dtype=dtype, **kwargs)
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        if variable.path.endswith("embeddings"):
            std = 1.0  # big enough that the final soft-cap clearly bends the logits
        elif len(variable.shape) == 1:
            std = 0.5  # norm scales, applied as (1 + w)
        else:
            std = 0.3
        variable.assign(rng.normal(0.0, std, variable.shape).astype("float32"))
    return backbone


def _inputs():
    rng = np.random.default_rng(1)
    token_ids = rng.integers(0, VOCAB, (2, SEQUENCE)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 8:] = 0  # right padding in one row
    token_ids[1, 8:] = 0
    return token_ids, padding_mask


def _numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype="float32")


def _kerashub_logits(backbone, token_ids, padding_mask):
    causal_lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    return _numpy(causal_lm({"token_ids": token_ids, "padding_mask": padding_mask}))


def _our_logits(causal_lm, token_ids, padding_mask):
    return _numpy(causal_lm({"token_ids": token_ids, "padding_mask": padding_mask}))


def _max_diff_on_real_tokens(a, b, padding_mask):
    """Max |a - b| over every position except padded queries that see no key.

    A padded query (right padding) still attends to the real keys before it,
    except in a sliding layer once its whole window is padding. There
    keras-hub zeroes the attention output while we attend uniformly; both are
    arbitrary, and outputs at padded positions are never used.
    """
    positions = np.arange(padding_mask.shape[1])
    first_pad = padding_mask.sum(axis=1, keepdims=True)  # right padding only
    sees_a_key = positions[None, :] - WINDOW + 1 < first_pad
    return float(np.abs(a - b)[sees_a_key].max())


@pytest.fixture(scope="module")
def kerashub_preset(tmp_path_factory, sentencepiece_path):
    """(preset dir, keras-hub backbone, token ids, padding mask, keras-hub logits)."""
    backbone = _randomized_backbone(0, **GEMMA2_2B_STYLE)
    directory = str(tmp_path_factory.mktemp("kerashub") / "gemma2_tiny")
    backbone.save_to_preset(directory)
    keras_hub.models.GemmaTokenizer(proto=sentencepiece_path).save_to_preset(directory)
    token_ids, padding_mask = _inputs()
    logits = _kerashub_logits(backbone, token_ids, padding_mask)
    return directory, backbone, token_ids, padding_mask, logits


@pytest.fixture
def preset_copy(kerashub_preset, tmp_path):
    """A private copy of the preset that a test may damage."""
    copy = str(tmp_path / "preset")
    shutil.copytree(kerashub_preset[0], copy)
    return copy


def _edit_config(directory, **changes):
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        serialized = json.load(f)
    for key, value in changes.items():
        if key == "class_name":
            serialized["class_name"] = value
            serialized["registered_name"] = f"keras_hub>{value}"
        else:
            serialized["config"][key] = value
    with open(path, "w") as f:
        json.dump(serialized, f)


# ---- the preset keras-hub writes -------------------------------------------------
@pytest.mark.backend_agnostic
def test_preset_is_what_kaggle_ships(kerashub_preset):
    directory = kerashub_preset[0]
    for name in ("config.json", "metadata.json", "model.weights.h5", "tokenizer.json"):
        assert os.path.isfile(os.path.join(directory, name)), name
    assert os.path.isfile(os.path.join(directory, KERASHUB_TOKENIZER_FILE))


@pytest.mark.backend_agnostic
def test_config_mapping(kerashub_preset):
    config, tensors = read_kerashub_preset(kerashub_preset[0], Gemma2Config)
    assert config.vocabulary_size == VOCAB
    assert config.num_layers == NUM_LAYERS
    assert config.hidden_dim == 32
    assert config.intermediate_dim == 48  # per branch: keras-hub's 96 // 2
    assert (config.num_query_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert config.query_pre_attn_scalar == 16  # query_head_dim_normalize -> head_dim
    assert config.sliding_window_size == WINDOW
    assert (config.attention_logit_soft_cap, config.final_logit_soft_cap) == (50.0, 30.0)
    assert config.rope_max_wavelength == 10000.0
    assert config.max_sequence_length == 8192
    assert config.layer_norm_epsilon == 1e-6
    # 1 embedding + 11 per block + final norm, each lazy with its source recorded.
    assert len(tensors) == 2 + 11 * NUM_LAYERS
    query = tensors["decoder_block_0/attention/query/kernel"]
    assert query.source_name == "layers/gemma_decoder_block/attention/query_dense/vars/0"
    assert query.source_shape == (4, 32, 16)
    assert query().shape == (4 * 16, 32)  # ours: [heads * head_dim, hidden]


def test_blocks_map_by_creation_order_not_lexicographically(kerashub_preset):
    _, backbone, *_ = kerashub_preset
    _, tensors = read_kerashub_preset(kerashub_preset[0], Gemma2Config)
    for i, block in enumerate(backbone.transformer_layers):
        expected = {
            "pre_attention_norm/scale": block.pre_attention_norm.scale,
            # keras-hub (heads, hidden, head_dim) -> ours [heads * head_dim, hidden]
            "attention/query/kernel": np.concatenate(
                [h.T for h in _numpy(block.attention.query_dense.kernel)], axis=0
            ),
            # keras-hub (heads, head_dim, hidden) -> ours [hidden, heads * head_dim]
            "attention/attention_output/kernel": np.concatenate(
                list(_numpy(block.attention.output_dense.kernel)), axis=0
            ).T,
            # keras-hub Dense kernels are [in, out]; ours [out, in].
            "feedforward/gate/kernel": _numpy(block.gating_ffw.kernel).T,  # the gelu branch
            "feedforward/up/kernel": _numpy(block.gating_ffw_2.kernel).T,
            "feedforward/down/kernel": _numpy(block.ffw_linear.kernel).T,
            "post_feedforward_norm/scale": block.post_ffw_norm.scale,
        }
        for name, value in expected.items():
            np.testing.assert_array_equal(
                tensors[f"decoder_block_{i}/{name}"](), _numpy(value), err_msg=f"block {i} {name}"
            )


def test_logits_match_kerashub(kerashub_preset):
    directory, _, token_ids, padding_mask, reference = kerashub_preset
    causal_lm = Gemma2CausalLM.from_preset(directory)
    ours = _our_logits(causal_lm, token_ids, padding_mask)
    assert _max_diff_on_real_tokens(ours, reference, padding_mask) <= 1e-4


def test_comparison_exercises_window_and_final_soft_cap(kerashub_preset):
    """Both sides apply the final soft-cap, and the window changes the logits."""
    _, backbone, token_ids, padding_mask, reference = kerashub_preset
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    hidden = _numpy(backbone(inputs))
    embeddings = _numpy(backbone.token_embedding.embeddings)
    raw = hidden @ embeddings.T
    assert np.abs(raw - reference).max() > 1.0  # the cap bends these logits a lot
    np.testing.assert_allclose(reference, 30.0 * np.tanh(raw / 30.0), atol=1e-4)

    # Without the window keras-hub's logits change, but only past the window.
    no_window = _kerashub_backbone(**dict(GEMMA2_2B_STYLE, use_sliding_window_attention=False))
    no_window.set_weights(backbone.get_weights())
    unwindowed = _kerashub_logits(no_window, token_ids, padding_mask)
    difference = np.abs(unwindowed - reference)
    assert difference[:, :WINDOW].max() <= 1e-5
    assert difference[0, WINDOW:].min() > 1e-3


@pytest.mark.backend_agnostic
def test_tokenizer_is_found(kerashub_preset):
    directory = kerashub_preset[0]
    _, _, tokenizer_path = read_checkpoint(directory, Gemma2Config)
    assert tokenizer_path == os.path.join(directory, KERASHUB_TOKENIZER_FILE)
    causal_lm = Gemma2CausalLM.from_preset(directory)
    assert causal_lm.tokenizer is not None
    kerashub_tokenizer = keras_hub.models.GemmaTokenizer.from_preset(directory)
    text = "Hello, world! def add(a, b):"
    expected = _numpy(kerashub_tokenizer(text)).astype(int).tolist()
    assert list(causal_lm.tokenizer.tokenize(text, add_bos=False)) == expected


# ---- sharded and bfloat16 presets ------------------------------------------------
def test_sharded_preset_loads_identically(kerashub_preset, tmp_path):
    directory, backbone, token_ids, padding_mask, reference = kerashub_preset
    sharded = str(tmp_path / "sharded")
    backbone.save_to_preset(sharded, max_shard_size=0.00005)  # GB: ~52 KB per shard
    files = sorted(os.listdir(sharded))
    shards = [name for name in files if name.startswith("model_") and name.endswith(".weights.h5")]
    assert "model.weights.json" in files and "model.weights.h5" not in files
    assert len(shards) > 1

    _, single = read_kerashub_preset(directory, Gemma2Config)
    config, split = read_kerashub_preset(sharded, Gemma2Config)
    assert sorted(split) == sorted(single)
    assert len({loader.source_file for loader in split.values()}) == len(shards)
    for path in single:
        np.testing.assert_array_equal(split[path](), single[path](), err_msg=path)

    ours = _our_logits(Gemma2CausalLM.from_preset(sharded), token_ids, padding_mask)
    assert _max_diff_on_real_tokens(ours, reference, padding_mask) <= 1e-4

    os.remove(os.path.join(sharded, shards[-1]))
    with pytest.raises(FileNotFoundError, match=rf"missing weight shard\(s\) \['{shards[-1]}'\]"):
        Gemma2Backbone.from_preset(sharded)


def test_bfloat16_preset(tmp_path):
    backbone = _randomized_backbone(2, dtype="bfloat16", **dict(GEMMA2_2B_STYLE, num_layers=1))
    backbone.save_to_preset(str(tmp_path / "bf16"))
    _, tensors = read_kerashub_preset(str(tmp_path / "bf16"), Gemma2Config)
    embeddings = tensors["token_embedding/embeddings"]()
    assert str(embeddings.dtype) == "bfloat16"
    np.testing.assert_array_equal(
        embeddings.astype("float32"), _numpy(backbone.token_embedding.embeddings)
    )
    ours = Gemma2Backbone.from_preset(str(tmp_path / "bf16"), dtype="float32")
    np.testing.assert_array_equal(
        _numpy(ours.final_norm.scale), _numpy(backbone.layer_norm.scale)
    )


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loads_quantized_while_streaming(kerashub_preset, mode):
    """from_preset(quantize=) reads the table by row slices of the h5 dataset; the same model as quantize()."""
    directory, _, token_ids, padding_mask, _ = kerashub_preset
    _, tensors = read_kerashub_preset(directory, Gemma2Config)
    table = tensors["token_embedding/embeddings"]
    np.testing.assert_array_equal(table.read_rows(3, 70), table()[3:70])
    assert not hasattr(tensors["decoder_block_0/attention/query/kernel"], "read_rows")  # transposed: whole
    reference = Gemma2CausalLM.from_preset(directory)
    reference.quantize(mode)
    streamed = Gemma2CausalLM.from_preset(directory, quantize=mode)
    np.testing.assert_array_equal(
        _our_logits(streamed, token_ids, padding_mask), _our_logits(reference, token_ids, padding_mask)
    )


# ---- 27B-style query scaling -----------------------------------------------------
def test_27b_style_query_scalar(tmp_path):
    backbone = _randomized_backbone(3, **GEMMA2_27B_STYLE)
    directory = str(tmp_path / "gemma2_27b_style")
    backbone.save_to_preset(directory)
    config, _ = read_kerashub_preset(directory, Gemma2Config)
    assert config.head_dim == 16
    assert config.query_pre_attn_scalar == 32 // 4  # hidden_dim // num_query_heads

    # keras-hub 0.32's GemmaDecoderBlock hard-codes query_head_dim_normalize=True
    # in the attention layer it builds, so keras-hub itself scales 27B queries
    # by 1/sqrt(head_dim), not the 1/sqrt(hidden // heads) that Gemma 2 (and
    # CachedGemmaAttention's own flag) specify. Compare with the scaling
    # keras-hub really uses, whichever it is.
    attention = backbone.transformer_layers[0].attention
    effective = 16 if attention.query_head_dim_normalize else 8
    token_ids, padding_mask = _inputs()
    reference = _kerashub_logits(backbone, token_ids, padding_mask)
    ours = _our_logits(
        Gemma2CausalLM.from_preset(directory, query_pre_attn_scalar=effective), token_ids, padding_mask
    )
    assert _max_diff_on_real_tokens(ours, reference, padding_mask) <= 1e-4


# ---- bad inputs -------------------------------------------------------------------
@pytest.mark.parametrize(
    "class_name, match",
    [
        ("Gemma3Backbone", r"config\.json describes a 'keras_hub>Gemma3Backbone' model \(Gemma 3"),
        ("LlamaBackbone", r"'keras_hub>LlamaBackbone' model \(Llama\)"),
        ("BertBackbone", r"'keras_hub>BertBackbone' model \(not Gemma 2\)"),
    ],
)
@pytest.mark.backend_agnostic
def test_rejects_other_architectures(preset_copy, class_name, match):
    _edit_config(preset_copy, class_name=class_name)
    with pytest.raises(ValueError, match=match):
        Gemma2Backbone.from_preset(preset_copy)


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_post_ffw_norm", False),
        ("use_post_attention_norm", False),
        ("use_sliding_window_attention", False),
        ("attention_logit_soft_cap", None),
        ("final_logit_soft_cap", None),
    ],
)
@pytest.mark.backend_agnostic
def test_rejects_gemma1_flags(preset_copy, field, value):
    _edit_config(preset_copy, **{field: value})
    match = rf"config\.json is not a Gemma 2 preset .*Gemma 1.*`{field}`"
    with pytest.raises(ValueError, match=match):
        Gemma2Backbone.from_preset(preset_copy)


@pytest.mark.backend_agnostic
def test_rejects_quantized_and_odd_intermediate(preset_copy):
    _edit_config(
        preset_copy,
        dtype={"class_name": "DTypePolicy", "config": {"name": "int8_from_float32"}},
    )
    with pytest.raises(ValueError, match=r"'int8_from_float32': a quantized KerasHub preset"):
        Gemma2Backbone.from_preset(preset_copy)
    _edit_config(preset_copy, dtype="float32", intermediate_dim=97)
    with pytest.raises(ValueError, match=r"`intermediate_dim` 97.*must be an even integer"):
        Gemma2Backbone.from_preset(preset_copy)


@pytest.mark.backend_agnostic
def test_missing_weights_file(preset_copy):
    os.remove(os.path.join(preset_copy, "model.weights.h5"))
    with pytest.raises(FileNotFoundError, match=r"has no weights: expected model\.weights\.h5"):
        Gemma2Backbone.from_preset(preset_copy)


@pytest.mark.backend_agnostic
def test_truncated_weights_file(preset_copy):
    path = os.path.join(preset_copy, "model.weights.h5")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    # A local folder (not a download cache): the fix is a complete copy, not a new download.
    match = r"model\.weights\.h5 is not a valid KerasHub weights file \(truncated or corrupt.*complete copy"
    with pytest.raises(OSError, match=match) as caught:
        Gemma2Backbone.from_preset(preset_copy)
    assert "download" not in str(caught.value).lower()


@pytest.mark.backend_agnostic
def test_shape_mismatch(preset_copy):
    _edit_config(preset_copy, vocabulary_size=256)
    with pytest.raises(
        ValueError,
        match=r"'layers/reversible_embedding/vars/0' in .*model\.weights\.h5 has shape "
        r"\(128, 32\), but .*config\.json implies \(256, 32\)",
    ):
        Gemma2Backbone.from_preset(preset_copy)


@pytest.mark.backend_agnostic
def test_layer_count_mismatch(preset_copy):
    _edit_config(preset_copy, num_layers=NUM_LAYERS - 1)
    with pytest.raises(ValueError, match=rf"holds {NUM_LAYERS} decoder blocks but .*num_layers=11"):
        Gemma2Backbone.from_preset(preset_copy)
