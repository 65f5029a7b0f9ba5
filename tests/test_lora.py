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
