"""Speculative decoding: a small draft model proposes k tokens, the target checks them in one pass.

Gemma 2's 2B and 9B are distilled from larger Gemma 2 models and share their
vocabulary, so a small distilled model is a natural draft for a large one.
Each round of the compiled loop:

1. the draft feeds the last two tokens (the one before the last may already be
   in its cache; writing it again is harmless) and proposes x_1..x_k, one
   cached step each;
2. the target runs ONE cached forward over [last token, x_1..x_k] at the
   current index: its distributions p_1..p_{k+1} for every position at once;
3. greedy: x_i is kept while it is the target's argmax; sampling: x_i is kept
   with probability min(1, p_i(x_i) / q_i(x_i)) (q_i: the draft's
   distribution under the same sampler settings), so every emitted token is
   distributed exactly as the target's (Leviathan et al. 2023; Chen et al. 2023);
4. after the n kept tokens comes the target's own token at n+1: its argmax,
   or a draw from max(0, p - q) normalized (p_{k+1} itself when all k were kept).

A batch advances by the fewest tokens any unfinished row kept, plus one (every
row's token at that position is still its own exact accept-or-resample
token). Rolling back is free: both caches are full length (index t in slot
t; sliding layers still read only their window), so a rejected suffix lies
past every later query until the next round overwrites it. That costs the
sliding layers' memory beyond their window (the 2B at 8K in bfloat16: 832
MiB instead of 624), and buys a one-slice-update write of each chunk.
"""

import numpy as np
from keras import ops

from keras_gemma2 import backend
from keras_gemma2.generation import samplers
from keras_gemma2.generation.steps import decode_step, prefill
from keras_gemma2.model import kv_cache

MAX_DRAFT_TOKENS = 16
DEFAULT_DRAFT_TOKENS = 4
_STREAMS_PER_STEP = 64  # random streams per decode step (proposals, acceptance, the last draw)


def check_draft(model, draft_model, num_draft_tokens, beam):
    """The number of draft tokens, after refusing a draft that cannot propose for `model`."""
    if draft_model is None:
        if num_draft_tokens is not None:
            raise ValueError("num_draft_tokens is for speculative decoding: pass draft_model=... too.")
        return None
    if type(draft_model).__name__ != "Gemma2CausalLM" or not hasattr(draft_model, "backbone"):
        raise TypeError(
            f"draft_model must be a keras_gemma2 Gemma2CausalLM (e.g. a distilled student), got "
            f"{type(draft_model).__name__}."
        )
    if draft_model is model:
        raise ValueError("draft_model is the model itself: pass a smaller model that shares its vocabulary.")
    if beam:
        raise ValueError(
            "Speculative decoding (draft_model=...) samples one sequence per row; it does not combine "
            "with beam search. Drop draft_model, or pick another sampler."
        )
    if num_draft_tokens is None:
        num_draft_tokens = DEFAULT_DRAFT_TOKENS
    if not samplers.is_integer(num_draft_tokens) or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
        raise ValueError(
            f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}] (tokens the draft proposes "
            f"per target pass), got {num_draft_tokens!r}; 3-5 is typical."
        )
    ours, theirs = model.config.vocabulary_size, draft_model.config.vocabulary_size
    if ours != theirs:
        raise ValueError(
            f"The draft model's vocabulary ({theirs} ids) is not the target's ({ours}): its proposals "
            "would be other tokens. Use a draft with the same tokenizer (e.g. Gemma 2 2B for 9B or 27B)."
        )
    if model.tokenizer is not None and draft_model.tokenizer is not None and (
        model.tokenizer.proto_bytes != draft_model.tokenizer.proto_bytes
    ):
        raise ValueError(
            "The draft model's tokenizer differs from the target's (same size, other pieces): its "
            "proposals would mean other text. Use a draft with the same tokenizer."
        )
    return int(num_draft_tokens)


def check_room(draft_model, longest, max_new_tokens, num_draft_tokens):
    """The draft must hold the prompt, the budget and one round past it."""
    needed = longest + max_new_tokens + num_draft_tokens
    context = draft_model.config.max_sequence_length
    if needed > context:
        raise ValueError(
            f"The draft model's context ({context} tokens) cannot hold the prompt ({longest}), "
            f"max_new_tokens ({max_new_tokens}) and num_draft_tokens ({num_draft_tokens}): lower "
            "max_new_tokens or num_draft_tokens."
        )


def draft_key(draft_model):
    """What a compiled speculative program depends on besides shapes: the draft and its variables."""
    backbone = draft_model.backbone
    return (draft_model, tuple(backbone.lora_targets or ()), tuple(id(v) for v in backbone.variables))


def resample_distribution(p, q):
    """After a rejection: max(0, p - q), unnormalized (the sampler draws from its logarithm)."""
    return ops.maximum(p - q, 0.0)


def build(generator, draft_model, bucket, cache_length, kind, window, k):
    """(start, run) compiled: prefill both models, then rounds of k proposals and one verification."""
    target, drafter = generator.model.backbone, draft_model.backbone
    # Full-length caches: a chunk at a dynamic index is one slice update (a ring's is a gather
    # and a select over the layer's cache, ~25% of a 148M model's 5-token pass).
    target_layout = kv_cache.CacheLayout.full(target.config.replace(sliding_window_size=window), cache_length)
    draft_layout = kv_cache.CacheLayout.full(drafter.config, cache_length)
    first_token, _ = generator.sampling_loop(target_layout, kind)
    greedy = kind[0] == "greedy"

    def key(seed, step, stream):
        return ops.stack([seed, step * _STREAMS_PER_STEP + stream])

    def start(prompt, padding, stop, settings, seed):
        """Both prefills and the target's first token (sampled as plain decoding samples it)."""
        generator.count_trace()
        logits, target_caches = prefill(target, target_layout, prompt, padding)
        _, draft_caches = prefill(drafter, draft_layout, prompt, padding)
        # Buffers hold a round's k + 1 tokens past the budget; the host cuts them off.
        state = first_token(logits, target_caches, padding, bucket, cache_length - bucket + k + 1,
                            stop, settings, seed)
        zero = ops.zeros((), "int32")
        return {**state, "draft_caches": draft_caches, "previous": prompt[:, -1], "rounds": zero,
                "accepted": zero}

    def propose(previous, token, caches, index, padding, seed, step, settings):
        """The draft's k tokens after `token` (at cache index `index`) and, sampling, their distributions."""
        chunk = ops.stack([previous, token], axis=1)
        positions = (index - 1 + ops.arange(2, dtype="int32"))[None, :] - padding[:, None]
        hidden, caches = drafter.forward_pass(chunk, positions, caches, index - 1, draft_layout)
        logits = drafter.logits(hidden[:, -1:])[:, 0]
        proposals, distributions = [], []
        for i in range(k):
            if i:
                logits, caches = decode_step(drafter, draft_layout, proposals[-1], padding, caches, index + i)
            if greedy:
                proposals.append(ops.cast(ops.argmax(logits, axis=-1), "int32"))
            else:
                filtered = samplers.filtered_logits(kind, logits, settings)
                proposals.append(backend.stateless_categorical(filtered, key(seed, step, i)))
                distributions.append(ops.softmax(filtered, axis=-1))
        return ops.stack(proposals, axis=1), distributions, caches

    def verify(logits, drafted, distributions, done, seed, step, settings):
        """(tokens kept n: a scalar, the target's token after them [B]) for a round's proposals."""
        batch, vocabulary = ops.shape(drafted)[0], logits.shape[-1]
        if greedy:
            best = ops.cast(ops.argmax(logits, axis=-1), "int32")  # [B, k + 1]
            accept = ops.equal(drafted, best[:, :k])
        else:
            flat = ops.reshape(logits, (-1, vocabulary))
            p = ops.reshape(ops.softmax(samplers.filtered_logits(kind, flat, settings), axis=-1),
                            (batch, k + 1, vocabulary))
            q = ops.stack(distributions + [ops.zeros_like(distributions[0])], axis=1)  # q_{k+1} = 0
            p_x = ops.take_along_axis(p[:, :k], drafted[..., None], axis=-1)[..., 0]
            q_x = ops.take_along_axis(q[:, :k], drafted[..., None], axis=-1)[..., 0]
            uniform = backend.stateless_uniform((batch, k), key(seed, step, k))
            accept = uniform * q_x < p_x
        # Leading accepted proposals per row; a finished row does not hold the others back.
        leading = ops.sum(ops.cumprod(ops.cast(accept, "int32"), axis=1), axis=1)
        kept = ops.min(ops.where(done, k, leading))
        if greedy:
            return kept, ops.take(best, kept, axis=1)
        accepted_there = ops.take(ops.concatenate([accept, ops.zeros((batch, 1), "bool")], axis=1), kept, axis=1)
        padded = ops.concatenate([drafted, ops.zeros((batch, 1), "int32")], axis=1)
        residual = resample_distribution(ops.take(p, kept, axis=1), ops.take(q, kept, axis=1))
        # Floored at float32's smallest normal number (XLA:CPU flushes subnormals to 0).
        smallest = float(np.finfo(np.float32).tiny)
        draw = backend.stateless_categorical(
            ops.where(residual > 0, ops.log(ops.maximum(residual, smallest)), samplers.lowest()), key(seed, step, k + 1)
        )
        return kept, ops.where(accepted_there, ops.take(padded, kept, axis=1), draw)

    def run(state, seed, stop_at):
        """Rounds until `stop_at` tokens or every row stopped (a round may pass `stop_at` by up to k)."""
        generator.count_trace()
        padding, stop, settings = state["padding"], state["stop"], state["settings"]
        columns = ops.arange(k + 1, dtype="int32")[None, :]

        def cond(step, token, previous, caches, draft_caches, tokens, logprobs, done, rounds, accepted):
            return ops.logical_and(step < stop_at, ops.logical_not(ops.all(done)))

        def body(step, token, previous, caches, draft_caches, tokens, logprobs, done, rounds, accepted):
            index = state["base"] + step - 1  # where `token` goes
            drafted, distributions, draft_caches = propose(
                previous, token, draft_caches, index, padding, seed, step, settings
            )
            chunk = ops.concatenate([token[:, None], drafted], axis=1)
            positions = (index + columns) - padding[:, None]
            hidden, caches = target.forward_pass(chunk, positions, caches, index, target_layout)
            logits = target.logits(hidden)  # [B, k + 1, vocab]
            kept, last = verify(logits, drafted, distributions, done, seed, step, settings)
            # Emitted this round: x_1..x_kept, then `last`; a row's tokens after its first stop are 0.
            padded = ops.concatenate([drafted, ops.zeros_like(token)[:, None]], axis=1)
            emitted = ops.where(columns < kept, padded, ops.where(columns == kept, last[:, None], 0))
            valid = ops.logical_and(columns <= kept, ops.logical_not(done)[:, None])
            stops = ops.logical_and(ops.any(emitted[..., None] == stop[None, None, :], axis=-1), valid)
            before_stop = ops.cumsum(ops.cast(stops, "int32"), axis=1) - ops.cast(stops, "int32") == 0
            keep = ops.logical_and(valid, before_stop)
            chosen = ops.take_along_axis(ops.log_softmax(logits, axis=-1), emitted[..., None], axis=-1)[..., 0]
            tokens = ops.slice_update(tokens, [0, step], ops.where(keep, emitted, 0))
            logprobs = ops.slice_update(logprobs, [0, step], ops.where(keep, chosen, 0.0))
            done = ops.logical_or(done, ops.any(stops, axis=1))
            previous = ops.take(ops.concatenate([token[:, None], drafted], axis=1), kept, axis=1)
            token = ops.where(done, 0, last)
            return (step + kept + 1, token, previous, caches, draft_caches, tokens, logprobs, done,
                    rounds + 1, accepted + kept)

        names = ("step", "token", "previous", "caches", "draft_caches", "tokens", "logprobs", "done",
                 "rounds", "accepted")
        loop = ops.while_loop(cond, body, tuple(state[name] for name in names))
        return {**state, **dict(zip(names, loop))}

    variables = target.variables + drafter.variables
    return (
        backend.compile_function(start, variables),
        backend.compile_function(run, variables, donate_first=True),
    )


def acceptance(state, k):
    """{"rounds", "drafted", "accepted", "rate"} of a finished speculative run's state."""
    rounds = int(np.asarray(ops.convert_to_numpy(state["rounds"])))
    accepted = int(np.asarray(ops.convert_to_numpy(state["accepted"])))
    return {"rounds": rounds, "drafted": rounds * k, "accepted": accepted,
            "rate": accepted / (rounds * k) if rounds else float("nan")}
