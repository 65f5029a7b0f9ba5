"""The traced prefill/decode signatures of an export, and the metadata file beside them.

Traced on Keras' TensorFlow backend; see keras_gemma2/edge/export.py for the
signatures' inputs and outputs.
"""

import contextlib

import keras
import numpy as np

from keras_gemma2.edge import litert_weights
from keras_gemma2.model import kv_cache
from keras_gemma2.tokenizer import Gemma2Tokenizer
from keras_gemma2.version import __version__


def build_signatures(backbone, cache_length, prefill_lengths, int8_lookup=False, template=False,
                     stage=None):
    """A tf.Module with `prefill_{P}` and `decode` tf.functions over the backbone's weights.

    The module holds the backbone's underlying tf.Variables (not the Keras
    layers): traced under a StatelessScope that maps each Keras variable to
    its tf.Variable, the graph reads plain variables, which the TFLite
    converter freezes into constants. `template=True` maps block l's variables
    to block l % 2's (see litert_weights): the module then holds the embedding
    and two blocks, whatever the depth.
    """
    import tensorflow as tf
    from keras import ops

    config = backbone.config
    layout = kv_cache.CacheLayout.rings(config, cache_length)
    slots = list(layout.slots)
    keras_variables = list(backbone.variables)
    cache_specs = [
        tf.TensorSpec(layout.shape(i, config, 1), tf.float32, name=f"cache_{i}")
        for i in range(config.num_layers)
    ]

    module = tf.Module()
    sources = litert_weights.template_sources(backbone) if template else keras_variables
    tf_variables = {}  # one tf.Variable per source (the template shares them across blocks)
    for source in sources:
        if id(source) not in tf_variables:
            tf_variables[id(source)] = (
                tf.Variable(source, trainable=False) if isinstance(source, np.ndarray) else source.value
            )
    module.weights = list(tf_variables.values())
    read = [tf_variables[id(source)] for source in sources]
    embedding = backbone.token_embedding
    if int8_lookup:
        # The token lookup reads an int8 copy (a row per token, dequantized on the fly);
        # the output projection keeps the float table for the converter to quantize.
        table, row_scale = litert_weights.quantize_rows(embedding.embeddings)
        module.lookup_table = tf.Variable(table, trainable=False, name="lookup_table")
        module.lookup_scale = tf.Variable(row_scale, trainable=False, name="lookup_scale")
        del table, row_scale

    @contextlib.contextmanager
    def scope():
        with keras.StatelessScope(state_mapping=list(zip(keras_variables, read))):
            if not int8_lookup:
                yield
                return
            embedding.int8_lookup = (module.lookup_table, module.lookup_scale)
            try:
                yield
            finally:
                embedding.int8_lookup = None

    def named(logits, caches):
        return {"logits": logits, **{f"cache_{i}": c for i, c in enumerate(caches)}}

    def make_prefill(bucket):
        @tf.function(
            input_signature=[
                tf.TensorSpec((1, bucket), tf.int32, name="tokens"),
                tf.TensorSpec((), tf.int32, name="length"),
            ]
        )
        def prefill(tokens, length):
            with scope():
                pad = bucket - length
                # Left-padded, as generate does: the prompt ends at index bucket - 1 and
                # its pad tokens have negative positions (never attended to).
                index = ops.arange(bucket, dtype="int32")
                aligned = ops.take(tokens, ops.mod(index - pad, bucket), axis=1)
                whole = kv_cache.CacheLayout.full(config, bucket)
                hidden, filled = backbone.forward_pass(
                    aligned, (index - pad)[None, :], whole.new_caches(config, 1, "float32"), 0, whole
                )
                # Into the decode layout, where index == position: slot s of a layer
                # keeps the position the ring rule gives it (held_indices), found at
                # index position + pad of the prefill's cache; empty slots are masked.
                caches = []
                for cache, n in zip(filled, slots):
                    source = ops.clip(kv_cache.held_indices(length, n) + pad, 0, bucket - 1)
                    caches.append(ops.take(cache, source, axis=kv_cache.SLOT_AXIS))
                return named(backbone.logits(hidden[:, -1:])[:, 0], caches)

        return prefill

    @tf.function(
        input_signature=[
            tf.TensorSpec((1, 1), tf.int32, name="token"),
            tf.TensorSpec((), tf.int32, name="position"),
            *cache_specs,
        ]
    )
    def decode(token, position, *caches):
        with scope():
            positions = ops.reshape(position, (1, 1))
            hidden, caches = backbone.forward_pass(token, positions, list(caches), position, layout)
            return named(backbone.logits(hidden)[:, 0], caches)

    signatures = {f"prefill_{p}": make_prefill(p) for p in prefill_lengths}
    signatures["decode"] = decode
    for name, function in signatures.items():
        setattr(module, name, function)
    concrete = {}
    for name, function in signatures.items():
        if stage:
            stage(f"tracing the {name} signature")
        concrete[name] = function.get_concrete_function()
    return module, concrete, slots


def metadata(backbone, tokenizer, plan, stop_ids, slots, files):
    config = backbone.config
    return {
        "format": plan.format,
        "quantization": plan.quantization,
        "files": files,
        "compute_dtype": "float32",
        "cache_dtype": "float32",
        "cache_length": plan.cache_length,
        "cache_slots": slots,
        "cache_shape": [1, 2, config.num_key_value_heads, None, config.head_dim],
        "prefill_lengths": list(plan.prefill_lengths),
        "signatures": {
            "prefill": {str(p): f"prefill_{p}" for p in plan.prefill_lengths},
            "decode": "decode",
        },
        "vocabulary_size": config.vocabulary_size,
        "bos_token_id": tokenizer.bos_token_id if tokenizer is not None else 2,
        "add_bos": True,
        "stop_token_ids": stop_ids,
        "chat_template": Gemma2Tokenizer.chat_format(),  # apply_chat_template's turn format
        "config": config.to_dict(),
        "keras_gemma2_version": __version__,
    }
