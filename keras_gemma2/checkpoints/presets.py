"""Presets as data: what from_preset reads and save_to_preset writes, for every source.

A preset is a registered name (resolved to its download handles), a
`kaggle://` or `hf://` handle, or a local directory in one of two formats:

* transformers Gemma 2 (config.json with model_type "gemma2", safetensors,
  tokenizer.model). `save_to_preset` writes this format too, plus
  `keras_gemma2.json` holding the exact Gemma2Config.
* KerasHub (config.json naming GemmaBackbone, model.weights.h5, possibly
  sharded, assets/tokenizer/vocabulary.spm) as downloaded from Kaggle.

Nothing here builds a model. Reading returns a config (of the class the caller
hands in), {variable path: lazy array} and the tokenizer file's path; the
model classes build themselves from those in their own `from_preset`.
Writing takes a config, the variables by path and a tokenizer.
"""

import json
import os

import keras
import ml_dtypes
import numpy as np

from keras_gemma2.checkpoints import download, kerashub_format, registry, transformers_format
from keras_gemma2.io import atomic, safetensors_files
from keras_gemma2.version import __version__

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
        return download.fetch(preset)
    if os.path.isdir(preset):
        return preset
    if preset in registry.names():
        entry = registry.get(preset)
        if entry.get("local"):
            return entry["local"]
        return download.fetch_any(preset, entry.get("handles", []))
    if os.path.isfile(preset):
        raise ValueError(
            f"Preset {preset!r} is a file; a preset is a folder (config.json and weights). Give the "
            "folder that holds it, or a preset name (keras-gemma2 presets lists them)."
        )
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
def read_preset(preset, config_class, load_weights=True):
    """(config, {variable path: callable -> numpy array} or None, tokenizer path or None).

    `config_class` (Gemma2Config) is what the config is built as. A registered
    preset without weights to download, or any registered name with
    `load_weights=False`, gives its recorded config with no download (and no
    tensors or tokenizer). Otherwise the preset's files are resolved
    (downloaded at most once) and checked; `load_weights=False` then drops the
    tensors.
    """
    entry = registry.get(preset) if preset in registry.names() else None
    if entry is not None and (not load_weights or not (entry.get("handles") or entry.get("local"))):
        return config_class.from_dict(entry["config"]), None, None
    directory = resolve_preset(preset)
    config, tensors, _ = read_checkpoint(directory, config_class)
    return config, (tensors if load_weights else None), _tokenizer_in(directory)


def read_checkpoint(directory, config_class):
    """(config, {keras variable path: callable -> numpy array}, tokenizer path or None)."""
    kind = detect_format(directory)
    if kind == "kerashub":
        config, tensors = kerashub_format.read_kerashub_preset(directory, config_class)
        tokenizer = os.path.join(directory, KERASHUB_TOKENIZER_FILE)
        return config, tensors, tokenizer if os.path.exists(tokenizer) else None

    # config.json is the one source of truth (transformers reads it too); keras_gemma2.json,
    # written beside it by save_to_preset, must agree, so one folder never holds two models.
    config = transformers_format.config_from_hf(
        transformers_format.read_hf_config(directory), config_class, os.path.join(directory, "config.json")
    )
    ours = os.path.join(directory, OUR_CONFIG_FILE)
    if os.path.exists(ours):
        _check_same_config(config, _read_our_config(ours, config_class), directory)
    checkpoint = safetensors_files.SafetensorsCheckpoint(directory, repair_hint=download.repair_hint)
    tensors = {}
    for keras_path, hf_name in transformers_format.tensor_names(config):
        if hf_name not in checkpoint:
            raise ValueError(
                f"{directory} lacks tensor {hf_name!r} that a Gemma 2 model with "
                f"{config.num_layers} layers needs. Is the checkpoint complete?"
            )
        tensors[keras_path] = _lazy(checkpoint, hf_name)
    tokenizer = os.path.join(directory, HF_TOKENIZER_FILE)
    return config, tensors, tokenizer if os.path.exists(tokenizer) else None


def _read_our_config(path, config_class):
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
        config_class.from_dict(data["config"])  # complete and valid
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
    loader.read_rows = lambda start, stop: checkpoint.get(name, rows=(start, stop))
    loader.source_name = name
    loader.source_shape = checkpoint.shape(name)
    return loader


def _tokenizer_in(directory):
    """The tokenizer file in a preset folder (either format's name), or None."""
    for candidate in (HF_TOKENIZER_FILE, KERASHUB_TOKENIZER_FILE):
        path = os.path.join(directory, candidate)
        if os.path.exists(path):
            return path
    return None


def tokenizer_file(preset):
    """The path of the tokenizer stored with a preset, or a clear error when it has none."""
    directory = resolve_preset(preset)
    path = _tokenizer_in(directory)
    if path is None:
        raise FileNotFoundError(
            f"{directory} has no tokenizer: expected {HF_TOKENIZER_FILE} (transformers) or "
            f"{KERASHUB_TOKENIZER_FILE} (KerasHub)."
        )
    return path


# ---- writing ---------------------------------------------------------------
def save_preset(preset_dir, config, variables, dtype_policy, tokenizer=None, max_shard_size="4GB"):
    """Write transformers-format files + keras_gemma2.json, all-or-nothing.

    `config`: the Gemma2Config; `variables`: {keras variable path: float
    variable} holding every weight of `transformers_format.tensor_names`;
    `dtype_policy`: the model's Keras dtype policy (recorded, and its variable
    dtype names the files' dtype); `tokenizer`: one with `save_assets` and its
    special ids, or None. Files go to a temporary sibling directory that is
    renamed into place at the end, so a failure never leaves a half-written preset.
    """
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

    try:
        tensors, sizes = {}, {}
        for keras_path, hf_name in transformers_format.tensor_names(config):
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
        dtype_name = str(dtype_policy.variable_dtype)
        safetensors_files.write_json(
            os.path.join(staging, "config.json"), transformers_format.config_to_hf(config, dtype_name, special)
        )
        safetensors_files.write_json(
            os.path.join(staging, OUR_CONFIG_FILE),
            {
                "config": config.to_dict(),
                "dtype_policy": dtype_policy.name,
                "keras_gemma2_version": __version__,
                "parameter_count": config.parameter_count(),
            },
        )
        if os.path.isdir(preset_dir):
            os.rmdir(preset_dir)  # empty, checked above
        os.replace(staging, preset_dir)
    finally:
        atomic.remove_staging(staging)
    return preset_dir


def _numpy_dtype(variable):
    name = str(variable.dtype)
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def _exporter(variable):
    def produce():
        array = np.asarray(keras.ops.convert_to_numpy(variable.value))
        return np.ascontiguousarray(array)

    return produce
