"""Text generation: one prefill pass, then one compiled decode loop.

Prompts are left-padded to a length bucket (powers of two from 16), so
prompts of different lengths share one compiled program per (batch size,
bucket, new-token budget, sampler, stop ids). Prefill costs the bucket, not
the full generation length; the decode loop stops early once every row has
emitted a stop token. Streaming runs the same compiled loop a chunk at a time.
"""

import numpy as np
from keras import ops

from keras_gemma2 import backend
from keras_gemma2.model import kv_cache

MIN_BUCKET = 16


def prompt_bucket(longest, limit):
    """Smallest power of two >= longest (at least MIN_BUCKET), at most `limit`."""
    bucket = MIN_BUCKET
    while bucket < longest:
        bucket *= 2
    return max(longest, min(bucket, limit))


def left_pad(prompts, max_new_tokens, max_sequence_length):
    """Prompts left-padded to their bucket: (ids [B, bucket], pad counts [B], bucket)."""
    longest = max(len(p) for p in prompts)
    bucket = prompt_bucket(longest, max_sequence_length - max_new_tokens)
    padded = np.zeros((len(prompts), bucket), "int32")
    padding = np.zeros((len(prompts),), "int32")
    for row, prompt in enumerate(prompts):
        padded[row, bucket - len(prompt) :] = prompt
        padding[row] = bucket - len(prompt)
    return padded, padding, bucket


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


class Generator:
    """Owns the compiled prefill/decode functions of one Gemma2CausalLM."""

    def __init__(self, model):
        self.model = model
        self.compilations = 0  # traces of compiled functions (jax / tensorflow)
        self._functions = {}

    # ---- compiled pieces --------------------------------------------------
    def cached(self, key, build):
        """The compiled functions stored under `key` (hashable), made by `build()` on first use.

        Beam search keeps its compiled search here too, so `quantize` and LoRA
        (which drop the generator) drop it with the rest.
        """
        if key not in self._functions:
            self._functions[key] = build()
        return self._functions[key]

    def count_trace(self):
        """Count one trace of a compiled function (call it inside the traced Python)."""
        if backend.compiles():
            self.compilations += 1  # runs once per trace, not per call

    def functions(self, batch_size, bucket, max_new_tokens, sampler, stop_ids, window):
        """(prefill, decode loop) for one shape of request, compiled on first use."""
        key = (batch_size, bucket, max_new_tokens, sampler, stop_ids, window)
        return self.cached(
            key, lambda: self._build(batch_size, bucket, max_new_tokens, sampler, stop_ids, window)
        )

    def _build(self, batch_size, bucket, max_new_tokens, sampler, stop_ids, window):
        backbone = self.model.backbone
        total_length = bucket + max_new_tokens
        layout = kv_cache.CacheLayout.rings(
            backbone.config.replace(sliding_window_size=window), total_length
        )
        stop = np.array(stop_ids or [-1], "int32")

        def choose(logits, step, seed, tokens, logprobs, done):
            """Sample step `step`'s token per row; finished rows get 0 (never fed back)."""
            token = sampler.select(logits, ops.stack([seed, step]))
            chosen = ops.take_along_axis(ops.log_softmax(logits, axis=-1), token[:, None], axis=-1)
            token = ops.where(done, 0, token)
            tokens = ops.slice_update(tokens, [0, step], token[:, None])
            logprobs = ops.slice_update(logprobs, [0, step], ops.where(done[:, None], 0.0, chosen))
            done = ops.logical_or(done, ops.any(token[:, None] == stop[None, :], axis=-1))
            return token, tokens, logprobs, done

        def start(prompt, padding, seed):
            """Prefill and the first token: all time-to-first-token costs, nothing more."""
            self.count_trace()
            batch = ops.shape(prompt)[0]
            logits, caches = prefill(backbone, layout, prompt, padding)
            token, tokens, logprobs, done = choose(
                logits, ops.zeros((), "int32"), seed,
                ops.zeros((batch, max_new_tokens), "int32"),
                ops.zeros((batch, max_new_tokens), "float32"),
                ops.zeros((batch,), "bool"),
            )
            return {
                "step": ops.ones((), "int32"), "token": token, "caches": caches, "padding": padding,
                "tokens": tokens, "logprobs": logprobs, "done": done,
            }

        def run(state, seed, stop_at):
            """Steps until `stop_at` or all rows done; each feeds the last token, then samples.

            The forward pass feeds a token that was already sampled, so none is
            spent on logits nobody reads (after the last token or a stop).
            """
            self.count_trace()

            def cond(step, token, caches, tokens, logprobs, done):
                return ops.logical_and(step < stop_at, ops.logical_not(ops.all(done)))

            def body(step, token, caches, tokens, logprobs, done):
                logits, caches = decode_step(
                    backbone, layout, token, state["padding"], caches, bucket + step - 1
                )
                token, tokens, logprobs, done = choose(logits, step, seed, tokens, logprobs, done)
                return step + 1, token, caches, tokens, logprobs, done

            names = ("step", "token", "caches", "tokens", "logprobs", "done")
            loop = ops.while_loop(cond, body, tuple(state[name] for name in names))
            return {**state, **dict(zip(names, loop))}

        variables = backbone.variables
        return (
            backend.compile_function(start, variables),
            backend.compile_function(run, variables, donate_first=True),
        )

    # ---- host side ----------------------------------------------------------
    def run(self, prompts, max_new_tokens, sampler, stop_ids, seed, window, chunk=None):
        """Yield (tokens [B, n], logprobs [B, n], done [B]) after each chunk (one chunk if None)."""
        padded, padding, bucket = left_pad(
            prompts, max_new_tokens, self.model.config.max_sequence_length
        )
        start, decode = self.functions(
            len(prompts), bucket, max_new_tokens, sampler, stop_ids, window
        )
        seed = ops.convert_to_tensor(np.int32(seed if seed is not None else np.random.randint(2**31 - 1)))
        state = start(ops.convert_to_tensor(padded), ops.convert_to_tensor(padding), seed)
        step = 1  # `start` sampled the first token
        while True:
            done = np.asarray(ops.convert_to_numpy(state["done"]))
            finished = step >= max_new_tokens or done.all()
            if finished or chunk is not None:
                yield (
                    np.asarray(ops.convert_to_numpy(state["tokens"]))[:, :step],
                    np.asarray(ops.convert_to_numpy(state["logprobs"]))[:, :step],
                    done,
                )
            if finished:
                return
            stop_at = max_new_tokens if chunk is None else min(step + chunk, max_new_tokens)
            state = decode(state, seed, ops.convert_to_tensor(np.int32(stop_at)))
            step = int(ops.convert_to_numpy(state["step"]))
