"""Beam search on the same KV cache and compiled-loop machinery as sampling.

Each prompt keeps `num_beams` rows in the cache; after every step the
best `num_beams` continuations (by summed log-probability) are kept and
the cache rows are gathered to follow their beams. A finished beam only
extends with padding at no cost, so it keeps its score.
"""

import numpy as np
from keras import ops

from keras_gemma2 import backend
from keras_gemma2.generation import samplers
from keras_gemma2.generation.generator import decode_step, left_pad, prefill
from keras_gemma2.model import kv_cache


def _build(model, batch_size, bucket, max_new_tokens, num_beams, stop_ids, window):
    backbone = model.backbone
    config = backbone.config
    layout = kv_cache.CacheLayout.rings(config.replace(sliding_window_size=window), bucket + max_new_tokens)
    stop = np.array(stop_ids or [-1], "int32")
    vocabulary = config.vocabulary_size
    rows = batch_size * num_beams
    generator = model.generator

    def search(prompt, padding):
        generator.count_trace()
        logits, caches = prefill(backbone, layout, prompt, padding)
        # Every prompt row becomes num_beams identical rows; only beam 0 starts alive.
        expand = ops.repeat(ops.arange(batch_size, dtype="int32"), num_beams)
        caches = kv_cache.map_caches(lambda cache: ops.take(cache, expand, axis=0), caches)
        logits = ops.take(logits, expand, axis=0)
        padding = ops.take(padding, expand, axis=0)
        first = ops.where(ops.arange(num_beams) == 0, 0.0, samplers.lowest())
        scores = ops.broadcast_to(first[None, :], (batch_size, num_beams))
        tokens = ops.zeros((batch_size, num_beams, max_new_tokens), "int32")
        token_logprobs = ops.zeros((batch_size, num_beams, max_new_tokens), "float32")
        done = ops.zeros((batch_size, num_beams), "bool")
        state = select(ops.zeros((), "int32"), logits, scores, tokens, token_logprobs, done)

        def cond(step, caches, sources, token, scores, tokens, token_logprobs, done):
            return ops.logical_and(step < max_new_tokens, ops.logical_not(ops.all(done)))

        def body(step, caches, sources, token, scores, tokens, token_logprobs, done):
            # The cache follows the kept beams, then takes their last token.
            caches = kv_cache.map_caches(lambda cache: ops.take(cache, sources, axis=0), caches)
            logits, caches = decode_step(
                backbone, layout, ops.reshape(token, (rows,)), padding, caches, bucket + step - 1
            )
            return (step + 1, caches, *select(step, logits, scores, tokens, token_logprobs, done))

        step, _, _, _, scores, tokens, token_logprobs, _ = ops.while_loop(
            cond, body, (ops.ones((), "int32"), caches, *state)
        )
        return step, scores, tokens, token_logprobs

    def select(step, logits, scores, tokens, token_logprobs, done):
        """Keep the best num_beams continuations: (cache rows to follow, their tokens, ...)."""
        log_probs = ops.reshape(ops.log_softmax(logits, axis=-1), (batch_size, num_beams, vocabulary))
        # A finished beam continues with token 0 at no cost (and nothing else).
        only_pad = ops.where(ops.arange(vocabulary) == 0, 0.0, samplers.lowest())
        log_probs = ops.where(done[:, :, None], only_pad[None, None, :], log_probs)
        candidates = ops.reshape(scores[:, :, None] + log_probs, (batch_size, -1))
        scores, best = ops.top_k(candidates, num_beams, sorted=True)
        beam = best // vocabulary
        token = ops.cast(best % vocabulary, "int32")
        chosen = ops.take_along_axis(ops.reshape(log_probs, (batch_size, -1)), best, axis=-1)
        tokens = ops.take_along_axis(tokens, beam[:, :, None], axis=1)
        token_logprobs = ops.take_along_axis(token_logprobs, beam[:, :, None], axis=1)
        done = ops.take_along_axis(done, beam, axis=1)
        tokens = ops.slice_update(tokens, [0, 0, step], token[:, :, None])
        token_logprobs = ops.slice_update(token_logprobs, [0, 0, step], chosen[:, :, None])
        done = ops.logical_or(done, ops.any(token[:, :, None] == stop[None, None, :], axis=-1))
        sources = ops.reshape(
            ops.arange(batch_size, dtype="int32")[:, None] * num_beams + ops.cast(beam, "int32"),
            (rows,),
        )
        return sources, token, scores, tokens, token_logprobs, done

    return backend.compile_function(search, backbone.variables)


def beam_search(model, request, sampler):
    """The best beam per prompt of a validated request: (tokens [B, n], log-probabilities [B, n])."""
    prompts = request.prompts
    max_new_tokens = request.max_new_tokens
    padded, padding, bucket = left_pad(prompts, model.config.max_sequence_length)
    key = ("beam", len(prompts), bucket, max_new_tokens, sampler.num_beams,
           request.stop_ids, request.window)
    search = model.generator.cached(key, lambda: _build(
        model, len(prompts), bucket, max_new_tokens, sampler.num_beams,
        request.stop_ids, request.window,
    ))
    step, scores, tokens, token_logprobs = search(
        ops.convert_to_tensor(padded), ops.convert_to_tensor(padding)
    )
    step = int(ops.convert_to_numpy(step))
    best = np.asarray(ops.convert_to_numpy(scores)).argmax(axis=-1)  # sorted: beam 0
    tokens = np.asarray(ops.convert_to_numpy(tokens))[np.arange(len(prompts)), best, :step]
    logprobs = np.asarray(ops.convert_to_numpy(token_logprobs))[np.arange(len(prompts)), best, :step]
    return tokens, logprobs
