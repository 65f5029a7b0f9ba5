"""Text generation: one prefill pass, then one compiled decode loop.

Programs are compiled once per (batch size, prompt bucket, cache bucket,
sampler kind, window, stop-id slots): prompts are left-padded to a length
bucket (powers of two from 16) and the cache to a power of two that holds
prompt + budget, while the new-token budget, the stop ids, the seed and the
sampler's numbers are runtime values. Trying 64, then 100, then 200 new
tokens compiles at most once per cache bucket. Prefill costs the prompt
bucket, not the generation length; the decode loop stops early once every
row has emitted a stop token. Streaming runs the same loop a chunk at a time.
"""

import numpy as np
from keras import ops

from keras_gemma2 import backend
from keras_gemma2.generation import samplers
from keras_gemma2.model import kv_cache

MIN_BUCKET = 16
MIN_STOP_SLOTS = 8  # stop ids are padded with -1 (never a token) to at least 8 slots


def power_of_two_bucket(length, smallest, limit):
    """Smallest power of two >= length (at least `smallest`), at most `limit` (but >= length)."""
    return max(length, min(samplers.power_of_two(length, smallest), limit))


def prompt_bucket(longest, limit):
    """Smallest power of two >= longest (at least MIN_BUCKET), at most `limit`."""
    return power_of_two_bucket(longest, MIN_BUCKET, limit)


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


def stop_slots(stop_ids):
    """The stop ids as a fixed-size int32 array, padded with -1 (a runtime input of the loop)."""
    slots = np.full((max(len(stop_ids), MIN_STOP_SLOTS),), -1, "int32")
    slots[: len(stop_ids)] = stop_ids
    return slots


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

    def functions(self, batch_size, bucket, cache_length, sampler_kind, window, stop_count):
        """(prefill, decode loop) for one shape of request, compiled on first use."""
        key = (batch_size, bucket, cache_length, sampler_kind, window, stop_count)
        return self.cached(
            key, lambda: self._build(bucket, cache_length, sampler_kind, window)
        )

    def _build(self, bucket, cache_length, sampler_kind, window):
        backbone = self.model.backbone
        layout = kv_cache.CacheLayout.rings(
            backbone.config.replace(sliding_window_size=window), cache_length
        )
        capacity = cache_length - bucket  # the most new tokens this program can give

        def choose(logits, step, seed, tokens, logprobs, done, stop, settings):
            """Sample step `step`'s token per row; finished rows get 0 (never fed back)."""
            token = samplers.select(sampler_kind, logits, ops.stack([seed, step]), settings)
            chosen = ops.take_along_axis(ops.log_softmax(logits, axis=-1), token[:, None], axis=-1)
            token = ops.where(done, 0, token)
            tokens = ops.slice_update(tokens, [0, step], token[:, None])
            logprobs = ops.slice_update(logprobs, [0, step], ops.where(done[:, None], 0.0, chosen))
            done = ops.logical_or(done, ops.any(token[:, None] == stop[None, :], axis=-1))
            return token, tokens, logprobs, done

        def start(prompt, padding, stop, settings, seed):
            """Prefill and the first token: all time-to-first-token costs, nothing more."""
            self.count_trace()
            batch = ops.shape(prompt)[0]
            logits, caches = prefill(backbone, layout, prompt, padding)
            token, tokens, logprobs, done = choose(
                logits, ops.zeros((), "int32"), seed,
                ops.zeros((batch, capacity), "int32"),
                ops.zeros((batch, capacity), "float32"),
                ops.zeros((batch,), "bool"), stop, settings,
            )
            return {
                "step": ops.ones((), "int32"), "token": token, "caches": caches, "padding": padding,
                "tokens": tokens, "logprobs": logprobs, "done": done, "stop": stop, "settings": settings,
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
                token, tokens, logprobs, done = choose(
                    logits, step, seed, tokens, logprobs, done, state["stop"], state["settings"]
                )
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
    def prepare(self, prompts, max_new_tokens, sampler, stop_ids, window):
        """(start, decode, start's inputs but the seed) for one request, compiled on first use.

        `start(*inputs, seed)` prefills and samples the first token; `decode(state,
        seed, stop_at)` continues to step `stop_at` (benchmarks/generate.py times the two).
        """
        context = self.model.config.max_sequence_length
        padded, padding, bucket = left_pad(prompts, max_new_tokens, context)
        cache_length = power_of_two_bucket(bucket + max_new_tokens, 2 * MIN_BUCKET, context)
        stop = stop_slots(stop_ids)
        kind = sampler.kind(self.model.config.vocabulary_size)
        start, decode = self.functions(len(prompts), bucket, cache_length, kind, window, len(stop))
        inputs = (padded, padding, stop, sampler.settings())
        return start, decode, tuple(ops.convert_to_tensor(value) for value in inputs)

    def run(self, prompts, max_new_tokens, sampler, stop_ids, seed, window, chunk=None):
        """Yield (tokens [B, n], logprobs [B, n], done [B]) after each chunk (one chunk if None)."""
        start, decode, inputs = self.prepare(prompts, max_new_tokens, sampler, stop_ids, window)
        seed = ops.convert_to_tensor(np.int32(seed if seed is not None else np.random.randint(2**31 - 1)))
        state = start(*inputs, seed)
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
