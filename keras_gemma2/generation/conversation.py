"""A chat that keeps its KV cache between turns: a turn prefills only what is new.

The conversation's transcript is token ids: BOS, then Gemma's turns as
`apply_chat_template` writes them, except that the model's replies stay the
ids it sampled (never re-tokenized text). The cache is full length (index t
in slot t, `Generator.continuation`), so it holds a prefix of the transcript:
a turn feeds the rest (the last reply token, which the loop sampled but never
fed, `<end_of_turn>`, the new user turn and `<start_of_turn>model\\n`) as one
chunk at the cache's end, then decodes. Cutting a reply at a stop string is a
shorter transcript; growing past the cache's length pads the cache; past the
model's context the turn is refused before any work, or, on request, the
oldest turns are dropped and what is left is prefilled again.
"""

import contextlib
import dataclasses
import threading

import numpy as np
from keras import ops

from keras_gemma2.generation import results
from keras_gemma2.generation.generator import MIN_BUCKET, drive, power_of_two_bucket, stop_slots
from keras_gemma2.generation.request import (
    GenerationRequest, check_output_options, check_window, stop_id_tuple, stop_string_tuple,
)
from keras_gemma2.generation.samplers import Sampler, is_integer, power_of_two
from keras_gemma2.model import kv_cache

OVERFLOW_CHOICES = ("error", "drop_oldest")
DEFAULT_REPLY_TOKENS = 256


@dataclasses.dataclass(frozen=True)
class ChatTurn:
    """One exchange: the user's message, the reply's text and ids, and the ids the reply followed.

    `prompt_ids` is the transcript the model saw before its first reply token:
    `model.generate(turn.prompt_ids, ...)` continues it from an empty cache.
    """

    message: str
    reply: str
    reply_ids: np.ndarray
    prompt_ids: np.ndarray


class Conversation:
    """`model.start_chat()`: `send(message)` returns the model's reply, reusing the cache.

    The settings given to `start_chat` (sampler, stop ids and strings, the
    reply budget, the window) hold for every turn; `send(max_new_tokens=...)`
    changes one turn's budget. `token_ids` is the transcript so far, `turns`
    the exchanges, `messages` the text history, `reset()` starts over.
    """

    def __init__(self, model, messages, max_new_tokens, sampler, seed, stop_token_ids, stop_strings,
                 window, on_overflow):
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError("start_chat() needs a tokenizer: load a preset that has one.")
        if not isinstance(sampler, Sampler):
            raise ValueError(
                "A conversation samples token by token into its cache; beam search does not continue "
                "a cache. Pick another sampler, or use model.chat(messages, sampler='beam') per turn."
            )
        if on_overflow not in OVERFLOW_CHOICES:
            raise ValueError(
                f"on_overflow must be one of {OVERFLOW_CHOICES}, got {on_overflow!r}: 'error' refuses a "
                "turn that would outgrow the model's context, 'drop_oldest' drops the oldest turns."
            )
        history = list(messages or [])
        # Checked now (roles, content, the system-message rule), with a stand-in for the first message.
        tokenizer.chat_turns(history + [{"role": "user", "content": "?"}])
        config = model.config
        self._budget = _reply_budget(max_new_tokens, config.max_sequence_length)
        check_output_options(seed, False, False, beam=False)
        self._request = GenerationRequest(
            prompts=[], is_text=True, single=True, max_new_tokens=self._budget,
            stop_ids=stop_id_tuple(stop_token_ids, tokenizer, config.vocabulary_size),
            stop_strings=stop_string_tuple(stop_strings, tokenizer),
            window=check_window(window, config),
        )
        self.model, self._sampler, self._seed, self._on_overflow = model, sampler, seed, on_overflow
        self._history = history
        self._start_of_user_turn = tokenizer.tokenize(
            tokenizer.chat_format()["turn"].split("{content}")[0].format(role="user"), add_bos=False
        )
        self._open = None  # a streamed reply not yet read to its end
        self._busy = threading.Lock()  # held while one thread works on the conversation
        self.reset()

    @contextlib.contextmanager
    def _one_at_a_time(self):
        """Refuse to start while another thread works on this conversation (a turn, a stream's step).

        One KV cache and one transcript: two turns at once would each feed the
        cache and record a transcript that is not what the model saw.
        """
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "This conversation is busy with a turn in another thread: it holds one KV cache, so "
                "its turns go one at a time. Wait for that turn (or its stream) to finish, or give "
                "each thread its own conversation (model.start_chat())."
            )
        try:
            yield
        finally:
            self._busy.release()

    # ---- the transcript -------------------------------------------------------
    def reset(self):
        """Start over: an empty transcript (the `messages` given to start_chat come back)."""
        with self._one_at_a_time():
            self._reset()

    def _reset(self):
        self._close_open_stream()
        self._ids = []  # the transcript, including ids not yet in the cache
        self._cached = 0  # the cache holds self._ids[:self._cached]
        self._caches, self._cache_length = None, 0
        self._messages = list(self._history)
        self.turns = []
        self.dropped_turns = 0  # user turns dropped (on_overflow="drop_oldest") to fit the context

    @property
    def token_ids(self):
        """The transcript so far (int32): BOS, the turns, the replies' sampled ids."""
        with self._one_at_a_time():
            self._close_open_stream()
            return np.asarray(self._ids, "int32")

    @property
    def messages(self):
        """The history as text: start_chat's messages, then each user message and reply."""
        with self._one_at_a_time():
            self._close_open_stream()
            return list(self._messages)

    @property
    def cached_tokens(self):
        """How many of the transcript's ids the cache holds (the next turn feeds only the rest)."""
        return self._cached

    # ---- a turn -------------------------------------------------------------------
    def send(self, message, *, max_new_tokens=None, stream=False, return_logprobs=False):
        """The model's reply to `message`: text, a `GenerationResult` (return_logprobs), or pieces.

        `stream=True` returns an iterator of text pieces; `stream=callable`
        calls it with each piece and returns the text. A refused turn (bad
        input, or a transcript that would outgrow the context) changes nothing.
        Turns go one at a time: a send while another thread's turn runs is refused.
        """
        with self._one_at_a_time():
            return self._send(message, max_new_tokens, stream, return_logprobs)

    def _send(self, message, max_new_tokens, stream, return_logprobs):
        self._close_open_stream()
        check_output_options(None, return_logprobs, stream, beam=False)
        if not isinstance(message, str):
            raise TypeError(f"send() takes the user's message as a str, got {type(message).__name__}.")
        if not message.strip():
            raise ValueError("Empty message: send() needs some text for the user's turn.")
        budget = self._budget if max_new_tokens is None else _reply_budget(
            max_new_tokens, self.model.config.max_sequence_length
        )
        ids, cached, dropped = self._fit(self._turn_ids(message), budget)
        request = dataclasses.replace(self._request, prompts=[ids], max_new_tokens=budget)
        seed = None if self._seed is None else (self._seed + len(self.turns)) % 2**31
        rows = self._reply(message, ids, cached, dropped, request, seed, chunk=1 if stream else None)
        if stream is True:
            self._open = self._stepwise(results.stream_text(rows, self.model.tokenizer, request))
            return self._open
        if callable(stream):
            return results.hand_each(stream, results.stream_text(rows, self.model.tokenizer, request))
        tokens, logprobs, _ = list(rows)[-1]
        return results.finish(request, self.model.tokenizer, tokens, logprobs, return_logprobs)

    def _turn_ids(self, message):
        """The ids this turn adds: the previous reply's close, the user's turn, the model's opening."""
        tokenizer = self.model.tokenizer
        if not self._ids:  # start_chat's messages and this one, BOS first
            text = tokenizer.apply_chat_template(self._messages + [{"role": "user", "content": message}])
            return tokenizer.tokenize(text, add_bos=True)
        chat = tokenizer.chat_format()
        (_, content), = tokenizer.chat_turns([{"role": "user", "content": message}])
        turn = chat["turn"].format(role="user", content=content) + chat["generation_prompt"]
        if self.turns:  # the last reply's turn is still open: close it as the template would
            return [tokenizer.end_of_turn_id] + tokenizer.tokenize("\n" + turn, add_bos=False)
        return tokenizer.tokenize(turn, add_bos=False)

    def _fit(self, new_ids, budget):
        """(transcript with the new turn, how many of its ids are cached, turns dropped), within the context.

        Over the context: a clear error, or (drop_oldest) BOS plus the latest
        turns that fit, none of them cached. Nothing changes here.
        """
        context = self.model.config.max_sequence_length
        ids = self._ids + new_ids
        if len(ids) + budget <= context:
            return ids, self._cached, 0
        if self._on_overflow == "drop_oldest":
            for dropped, start in enumerate(self._user_turn_starts(ids), 1):
                if 1 + len(ids) - start + budget <= context:
                    return ids[:1] + ids[start:], 0, dropped
        raise ValueError(
            f"This turn does not fit: the conversation holds {len(self._ids)} tokens, the message adds "
            f"{len(new_ids)} and the reply may take {budget} ({len(ids) + budget} > the model's context "
            f"{context}). "
            + ("The message and its reply alone are too long: shorten it or lower max_new_tokens."
               if self._on_overflow == "drop_oldest" else
               "Start over with conversation.reset(), lower max_new_tokens, or use "
               "model.start_chat(on_overflow='drop_oldest') to drop the oldest turns.")
        )

    def _user_turn_starts(self, ids):
        """Where each user turn after the first begins in `ids` (its `<start_of_turn>user`), in order."""
        pattern = self._start_of_user_turn
        return [
            i for i in range(2, len(ids) - len(pattern) + 1) if ids[i : i + len(pattern)] == pattern
        ]

    def _reply(self, message, ids, cached, dropped, request, seed, chunk):
        """Feed ids[cached:], decode the reply; yield (tokens, logprobs, done) rows; commit at the end.

        Whatever ends the reply (its last token, a stop, a stream closed or
        failing part-way), the transcript keeps the tokens delivered so far; a
        call that fails before delivering any leaves the transcript as it was.
        After an error the cache is dropped (its buffers may have been donated
        to the failed program) and the next turn prefills the transcript again.
        """
        model = self.model
        context = model.config.max_sequence_length
        cache_length = power_of_two_bucket(len(ids) + request.max_new_tokens, 2 * MIN_BUCKET, context)
        caches = self._caches_of_length(cache_length, cached)
        feed = ids[cached:]
        bucket = min(power_of_two(len(feed), MIN_BUCKET), self._cache_length)
        chunk_ids = np.zeros((1, bucket), "int32")
        chunk_ids[0, : len(feed)] = feed
        stop = stop_slots(request.stop_ids)
        extend, decode = model.generator.continuation(
            self._cache_length, bucket, self._sampler.kind(model.config.vocabulary_size),
            request.window, len(stop),
        )
        inputs = (caches, chunk_ids, np.int32(len(feed)), np.int32(cached), stop, self._sampler.settings())
        inputs = (caches,) + tuple(ops.convert_to_tensor(value) for value in inputs[1:])
        self._caches = None  # donated to `extend`: only the loop's latest state holds them
        latest = None
        try:
            for tokens, logprobs, done, state in drive(extend, inputs, decode, request.max_new_tokens, seed, chunk):
                latest = tokens, logprobs, state
                yield tokens, logprobs, done
        except GeneratorExit:  # a stream closed early: the reply is what was read
            self._commit(message, ids, dropped, request, latest, keep_cache=True)
            raise
        except BaseException:
            self._commit(message, ids, dropped, request, latest, keep_cache=False)
            raise
        self._commit(message, ids, dropped, request, latest, keep_cache=True)

    def _commit(self, message, ids, dropped, request, latest, keep_cache):
        """The transcript after a reply: the prompt ids plus the reply as `finish` cuts it."""
        if latest is None:  # nothing was sampled: the transcript is as it was
            self._cached = 0
            return
        tokens, logprobs, state = latest
        result = results.finish(request, self.model.tokenizer, tokens, logprobs, True)
        reply_ids = result.token_ids[0]
        fed = int(ops.convert_to_numpy(state["step"])) - 1  # reply tokens the loop fed to the cache
        self._ids = ids + [int(i) for i in reply_ids]
        self.dropped_turns += dropped
        if keep_cache:
            self._caches = state["caches"]
            self._cached = min(len(ids) + fed, len(self._ids))
        else:
            self._cached = 0
        self._messages += [{"role": "user", "content": message}, {"role": "model", "content": result.text[0]}]
        self.turns.append(ChatTurn(message, result.text[0], reply_ids, np.asarray(ids, "int32")))

    def _caches_of_length(self, length, cached):
        """A cache of at least `length` slots whose first `cached` hold the transcript's start.

        Never shrinks (a shorter one would compile new programs): a new zeroed
        cache when nothing needs keeping, else the current one padded with
        empty slots.
        """
        length = max(length, self._cache_length)
        if self._caches is None or (cached == 0 and length > self._cache_length):
            layout = kv_cache.CacheLayout.full(self.model.config, length)
            self._caches = layout.new_caches(self.model.config, 1, self.model.backbone.compute_dtype)
        elif length > self._cache_length:
            def grow(cache):
                shape = list(cache.shape)
                shape[kv_cache.SLOT_AXIS] = length - self._cache_length
                return ops.concatenate([cache, ops.zeros(shape, cache.dtype)], axis=kv_cache.SLOT_AXIS)

            self._caches = kv_cache.map_caches(grow, self._caches)
        self._cache_length = length
        return self._caches

    def _stepwise(self, pieces):
        """A streamed reply whose every step claims the conversation (see _one_at_a_time)."""
        try:
            while True:
                with self._one_at_a_time():
                    piece = next(pieces, None)
                if piece is None:
                    return
                yield piece
        finally:
            pieces.close()  # closed early (by a later send, or its reader): keep what was read

    def _close_open_stream(self):
        """Finish a streamed reply nobody read to its end: it keeps what was generated."""
        if self._open is not None:
            self._open.close()
            self._open = None


def _reply_budget(max_new_tokens, context):
    """A turn's new-token budget: max_new_tokens, or DEFAULT_REPLY_TOKENS."""
    if max_new_tokens is None:
        return min(DEFAULT_REPLY_TOKENS, context - 1)
    if not is_integer(max_new_tokens) or not 0 < max_new_tokens < context:
        raise ValueError(
            f"max_new_tokens must be a positive integer below the model's context {context}, "
            f"got {max_new_tokens!r}."
        )
    return int(max_new_tokens)
