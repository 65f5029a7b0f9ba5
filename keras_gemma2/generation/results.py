"""One generate call past validation: run the compiled loop or beam search, then cut the
tokens at stops and detokenize, all at once or piece by piece."""

import dataclasses

import numpy as np

from keras_gemma2.generation.beam_search import beam_search
from keras_gemma2.generation.samplers import Sampler


@dataclasses.dataclass
class GenerationResult:
    """What `generate(..., return_logprobs=True)` returns.

    Per row: the new tokens (stop token excluded), their log-probabilities,
    and the text (None without a tokenizer, or for token-id prompts without stop strings).
    """

    token_ids: list
    logprobs: list
    text: list = None


def trim_at_stop(tokens, logprobs, stop_ids):
    """Cut a row at its first stop token (excluded)."""
    for position, token in enumerate(tokens):
        if int(token) in stop_ids:
            return tokens[:position], logprobs[:position]
    return tokens, logprobs


def cut_at_stop_string(text, stop_strings):
    """(text before the first stop string, whether one was found)."""
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def tokens_covering(tokenizer, ids, text):
    """How many leading tokens detokenize to (at least) `text`."""
    for count in range(len(ids) + 1):
        if len(tokenizer.detokenize(ids[:count])) >= len(text):
            return count
    return len(ids)


def generate(model, request, sampler, seed, return_logprobs, stream):
    """Run a validated `GenerationRequest` on `model` (a Gemma2CausalLM); returns like its `generate`."""
    if not isinstance(sampler, Sampler):  # beam search
        tokens, logprobs = beam_search(model, request, sampler)
        return finish(request, model.tokenizer, tokens, logprobs, return_logprobs)
    if stream:
        rows = model.generator.run(
            request.prompts, request.max_new_tokens, sampler, request.stop_ids, seed, request.window, chunk=1,
            draft=request.draft, num_draft_tokens=request.num_draft_tokens,
        )
        pieces = stream_text(rows, model.tokenizer, request)
        return pieces if stream is True else hand_each(stream, pieces)
    return complete(model.generator, model.tokenizer, request, sampler, seed, return_logprobs)


def hand_each(callback, pieces):
    """Call `callback` with each text piece as it comes (its return value unused); the whole text."""
    text = []
    try:
        for piece in pieces:
            callback(piece)
            text.append(piece)
    finally:
        pieces.close()
    return "".join(text)


def finish(request, tokenizer, tokens, logprobs, return_logprobs):
    """Tokens [B, n] and log-probabilities [B, n] of a finished run, returned like `generate`."""
    rows = [trim_at_stop(t, lp, request.stop_ids) for t, lp in zip(tokens, logprobs)]
    token_ids = [np.asarray(t, "int32") for t, _ in rows]
    row_logprobs = [np.asarray(lp, "float32") for _, lp in rows]
    texts = None
    if tokenizer is not None and (request.is_text or request.stop_strings):
        texts = []
        for row, ids in enumerate(token_ids):
            text, found = cut_at_stop_string(tokenizer.detokenize(ids), request.stop_strings)
            if found:  # keep only the tokens that make up the kept text
                keep = tokens_covering(tokenizer, ids, text)
                token_ids[row], row_logprobs[row] = ids[:keep], row_logprobs[row][:keep]
            texts.append(text)
    if return_logprobs:
        return GenerationResult(token_ids=token_ids, logprobs=row_logprobs, text=texts)
    outputs = texts if request.is_text else token_ids
    return outputs[0] if request.single else outputs


def complete(generator, tokenizer, request, sampler, seed, return_logprobs):
    """Run the compiled loop to the end, then `finish`."""
    tokens, logprobs, _ = list(
        generator.run(
            request.prompts, request.max_new_tokens, sampler, request.stop_ids, seed, request.window,
            draft=request.draft, num_draft_tokens=request.num_draft_tokens,
        )
    )[-1]
    return finish(request, tokenizer, tokens, logprobs, return_logprobs)


def stream_text(rows, tokenizer, request):
    """Yield text pieces from (tokens [1, n], logprobs, done) rows as the loop produces tokens."""
    if tokenizer is None:
        raise ValueError("Streaming text needs a tokenizer.")
    emitted = ""
    try:
        for tokens, logprobs, _ in rows:
            ids, _ = trim_at_stop(tokens[0], logprobs[0], request.stop_ids)
            text, found = cut_at_stop_string(tokenizer.detokenize(ids), request.stop_strings)
            if text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]
                emitted = text
            if found:
                return
    finally:
        rows.close()  # the loop stops with the text (a conversation keeps what was generated)
