"""The KV cache: which slot holds which index, and which keys a query may see.

A layer's cache is a (key, value) pair, each [batch, kv_heads, slots,
head_dim]: head-major, so both attention products read it in place, and
kept apart, so a step writes and reads each without copying the other (an
export's graph then carries them as the engine's separate key and value
buffers with no stacking or slicing). Cache index t
(shared by every row of a batch) lives in slot `t % slots`: a layer with
fewer slots than indices is a ring that keeps the latest ones. That rule is
`held_indices`; everything else (writing a chunk, the key positions of a
mask, export) derives from it.

`CacheLayout` says how many slots each layer keeps and which window it
attends over: rings of the window for generation (all a sliding layer ever
reads), rings of window + k for a speculative step that may roll back k
tokens, or full length on every layer (what LiteRT-LM expects; there a sliding
layer still reads only the slots of its window, `CacheLayout.read_span`).

Rows may be left-padded: a row's positions are its indices minus its padding,
and a key is real when its position is >= 0. `attention_mask` is the one mask
rule, over positions, for every path; `attention_bias` is how attention applies it.
"""

import dataclasses

import numpy as np
from keras import ops

from keras_gemma2 import backend

SLOT_AXIS = 2
# Masked attention logits get this added instead of -inf, so that a row with no
# visible key (a padded query) gives a finite row, never NaN. It must fit every compute
# dtype (Keras casts a layer's float inputs to it; float16 ends at 65504), and it is
# far below the soft-capped logits (|x| <= 50), whose softmax it leaves exact.
MASK_VALUE = -30000.0
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def attention_mask(query_positions, key_positions, key_valid, window=None):
    """Which keys each query may see: [batch, queries, keys] booleans.

    Causal (key position <= query position), a real key, and for a sliding
    layer 0 <= query - key < window (the window counts the query itself).
    """
    distance = query_positions[:, :, None] - key_positions[:, None, :]
    visible = distance >= 0
    if window is not None:
        visible = ops.logical_and(visible, distance < window)
    return ops.logical_and(visible, ops.cast(key_valid, "bool")[:, None, :])


def attention_bias(mask):
    """A mask as the additive bias attention applies: 0 where visible, MASK_VALUE elsewhere (float32).

    Built once per mask and added to every layer's logits: in an export's
    graph that is one select, then a plain add per layer, which LiteRT's
    XNNPACK delegate runs inside its own graph (a select per layer split it).
    """
    return ops.where(mask, 0.0, MASK_VALUE)


def held_indices(end, slots):
    """The index each of `slots` slots holds once indices < `end` are written: [slots] int32.

    Slot s holds the latest t < end with t % slots == s; negative means empty.
    `end` may be a Python int or a scalar tensor.
    """
    if isinstance(end, (int, np.integer)):  # static: numpy, so traced graphs get constants
        slot, mod = np.arange(slots, dtype="int32"), np.mod
    else:
        slot, mod = ops.arange(slots, dtype="int32"), ops.mod
    last = end - 1
    return last - mod(last - slot, slots)


def write(cache, fresh, start, ring=True):
    """`cache` with `fresh` [batch, kv_heads, T, head_dim] written at indices start..start+T-1.

    A ring (`ring=True`): each index goes to its ring slot; when T exceeds the
    slots only the latest indices stay. One token is a single dynamic slice
    update (the decode step); a chunk at a static start is static slicing; a
    chunk at a dynamic start is a gather that writes each slot from its latest
    index. A full-length cache (`ring=False`, CacheLayout.full): index t is
    slot t and indices past the last slot are dropped (the unused rows a
    caller pads a chunk with); a chunk is one dynamic slice update of T slots.
    """
    fresh = ops.cast(fresh, cache.dtype)
    length, slots = fresh.shape[SLOT_AXIS], cache.shape[SLOT_AXIS]
    if not ring:
        return _write_in_place(cache, fresh, start)
    if length == 1:
        return ops.slice_update(cache, [0, 0, ops.mod(start, slots), 0], fresh)
    static = isinstance(start, (int, np.integer))
    if static and start + length <= slots:  # no wrap
        return ops.slice_update(cache, [0, 0, int(start), 0], fresh)
    source = held_indices(start + length, slots) - start  # chunk entry per slot; < 0: untouched
    if static and (source >= 0).all():  # every slot rewritten: the chunk's latest, in ring order
        return ops.take(fresh, source, axis=SLOT_AXIS)
    written = ops.take(fresh, ops.clip(source, 0, length - 1), axis=SLOT_AXIS)
    keep_old = (source < 0)[None, None, :, None]
    return ops.where(keep_old, cache, written)


def _write_in_place(cache, fresh, start):
    """A full-length cache's write: T slots from `start`, rows past the last slot dropped.

    The update covers slots start'..start'+T-1, start' = min(start, slots - T):
    when the chunk runs past the end, its first `start - start'` slots keep the
    cache's own values and the chunk's overflow falls off (O(T), not O(slots)).
    Slices and slice updates only (no gather or select), ops LiteRT's XNNPACK
    delegate runs.
    """
    length, slots = fresh.shape[SLOT_AXIS], cache.shape[SLOT_AXIS]
    if length == 1 or (isinstance(start, (int, np.integer)) and start + length <= slots):
        return ops.slice_update(cache, [0, 0, start, 0], fresh)
    begin = ops.minimum(start, slots - length)
    size = fresh.shape[:SLOT_AXIS] + (length,) + fresh.shape[SLOT_AXIS + 1:]
    # The cache's T slots from start', then T spare ones; the chunk goes in at start - start'.
    block = ops.concatenate([backend.dynamic_slice(cache, [0, 0, begin, 0], size), ops.zeros_like(fresh)], axis=SLOT_AXIS)
    block = ops.slice_update(block, [0, 0, start - begin, 0], fresh)
    return ops.slice_update(cache, [0, 0, begin, 0], block[:, :, :length])


def map_caches(function, caches):
    """`function` applied to every key and value cache (e.g. gathering rows to follow beams)."""
    return [(function(key), function(value)) for key, value in caches]


def layer_windows(config):
    """Each layer's attention window: the config's on sliding layers, None on global ones."""
    return tuple(
        config.sliding_window_size if config.is_sliding(i) else None for i in range(config.num_layers)
    )


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Slots per layer and the attention window each layer applies (None: global)."""

    slots: tuple
    windows: tuple
    # Full length: every index written is below the slots (the caller's contract), so no ring wraps.
    never_wraps: bool = False

    @classmethod
    def rings(cls, config, length, extra=0):
        """Global layers keep `length` indices; sliding layers a ring of window + `extra`.

        `extra` = k lets a step of k + 1 tokens be verified and k of them
        rolled back (speculative decoding) without losing a key still needed.
        """
        windows = layer_windows(config)
        slots = tuple(length if w is None else min(w + extra, length) for w in windows)
        return cls(slots, windows)

    @classmethod
    def full(cls, config, length):
        """Every layer keeps `length` indices (sliding layers still mask to their window)."""
        return cls((length,) * config.num_layers, layer_windows(config), never_wraps=True)

    def shape(self, layer, config, batch_size):
        """The shape of layer `layer`'s key cache, and of its value cache."""
        return (batch_size, config.num_key_value_heads, self.slots[layer], config.head_dim)

    def new_caches(self, config, batch_size, dtype):
        """Zeroed caches: a (key, value) pair per layer."""
        return [
            (ops.zeros(self.shape(i, config, batch_size), dtype), ops.zeros(self.shape(i, config, batch_size), dtype))
            for i in range(len(self.slots))
        ]

    def bytes(self, config, batch_size, dtype):
        per_slot = 2 * config.num_key_value_heads * config.head_dim * _ITEMSIZE[str(dtype)]
        return sum(self.slots) * per_slot * batch_size

    def read_span(self, layer, start, chunk_length):
        """The slots a chunk written at `start` reads on layer `layer`: (begin, size), or None (all).

        A full-length cache's sliding layer needs only the window behind the
        chunk: window + chunk_length - 1 slots ending at its last row, begin
        clipped into the cache. Attention then reads those instead of every
        slot: a cache longer than the window costs sliding layers nothing more.
        Rings already hold just the window (None).
        """
        window, slots = self.windows[layer], self.slots[layer]
        if not self.never_wraps or window is None:
            return None
        size = window + chunk_length - 1
        if size >= slots:
            return None
        if isinstance(start, (int, np.integer)):
            return min(max(int(start) - window + 1, 0), slots - size), size
        return ops.clip(start - window + 1, 0, slots - size), size

    def writes_before_reading(self, layer, chunk_length):
        """Whether a chunk can be written first and the layer then read from the cache alone.

        True when writing `chunk_length` indices cannot evict a key any of
        them still needs: a global layer or a full-length layout (their slots
        cover every index) or a ring of at least window + chunk_length - 1
        slots. Otherwise the chunk attends to the cache as it was plus itself,
        then is written.
        """
        window = self.windows[layer]
        return self.never_wraps or window is None or self.slots[layer] >= window + chunk_length - 1
