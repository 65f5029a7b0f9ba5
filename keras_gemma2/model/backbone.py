"""The Gemma 2 backbone: token ids and padding mask in, final hidden states out.

`decoder_forward` is the model's one forward pass; the functional graph
(training, scoring) and `Gemma2Backbone.forward_pass` (the cached path: generate,
beam search, export) both run it.
"""

import dataclasses

import keras
import ml_dtypes
import numpy as np

from keras import ops

from keras_gemma2 import backend
from keras_gemma2.config import Gemma2Config
from keras_gemma2.model import kv_cache
from keras_gemma2.model.layers import Gemma2DecoderBlock, RMSNorm, TiedEmbedding
from keras_gemma2.checkpoints import presets
from keras_gemma2.training import distribution
from keras_gemma2.model import lora, quantization
from keras_gemma2.model.layers import adapted_layers, own_policy, weights_from_checkpoint


def decoder_forward(token_embedding, blocks, final_norm, config, token_ids, positions,
                    padding_mask=None, caches=None, cache_index=0, layout=None):
    """Gemma 2 from token ids to final hidden states: THE forward pass.

    Training, scoring (the functional graph, `padding_mask` marking real
    tokens), generate's prefill and decode steps, beam search and every
    export signature (with `caches`) run this function. See
    `Gemma2Backbone.forward_pass` for the cached arguments.
    """
    if caches is None:
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids)
        windows = kv_cache.layer_windows(config)
        caches = [None] * config.num_layers
    elif padding_mask is not None:
        raise ValueError("A cached forward marks padding with negative positions, not padding_mask.")
    else:
        windows = layout.windows
    length = token_ids.shape[1]
    static_start = isinstance(cache_index, (int, np.integer))

    masks = {}

    def mask_and_reads(layer):
        """The keys layer `layer` reads (see Gemma2Attention) and its mask, shared by like layers."""
        window = windows[layer]
        if caches[layer] is None:
            key = (window, None, "chunk")
        elif static_start and cache_index == 0:  # an empty cache: the chunk alone
            key = (window, None, "chunk")
        elif length is not None and layout.writes_before_reading(layer, length):
            key = (window, layout.slots[layer], "cache")
        else:
            key = (window, layout.slots[layer], "cache_and_chunk")
        span = layout.read_span(layer, cache_index, length) if key[2] == "cache" else None
        key += (span is not None,)
        if key not in masks:
            _, slots, reads, _ = key
            if reads == "chunk":
                valid = padding_mask if padding_mask is not None else positions >= 0
                keys = positions
            else:
                end = cache_index + length if reads == "cache" else cache_index
                # Index minus position: each row's left padding (positions advance with indices).
                offset = cache_index - positions[:, :1]
                # A full-length cache holds index s in slot s (unwritten ones are later than
                # every query, so causality masks them); a ring holds what held_indices says.
                if span is not None:  # a full-length cache's window behind the chunk
                    held = span[0] + ops.arange(span[1], dtype="int32")
                elif layout.never_wraps:
                    held = np.arange(slots, dtype="int32")
                else:
                    held = kv_cache.held_indices(end, slots)
                keys = ops.convert_to_tensor(held)[None, :] - offset
                if reads == "cache_and_chunk":
                    keys = ops.concatenate([keys, positions], axis=1)
                valid = keys >= 0
            masks[key] = kv_cache.attention_bias(kv_cache.attention_mask(positions, keys, valid, window))
        return masks[key], key[2], span

    x = token_embedding(token_ids)
    updated = []
    for layer, (block, cache) in enumerate(zip(blocks, caches)):
        mask, reads, span = mask_and_reads(layer)
        if cache is None:
            x = block(x, positions, mask)
        else:
            x, cache = block(x, positions, mask, cache=cache, cache_index=cache_index, reads=reads,
                             ring=not layout.never_wraps, span_start=None if span is None else span[0])
        updated.append(cache)
    return final_norm(x), (None if caches[0] is None else updated)


def resolve_dtype_policy(dtype):
    """A Keras dtype policy from a name, a policy or None (the global policy)."""
    if dtype is None:
        return keras.config.dtype_policy()
    if isinstance(dtype, keras.dtype_policies.DTypePolicy):
        return dtype
    if isinstance(dtype, dict):  # a serialized policy, from get_config
        return keras.dtype_policies.deserialize(dtype)
    try:
        return keras.dtype_policies.get(dtype)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Unknown dtype {dtype!r}. Use one of 'float32', 'bfloat16', 'float16', "
            "'mixed_bfloat16', 'mixed_float16', or a keras.DTypePolicy."
        ) from error


def check_token_ids(values, vocabulary_size, name="token_ids"):
    """Raise ValueError naming `name` when a value of the numpy array lies outside [0, vocabulary_size)."""
    if values.size and (values.min() < 0 or values.max() >= vocabulary_size):
        bad = values[(values < 0) | (values >= vocabulary_size)]
        raise ValueError(
            f"Token ids must lie in [0, {vocabulary_size}); found {bad[:5].tolist()} in `{name}` "
            f"(the model's vocabulary has {vocabulary_size} tokens). Was the input tokenized "
            "with this model's tokenizer?"
        )


def standardize_inputs(inputs, config):
    """Fill a missing padding mask and check shapes and ids before any compute.

    Values are checked only when they are concrete (eager calls); inside a
    traced function only static shapes can be checked.
    """
    if not isinstance(inputs, dict):
        inputs = {"token_ids": inputs}
    unknown = sorted(set(inputs) - {"token_ids", "padding_mask"})
    if unknown or "token_ids" not in inputs:
        raise ValueError(
            f"Expected inputs {{'token_ids', 'padding_mask'}}, got keys {sorted(inputs)}."
        )
    token_ids = inputs["token_ids"]
    if isinstance(token_ids, (list, tuple, np.ndarray)):
        token_ids = np.asarray(token_ids)
        if token_ids.dtype.kind not in "iu":
            raise ValueError(
                f"`token_ids` must be integers, got dtype {token_ids.dtype}. "
                "Tokenize text first (Gemma2Tokenizer) or pass int arrays."
            )
        token_ids = token_ids.astype("int32")
    shape = tuple(token_ids.shape)
    if len(shape) == 1:
        raise ValueError(
            f"`token_ids` must have shape [batch, sequence], got {shape}. "
            "Add a batch axis, e.g. token_ids[None]."
        )
    if len(shape) != 2:
        raise ValueError(f"`token_ids` must have shape [batch, sequence], got {shape}.")
    length = shape[1]
    if length is not None and length > config.max_sequence_length:
        raise ValueError(
            f"Sequence length {length} exceeds the model's max_sequence_length "
            f"{config.max_sequence_length}. Truncate the input or split it into chunks."
        )
    if backend.is_concrete(token_ids):
        check_token_ids(np.asarray(keras.ops.convert_to_numpy(token_ids)), config.vocabulary_size)
    padding_mask = inputs.get("padding_mask")
    if padding_mask is None:
        padding_mask = keras.ops.ones(keras.ops.shape(token_ids), dtype="int32")
    else:
        if isinstance(padding_mask, (list, tuple, np.ndarray)):
            padding_mask = np.asarray(padding_mask).astype("int32")
        if tuple(padding_mask.shape) != shape:
            raise ValueError(
                f"`padding_mask` shape {tuple(padding_mask.shape)} must equal "
                f"`token_ids` shape {shape}."
            )
    if backend.is_concrete(token_ids):  # one tensor type for both inputs
        token_ids = keras.ops.convert_to_tensor(token_ids, "int32")
        padding_mask = keras.ops.convert_to_tensor(padding_mask, "int32")
    return {"token_ids": token_ids, "padding_mask": padding_mask}


@keras.saving.register_keras_serializable(package="keras_gemma2")
class Gemma2Backbone(keras.Model):
    """Decoder-only Gemma 2 transformer (functional Keras model).

    Inputs: `{"token_ids": int [batch, seq], "padding_mask": [batch, seq]}`
    (1 for real tokens; padding goes on the right). Output: the final
    RMS-normed hidden states [batch, seq, hidden_dim].
    """

    def __init__(self, config, dtype=None, **kwargs):
        if isinstance(config, dict):
            config = Gemma2Config.from_dict(config)
        if not isinstance(config, Gemma2Config):
            raise TypeError(f"`config` must be a Gemma2Config or dict, got {type(config).__name__}.")
        backend.check_backend()
        # `policy` goes to the layers. A DTypePolicyMap (a saved quantized model's
        # config) gives each quantized layer its own policy by path, so the layer
        # builds its quantized variables directly; the model itself keeps the default.
        policy = resolve_dtype_policy(dtype)
        model_policy = policy
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            model_policy = policy.default_policy

        # ---- layers ------------------------------------------------------
        token_embedding = TiedEmbedding(
            config.vocabulary_size,
            config.hidden_dim,
            config.final_logit_soft_cap,
            dtype=policy,
            name="token_embedding",
        )
        blocks = [
            Gemma2DecoderBlock(config, i, dtype=policy, name=f"decoder_block_{i}")
            for i in range(config.num_layers)
        ]
        final_norm = RMSNorm(config.layer_norm_epsilon, dtype=policy, name="final_norm")

        # ---- functional graph: the same forward, without a cache -----------
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        positions = ops.cumsum(ops.ones_like(token_ids), axis=1) - 1
        hidden, _ = decoder_forward(
            token_embedding, blocks, final_norm, config, token_ids, positions, padding_mask
        )
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=hidden,
            **kwargs,
        )
        self.dtype_policy = model_policy  # functional models ignore the `dtype` argument

        self.config = config
        self.token_embedding = token_embedding
        self.decoder_blocks = blocks
        self.final_norm = final_norm

    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(standardize_inputs(inputs, self.config), *args, **kwargs)

    # The projections carrying LoRA adapters (lora.enable_lora), None without any.
    lora_targets = None

    def enable_lora(self, rank, target_layers=("query", "value"), alpha=None):
        """Freeze the weights; add trainable rank-`rank` adapters (keras-hub's `backbone.enable_lora`).

        The same as `Gemma2CausalLM.enable_lora`: the adapters live here either way.
        """
        lora.enable_lora(self, rank, target_layers, alpha)

    @staticmethod
    def get_layout_map(device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"):
        """A keras.distribution.LayoutMap sharding every weight over `model_parallel_dim_name`.

        keras-hub's name for this library's sharding rules (training/distribution.py):
        projections are split over their flattened output or input width, not over
        heads, so a model with fewer key/value heads than devices still shards.
        `data_parallel_dim_name` is accepted for keras-hub's signature; batches are
        split by keras.distribution.ModelParallel(batch_dim_name=...).
        """
        del data_parallel_dim_name
        return distribution.layout_map(device_mesh, model_axis=model_parallel_dim_name)

    def forward_pass(self, token_ids, positions, caches=None, cache_index=0, layout=None):
        """The cached forward: a chunk of tokens attends to the caches plus itself.

        (Not named `forward`: under PyTorch that is every Keras layer's torch entry point.)

        `token_ids`, `positions` [batch, T]: the chunk is cache indices
        cache_index..cache_index+T-1 (shared by every row; `cache_index` a
        Python int or a scalar tensor) at these positions (a left-padded row's
        are its indices minus its padding; negative ones are padding). With
        `caches` (one per layer, as `layout`, a kv_cache.CacheLayout, holds
        them) the chunk reads what they hold and is written in. Returns
        (hidden states after the final norm [batch, T, hidden], caches).
        """
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        positions = ops.convert_to_tensor(positions, "int32")
        return decoder_forward(
            self.token_embedding, self.decoder_blocks, self.final_norm, self.config,
            token_ids, positions, caches=caches, cache_index=cache_index, layout=layout,
        )

    def logits(self, hidden):
        """Float32 vocabulary logits (tied projection, final soft-cap) of hidden states."""
        return self.token_embedding(hidden, reverse=True)

    def get_config(self):
        return {
            "config": self.config.to_dict(),
            "dtype": keras.dtype_policies.serialize(self._config_policy()),
            "name": self.name,
        }

    def _config_policy(self):
        """The model's policy, or a DTypePolicyMap of it plus each quantized layer's policy."""
        quantized = {layer.path: own_policy(layer) for layer in quantization.quantized_layers(self)}
        if not quantized:
            return self.dtype_policy
        return keras.dtype_policies.DTypePolicyMap(self.dtype_policy, quantized)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def from_preset(cls, preset, dtype=None, load_weights=True, quantize=None, **config_overrides):
        """Load a backbone from a preset name, directory or handle (see `keras_gemma2.from_preset`)."""
        return cls._from_preset(preset, dtype, load_weights, config_overrides, quantize)[0]

    # ---- one architecture, these weights: presets, merging, LoRA merge, export ----
    @classmethod
    def from_weights(cls, config, tensors, dtype=None, quantize=None):
        """A backbone of `config` holding `tensors`, {variable path: value}, one per variable.

        A value is an array, a backend tensor or a zero-argument callable
        returning one (read only when its turn comes: one tensor in memory at a
        time). Every name is checked before any value is read, every shape as
        it is assigned. The layers start as zeros, not random draws, since every
        weight is overwritten (`weights_from_checkpoint`).

        `quantize` ("int8" / "int4"): the projections and the tied embedding
        are built quantized and each float tensor is quantized as it is read,
        to the codes `quantize` would give after a float load, without ever
        holding the float model.
        """
        policy = resolve_dtype_policy(dtype)
        quantize = quantization.check_load_request(quantize, policy)
        with weights_from_checkpoint(quantization=quantize):
            backbone = cls(config, dtype=policy)
        # The checkpoint names float weights; a quantized layer's codes sit at its float
        # weight's path and its scales are computed from it.
        quantized = {quantization.checkpoint_variable(layer).path: layer
                     for layer in quantization.quantized_layers(backbone)} if quantize else {}
        derived = {v.path for layer in quantized.values() for v in layer.weights} - set(quantized)
        variables = {v.path: v for v in backbone.weights if v.path not in derived}
        missing = sorted(set(variables) - set(tensors))
        unexpected = sorted(set(tensors) - set(variables))
        if missing or unexpected:
            raise ValueError(
                f"Checkpoint does not fit the architecture: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}."
            )

        def shape_error(path):
            source = getattr(tensors[path], "source_name", path)
            return lambda shape, expected: ValueError(
                f"Weight {source!r} has shape {tuple(shape)} after conversion but the model "
                f"expects {tuple(expected)} for {path!r}. The checkpoint does not match "
                "its config (or the config overrides)."
            )

        for path, variable in variables.items():
            if path in quantized:
                with quantization.collecting_new_objects_only():
                    quantization.fill_quantized(quantized[path], tensors[path], shape_error(path))
                continue
            array = tensors[path]() if callable(tensors[path]) else tensors[path]
            if not isinstance(array, np.ndarray):
                array = keras.ops.convert_to_numpy(array)
            if tuple(array.shape) != tuple(variable.shape):
                raise shape_error(path)(array.shape, variable.shape)
            name = str(variable.dtype)
            target = ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)
            # A plain array (not a memmap) in the variable's dtype, for every backend.
            variable.assign(np.array(array, dtype=target))
        return backbone

    def clone(self, dtype=None):
        """A new backbone with this one's config and a copy of its weights.

        `dtype=None` keeps this backbone's policy, quantized layers included;
        another policy converts the copied weights (of a float backbone).
        """
        if adapted_layers(self):
            raise ValueError(
                "This backbone has unmerged LoRA adapters; call `model = model.merge_lora()` "
                "and clone the merged model's backbone."
            )
        policy = self._config_policy() if dtype is None else dtype
        return type(self).from_weights(self.config, {v.path: v.value for v in self.weights}, dtype=policy)

    @classmethod
    def _from_preset(cls, preset, dtype, load_weights, config_overrides, quantize=None):
        """(backbone, the path of the tokenizer stored with the preset or None).

        Gemma2CausalLM.from_preset builds on this. Every argument is checked
        before anything is downloaded or read.
        """
        policy = resolve_dtype_policy(dtype)  # a bad dtype fails before any download
        cls._check_load_options(load_weights, config_overrides)
        quantization.check_load_request(quantize, policy, load_weights)
        config, tensors, tokenizer_file = presets.read_preset(preset, Gemma2Config, load_weights)
        config = config.replace(**config_overrides)
        if tensors is None:
            return cls(config, dtype=policy), tokenizer_file
        return cls.from_weights(config, tensors, dtype=policy, quantize=quantize), tokenizer_file

    @staticmethod
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
