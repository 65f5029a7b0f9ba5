"""save_to_preset / from_preset on disk, and every bad checkpoint input."""

import json
import os

import keras
import numpy as np
import pytest

import keras_gemma2
from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config, Gemma2Tokenizer
from keras_gemma2.checkpoints import download
from keras_gemma2.io import safetensors_files
from reference import hf_logits, random_hf_model, save_hf_checkpoint

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): missing, corrupt or
# mismatched files, downloads and refused saves are file and config checks made before any tensor.

TINY = Gemma2Config.from_preset("gemma2_tiny_test")


def random_model(dtype="float32", seed=0, tokenizer=None):
    keras.utils.set_random_seed(seed)
    model = Gemma2CausalLM(Gemma2Backbone(TINY, dtype=dtype), tokenizer=tokenizer)
    rng = np.random.default_rng(seed)
    for variable in model.backbone.weights:  # norm scales too (they start at zero)
        variable.assign(rng.normal(0, 0.3, variable.shape).astype("float32"))
    return model


def weights_as_numpy(model):
    return {
        v.path: np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(v.value, "float32")))
        for v in model.backbone.weights
    }


@pytest.fixture
def hf_dir(tmp_path):
    return save_hf_checkpoint(random_hf_model(TINY, seed=1), str(tmp_path / "hf"))


# ---- round trips --------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_save_to_preset_round_trip_is_bit_exact(tmp_path, dtype, sentencepiece_path):
    model = random_model(dtype, tokenizer=Gemma2Tokenizer(sentencepiece_path))
    path = str(tmp_path / "preset")
    model.save_to_preset(path, max_shard_size="10KB")  # forces several shards
    files = sorted(os.listdir(path))
    assert "model.safetensors.index.json" in files and "tokenizer.model" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1
    assert not any(".partial" in f for f in os.listdir(tmp_path))

    restored = keras_gemma2.from_preset(path, dtype=dtype)
    assert restored.config == model.config
    assert restored.backbone.dtype_policy.name == dtype
    for name, value in weights_as_numpy(model).items():
        np.testing.assert_array_equal(weights_as_numpy(restored)[name], value, err_msg=name)
    assert restored.tokenizer.proto_bytes == model.tokenizer.proto_bytes
    token_ids = np.array([[2, 5, 9, 17, 33, 64, 100]], "int32")
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(restored({"token_ids": token_ids})),
        keras.ops.convert_to_numpy(model({"token_ids": token_ids})),
    )


def test_saved_preset_loads_in_transformers(tmp_path):
    """The save format is transformers' own: a saved model is usable there too."""
    import transformers

    model = random_model()
    path = str(tmp_path / "preset")
    model.save_to_preset(path)
    reference = transformers.Gemma2ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    token_ids = np.random.default_rng(0).integers(0, 128, (2, 14)).astype("int32")
    ours = keras.ops.convert_to_numpy(model({"token_ids": token_ids}))
    assert np.abs(ours - hf_logits(reference, token_ids)).max() <= 1e-4


def test_config_overrides_and_architecture_only(hf_dir):
    model = keras_gemma2.from_preset(hf_dir, sliding_window_size=8)
    assert model.config.sliding_window_size == 8
    assert Gemma2Config.from_preset(hf_dir) == TINY
    random_weights = keras_gemma2.from_preset("gemma2_tiny_test")
    assert random_weights.config == TINY and random_weights.tokenizer is None
    assert Gemma2Backbone.from_preset(hf_dir).config == TINY


def test_loading_draws_no_random_weights(hf_dir, monkeypatch):
    """Every weight is read from the checkpoint, so none is first drawn at random."""
    import transformers

    from keras_gemma2.model.layers import Projection

    def refuse(self, *args, **kwargs):
        raise AssertionError("a random initializer ran while loading a checkpoint")

    monkeypatch.setattr(keras.initializers.VarianceScaling, "__call__", refuse)
    model = keras_gemma2.from_preset(hf_dir)
    monkeypatch.undo()
    reference = transformers.Gemma2ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
    token_ids = np.random.default_rng(0).integers(0, 128, (1, 9)).astype("int32")
    ours = keras.ops.convert_to_numpy(model({"token_ids": token_ids}))
    assert np.abs(ours - hf_logits(reference, token_ids)).max() <= 1e-4
    # The configs still say how to start a model from scratch.
    projections = [l for l in model.backbone._flatten_layers() if isinstance(l, Projection)]
    assert projections and all(
        l.get_config()["kernel_initializer"]["class_name"] == "GlorotUniform" for l in projections
    )
    fresh = Gemma2Backbone(TINY)
    assert np.abs(keras.ops.convert_to_numpy(fresh.token_embedding.embeddings)).max() > 0


def test_tokenizer_and_backbone_classmethods(tmp_path, sentencepiece_path):
    directory = save_hf_checkpoint(
        random_hf_model(TINY), str(tmp_path / "hf"), tokenizer_path=sentencepiece_path
    )
    tokenizer = Gemma2Tokenizer.from_preset(directory)
    assert tokenizer.vocabulary_size == 128
    model = Gemma2CausalLM.from_preset(directory)
    assert model.tokenizer.proto_bytes == tokenizer.proto_bytes


# ---- bad inputs --------------------------------------------------------------------
@pytest.mark.backend_agnostic
def test_unknown_preset_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown preset 'gemma2_2b'. Did you mean 'gemma2_2b_en'"):
        keras_gemma2.from_preset("gemma2_2b")


@pytest.mark.backend_agnostic
def test_missing_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        keras_gemma2.from_preset(str(tmp_path / "nowhere"))


@pytest.mark.backend_agnostic
def test_registered_preset_that_cannot_be_downloaded(monkeypatch):
    tried = []

    def offline(handle):
        tried.append(handle)
        raise download.DownloadError(f"{handle}: no network")

    monkeypatch.setattr(download, "fetch", offline)
    with pytest.raises(download.DownloadError) as error:
        keras_gemma2.from_preset("gemma2_2b_en")
    message = str(error.value)
    assert tried == ["kaggle://keras/gemma2/keras/gemma2_2b_en/2", "hf://google/gemma-2-2b"]
    for handle in tried:
        assert handle in message
    assert "from_preset('/path/to/gemma2_2b_en')" in message
    # The architecture alone needs no download.
    assert Gemma2Config.from_preset("gemma2_2b_en").num_layers == 26


@pytest.mark.backend_agnostic
def test_download_without_client_libraries_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_clients(name, *args, **kwargs):
        if name in ("kagglehub", "huggingface_hub"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_clients)
    with pytest.raises(download.DownloadError, match=r"kagglehub is not installed"):
        download.fetch("kaggle://keras/gemma2/keras/gemma2_2b_en/2")
    with pytest.raises(download.DownloadError, match=r"huggingface_hub is not installed"):
        download.fetch("hf://google/gemma-2-2b")


@pytest.mark.backend_agnostic
def test_directory_missing_files(tmp_path, hf_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        keras_gemma2.from_preset(str(empty))
    os.remove(os.path.join(hf_dir, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="No model.safetensors"):
        keras_gemma2.from_preset(hf_dir)


@pytest.mark.backend_agnostic
def test_missing_shard_is_named(tmp_path):
    directory = save_hf_checkpoint(random_hf_model(TINY), str(tmp_path / "hf"), max_shard_size="20KB")
    shard = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))[-1]
    os.remove(os.path.join(directory, shard))
    with pytest.raises(FileNotFoundError, match=f"Shard {shard} .* is missing"):
        keras_gemma2.from_preset(directory)


@pytest.mark.backend_agnostic
def test_shape_mismatch_names_tensor_and_shapes(hf_dir):
    config_path = os.path.join(hf_dir, "config.json")
    config = json.load(open(config_path))
    config["intermediate_size"] = 64
    json.dump(config, open(config_path, "w"))
    with pytest.raises(
        ValueError, match=r"'model.layers.0.mlp.gate_proj.weight' has shape \(48, 32\) .* expects \(64, 32\)"
    ):
        keras_gemma2.from_preset(hf_dir)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
@pytest.mark.backend_agnostic
def test_corrupt_weights_file(hf_dir, damage):
    path = os.path.join(hf_dir, "model.safetensors")
    data = open(path, "rb").read()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"\x10\x00" * 500, "empty": b""}[damage]
    open(path, "wb").write(damaged)
    with pytest.raises(ValueError, match="truncated|corrupt"):
        keras_gemma2.from_preset(hf_dir)


@pytest.mark.parametrize("model_type", ["gemma", "gemma3", "llama"])
@pytest.mark.backend_agnostic
def test_other_model_types_are_rejected(hf_dir, model_type):
    config_path = os.path.join(hf_dir, "config.json")
    config = json.load(open(config_path))
    config["model_type"] = model_type
    json.dump(config, open(config_path, "w"))
    with pytest.raises(ValueError, match=f"model_type '{model_type}'.*loads only model_type 'gemma2'"):
        keras_gemma2.from_preset(hf_dir)


@pytest.mark.backend_agnostic
def test_save_to_non_empty_directory_is_refused(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        random_model().save_to_preset(str(target))
    assert os.listdir(target) == ["notes.txt"]


@pytest.mark.backend_agnostic
def test_save_to_unwritable_location_is_refused(tmp_path, read_only_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(PermissionError, match="Cannot write a preset under"):
        random_model().save_to_preset(str(blocker / "preset"))
    with pytest.raises(PermissionError, match="Cannot write a preset under"):
        random_model().save_to_preset(str(read_only_dir / "preset"))
    assert os.listdir(read_only_dir) == ["existing.txt"]


@pytest.mark.backend_agnostic
def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real_write = safetensors_files.write_file

    def fail_on_second_shard(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write(path, tensors, metadata)

    monkeypatch.setattr(safetensors_files, "write_file", fail_on_second_shard)
    with pytest.raises(OSError, match="disk full"):
        random_model().save_to_preset(str(tmp_path / "preset"), max_shard_size="10KB")
    assert os.listdir(tmp_path) == []


@pytest.mark.backend_agnostic
def test_handles_go_through_the_download_clients(monkeypatch, hf_dir):
    """kaggle:// and hf:// reach kagglehub / huggingface_hub and load what they return."""
    import sys
    import types

    requests = []
    kagglehub = types.SimpleNamespace(model_download=lambda handle: requests.append(handle) or hf_dir)
    huggingface_hub = types.SimpleNamespace(
        snapshot_download=lambda repo_id, allow_patterns: requests.append(repo_id) or hf_dir
    )
    monkeypatch.setitem(sys.modules, "kagglehub", kagglehub)
    monkeypatch.setitem(sys.modules, "huggingface_hub", huggingface_hub)
    assert keras_gemma2.from_preset("kaggle://keras/gemma2/keras/x/1").config == TINY
    assert keras_gemma2.from_preset("hf://google/gemma-2-2b").config == TINY
    assert requests == ["keras/gemma2/keras/x/1", "google/gemma-2-2b"]
