"""The traced prefill/decode signatures of an export, and the metadata file beside them.

Traced on Keras' TensorFlow backend; see keras_gemma2/edge/export.py for the
signatures' inputs and outputs.
"""

import contextlib

import keras
import numpy as np

from keras_gemma2.edge import litert_weights
from keras_gemma2.model import kv_cache
from keras_gemma2.model.layers import product_plan, stacked_kernel
from keras_gemma2.tokenizer import Gemma2Tokenizer
from keras_gemma2.version import __version__


def cache_names(layer):
    """The engine's names of layer `layer`'s key and value caches (inputs and outputs alike)."""
    return f"kv_cache_k_{layer}", f"kv_cache_v_{layer}"


def build_signatures(backbone, cache_length, prefill_lengths, int8_lookup=False, template=False,
                     fuse_projections=False, stage=None):
    """A tf.Module with `prefill_{T}` and `decode` tf.functions over the backbone's weights.

    The module holds the backbone's underlying tf.Variables (not the Keras
    layers): traced under a StatelessScope that maps each Keras variable to
    its tf.Variable, the graph reads plain variables, which the TFLite
    converter freezes into constants. `template=True` maps block l's variables
    to block l % 2's (see litert_weights): the module then holds the embedding
    and two blocks, whatever the depth. `fuse_projections=True` traces query,
    key and value (and gate and up) as one product each, for a converter that
    folds the stacked constant kernels into one fully-connected weight.
    """
    import tensorflow as tf
    from keras import ops

    config = backbone.config
    layout = kv_cache.CacheLayout.full(config, cache_length)
    layers = range(config.num_layers)
    cache_shape = (1, config.num_key_value_heads, cache_length, config.head_dim)
    cache_specs = [
        tf.TensorSpec(cache_shape, tf.float32, name=name) for i in layers for name in cache_names(i)
    ]

    module = tf.Module()
    sources = litert_weights.template_sources(backbone) if template else list(backbone.variables)
    keras_variables = list(backbone.variables)
    tf_variables = {}  # one tf.Variable per source (the template shares them across blocks)
    for source in sources:
        if id(source) not in tf_variables:
            tf_variables[id(source)] = (
                tf.Variable(source, trainable=False) if isinstance(source, np.ndarray) else source.value
            )
    embedding = backbone.token_embedding
    # The template reads only the int8 table (lookup and projection): the float table stays
    # out of the SavedModel, so the converter process never loads it.
    unread = {id(embedding.embeddings.value)} if template and int8_lookup else set()
    module.weights = [v for v in tf_variables.values() if id(v) not in unread]
    read = [tf_variables[id(source)] for source in sources]
    if int8_lookup:
        # The token lookup reads an int8 copy (a row per token, dequantized on the fly);
        # the output projection keeps the float table for the converter to quantize.
        table, row_scale = litert_weights.quantize_rows(embedding.embeddings)
        module.lookup_table = tf.Variable(table, trainable=False, name="lookup_table")
        module.lookup_scale = tf.Variable(row_scale, trainable=False, name="lookup_scale")
        del table, row_scale

    # Stacked kernels as variables of their own: frozen once and shared by every signature
    # (stacking inside each trace would make the converter fold a copy per signature).
    fused = []  # (layer, the stacked kernel it reads)
    if fuse_projections:
        stacked = {}
        for index, block in enumerate(backbone.decoder_blocks):
            source = backbone.decoder_blocks[index % 2] if template else block  # as template_sources
            for name in ("attention", "feedforward"):
                owner = getattr(source, name)
                if id(owner) not in stacked:
                    stacked[id(owner)] = tf.Variable(stacked_kernel(owner.fused_projections), trainable=False)
                fused.append((getattr(block, name), stacked[id(owner)]))
        module.stacked_kernels = list(stacked.values())

    @contextlib.contextmanager
    def scope():
        with keras.StatelessScope(state_mapping=list(zip(keras_variables, read))), product_plan(kernel_first_positions=1, one_row=False):
            if int8_lookup:
                embedding.int8_lookup = (module.lookup_table, module.lookup_scale)
            for layer, kernel in fused:
                layer.fused_kernel = kernel
            try:
                yield
            finally:
                embedding.int8_lookup = embedding.projection_codes = None
                for layer, _ in fused:
                    layer.fused_kernel = None  # the layers' default

    def run(tokens, input_pos, flat_caches):
        """The chunk at positions `input_pos` through the cached forward; returns hidden, named caches.

        The engine fills a bucket's unused rows with token 0 at position 0.
        Row r is run at position and index input_pos[0] + r instead, so those
        rows are later than every real one: no real query sees them, the next
        call rewrites them before reading them, and those past the end of the
        full-length cache are dropped (never wrapped onto index 0, BOS).
        """
        start = input_pos[0]
        positions = start + ops.arange(tokens.shape[1], dtype="int32")
        caches = [(flat_caches[2 * i], flat_caches[2 * i + 1]) for i in layers]
        hidden, caches = backbone.forward_pass(tokens, positions[None, :], caches, start, layout)
        named = {}
        for i, pair in zip(layers, caches):
            for name, cache in zip(cache_names(i), pair):
                named[name] = cache
        return hidden, named

    def make_prefill(bucket):
        @tf.function(
            input_signature=[
                tf.TensorSpec((1, bucket), tf.int32, name="tokens"),
                tf.TensorSpec((bucket,), tf.int32, name="input_pos"),
                *cache_specs,
            ]
        )
        def prefill(tokens, input_pos, *caches):
            with scope():
                return run(tokens, input_pos, caches)[1]  # the engine never reads its logits

        return prefill

    @tf.function(
        input_signature=[
            tf.TensorSpec((1, 1), tf.int32, name="tokens"),
            tf.TensorSpec((1,), tf.int32, name="input_pos"),
            *cache_specs,
        ]
    )
    def decode(tokens, input_pos, *caches):
        with scope():
            if template and int8_lookup:
                embedding.projection_codes = _codes_at_run_time(module.lookup_table, input_pos)
            hidden, named = run(tokens, input_pos, caches)
            return {"logits": backbone.logits(hidden), **named}

    signatures = {f"prefill_{p}": make_prefill(p) for p in prefill_lengths}
    signatures["decode"] = decode
    for name, function in signatures.items():
        setattr(module, name, function)
    concrete = {}
    for name, function in signatures.items():
        if stage:
            stage(f"tracing the {name} signature")
        concrete[name] = function.get_concrete_function()
    return module, concrete, list(layout.slots)


def _codes_at_run_time(table, input_pos):
    """`table`'s rows through a gather whose indices depend on an input (always 0..vocab-1).

    The template's tied projection reads these: the converter cannot fold a float
    copy of the 256k-row table into the graph (2.4 GB for the 2B, held several
    times over), and stitching points the projection at the int8 table itself.
    """
    from keras import ops

    offset = ops.minimum(input_pos[0], 0)  # 0 for every valid position; unknown to the converter
    return ops.take(table, ops.arange(table.shape[0], dtype="int32") + offset, axis=0)


def metadata(backbone, tokenizer, plan, stop_ids, slots, files):
    """The export's description for runners: files, signatures, cache names and shapes, tokens."""
    config = backbone.config
    return {
        "format": plan.format,
        "quantization": plan.quantization,
        "files": files,
        "compute_dtype": "float32",
        "cache_dtype": "float32",
        "cache_length": plan.cache_length,
        "cache_slots": slots,
        "cache_names": [list(cache_names(i)) for i in range(config.num_layers)],
        "cache_shape": [1, config.num_key_value_heads, plan.cache_length, config.head_dim],
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
