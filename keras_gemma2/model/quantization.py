"""Keras-side weight quantization of a Gemma2CausalLM ("int8", "int4").

The attention and feed-forward projections are stock `EinsumDense` / `Dense`
layers, which Keras quantizes itself; the tied embedding quantizes its table
with one scale per vocabulary row (`layers.TiedEmbedding`). Norm scales stay
float. This module checks the request, picks the layers, and measures bytes.
"""

import re

import keras
import ml_dtypes
import numpy as np

from keras_gemma2.model.layers import TiedEmbedding, adapted_layers

MODES = ("int8", "int4")


def quantizable(layer):
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense, TiedEmbedding))


def is_quantized(layer):
    return getattr(layer, "quantization_mode", None) is not None


def quantized_layers(model):
    """The layers of `model` (a Gemma2CausalLM, a backbone or a layer) that are quantized.

    The one place that says which layers are quantized: the saved policy
    (Gemma2Backbone.get_config), the refusals of LoRA, presets and a second
    quantize, and export all read it.
    """
    return [layer for layer in model._flatten_layers(include_self=False) if is_quantized(layer)]


def modes_of(layers):
    """Sorted quantization modes among `layers` (empty: all float)."""
    return sorted({str(layer.quantization_mode) for layer in layers if is_quantized(layer)})


def quantization_modes(model):
    """Sorted quantization modes found in `model`'s layers (empty: a float model)."""
    return modes_of(quantized_layers(model))


def check_request(model, mode, config=None):
    """Fail before any work: an unknown mode, a quantized model, float16 + int8, LoRA."""
    if mode is None and config is not None:
        mode = getattr(config, "mode", None)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(
            f"Unknown quantization mode {mode!r}; Gemma2CausalLM.quantize supports "
            f"{', '.join(repr(m) for m in MODES)}."
        )
    if config is not None and getattr(config, "mode", mode) != mode:
        raise ValueError(f"mode {mode!r} disagrees with the config's mode {config.mode!r}.")
    done = quantization_modes(model)
    if done:
        raise ValueError(
            f"This model is already quantized ({', '.join(done)}). Quantize a float model: "
            "load the float weights again and call quantize once."
        )
    if mode == "int8" and model.backbone.compute_dtype == "float16":
        raise ValueError(
            "int8 quantization does not work with a float16 compute dtype (Keras quantizes "
            "int8 activations too, and float16 overflows). Load the model in bfloat16 or "
            "float32 (from_preset(..., dtype='bfloat16')) and quantize that."
        )
    if adapted_layers(model.backbone):
        raise ValueError(
            "This model has unmerged LoRA adapters; call `model = model.merge_lora()` first, "
            "then quantize the merged model."
        )
    return mode


def layer_filter(filters=None):
    """Quantizable layers, narrowed by Keras-style `filters` (regexes searched in the layer path, or a callable)."""
    if filters is None:
        return quantizable
    if isinstance(filters, str):
        filters = [filters]
    if callable(filters):
        return lambda layer: quantizable(layer) and bool(filters(layer))
    if isinstance(filters, (list, tuple)) and all(isinstance(f, str) for f in filters):
        for pattern in filters:  # a bad regex fails here, not after some layers are quantized
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"`filters` holds an invalid regex {pattern!r}: {error}.") from None
        return lambda layer: quantizable(layer) and any(re.search(f, layer.path) for f in filters)
    raise ValueError(
        f"`filters` must be a regex string, a list of them or a callable; got {type(filters).__name__}."
    )


def itemsize(dtype):
    name = keras.backend.standardize_dtype(dtype)
    return np.dtype(getattr(ml_dtypes, name, name)).itemsize


def weight_bytes(model):
    """Bytes held by the model's variables (weights, quantization scales, adapters)."""
    seen, total = set(), 0
    for variable in model.weights:
        if id(variable) not in seen:
            seen.add(id(variable))
            total += int(np.prod(variable.shape)) * itemsize(variable.dtype)
    return total
