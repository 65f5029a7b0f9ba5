"""The two uses of the cached forward every generation loop shares: prefill and one decode step."""

from keras import ops


def prefill(backbone, layout, prompt, padding):
    """Left-padded prompts [B, bucket] into empty caches: (float32 logits of the last index, caches).

    Row b's pad tokens get negative positions, so nothing attends to them.
    """
    caches = layout.new_caches(backbone.config, ops.shape(prompt)[0], backbone.compute_dtype)
    positions = ops.arange(prompt.shape[1], dtype="int32")[None, :] - padding[:, None]
    hidden, caches = backbone.forward_pass(prompt, positions, caches, 0, layout)
    return backbone.logits(hidden[:, -1:])[:, 0], caches


def decode_step(backbone, layout, token, padding, caches, index):
    """One token per row, `token` [B], at cache index `index`: (float32 logits [B, vocab], caches)."""
    positions = index - padding[:, None]
    hidden, caches = backbone.forward_pass(token[:, None], positions, caches, index, layout)
    return backbone.logits(hidden)[:, 0], caches
