"""Model merging (paper section 4): weight averaging and interpolation toward a base.

Gemma 2's post-training averages checkpoints. These functions read presets
tensor by tensor (one checkpoint tensor in memory at a time, plus the float32
running sum) and return a Gemma2CausalLM.
"""

import os

import numpy as np

from keras_gemma2.causal_lm import Gemma2CausalLM
from keras_gemma2.checkpoints.presets import read_checkpoint, resolve_preset
from keras_gemma2.config import Gemma2Config
from keras_gemma2.model.backbone import Gemma2Backbone
from keras_gemma2.tokenizer import Gemma2Tokenizer


def _is_real(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _load(preset):
    directory = resolve_preset(preset)
    config, tensors, tokenizer_path = read_checkpoint(directory, Gemma2Config)
    return config, tensors, tokenizer_path


def _check_same_architecture(reference, config, preset):
    if config != reference:
        differences = {
            field: (value, getattr(config, field))
            for field, value in reference.to_dict().items()
            if getattr(config, field) != value
        }
        raise ValueError(
            f"Cannot merge {preset!r}: its architecture differs from the first checkpoint's "
            f"({', '.join(f'{k}: {a} vs {b}' for k, (a, b) in differences.items())}). "
            "Only checkpoints of one architecture can be averaged."
        )


def _build(config, sums, tokenizer_path, dtype):
    backbone = Gemma2Backbone.from_weights(config, sums, dtype=dtype)
    tokenizer = Gemma2Tokenizer(tokenizer_path) if tokenizer_path else None
    return Gemma2CausalLM(backbone, tokenizer=tokenizer)


def average_checkpoints(presets, weights=None, dtype=None):
    """Weighted average of checkpoints of one architecture (uniform by default).

    `weights` are normalised to sum to 1; the first preset's tokenizer is kept.
    """
    if isinstance(presets, (str, bytes, os.PathLike)):
        raise TypeError(
            f"presets must be a list of presets, got the single {type(presets).__name__} {presets!r} "
            "(pass a list, e.g. presets=[a, b])."
        )
    presets = list(presets)
    if not presets:
        raise ValueError("average_checkpoints needs at least one preset.")
    if weights is None:
        weights = [1.0] * len(presets)
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(
            f"weights must be a list of numbers, one per preset, got {weights!r} "
            "(pass e.g. weights=[0.5, 0.5])."
        )
    if len(weights) != len(presets):
        raise ValueError(
            f"Got {len(weights)} weights for {len(presets)} checkpoints "
            "(pass one weight per preset)."
        )
    for weight in weights:
        if not _is_real(weight):
            raise TypeError(
                f"weights must be numbers, got {weight!r} (a {type(weight).__name__}) in {list(weights)!r}."
            )
    weights = np.asarray(weights, "float64")
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(
            f"Merge weights must be finite and non-negative with a positive sum, got "
            f"{weights.tolist()} (pass e.g. weights=[0.5, 0.5])."
        )
    weights = weights / weights.sum()

    loaded = [_load(preset) for preset in presets]  # configs first: fail before any tensor is read
    reference, _, tokenizer_path = loaded[0]
    for preset, (config, _, _) in zip(presets[1:], loaded[1:]):
        _check_same_architecture(reference, config, preset)
    sums = {}
    for weight, (_, tensors, _) in zip(weights, loaded):
        for path, produce in tensors.items():
            value = np.asarray(produce(), "float32") * np.float32(weight)
            sums[path] = value if path not in sums else sums[path] + value
    return _build(reference, sums, tokenizer_path, dtype)


def interpolate(preset, base, alpha, dtype=None):
    """base + alpha * (preset - base): alpha=1 gives `preset`, 0 gives `base`.

    Any finite alpha is allowed: outside [0, 1] it extrapolates.
    """
    if not _is_real(alpha) or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r} (pass e.g. alpha=0.5).")
    config, tensors, tokenizer_path = _load(preset)
    base_config, base_tensors, _ = _load(base)
    _check_same_architecture(config, base_config, base)
    mixed = {
        path: (1.0 - alpha) * np.asarray(base_tensors[path](), "float32")
        + alpha * np.asarray(produce(), "float32")
        for path, produce in tensors.items()
    }
    return _build(config, mixed, tokenizer_path, dtype)
