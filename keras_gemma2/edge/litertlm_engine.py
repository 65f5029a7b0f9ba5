"""Run a .litertlm bundle in Google's LiteRT-LM engine from the desktop (`keras-gemma2 run/chat`).

The PyPI binding (`litert-lm-api`) is the same C++ engine as on Android and
iOS, so what a user tries here is what ships. Text goes in through the
engine's own tokenizer (BOS added on a session's first prefill); prompts are
passed as they are (the bundle's turn affixes are not applied), and chat turns
are rendered here in Gemma's format, so one session's KV cache holds exactly
the conversation: the reply's tokens stay in the cache and the next turn
prefills only its new text.
"""

import os

from keras_gemma2.tokenizer import Gemma2Tokenizer


def _litert_lm():
    try:
        import litert_lm
    except ImportError as error:
        raise ImportError(
            "Running a .litertlm needs LiteRT-LM's Python engine: pip install litert-lm-api "
            "(or keras-gemma2[export])."
        ) from error
    return litert_lm


def default_cache_dir():
    """Where the engine keeps its XNNPACK weight caches (not beside the user's bundle)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "keras_gemma2", "litert_lm")


def sampler_config(litert_lm, temperature=None, top_k=None, top_p=None, seed=None):
    """The engine's sampler for these options: greedy (top-k 1) when none is set."""
    if temperature is None and top_k is None and top_p is None:
        return litert_lm.SamplerConfig(top_k=1)
    for name, value, valid in (("temperature", temperature, lambda v: v > 0),
                               ("top_k", top_k, lambda v: v >= 1),
                               ("top_p", top_p, lambda v: 0 < v <= 1)):
        if value is not None and not valid(value):
            raise ValueError(f"{name}={value} is out of range (temperature > 0, top_k >= 1, 0 < top_p <= 1).")
    return litert_lm.SamplerConfig(
        top_k=top_k if top_k is not None else 64_000, top_p=top_p if top_p is not None else 1.0,
        temperature=temperature if temperature is not None else 1.0, seed=seed,
    )


class BundleEngine:
    """A loaded .litertlm: `stream(prompt)` for one completion, `start_chat()` for a conversation."""

    def __init__(self, path, threads=None, cache_dir=None):
        path = os.path.abspath(os.fspath(path))
        if not path.endswith(".litertlm"):
            raise ValueError(f"{path} is not a .litertlm bundle; export one with keras_gemma2.export(model, "
                             "'model.litertlm').")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist; export it with keras_gemma2.export first.")
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: use 1 or more.")
        self.litert_lm = _litert_lm()
        self.litert_lm.set_min_log_severity(self.litert_lm.LogSeverity.ERROR)
        cache_dir = cache_dir or default_cache_dir()
        os.makedirs(cache_dir, exist_ok=True)
        self.path = path
        self.engine = self.litert_lm.Engine(
            path, backend=self.litert_lm.Backend.CPU(thread_count=threads), cache_dir=cache_dir
        )

    def session(self, max_new_tokens, **sampling):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: use 1 or more.")
        return self.engine.create_session(
            apply_prompt_template=False,
            sampler_config=sampler_config(self.litert_lm, **sampling),
            max_output_tokens=max_new_tokens,
        )

    def stream(self, prompt, max_new_tokens=128, **sampling):
        """Yield the text pieces of `prompt`'s continuation as the engine decodes them."""
        if not prompt:
            raise ValueError("Empty prompt: give some text to continue.")
        session = self.session(max_new_tokens, **sampling)
        try:
            yield from _pieces(session, prompt)
        finally:
            session.close()

    def start_chat(self, max_new_tokens=256, **sampling):
        return BundleChat(self.session(max_new_tokens, **sampling), max_new_tokens)

    def close(self):
        self.engine.close()


class BundleChat:
    """One conversation in one engine session: each `send` prefills only the new turn.

    The engine keeps a reply's tokens in the cache, its stop token included
    (measured: the next turn continues exactly as `generate` over those ids).
    So a turn opens with "\n" after a reply that stopped (on `<end_of_turn>`),
    or with the whole `<end_of_turn>\n` after one the token budget cut short.
    """

    def __init__(self, session, max_new_tokens):
        self.session, self.max_new_tokens = session, max_new_tokens
        self.turns = 0
        self._reply_stopped = False
        template = Gemma2Tokenizer.chat_format()
        self._turn, self._opening = template["turn"], template["generation_prompt"]

    def turn_text(self, message):
        """What `send(message)` prefills: the previous model turn closed, then the user's turn."""
        text = self._turn.format(role="user", content=message.strip()) + self._opening
        if not self.turns:
            return text
        closing = self._turn.split("{content}")[1]  # "<end_of_turn>\n"
        end_of_turn = closing.rstrip("\n")
        return (closing[len(end_of_turn):] if self._reply_stopped else closing) + text

    def send(self, message):
        """Yield the reply's text pieces."""
        if not message.strip():
            raise ValueError("Empty message.")
        text = self.turn_text(message)
        self.turns += 1
        decoded = [0]
        yield from _pieces(self.session, text, decoded)
        self._reply_stopped = decoded[0] < self.max_new_tokens

    def close(self):
        self.session.close()


def _pieces(session, text, decoded=None):
    """Prefill `text`, then yield the decoded pieces; `decoded[0]` counts the engine's steps."""
    try:
        session.run_prefill([text])
    except RuntimeError as error:  # the binding's message is generic; the engine logged the cause
        raise RuntimeError(
            "The LiteRT-LM engine refused the prompt: most likely it does not fit what is left of "
            "the bundle's cache (its max_num_tokens, the export's cache_length). Start a new chat "
            "(/reset), shorten the prompt, or export with a larger cache_length."
        ) from error
    for response in session.run_decode_async():
        if decoded is not None:
            decoded[0] += 1
        for piece in response.texts:
            if piece:
                yield piece
