"""from_preset / save_to_preset: one entry point for every checkpoint source.

A preset is a registered name (resolved to its download handles), a
`kaggle://` or `hf://` handle, or a local directory in one of two formats:

* transformers Gemma 2 (config.json with model_type "gemma2", safetensors,
  tokenizer.model). `save_to_preset` writes this format too, plus
  `keras_gemma2.json` holding the exact Gemma2Config.
* KerasHub (config.json naming GemmaBackbone, model.weights.h5, possibly
  sharded, assets/tokenizer/vocabulary.spm) as downloaded from Kaggle.
"""

import dataclasses
import json
import os
import shutil

import numpy as np

from keras_gemma2.io import atomic
from keras_gemma2.model import layers
from keras_gemma2.checkpoints import registry
from keras_gemma2.checkpoints import transformers_format
from keras_gemma2.io import safetensors_files
from keras_gemma2.config import Gemma2Config

OUR_CONFIG_FILE = "keras_gemma2.json"
# Hidden folder beside a preset while save_preset writes it (atomic.staging_directory).
STAGING_PREFIX = ".keras_gemma2-preset-"
HF_TOKENIZER_FILE = "tokenizer.model"
KERASHUB_TOKENIZER_FILE = os.path.join("assets", "tokenizer", "vocabulary.spm")


# ---- resolving a preset to files on disk --------------------------------
def resolve_preset(preset):
    """A local directory holding the preset's files (downloading if needed)."""
    if isinstance(preset, os.PathLike):
        preset = os.fspath(preset)
    if not isinstance(preset, str) or not preset:
        raise TypeError(f"`preset` must be a preset name, a directory or a handle, got {preset!r}.")
    if preset.startswith(("kaggle://", "hf://")):
        from keras_gemma2.checkpoints import download

        return download.fetch(preset)
    if os.path.isdir(preset):
        return preset
    if preset in registry.names():
        entry = registry.get(preset)
        if entry.get("local"):
            return entry["local"]
        from keras_gemma2.checkpoints import download

        return download.fetch_any(preset, entry.get("handles", []))
    if os.path.sep in preset or preset.startswith(".") or os.path.exists(preset):
        raise FileNotFoundError(
            f"Preset directory {preset!r} does not exist (or is not a directory)."
        )
    raise ValueError(registry.unknown_name_message(preset))


def detect_format(directory):
    """'hf' or 'kerashub', or a clear error listing what is missing."""
    config_path = os.path.join(directory, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(
            f"{directory} has no config.json, so it is neither a transformers Gemma 2 checkpoint "
            "(config.json, model.safetensors, tokenizer.model) nor a KerasHub preset "
            "(config.json, model.weights.h5, assets/tokenizer/vocabulary.spm)."
        )
    config = transformers_format.read_hf_config(directory)
    if "model_type" in config:
        return "hf"
    if "class_name" in config and "config" in config:
        return "kerashub"
    raise ValueError(
        f"{config_path} is neither a transformers config (no 'model_type') nor a KerasHub "
        "config (no 'class_name')."
    )


# ---- reading ---------------------------------------------------------------
def read_checkpoint(directory):
    """(Gemma2Config, {keras variable path: callable -> numpy array}, tokenizer path or None)."""
    kind = detect_format(directory)
    if kind == "kerashub":
        from keras_gemma2.checkpoints import kerashub_format

        config, tensors = kerashub_format.read_kerashub_preset(directory)
        tokenizer = os.path.join(directory, KERASHUB_TOKENIZER_FILE)
        return config, tensors, tokenizer if os.path.exists(tokenizer) else None

    # config.json is the one source of truth (transformers reads it too); keras_gemma2.json,
    # written beside it by save_to_preset, must agree, so one folder never holds two models.
    config = transformers_format.config_from_hf(transformers_format.read_hf_config(directory), os.path.join(directory, "config.json"))
    ours = os.path.join(directory, OUR_CONFIG_FILE)
    if os.path.exists(ours):
        _check_same_config(config, _read_our_config(ours), directory)
    checkpoint = safetensors_files.SafetensorsCheckpoint(directory)
    tensors = {}
    for keras_path, hf_name in transformers_format.weight_layout(config):
        if hf_name not in checkpoint:
            raise ValueError(
                f"{directory} lacks tensor {hf_name!r} that a Gemma 2 model with "
                f"{config.num_layers} layers needs. Is the checkpoint complete?"
            )
        tensors[keras_path] = _lazy(checkpoint, hf_name)
    tokenizer = os.path.join(directory, HF_TOKENIZER_FILE)
    return config, tensors, tokenizer if os.path.exists(tokenizer) else None


def _read_our_config(path):
    """The Gemma2Config fields recorded in keras_gemma2.json, or an error naming what is wrong."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}.") from error
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(
            f"{path} has no 'config' object (the Gemma2Config save_to_preset records). "
            f"Delete {OUR_CONFIG_FILE} to load the folder from config.json alone."
        )
    try:
        Gemma2Config.from_dict(data["config"])  # complete and valid
        return data["config"]
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{path}: {error} Fix the file, or delete {OUR_CONFIG_FILE} to load the folder "
            "from config.json alone."
        ) from error


def _check_same_config(hf_config, recorded, directory):
    """Refuse a folder whose two config files describe different models."""
    differ = [
        f"{name}: config.json {getattr(hf_config, name)!r} vs {OUR_CONFIG_FILE} {value!r}"
        for name, value in recorded.items()
        if getattr(hf_config, name) != value
    ]
    if differ:
        raise ValueError(
            f"{directory}: config.json and {OUR_CONFIG_FILE} describe different models ("
            + "; ".join(differ)
            + "). transformers reads config.json, so this library does too: make the two agree, "
            f"or delete {OUR_CONFIG_FILE} to use config.json."
        )


def _lazy(checkpoint, name):
    loader = lambda: checkpoint.get(name)  # noqa: E731
    loader.source_name = name
    loader.source_shape = checkpoint.shape(name)
    return loader


def assign_weights(backbone, tensors):
    """Copy arrays into the backbone's variables, checking every name and shape first."""
    variables = {v.path: v for v in backbone.weights}
    missing = sorted(set(variables) - set(tensors))
    unexpected = sorted(set(tensors) - set(variables))
    if missing or unexpected:
        raise ValueError(
            f"Checkpoint does not fit the architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}."
        )
    for path, variable in variables.items():
        array = tensors[path]() if callable(tensors[path]) else tensors[path]
        if tuple(array.shape) != tuple(variable.shape):
            source = getattr(tensors[path], "source_name", path)
            raise ValueError(
                f"Weight {source!r} has shape {tuple(array.shape)} after conversion but the model "
                f"expects {tuple(variable.shape)} for {path!r}. The checkpoint does not match "
                "its config (or the config overrides)."
            )
        # One tensor in memory at a time; a plain array (not a memmap) for every backend.
        variable.assign(np.array(array, dtype=_numpy_dtype(variable)))


def _build_backbone(preset, dtype, load_weights, config_overrides):
    """(backbone, directory of the preset's files or None when architecture-only)."""
    from keras_gemma2.model.backbone import Gemma2Backbone, resolve_dtype_policy

    policy = resolve_dtype_policy(dtype)  # a bad dtype fails before any download
    _check_load_options(load_weights, config_overrides)
    entry = registry.get(preset) if preset in registry.names() else None
    if entry is not None and (not load_weights or not (entry.get("handles") or entry.get("local"))):
        config = Gemma2Config.from_dict(entry["config"]).replace(**config_overrides)
        return Gemma2Backbone(config, dtype=policy), None
    directory = resolve_preset(preset)  # downloads at most once
    config, tensors, _ = read_checkpoint(directory)
    if not load_weights:
        return Gemma2Backbone(config.replace(**config_overrides), dtype=policy), directory
    with layers.weights_from_checkpoint():  # assign_weights checks that every one is there
        backbone = Gemma2Backbone(config.replace(**config_overrides), dtype=policy)
    assign_weights(backbone, tensors)
    return backbone, directory


def _check_load_options(load_weights, config_overrides):
    """Unknown keywords would otherwise reach dataclasses.replace as a bare TypeError."""
    fields = [f.name for f in dataclasses.fields(Gemma2Config)]
    unknown = sorted(set(config_overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"Unknown from_preset argument(s) {unknown}. Valid ones: dtype, load_weights, and "
            f"these Gemma2Config fields to override: {', '.join(fields)}."
        )
    if not isinstance(load_weights, (bool, np.bool_)):
        raise ValueError(f"load_weights must be True or False, got {load_weights!r}.")


def load_backbone(preset, dtype=None, load_weights=True, **config_overrides):
    return _build_backbone(preset, dtype, load_weights, config_overrides)[0]


def _tokenizer_in(directory):
    from keras_gemma2.tokenizer import Gemma2Tokenizer

    for candidate in (HF_TOKENIZER_FILE, KERASHUB_TOKENIZER_FILE):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return Gemma2Tokenizer(path)
    return None


def load_tokenizer(preset):
    directory = resolve_preset(preset)
    tokenizer = _tokenizer_in(directory)
    if tokenizer is None:
        raise FileNotFoundError(
            f"{directory} has no tokenizer: expected {HF_TOKENIZER_FILE} (transformers) or "
            f"{KERASHUB_TOKENIZER_FILE} (KerasHub)."
        )
    return tokenizer


def load_causal_lm(preset, dtype=None, load_weights=True, **config_overrides):
    from keras_gemma2.causal_lm import Gemma2CausalLM

    backbone, directory = _build_backbone(preset, dtype, load_weights, config_overrides)
    tokenizer = _tokenizer_in(directory) if directory else None
    return Gemma2CausalLM(backbone, tokenizer=tokenizer)


# ---- writing ---------------------------------------------------------------
def save_preset(backbone, preset_dir, tokenizer=None, max_shard_size="4GB"):
    """Write transformers-format files + keras_gemma2.json, all-or-nothing.

    Files go to a temporary sibling directory that is renamed into place at
    the end, so a failure never leaves a half-written preset.
    """
    from keras_gemma2.model.quantization import quantization_modes

    quantized = quantization_modes(backbone)
    if quantized:
        raise ValueError(
            f"This model is quantized in Keras ({', '.join(quantized)}); a preset holds float "
            "(transformers-format) weights. Save it with model.save('model.keras') and load "
            "that with keras.saving.load_model, or save the float model to a preset and "
            "quantize after loading."
        )
    if layers.adapted_layers(backbone):
        raise ValueError(
            "This model has unmerged LoRA adapters, which a preset does not hold: saving would "
            "write only the base weights. Call `model = model.merge_lora()` and save that, or "
            "keep the adapters beside the preset with `model.save_lora_weights('adapters.safetensors')`."
        )
    safetensors_files.parse_size(max_shard_size)  # a bad size fails before anything is written
    preset_dir = os.path.abspath(os.fspath(preset_dir))
    if os.path.exists(preset_dir) and (not os.path.isdir(preset_dir) or os.listdir(preset_dir)):
        raise FileExistsError(
            f"{preset_dir} exists and is not an empty directory; save_to_preset will not "
            "overwrite it. Choose a new path or remove it first."
        )
    parent = os.path.dirname(preset_dir)
    try:
        os.makedirs(parent, exist_ok=True)
        staging = atomic.staging_directory(parent, STAGING_PREFIX)
    except OSError as error:
        raise PermissionError(
            f"Cannot write a preset under {parent}: {error.strerror or error}. "
            "Choose a writable directory."
        ) from error

    config = backbone.config
    variables = {v.path: v for v in backbone.weights}
    try:
        tensors, sizes = {}, {}
        for keras_path, hf_name in transformers_format.weight_layout(config):
            variable = variables[keras_path]
            tensors[hf_name] = _exporter(variable)
            sizes[hf_name] = int(np.prod(variable.shape)) * np.dtype(_numpy_dtype(variable)).itemsize
        safetensors_files.write_sharded(staging, tensors, sizes, max_shard_size)
        special = {}
        if tokenizer is not None:
            tokenizer.save_assets(staging)
            special = {
                "pad": tokenizer.pad_token_id,
                "eos": tokenizer.eos_token_id,
                "bos": tokenizer.bos_token_id,
            }
        dtype_name = str(backbone.variable_dtype)
        safetensors_files.write_json(
            os.path.join(staging, "config.json"), transformers_format.config_to_hf(config, dtype_name, special)
        )
        from keras_gemma2.version import __version__

        safetensors_files.write_json(
            os.path.join(staging, OUR_CONFIG_FILE),
            {
                "config": config.to_dict(),
                "dtype_policy": backbone.dtype_policy.name,
                "keras_gemma2_version": __version__,
                "parameter_count": config.parameter_count(),
            },
        )
        if os.path.isdir(preset_dir):
            os.rmdir(preset_dir)  # empty, checked above
        os.replace(staging, preset_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return preset_dir


def _numpy_dtype(variable):
    import ml_dtypes

    name = str(variable.dtype)
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _exporter(variable):
    import keras

    def produce():
        array = np.asarray(keras.ops.convert_to_numpy(variable.value))
        return np.ascontiguousarray(array)

    return produce
