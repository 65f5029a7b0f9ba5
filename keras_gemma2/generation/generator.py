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
from keras_gemma2.generation import samplers, speculative
from keras_gemma2.generation.steps import decode_step, prefill
from keras_gemma2.model import kv_cache, layers

MIN_BUCKET = 16
MIN_STOP_SLOTS = 8  # stop ids are padded with -1 (never a token) to at least 8 slots


def power_of_two_bucket(length, smallest, limit):
    """Smallest power of two >= length (at least `smallest`), at most `limit` (but >= length)."""
    return max(length, min(samplers.power_of_two(length, smallest), limit))


def prompt_bucket(longest, limit):
    """Smallest power of two >= longest (at least MIN_BUCKET), at most `limit`."""
    return power_of_two_bucket(longest, MIN_BUCKET, limit)


def left_pad(prompts, max_sequence_length):
    """Prompts left-padded to their bucket: (ids [B, bucket], pad counts [B], bucket).

    The bucket is not shrunk to leave room for the new tokens: left padding takes
    no positions, and the cache may drop pad indices (`cache_length`), so a budget
    that fills the context (keras-hub's habitual `max_length`) keeps one bucket.
    """
    longest = max(len(p) for p in prompts)
    bucket = prompt_bucket(longest, max_sequence_length)
    padded = np.zeros((len(prompts), bucket), "int32")
    padding = np.zeros((len(prompts),), "int32")
    for row, prompt in enumerate(prompts):
        padded[row, bucket - len(prompt) :] = prompt
        padding[row] = bucket - len(prompt)
    return padded, padding, bucket


def cache_length_for(bucket, longest, new_tokens, context):
    """Cache indices for a prompt bucket and `new_tokens` more: a power of two (>= 32) up to
    the context, and never fewer than the real tokens' indices (`longest` + `new_tokens`).

    Below bucket + new_tokens the global layers' rings drop the earliest indices
    first, which every row holds as padding (at least bucket - longest of them).
    """
    return max(longest + new_tokens, min(samplers.power_of_two(bucket + new_tokens, 2 * MIN_BUCKET), context))


def stop_slots(stop_ids):
    """The stop ids as a fixed-size int32 array, padded with -1 (a runtime input of the loop)."""
    slots = np.full((max(len(stop_ids), MIN_STOP_SLOTS),), -1, "int32")
    slots[: len(stop_ids)] = stop_ids
    return slots


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
            key, lambda: self._build(batch_size, bucket, cache_length, sampler_kind, window)
        )

    def _build(self, batch_size, bucket, cache_length, sampler_kind, window):
        backbone = self.model.backbone
        layout = kv_cache.CacheLayout.rings(
            backbone.config.replace(sliding_window_size=window), cache_length
        )
        first_token, _ = self.sampling_loop(layout, sampler_kind)
        # The most new tokens a call of this program may ask for: its prompts hold >= 1 token
        # and all of them stay in the cache (cache_length_for).
        capacity = cache_length - 1
        blocks = self.host_steps_read_blocks(batch_size)

        def start(prompt, padding, stop, settings, seed):
            """Prefill and the first token: all time-to-first-token costs, nothing more."""
            self.count_trace()
            logits, caches = prefill(backbone, layout, prompt, padding)
            state = first_token(logits, caches, padding, bucket, capacity, stop, settings, seed)
            return {**state, "column_blocks": layers.decode_column_blocks(backbone)} if blocks else state

        return self._compile(start), self.decode_loop(layout, sampler_kind, batch_size)

    def continuation(self, cache_length, chunk_bucket, sampler_kind, window, stop_count):
        """(extend, decode loop) for a conversation's full-length cache of `cache_length` slots.

        `extend(caches, chunk [1, chunk_bucket], length, index, stop, settings,
        seed)` writes the chunk's first `length` tokens (the rest is padding)
        at cache index `index` and samples the first reply token; `decode` is
        generate's loop. A full-length cache holds index t in slot t, so
        padding written past the end is later than every query (causality
        hides it) and is overwritten by the next chunk, and dropping the tail
        (a reply cut at a stop string) is just a shorter transcript.
        """
        layout = kv_cache.CacheLayout.full(
            self.model.config.replace(sliding_window_size=window), cache_length
        )
        decode = self.cached(
            ("continue-decode", cache_length, sampler_kind, window, stop_count),
            lambda: self.decode_loop(layout, sampler_kind, 1),
        )
        extend = self.cached(
            ("continue", chunk_bucket, cache_length, sampler_kind, window, stop_count),
            lambda: self._build_extend(layout, sampler_kind),
        )
        return extend, decode

    def host_steps_read_blocks(self, batch_size):
        """Whether host-driven decode steps read `layers.decode_column_blocks`, made by the
        program that starts the decode (XLA:CPU only: the steps' one-row products)."""
        return backend.compiles() and backend.steps_from_host(self.model, batch_size)

    def _build_extend(self, layout, sampler_kind):
        backbone = self.model.backbone
        first_token, _ = self.sampling_loop(layout, sampler_kind)
        capacity = layout.slots[0]
        blocks = self.host_steps_read_blocks(1)

        def extend(caches, chunk, length, index, stop, settings, seed):
            """A right-padded chunk into the caches, then the first reply token (turn k's TTFT)."""
            self.count_trace()
            positions = index + ops.arange(chunk.shape[1], dtype="int32")[None, :]
            hidden, caches = backbone.forward_pass(chunk, positions, caches, index, layout)
            last = backend.dynamic_slice(hidden, [0, length - 1, 0], (hidden.shape[0], 1, hidden.shape[2]))
            padding = ops.zeros((chunk.shape[0],), "int32")
            state = first_token(
                backbone.logits(last)[:, 0], caches, padding, index + length, capacity, stop, settings, seed
            )
            return {**state, "column_blocks": layers.decode_column_blocks(backbone)} if blocks else state

        return self._compile(extend, donate_first=True)

    def _compile(self, function, donate_first=False, torch_compile=False):
        return backend.compile_function(
            function, self.model.backbone.variables, donate_first=donate_first, torch_compile=torch_compile
        )

    def sampling_loop(self, layout, sampler_kind):
        """(first_token, step) over caches held as `layout` says, for one sampler kind.

        `first_token` samples step 0 from the logits after a prefill and makes
        the loop's state; `step(state, seed)` feeds the last token and samples
        the next. Token t of the reply is fed at cache index `base + t - 1`,
        `base` (a state value) being where the reply starts. The forward pass
        feeds a token that was already sampled, so none is spent on logits
        nobody reads (after the last token or a stop).
        """
        backbone = self.model.backbone

        def choose(logits, step, seed, tokens, logprobs, done, stop, settings):
            """Sample step `step`'s token per row; finished rows get 0 (never fed back)."""
            token = samplers.select(sampler_kind, logits, ops.stack([seed, step]), settings)
            chosen = ops.take_along_axis(ops.log_softmax(logits, axis=-1), token[:, None], axis=-1)
            token = ops.where(done, 0, token)
            tokens = ops.slice_update(tokens, [0, step], token[:, None])
            logprobs = ops.slice_update(logprobs, [0, step], ops.where(done[:, None], 0.0, chosen))
            done = ops.logical_or(done, ops.any(token[:, None] == stop[None, :], axis=-1))
            return token, tokens, logprobs, done

        def first_token(logits, caches, padding, base, capacity, stop, settings, seed):
            batch = ops.shape(logits)[0]
            token, tokens, logprobs, done = choose(
                logits, ops.zeros((), "int32"), seed,
                ops.zeros((batch, capacity), "int32"),
                ops.zeros((batch, capacity), "float32"),
                ops.zeros((batch,), "bool"), stop, settings,
            )
            return {
                "step": ops.ones((), "int32"), "token": token, "caches": caches, "padding": padding,
                "base": ops.convert_to_tensor(base, "int32"), "tokens": tokens, "logprobs": logprobs,
                "done": done, "stop": stop, "settings": settings,
            }

        def step(state, seed):
            logits, caches = decode_step(
                backbone, layout, state["token"], state["padding"], state["caches"],
                state["base"] + state["step"] - 1,
            )
            token, tokens, logprobs, done = choose(
                logits, state["step"], seed, state["tokens"], state["logprobs"], state["done"],
                state["stop"], state["settings"],
            )
            return {**state, "step": state["step"] + 1, "token": token, "caches": caches,
                    "tokens": tokens, "logprobs": logprobs, "done": done}

        return first_token, step

    def decode_loop(self, layout, sampler_kind, batch_size):
        """`run(state, seed, stop_at)`: steps until `stop_at` or every row is done.

        Either one compiled loop, or (backend.steps_from_host) a host loop over
        one compiled step: XLA:CPU runs a bfloat16 or int8 weight's one-row
        product at memory speed only outside a while loop, and PyTorch loops
        in Python anyway (its step torch.compile'd on request).
        """
        _, step = self.sampling_loop(layout, sampler_kind)
        if backend.steps_from_host(self.model, batch_size):
            def traced_step(state, seed, blocks):
                self.count_trace()
                with layers.reading_column_blocks(blocks):
                    return step(state, seed)

            compiled = self._compile(
                traced_step, donate_first=True, torch_compile=backend.torch_compiles(self.model)
            )

            def run_from_host(state, seed, stop_at):
                stop_at = int(ops.convert_to_numpy(stop_at))
                at = int(ops.convert_to_numpy(state["step"]))
                # Read by every step, never donated with the state (nor copied into the next one).
                state = dict(state)
                blocks = state.pop("column_blocks", {})
                while at < stop_at and not np.asarray(ops.convert_to_numpy(state["done"])).all():
                    state = compiled(state, seed, blocks)
                    at += 1
                return {**state, "column_blocks": blocks} if blocks else state

            if hasattr(compiled, "traces"):
                run_from_host.traces = compiled.traces
            return run_from_host

        def run(state, seed, stop_at):
            self.count_trace()
            names = ("step", "token", "caches", "tokens", "logprobs", "done")

            def cond(*values):
                return ops.logical_and(values[0] < stop_at, ops.logical_not(ops.all(values[-1])))

            def body(*values):
                after = step({**state, **dict(zip(names, values))}, seed)
                return tuple(after[name] for name in names)

            loop = ops.while_loop(cond, body, tuple(state[name] for name in names))
            return {**state, **dict(zip(names, loop))}

        return self._compile(run, donate_first=True)

    # ---- host side ----------------------------------------------------------
    def prepare(self, prompts, max_new_tokens, sampler, stop_ids, window, draft=None, num_draft_tokens=None):
        """(start, decode, start's inputs but the seed) for one request, compiled on first use.

        `start(*inputs, seed)` prefills and samples the first token; `decode(state,
        seed, stop_at)` continues to step `stop_at` (benchmarks/generate.py times the two).
        With a `draft` model, decode is speculative (`speculative.build`).
        """
        context = self.model.config.max_sequence_length
        padded, padding, bucket = left_pad(prompts, context)
        spare = 0 if draft is None else num_draft_tokens + 1  # one round may run past the budget
        if draft is None:
            cache_length = cache_length_for(bucket, max(len(p) for p in prompts), max_new_tokens, context)
        else:  # a full-length cache, which never drops an index: room for every one
            cache_length = power_of_two_bucket(bucket + max_new_tokens + spare, 2 * MIN_BUCKET, context)
        stop = stop_slots(stop_ids)
        kind = sampler.kind(self.model.config.vocabulary_size)
        if draft is None:
            start, decode = self.functions(len(prompts), bucket, cache_length, kind, window, len(stop))
        else:
            key = ("speculative", speculative.draft_key(draft), num_draft_tokens, len(prompts), bucket,
                   cache_length, kind, window, len(stop))
            start, decode = self.cached(key, lambda: speculative.build(
                self, draft, bucket, cache_length, kind, window, num_draft_tokens
            ))
        inputs = (padded, padding, stop, sampler.settings())
        return start, decode, tuple(ops.convert_to_tensor(value) for value in inputs)

    def run(self, prompts, max_new_tokens, sampler, stop_ids, seed, window, chunk=None,
            draft=None, num_draft_tokens=None):
        """Yield (tokens [B, n], logprobs [B, n], done [B]) after each chunk (one chunk if None).

        A speculative run leaves its acceptance counts in `self.last_speculation`.
        """
        start, decode, inputs = self.prepare(
            prompts, max_new_tokens, sampler, stop_ids, window, draft, num_draft_tokens
        )
        for tokens, logprobs, done, state in drive(start, inputs, decode, max_new_tokens, seed, chunk):
            if draft is not None:
                self.last_speculation = speculative.acceptance(state, num_draft_tokens)
            yield tokens, logprobs, done


def runtime_seed(seed):
    """The seed as the loop's int32 input; None draws one."""
    return ops.convert_to_tensor(np.int32(seed if seed is not None else np.random.randint(2**31 - 1)))


def drive(start, inputs, decode, max_new_tokens, seed, chunk=None):
    """Run `start(*inputs, seed)`, then the decode loop to `max_new_tokens`.

    Yields (tokens [B, n], logprobs [B, n], done [B], state) after each
    `chunk` steps (once, at the end, if None); `state` is the loop's latest
    (a conversation keeps its caches).
    """
    seed = runtime_seed(seed)
    state = start(*inputs, seed)
    step = 1  # `start` sampled the first token
    while True:
        done = np.asarray(ops.convert_to_numpy(state["done"]))
        finished = step >= max_new_tokens or done.all()
        if finished or chunk is not None:
            shown = min(step, max_new_tokens)  # a speculative round may pass the budget
            yield (
                np.asarray(ops.convert_to_numpy(state["tokens"]))[:, :shown],
                np.asarray(ops.convert_to_numpy(state["logprobs"]))[:, :shown],
                done,
                state,
            )
        if finished:
            return
        stop_at = max_new_tokens if chunk is None else min(step + chunk, max_new_tokens)
        state = decode(state, seed, ops.convert_to_tensor(np.int32(stop_at)))
        step = int(ops.convert_to_numpy(state["step"]))
