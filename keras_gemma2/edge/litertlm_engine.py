"""Run a .litertlm bundle in Google's LiteRT-LM engine from the desktop (`keras-gemma2 run/chat`).

The PyPI binding (`litert-lm-api`) is the same C++ engine as on Android and
iOS, so what a user tries here is what ships. Text goes in through the
engine's own tokenizer (BOS added on a session's first prefill); prompts are
passed as they are (the bundle's turn affixes are not applied), and chat turns
are rendered here in Gemma's format, so one session's KV cache holds exactly
the conversation: the reply's tokens stay in the cache and the next turn
prefills only its new text.
"""

import contextlib
import hashlib
import os
import re
import sys
import tempfile

from keras_gemma2.edge.litertlm_bundle import check_bundle, read_contract
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
        if not path.lower().endswith(".litertlm"):  # export writes the suffix in any case
            raise ValueError(f"{path} is not a .litertlm bundle; export one with keras_gemma2.export(model, "
                             "'model.litertlm').")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} does not exist; export it with keras_gemma2.export first.")
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: use 1 or more.")
        # Checked before the engine sees it: the engine aborts the process on a cut file.
        self.tokenizer, self.cache_length = read_contract(path, check_bundle(path))
        self.litert_lm = _litert_lm()
        self.litert_lm.set_min_log_severity(self.litert_lm.LogSeverity.ERROR)
        cache_dir = cache_dir or default_cache_dir()
        os.makedirs(cache_dir, exist_ok=True)
        self.path = path
        with engine_logs() as logs:
            try:
                self.engine = self.litert_lm.Engine(
                    _lower_case_suffix(path, cache_dir), backend=self.litert_lm.Backend.CPU(thread_count=threads),
                    cache_dir=cache_dir,
                )
            except RuntimeError as error:
                raise RuntimeError(f"{error}{_reason(logs)}") from None

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
        self.check_fits(prompt, max_new_tokens)
        session = self.session(max_new_tokens, **sampling)
        try:
            yield from _pieces(session, prompt)
        finally:
            session.close()

    def check_fits(self, prompt, max_new_tokens):
        """Refuse a prompt and budget the bundle's cache cannot hold (the engine would stop short)."""
        if self.tokenizer is None or self.cache_length is None:
            return
        length = len(self.tokenizer.tokenize(prompt, add_bos=True))
        if length + max_new_tokens > self.cache_length:
            raise ValueError(
                f"The prompt ({length} tokens) and max_new_tokens={max_new_tokens} pass the bundle's cache of "
                f"{self.cache_length} tokens: use --max-new-tokens {max(self.cache_length - length, 1)} or less, "
                "a shorter prompt, or export with a larger --cache-length."
            )

    def start_chat(self, max_new_tokens=256, **sampling):
        return BundleChat(self.session(max_new_tokens, **sampling), max_new_tokens, self.tokenizer, self.cache_length)

    def close(self):
        self.engine.close()


class BundleChat:
    """One conversation in one engine session: each `send` prefills only the new turn.

    The engine keeps a reply's tokens in the cache, its stop token included
    (measured: the next turn continues exactly as `generate` over those ids).
    So a turn opens with "\n" after a reply that stopped (on `<end_of_turn>`),
    or with the whole `<end_of_turn>\n` after one the token budget cut short.
    """

    def __init__(self, session, max_new_tokens, tokenizer=None, cache_length=None):
        self.session, self.max_new_tokens = session, max_new_tokens
        self.tokenizer, self.cache_length = tokenizer, cache_length
        self.turns = 0
        self.cached_tokens = 0  # what the session's cache holds (known with the bundle's tokenizer)
        self.cache_full = False  # the last reply ended because the cache filled up
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
        counted = self.tokenizer is not None and self.cache_length is not None
        if counted:
            length = len(self.tokenizer.tokenize(text, add_bos=not self.turns))
            if self.cached_tokens + length + 1 > self.cache_length:
                raise ValueError(
                    f"This message ({length} tokens with its turn markers) does not fit what is left of the "
                    f"bundle's cache ({self.cached_tokens} of {self.cache_length} tokens used): /reset to start "
                    "over, send a shorter one, or export with a larger --cache-length."
                )
        self.turns += 1
        decoded = [0]
        yield from _pieces(self.session, text, decoded)
        self._reply_stopped = decoded[0] < self.max_new_tokens
        self.cache_full = False
        if counted:
            self.cached_tokens += length + decoded[0]
            # Short of its budget with the cache (nearly) full: cut by the cache, not by a stop.
            self.cache_full = self._reply_stopped and self.cached_tokens >= self.cache_length - 1

    def close(self):
        self.session.close()


def _pieces(session, text, decoded=None):
    """Prefill `text`, then yield the decoded pieces; `decoded[0]` counts the engine's steps."""
    with engine_logs() as logs:
        try:
            session.run_prefill([text])
        except RuntimeError:  # the binding's message is generic; the engine logged the cause
            raise RuntimeError(
                "The LiteRT-LM engine refused the prompt: most likely it does not fit what is left of "
                "the bundle's cache (its max_num_tokens, the export's cache_length). Start a new chat "
                f"(/reset), shorten the prompt, or export with a larger cache_length{_reason(logs)}"
            ) from None
    for response in session.run_decode_async():
        if decoded is not None:
            decoded[0] += 1
        for piece in response.texts:
            if piece:
                yield piece


def _lower_case_suffix(path, cache_dir):
    """`path`, or a link to it ending in ".litertlm": the engine knows the format by that suffix
    in lower case only (export writes any case). The link lives in the engine's cache folder,
    named after the bundle's path, so runs reuse it rather than leave new ones."""
    if path.endswith(".litertlm"):
        return path
    link = os.path.join(cache_dir, "links", hashlib.sha256(path.encode()).hexdigest()[:24] + ".litertlm")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.realpath(link) != os.path.realpath(path):
        staged = f"{link}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.remove(staged)
        os.symlink(path, staged)
        os.replace(staged, link)
    return link


@contextlib.contextmanager
def engine_logs():
    """Collect what the native engine writes to stderr meanwhile (a list of lines, filled on exit).

    Its log lines would surround the command's one-line error; the reason
    they give is put into that error instead (`_reason`).
    """
    lines = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (AttributeError, OSError, ValueError):  # no real stderr to redirect
        yield lines
        return
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines.extend(log.read().decode("utf-8", "replace").splitlines())


def _reason(lines):
    """': <the engine's first error message>' from its log lines, or ''."""
    for line in lines:
        match = re.match(r"^[EF]\d{4} .*?\] (.+)$", line.strip())
        if match:
            return f": {match.group(1)}"
    return ""
