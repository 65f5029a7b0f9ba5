"""LoRA: adapters only are trained, saved, loaded, and merged back."""

import keras
import numpy as np
import pytest

from helpers import randomize_weights
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config

TINY = Gemma2Config.from_preset("gemma2_tiny_test")


def model_and_data(seed=0):
    model = randomize_weights(Gemma2CausalLM(Gemma2Backbone(TINY)), seed=seed)
    token_ids = np.random.default_rng(seed).integers(0, 128, (4, 10)).astype("int32")
    return model, {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def logits(model, x):
    return keras.ops.convert_to_numpy(model(x))


def test_lora_trains_only_adapters_then_saves_loads_and_merges(tmp_path):
    model, x = model_and_data()
    before = logits(model, x)
    frozen = {v.path: keras.ops.convert_to_numpy(v.value) for v in model.backbone.weights}
    model.enable_lora(rank=2, target_layers=("query", "value", "down"))
    assert all("lora_kernel" in v.path for v in model.trainable_weights)
    assert len(model.trainable_weights) == 2 * 3 * TINY.num_layers
    np.testing.assert_allclose(logits(model, x), before, atol=1e-6)  # B starts at zero

    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, batch_size=4, epochs=5, verbose=0)
    tuned = logits(model, x)
    assert np.abs(tuned - before).max() > 1e-3
    for variable in model.backbone.weights:
        if "lora" not in variable.path:
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable.value), frozen[variable.path])

    path = str(tmp_path / "adapters.safetensors")
    model.save_lora_weights(path)
    fresh, _ = model_and_data()
    fresh.load_lora_weights(path)
    np.testing.assert_allclose(logits(fresh, x), tuned, atol=1e-5)

    merged = model.merge_lora()
    assert not any("lora" in v.path for v in merged.weights)
    np.testing.assert_allclose(logits(merged, x), tuned, atol=1e-4)
    # Generation sees the adapters too (its compiled functions are rebuilt).
    assert model.generate([[3, 4, 5]], max_new_tokens=5, stop_token_ids=())[0].tolist() == \
        merged.generate([[3, 4, 5]], max_new_tokens=5, stop_token_ids=())[0].tolist()


def test_lora_bad_inputs(tmp_path):
    model, _ = model_and_data()
    with pytest.raises(ValueError, match="Unknown LoRA targets"):
        model.enable_lora(2, target_layers=("q_proj",))
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        model.enable_lora(0)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        model.save_lora_weights(str(tmp_path / "a.safetensors"))
    model.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        model.enable_lora(2)
    with pytest.raises(ValueError, match=r"saved as \.safetensors"):
        model.save_lora_weights(str(tmp_path / "a.h5"))


def test_save_to_preset_refuses_unmerged_adapters(tmp_path):
    model, x = model_and_data()
    model.enable_lora(rank=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, batch_size=4, epochs=2, verbose=0)
    with pytest.raises(ValueError, match=r"unmerged LoRA adapters.*merge_lora\(\).*save_lora_weights"):
        model.save_to_preset(str(tmp_path / "preset"))
    assert not (tmp_path / "preset").exists()
    # The suggested fix keeps the trained model.
    merged = model.merge_lora()
    merged.save_to_preset(str(tmp_path / "preset"))
    reloaded = Gemma2CausalLM.from_preset(str(tmp_path / "preset"))
    np.testing.assert_allclose(logits(reloaded, x), logits(model, x), atol=1e-4)


def test_a_failed_load_lora_weights_leaves_the_model_as_it_was(tmp_path):
    other = randomize_weights(Gemma2CausalLM(Gemma2Backbone(TINY.replace(num_layers=2))))
    other.enable_lora(rank=2, target_layers=("query", "up"))
    path = str(tmp_path / "other.safetensors")
    other.save_lora_weights(path)
    model, x = model_and_data()
    before = logits(model, x)
    trainable = [v.path for v in model.trainable_weights]
    with pytest.raises(ValueError, match="other layers than this model's"):
        model.load_lora_weights(path)
    assert not any(getattr(layer, "lora_enabled", False) for layer in model.backbone._flatten_layers())
    assert [v.path for v in model.trainable_weights] == trainable  # nothing frozen
    np.testing.assert_allclose(logits(model, x), before)
    model.enable_lora(rank=3)  # and LoRA can still be enabled as usual


def test_a_load_with_the_wrong_rank_leaves_existing_adapters(tmp_path):
    source, x = model_and_data(seed=1)
    source.enable_lora(rank=4)
    path = str(tmp_path / "rank4.safetensors")
    source.save_lora_weights(path)
    model, _ = model_and_data()
    model.enable_lora(rank=2)
    adapters = {v.path: keras.ops.convert_to_numpy(v.value) for v in model.trainable_weights}
    with pytest.raises(ValueError, match="has shape"):
        model.load_lora_weights(path)
    for variable in model.trainable_weights:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable.value), adapters[variable.path])


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_enable_lora_refuses_a_quantized_model(mode):
    model, x = model_and_data()
    model.quantize(mode)
    before = logits(model, x)
    with pytest.raises(ValueError, match=f"quantized \\({mode}\\).*merge_lora\\(\\), then quantize"):
        model.enable_lora(rank=2)
    assert not any(getattr(layer, "lora_enabled", False) for layer in model.backbone._flatten_layers())
    assert model.trainable_weights  # nothing was frozen (enable_lora freezes all but adapters)
    np.testing.assert_allclose(logits(model, x), before)


def test_backbone_enable_lora_is_keras_hubs_spelling_and_generate_follows_it():
    """`gemma_lm.backbone.enable_lora(rank=4)` (the tutorials) adapts the same layers, and a
    generator compiled before it is rebuilt (it captured the variables without adapters)."""
    model, x = model_and_data()
    prompt = x["token_ids"][:1, :4]
    before = model.generate(prompt, max_new_tokens=5, stop_token_ids=None)  # compiles the generator
    model.backbone.enable_lora(rank=4)
    assert model.backbone.lora_targets == ("query", "value")
    assert all("lora_kernel" in v.path for v in model.trainable_weights)
    assert len(model.trainable_weights) == 2 * 2 * TINY.num_layers
    rng = np.random.default_rng(1)
    for variable in model.trainable_weights:  # adapters that change the outputs
        variable.assign(rng.normal(0, 0.5, variable.shape).astype("float32"))
    merged = model.merge_lora()
    after = model.generate(prompt, max_new_tokens=5, stop_token_ids=None)
    expected = merged.generate(prompt, max_new_tokens=5, stop_token_ids=None)
    np.testing.assert_array_equal(after[0], expected[0])
    assert not np.array_equal(after[0], before[0])
