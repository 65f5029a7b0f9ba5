"""LoRA adapters on the attention and feed-forward projections.

Keras' Dense and EinsumDense carry LoRA themselves (kernel + (alpha/rank) A B);
this module picks the Gemma 2 projections to adapt, freezes everything else,
saves and loads just the adapters, and merges them into plain kernels.
"""

import json

import keras
import numpy as np

from keras_gemma2.io import safetensors_files
from keras_gemma2.model import layers, quantization

PROJECTIONS = ("query", "key", "value", "attention_output", "gate", "up", "down")
DEFAULT_TARGETS = ("query", "value")


def _backbone(model):
    """A causal LM's backbone, or the backbone itself (keras-hub's `model.backbone.enable_lora`)."""
    return getattr(model, "backbone", model)


def _projection_layers(backbone, targets):
    chosen = []
    for block in backbone.decoder_blocks:
        for name in targets:
            owner = block.attention if name in ("query", "key", "value", "attention_output") else block.feedforward
            chosen.append(getattr(owner, name))
    return chosen


def _projection_widths(config):
    """{projection name: its kernel's (out, in) features}."""
    query, kv = config.num_query_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    hidden, inter = config.hidden_dim, config.intermediate_dim
    return {
        "query": (query, hidden), "key": (kv, hidden), "value": (kv, hidden),
        "attention_output": (hidden, query),
        "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter),
    }


def enable_lora(model, rank, target_layers=DEFAULT_TARGETS, alpha=None):
    """Freeze the model and add rank-`rank` adapters to the named projections of every block.

    `model`: a Gemma2CausalLM or its Gemma2Backbone (the adapters live in the backbone).
    """
    if isinstance(target_layers, str):
        target_layers = (target_layers,)  # one target, not its letters
    if not isinstance(target_layers, (list, tuple, set, frozenset)) or not target_layers or not all(
        isinstance(name, str) for name in target_layers
    ):
        raise ValueError(
            f"target_layers must be a projection name or a list of them (from {PROJECTIONS}), "
            f"got {target_layers!r}."
        )
    unknown = sorted(set(target_layers) - set(PROJECTIONS))
    if unknown:
        raise ValueError(f"Unknown LoRA targets {unknown} in target_layers; choose from {PROJECTIONS}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
    # A rank above a projection's smaller side adds parameters but no expressiveness.
    widths = _projection_widths(model.config)
    narrowest = min(target_layers, key=lambda name: min(widths[name]))
    if rank > min(widths[narrowest]):
        raise ValueError(
            f"LoRA rank {rank} exceeds the width of the {narrowest!r} projection "
            f"{widths[narrowest]} (out, in): an adapter cannot have a rank above "
            f"{min(widths[narrowest])}. Pass rank <= {min(widths[narrowest])}."
        )
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not alpha > 0):
        raise ValueError(f"LoRA alpha must be a positive number or None (= rank), got {alpha!r}.")
    if lora_layers(model):
        raise ValueError("LoRA is already enabled on this model; merge_lora() first to add new adapters.")
    quantized = quantization.modes_of(_projection_layers(_backbone(model), target_layers))
    if quantized:
        raise ValueError(
            f"This model is quantized ({', '.join(quantized)}); LoRA adapters train on float kernels. "
            "Enable LoRA on the float model, train, merge_lora(), then quantize the merged model."
        )
    backbone = _backbone(model)
    for layer in backbone._flatten_layers(include_self=False):
        layer.trainable = False
    for layer in _projection_layers(backbone, target_layers):
        layer.trainable = True
        layer.enable_lora(rank, lora_alpha=alpha)
    # The causal LM's compiled generation functions captured the old variables; it rebuilds
    # them when these targets differ from the ones they were built with.
    backbone.lora_targets = tuple(target_layers)


def lora_layers(model):
    return layers.adapted_layers(_backbone(model))


def save_lora_weights(model, path):
    """Write only the adapters (A and B of every adapted projection) to a .safetensors file."""
    adapted = lora_layers(model)
    if not adapted:
        raise ValueError("This model has no LoRA adapters; call enable_lora(rank) first.")
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"LoRA weights are saved as .safetensors; got {path!r}.")
    tensors = {v.path: np.asarray(keras.ops.convert_to_numpy(v.value)) for v in _adapter_variables(adapted)}
    metadata = {
        "rank": adapted[0].lora_rank,
        "alpha": adapted[0].lora_alpha,
        "targets": json.dumps(list(_backbone(model).lora_targets)),
    }
    safetensors_files.write_file(path, tensors, metadata=metadata)


def load_lora_weights(model, path):
    """Enable LoRA as recorded in the file (rank, alpha, targets) and load the adapters.

    The file is checked against the adapters it would need (names and shapes)
    before anything changes: a file of another model leaves this one as it was.
    """
    adapters = safetensors_files.SafetensorsFile(path)
    metadata = adapters.metadata
    if "rank" not in metadata:
        raise ValueError(f"{path} is not a keras_gemma2 LoRA file (no rank in its metadata).")
    try:
        rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
        targets = tuple(json.loads(metadata["targets"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{path} has unreadable LoRA metadata ({error}); save it again with save_lora_weights."
        ) from error
    enabled = lora_layers(model)
    if enabled:
        expected = {v.path: tuple(v.shape) for v in _adapter_variables(enabled)}
    else:
        unknown = sorted(set(targets) - set(PROJECTIONS))
        if unknown or not targets:
            raise ValueError(f"{path} names unknown LoRA targets {unknown or list(targets)}.")
        expected = _adapter_shapes(model, rank, targets)
    found = {name: adapters.shape(name) for name in adapters.keys()}
    if set(found) != set(expected):
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise ValueError(
            f"{path} holds adapters for other layers than this model's: "
            f"{len(missing)} missing (e.g. {missing[:1]}), {len(extra)} unexpected (e.g. {extra[:1]}). "
            "Load adapters saved from a model of this architecture."
        )
    for name, shape in found.items():
        if shape != expected[name]:
            raise ValueError(
                f"LoRA tensor {name!r} in {path} has shape {shape}; the model expects "
                f"{expected[name]}. Load adapters saved from a model of this architecture."
            )
    values = {name: np.array(adapters.get(name)) for name in found}  # read all before changing anything
    if not enabled:
        enable_lora(model, rank, targets, alpha)
    for variable in _adapter_variables(lora_layers(model)):
        variable.assign(values[variable.path])


def _adapter_variables(adapted):
    return [v for layer in adapted for v in (layer.lora_kernel_a, layer.lora_kernel_b)]


def _adapter_shapes(model, rank, targets):
    """{variable path: shape} of the adapters `enable_lora(rank, targets)` would add.

    Keras' EinsumDense.enable_lora: A is kernel.shape[:-1] + (rank,), B is (rank, kernel.shape[-1]).
    """
    shapes = {}
    for layer in _projection_layers(_backbone(model), targets):
        kernel = tuple(layer.kernel.shape)
        shapes[f"{layer.path}/lora_kernel_a"] = kernel[:-1] + (rank,)
        shapes[f"{layer.path}/lora_kernel_b"] = (rank, kernel[-1])
    return shapes


def merge_lora(model):
    """A new model of `model`'s class without adapters whose kernels include them (same outputs)."""
    adapted = lora_layers(model)
    adapters = {v.path for v in _adapter_variables(adapted)}
    # An adapted layer's `kernel` is its base kernel plus (alpha / rank) A B, computed when read.
    merged = {layer._kernel.path: (lambda layer=layer: layer.kernel) for layer in adapted}
    weights = {
        v.path: merged.get(v.path, v.value) for v in model.backbone.weights if v.path not in adapters
    }
    backbone = type(model.backbone).from_weights(model.config, weights, dtype=model.backbone.dtype_policy)
    return type(model)(backbone, tokenizer=model.tokenizer)
