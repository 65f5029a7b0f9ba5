"""The KV cache layout and the cached forward pass.

Global layers keep one slot per position of the whole generation; sliding
layers keep a ring of `sliding_window_size` slots (index t in slot t % W),
all a sliding layer ever attends to. A layer's cache is
[batch, 2 (key, value), kv_heads, slots, head_dim]: head-major, so both
attention products read it in place (a slot-major cache was transposed,
a full copy, on every layer of every decode step). Prompts are left-padded,
so every row writes the same slot at each step; a row's positions are its
slot indices minus its padding.
"""

from keras import ops

from keras_gemma2.model.layers import CACHE_SLOT_AXIS as SLOT_AXIS
from keras_gemma2.model.layers import attention_mask


def layer_windows(config):
    """The sliding window of each layer (None for global layers)."""
    return [config.sliding_window_size if config.is_sliding(i) else None for i in range(config.num_layers)]


def cache_lengths(config, total_length):
    """Slots per layer for a generation of `total_length` indices."""
    return [total_length if w is None else min(w, total_length) for w in layer_windows(config)]


def cache_shape(config, batch_size, slots):
    """One layer's cache: [batch, 2 (key, value), kv_heads, slots, head_dim]."""
    return (batch_size, 2, config.num_key_value_heads, slots, config.head_dim)


def new_caches(config, batch_size, total_length, dtype):
    """Zeroed per-layer caches (`cache_shape`)."""
    return [
        ops.zeros(cache_shape(config, batch_size, length), dtype)
        for length in cache_lengths(config, total_length)
    ]


def cache_bytes(config, batch_size, total_length, dtype, sliding=True):
    """Bytes of the cache; `sliding=False` gives a full-length cache on every layer."""
    lengths = cache_lengths(config, total_length) if sliding else [total_length] * config.num_layers
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[str(dtype)]
    per_slot = 2 * config.num_key_value_heads * config.head_dim * itemsize * batch_size
    return sum(lengths) * per_slot


def prefill(backbone, token_ids, padding, caches, windows):
    """Run a left-padded prompt [batch, P] and fill the caches.

    `padding`: [batch] number of pad tokens on the left of each row.
    `windows`: per-layer window (None: global), normally `layer_windows(config)`;
    an inference-time override only changes this list and the cache lengths.
    Returns (float32 logits of the last index [batch, vocab], caches).
    """
    length = ops.shape(token_ids)[1]
    index = ops.arange(length, dtype="int32")[None, :]
    positions = index - padding[:, None]
    valid = index >= padding[:, None]
    masks = {window: attention_mask(positions, positions, valid, window) for window in set(windows)}
    x = backbone.token_embedding(token_ids)
    updated = []
    for block, cache, window in zip(backbone.decoder_blocks, caches, windows):
        x, cache = block(x, positions=positions, attention_mask=masks[window], cache=cache)
        updated.append(cache)
    return _last_logits(backbone, x), updated


def decode(backbone, token_ids, padding, caches, cache_index, windows):
    """One step: tokens [batch, 1] at index `cache_index` attend over the caches."""
    positions = ops.broadcast_to(cache_index - padding[:, None], ops.shape(token_ids))
    x = backbone.token_embedding(token_ids)
    masks = {}
    updated = []
    for block, cache, window in zip(backbone.decoder_blocks, caches, windows):
        slots = ops.shape(cache)[SLOT_AXIS]
        if (window, slots) not in masks:
            # The index each slot holds once `cache_index` is written (a ring when slots < total).
            held = cache_index - ops.mod(cache_index - ops.arange(slots, dtype="int32"), slots)
            key_positions = held[None, :] - padding[:, None]
            masks[(window, slots)] = attention_mask(
                positions, key_positions, held[None, :] >= padding[:, None], window
            )
        x, cache = block(
            x,
            positions=positions,
            attention_mask=masks[(window, slots)],
            cache=cache,
            cache_index=cache_index,
        )
        updated.append(cache)
    return _last_logits(backbone, x), updated


def _last_logits(backbone, x):
    hidden = backbone.final_norm(x[:, -1:, :])
    return backbone.token_embedding(hidden, reverse=True)[:, 0, :]
