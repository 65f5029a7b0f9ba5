"""Keras-side weight quantization of a Gemma2CausalLM ("int8", "int4").

The attention and feed-forward projections are stock `EinsumDense` / `Dense`
layers, which Keras quantizes itself; the tied embedding quantizes its table
with one scale per vocabulary row (`layers.TiedEmbedding`). Norm scales stay
float. This module checks the request, picks the layers, measures bytes, and
fills a model built quantized from float checkpoint tensors one at a time
(`from_preset(..., quantize=)`), with the very codes `quantize` would give.
"""

import contextlib
import gc
import re

import keras
import ml_dtypes
import numpy as np

from keras_gemma2 import backend
from keras_gemma2.model.layers import (
    Projection, TiedEmbedding, adapted_layers, own_policy, stored_embedding_rows, weights_from_checkpoint,
)

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
    check_compute_dtype(mode, model.backbone.compute_dtype)
    if adapted_layers(model.backbone):
        raise ValueError(
            "This model has unmerged LoRA adapters; call `model = model.merge_lora()` first, "
            "then quantize the merged model."
        )
    return mode


def check_compute_dtype(mode, compute_dtype):
    if mode == "int8" and compute_dtype == "float16":
        raise ValueError(
            "int8 quantization does not work with a float16 compute dtype (Keras quantizes "
            "int8 activations too, and float16 overflows). Load the model in bfloat16 or "
            "float32 (from_preset(..., dtype='bfloat16')) and quantize that."
        )


def check_load_request(mode, policy, load_weights=True):
    """`from_preset(..., quantize=mode)`: fail before any download or read."""
    if mode is None:
        return None
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(
            f"Unknown quantize={mode!r}; from_preset quantizes while it loads to "
            f"{' or '.join(repr(m) for m in MODES)} (or None: float weights)."
        )
    if not load_weights:
        raise ValueError(
            "quantize= quantizes the checkpoint as it loads, and load_weights=False loads none. "
            f"Build the random model first, then call model.quantize({mode!r})."
        )
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap) or policy.quantization_mode is not None:
        raise ValueError(
            f"dtype={policy.name!r} is already a quantized policy; with quantize= pass the float "
            "dtype the rest of the model computes in ('float32', 'bfloat16', ...)."
        )
    check_compute_dtype(mode, policy.compute_dtype)
    return mode


@contextlib.contextmanager
def collecting_new_objects_only():
    """Keras runs gc.collect() each time `quantize` drops a float kernel; scan only new objects.

    A full collection walks every Python object alive (a 2B model's layers, ops
    and graph): 0.14 s each here, 183 per 2B quantize and one per slice when
    loading quantized (86 of a 116 s load). `gc.freeze` parks the objects that
    exist now; each collection still frees what the quantizing made, and
    `unfreeze` hands the parked ones back to the collector.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---- a model built quantized, filled from float tensors one at a time ------------------------
def checkpoint_variable(layer):
    """The variable of a quantized layer a float checkpoint names: the codes, at the float weight's path."""
    return layer.embeddings if isinstance(layer, TiedEmbedding) else layer._kernel


def fill_quantized(layer, tensor, expected_shape_error, chunk_bytes=2**24):
    """Quantize one float checkpoint tensor into `layer`, built quantized (weights_from_checkpoint).

    `tensor`: an array or a zero-argument callable returning one; a callable
    with `read_rows(start, stop)` (and `source_shape`) is read a slice of rows
    at a time. The codes and scales are those `layer.quantize` gives the float
    layer: projections go through float twins quantized by Keras itself, the
    table through the function TiedEmbedding.quantize uses. Each is done a
    slice of output rows at a time where rows are independent (the table;
    int8 projections, one scale per output channel) and written in place, so
    peak memory is a slice's float copy and Keras' temporaries beyond the
    codes. Keras' int4 groups the flattened kernel, so an int4 projection is
    quantized whole. `expected_shape_error(shape, expected)` words a mismatch.
    """
    policy = own_policy(layer)
    mode = str(policy.quantization_mode)
    source = keras.dtype_policies.get(policy.name.split("_from_", 1)[1])
    float_dtype = _numpy_dtype(source.variable_dtype)
    read_rows, shape = _row_reader(tensor)
    if isinstance(layer, TiedEmbedding):
        expected = (layer.vocabulary_size, layer.hidden_dim)
    else:
        expected = layer.float_kernel_shape
    if shape != expected:
        raise expected_shape_error(shape, expected)
    rows_per_chunk = max(1, chunk_bytes // (expected[1] * 4))  # float32 rows: Keras computes in it
    if mode != "int8" and not isinstance(layer, TiedEmbedding):
        rows_per_chunk = expected[0]
    for start in range(0, expected[0], rows_per_chunk):
        stop = min(start + rows_per_chunk, expected[0])
        # As the float model holds them (its variable dtype), then quantized as quantize does.
        rows = np.array(read_rows(start, stop), dtype=float_dtype)
        if isinstance(layer, TiedEmbedding):
            # (A backend tensor: torch's Keras casts a numpy bfloat16 array to float32 as bfloat16.)
            codes, scales = stored_embedding_rows(keras.ops.convert_to_tensor(rows), mode)
            backend.assign_slice(layer.embeddings, start, codes)
            backend.assign_slice(layer.embeddings_scale, start, scales)
        else:
            _fill_output_rows(layer, rows, start, source, policy)


def _row_reader(tensor):
    """(read_rows(start, stop) -> array, the tensor's shape) of a checkpoint value."""
    reader = getattr(tensor, "read_rows", None)
    if reader is not None:
        return reader, tuple(tensor.source_shape)
    array = tensor() if callable(tensor) else tensor
    if not isinstance(array, np.ndarray):
        array = keras.ops.convert_to_numpy(array)
    return (lambda start, stop: array[start:stop]), tuple(array.shape)


def _fill_output_rows(layer, rows, start, source, policy):
    """Keras' quantize of a float twin holding kernel rows start.. of `layer`, copied into it."""
    with weights_from_checkpoint():  # a float twin (nothing quantized at build), zeros
        twin = Projection.built(layer.name, rows.shape[0], rows.shape[1], source)
    twin.kernel.assign(rows)
    twin.quantize(str(policy.quantization_mode))  # Keras' own code, as model.quantize runs it
    if own_policy(twin).name != policy.name:
        raise RuntimeError(
            f"Keras quantized {layer.path} as {own_policy(twin).name!r}, not {policy.name!r} as "
            "this model was built: keras_gemma2 does not support this Keras version's quantize."
        )
    made = {variable.name: variable for variable in twin.weights}
    for variable in layer.weights:
        part = made[variable.name]
        # The output-channel axis: the one where the slice is shorter than the layer.
        axes = [a for a, (n, m) in enumerate(zip(variable.shape, part.shape)) if n != m]
        if not axes:
            variable.assign(part.value)
        else:
            (axis,) = axes
            backend.assign_slice(variable, start * part.shape[axis] // rows.shape[0], part.value, axis)


def _numpy_dtype(name):
    name = keras.backend.standardize_dtype(name)
    return np.dtype(getattr(ml_dtypes, name, name))


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
    return _numpy_dtype(dtype).itemsize


def weight_bytes(model):
    """Bytes held by the model's variables (weights, quantization scales, adapters)."""
    seen, total = set(), 0
    for variable in model.weights:
        if id(variable) not in seen:
            seen.add(id(variable))
            total += int(np.prod(variable.shape)) * itemsize(variable.dtype)
    return total
