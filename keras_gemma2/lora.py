"""LoRA adapters on the attention and feed-forward projections.

Keras' Dense and EinsumDense carry LoRA themselves (kernel + (alpha/rank) A B);
this module picks the Gemma 2 projections to adapt, freezes everything else,
saves and loads just the adapters, and merges them into plain kernels.
"""

import json

import keras
import numpy as np

from keras_gemma2.checkpoints import safetensors_io

PROJECTIONS = ("query", "key", "value", "attention_output", "gate", "up", "down")
DEFAULT_TARGETS = ("query", "value")


def _projection_layers(backbone, targets):
    layers = []
    for block in backbone.decoder_blocks:
        for name in targets:
            owner = block.attention if name in ("query", "key", "value", "attention_output") else block.feedforward
            layers.append(getattr(owner, name))
    return layers


def enable_lora(model, rank, target_layers=DEFAULT_TARGETS, alpha=None):
    """Freeze the model and add rank-`rank` adapters to the named projections of every block."""
    unknown = sorted(set(target_layers) - set(PROJECTIONS))
    if unknown or not target_layers:
        raise ValueError(f"Unknown LoRA targets {unknown or target_layers}; choose from {PROJECTIONS}.")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}.")
    if lora_layers(model):
        raise ValueError("LoRA is already enabled on this model; merge_lora() first to add new adapters.")
    backbone = model.backbone
    for layer in backbone._flatten_layers(include_self=False):
        layer.trainable = False
    for layer in _projection_layers(backbone, target_layers):
        layer.trainable = True
        layer.enable_lora(rank, lora_alpha=alpha)
    model._lora_targets = tuple(target_layers)
    model._generator = None  # compiled generation functions captured the old variables


def lora_layers(model):
    return [
        layer for layer in model.backbone._flatten_layers(include_self=False)
        if getattr(layer, "lora_enabled", False)
    ]


def save_lora_weights(model, path):
    """Write only the adapters (A and B of every adapted projection) to a .safetensors file."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("This model has no LoRA adapters; call enable_lora(rank) first.")
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"LoRA weights are saved as .safetensors; got {path!r}.")
    tensors = {}
    for layer in layers:
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            tensors[variable.path] = np.asarray(keras.ops.convert_to_numpy(variable.value))
    metadata = {
        "rank": layers[0].lora_rank,
        "alpha": layers[0].lora_alpha,
        "targets": json.dumps(list(model._lora_targets)),
    }
    safetensors_io.write_file(path, tensors, metadata=metadata)


def load_lora_weights(model, path):
    """Enable LoRA as recorded in the file (rank, alpha, targets) and load the adapters."""
    adapters = safetensors_io.SafetensorsFile(path)
    metadata = adapters.metadata
    if "rank" not in metadata:
        raise ValueError(f"{path} is not a keras_gemma2 LoRA file (no rank in its metadata).")
    if not lora_layers(model):
        enable_lora(
            model, int(metadata["rank"]), json.loads(metadata["targets"]), float(metadata["alpha"])
        )
    variables = {
        v.path: v for layer in lora_layers(model) for v in (layer.lora_kernel_a, layer.lora_kernel_b)
    }
    if set(variables) != set(adapters.keys()):
        raise ValueError(f"{path} holds adapters for other layers than this model's LoRA layers.")
    for name in adapters.keys():
        if tuple(variables[name].shape) != adapters.shape(name):
            raise ValueError(
                f"LoRA tensor {name!r} has shape {adapters.shape(name)}; the model expects "
                f"{tuple(variables[name].shape)}."
            )
        variables[name].assign(np.array(adapters.get(name)))


def merge_lora(model):
    """A new Gemma2CausalLM without adapters whose kernels include them (same outputs)."""
    from keras_gemma2.backbone import Gemma2Backbone
    from keras_gemma2.causal_lm import Gemma2CausalLM

    merged_kernels = {
        layer._kernel.path: keras.ops.convert_to_numpy(layer.kernel) for layer in lora_layers(model)
    }
    backbone = Gemma2Backbone(model.config, dtype=model.backbone.dtype_policy)
    source = {v.path: v for v in model.backbone.weights}
    for variable in backbone.weights:
        value = merged_kernels.get(variable.path)
        if value is None:
            value = keras.ops.convert_to_numpy(source[variable.path].value)
        variable.assign(value)
    return Gemma2CausalLM(backbone, tokenizer=model.tokenizer)
