"""A generation request: every `generate` argument checked and the prompts tokenized, before any compilation."""

import dataclasses

import keras
import numpy as np

from keras_gemma2.generation.samplers import is_integer
from keras_gemma2.tokenizer import check_text

GEMMA_STOP_PIECES = ("<eos>", "<end_of_turn>")
GEMMA_STOP_IDS = (1, 107)  # in the real vocabulary; used when no tokenizer is attached


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """What to generate, validated.

    `prompts`: token-id lists, one per row; `is_text`: the caller passed text
    (so text comes back); `single`: one prompt, not a batch (so one result comes
    back); `stop_ids`: sorted tuple of ids that end a row; `stop_strings`: texts
    that end a row; `window`: the sliding window used at inference.
    """

    prompts: list
    is_text: bool
    single: bool
    max_new_tokens: int
    stop_ids: tuple
    stop_strings: tuple
    window: int
    draft: object = None  # a Gemma2CausalLM proposing tokens (speculative decoding)
    num_draft_tokens: int = None


def default_stop_ids(tokenizer, vocabulary_size):
    """The ids of <eos> and <end_of_turn>: looked up in `tokenizer`, else Gemma's ids within the vocabulary."""
    if tokenizer is not None:
        ids = [tokenizer.piece_to_id(piece) for piece in GEMMA_STOP_PIECES]
        return [int(i) for i in ids if i is not None]
    return [i for i in GEMMA_STOP_IDS if i < vocabulary_size]


def build_request(
    config, tokenizer, inputs, max_length, max_new_tokens, stop_token_ids, stop_strings, stream, window
):
    """Validate `generate`'s request arguments and tokenize: a `GenerationRequest`."""
    is_text = isinstance(inputs, str) or (
        isinstance(inputs, (list, tuple)) and any(isinstance(x, str) for x in inputs)
    )
    if is_text:
        batch = [inputs] if isinstance(inputs, str) else list(inputs)
        if not all(isinstance(x, str) for x in batch):
            raise ValueError("A batch of prompts must be all strings or all token-id lists, not a mix.")
        if tokenizer is None:
            raise ValueError("Generating from text needs a tokenizer; pass token ids instead.")
        if any(not text for text in batch):
            raise ValueError("Empty prompt: every prompt needs at least one character.")
        for row, text in enumerate(batch):
            check_text(text, "The prompt" if len(batch) == 1 else f"Prompt {row}")
        prompts = tokenizer(batch)
        single = isinstance(inputs, str)
    else:
        prompts, single = _token_prompts(inputs, config.vocabulary_size)
    longest = max(len(p) for p in prompts)
    max_new_tokens = _new_token_budget(config.max_sequence_length, longest, max_length, max_new_tokens)
    stop_ids = stop_id_tuple(stop_token_ids, tokenizer, config.vocabulary_size)
    stop_strings = stop_string_tuple(stop_strings, tokenizer)
    if stream and len(prompts) != 1:
        raise ValueError("Streaming (stream=...) generates one prompt at a time; pass a single prompt.")
    window = check_window(window, config)
    return GenerationRequest(
        prompts=prompts,
        is_text=is_text,
        single=single,
        max_new_tokens=max_new_tokens,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        window=window,
    )


def stop_id_tuple(stop_token_ids, tokenizer, vocabulary_size):
    """generate's `stop_token_ids` ("auto": <eos> and <end_of_turn>) as a sorted tuple of checked ids."""
    if isinstance(stop_token_ids, str) and stop_token_ids == "auto":
        stop_token_ids = default_stop_ids(tokenizer, vocabulary_size)
    return _stop_ids(stop_token_ids, vocabulary_size)


def stop_string_tuple(stop_strings, tokenizer):
    """generate's `stop_strings` (None, one string or a list) as a tuple of non-empty strings."""
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)  # one stop string, not its characters
    if stop_strings is None:
        stop_strings = ()
    if not isinstance(stop_strings, (list, tuple, set, frozenset)) or not all(
        isinstance(s, str) and s for s in stop_strings
    ):
        raise ValueError(
            f"stop_strings must be a string or a list of non-empty strings, got {stop_strings!r}."
        )
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need a tokenizer to read the text.")
    return tuple(stop_strings)


def check_window(window, config):
    """The sliding window used at inference: `window`, or the config's when None."""
    window = config.sliding_window_size if window is None else window
    if isinstance(window, bool) or not isinstance(window, int) or not 0 < window <= config.max_sequence_length:
        raise ValueError(
            f"sliding_window_size must be an integer in [1, {config.max_sequence_length}], got {window!r}."
        )
    return window


def _token_prompts(inputs, vocabulary_size):
    """(token-id lists, whether `inputs` was one prompt) from ids given as lists or arrays."""
    array = inputs
    if isinstance(array, np.ndarray) or hasattr(array, "shape"):
        array = np.asarray(keras.ops.convert_to_numpy(array)).tolist()
    single = isinstance(array, (list, tuple)) and bool(array) and all(
        isinstance(x, (int, np.integer)) for x in array
    )
    if single:
        array = [array]
    if not isinstance(array, (list, tuple)) or not array:
        raise ValueError(
            f"Prompts must be a string, a list of strings or token ids; got {type(inputs).__name__}."
        )
    prompts = []
    for row in array:
        if isinstance(row, str):
            raise ValueError(
                "A batch of prompts must be all strings or all token-id lists, not a mix."
            )
        if not isinstance(row, (list, tuple)) or not all(is_integer(x) for x in row):
            raise ValueError(
                f"Prompt token ids must be lists of integers; got {row!r}. Pass text "
                "(with a tokenizer attached) or integer ids."
            )
        prompts.append([int(x) for x in row])
    if any(len(p) == 0 for p in prompts):
        raise ValueError("Empty prompt: every prompt needs at least one token.")
    flat = [x for p in prompts for x in p]
    if min(flat) < 0 or max(flat) >= vocabulary_size:
        raise ValueError(f"Prompt token ids must lie in [0, {vocabulary_size}).")
    return prompts, single


def _new_token_budget(max_sequence_length, longest, max_length, max_new_tokens):
    """How many tokens to generate, checked against the prompt and the model's context."""
    if max_length is not None and (not is_integer(max_length) or max_length < 1):
        raise ValueError(
            f"max_length must be a positive integer (prompt plus new tokens) or None, got "
            f"{max_length!r} ({type(max_length).__name__})."
        )
    if longest >= max_sequence_length:
        raise ValueError(
            f"The prompt has {longest} tokens, which fills the model's context "
            f"(max_sequence_length {max_sequence_length}) and leaves no room for new "
            f"tokens. Shorten the prompt to at most {max_sequence_length - 1} tokens."
        )
    if max_length is not None and max_length > max_sequence_length:
        raise ValueError(
            f"max_length {max_length} exceeds the model's max_sequence_length "
            f"{max_sequence_length}."
        )
    if max_length is not None and longest >= max_length:
        raise ValueError(
            f"The prompt ({longest} tokens) leaves no room: max_length is {max_length}. "
            "Raise max_length or shorten the prompt."
        )
    if max_new_tokens is None:
        limit = max_sequence_length if max_length is None else max_length
        max_new_tokens = min(256, limit - longest) if max_length is None else limit - longest
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    max_new_tokens = int(max_new_tokens)
    if longest + max_new_tokens > max_sequence_length:
        raise ValueError(
            f"Prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"model's max_sequence_length {max_sequence_length}."
        )
    return max_new_tokens


def _stop_ids(stop_token_ids, vocabulary_size):
    """One id, a list of ids or None as a sorted tuple of ids inside the vocabulary."""
    if stop_token_ids is None:
        stop_token_ids = ()
    elif is_integer(stop_token_ids):  # one id
        stop_token_ids = (stop_token_ids,)
    elif isinstance(stop_token_ids, np.ndarray):
        stop_token_ids = stop_token_ids.reshape(-1).tolist()
    if not isinstance(stop_token_ids, (list, tuple, set, frozenset, range)) or not all(
        is_integer(i) for i in stop_token_ids
    ):
        raise ValueError(
            "stop_token_ids must be 'auto', one integer id or a list of integer ids "
            f"(empty for none), got {stop_token_ids!r}."
        )
    stop_ids = tuple(sorted({int(i) for i in stop_token_ids}))
    bad = [i for i in stop_ids if not 0 <= i < vocabulary_size]
    if bad:
        raise ValueError(
            f"stop_token_ids {bad} lie outside the vocabulary [0, {vocabulary_size})."
        )
    return stop_ids


def check_output_options(seed, return_logprobs, stream, beam):
    """`seed`, `return_logprobs` and `stream` checks, so none is ignored or fails mid-generation."""
    if seed is not None and (not is_integer(seed) or not 0 <= seed < 2**31):
        raise ValueError(
            f"seed must be an integer in [0, 2**31 - 1] or None, got {seed!r} "
            f"({type(seed).__name__}); pass e.g. seed=1."
        )
    if not isinstance(return_logprobs, (bool, np.bool_)):
        raise ValueError(f"return_logprobs must be True or False, got {return_logprobs!r}.")
    if not (isinstance(stream, (bool, np.bool_)) or callable(stream)):
        raise ValueError(
            f"stream must be False, True (an iterator of text pieces) or a callable taking each "
            f"piece, got {stream!r}."
        )
    if stream and return_logprobs:
        raise ValueError(
            "return_logprobs=True cannot be combined with stream: streaming yields text pieces "
            "only. Drop stream to get a GenerationResult with log-probabilities."
        )
    if stream and beam:
        raise ValueError(
            "Beam search cannot stream (stream=...): the best beam is known only at the end. "
            "Drop stream, or pick a sampler other than 'beam'."
        )
