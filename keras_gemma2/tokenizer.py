"""Gemma 2's SentencePiece tokenizer and chat template.

Plain Python + numpy + sentencepiece: tokenization happens outside the
model graph, so it is the same for every Keras backend.
"""

import os

import numpy as np

from keras_gemma2.checkpoints import presets
from keras_gemma2.io.atomic import atomic_write

_PAD, _EOS, _BOS, _UNK = "<pad>", "<eos>", "<bos>", "<unk>"
_START_OF_TURN, _END_OF_TURN = "<start_of_turn>", "<end_of_turn>"

# Gemma calls the assistant "model" and has no system role of its own.
_ROLE_ALIASES = {"user": "user", "model": "model", "assistant": "model"}
_ALLOWED_ROLES = ("user", "model", "assistant", "system")


class Gemma2Tokenizer:
    """Text <-> token ids with Gemma's SentencePiece vocabulary.

    Args:
        proto: path to a SentencePiece `.model`/`.spm` file, or the
            serialized model bytes.
        add_bos: prepend `<bos>` in `tokenize` by default. Gemma's output
            quality collapses without it, hence on by default.
        add_eos: append `<eos>` in `tokenize` by default.

    Special ids are looked up by piece name, never assumed, so a vocabulary
    that numbers them differently still works; a missing piece gives None.
    """

    def __init__(self, proto, add_bos=True, add_eos=False):
        self._proto_bytes = _read_proto(proto)
        self._sp = _load_processor(self._proto_bytes, proto)
        self.add_bos = bool(add_bos)
        self.add_eos = bool(add_eos)

        self.pad_token_id = self._lookup(_PAD)
        self.eos_token_id = self._lookup(_EOS)
        self.bos_token_id = self._lookup(_BOS)
        self.unk_token_id = self._lookup(_UNK)
        self.start_of_turn_id = self._lookup(_START_OF_TURN)
        self.end_of_turn_id = self._lookup(_END_OF_TURN)

        # Fail now rather than silently dropping BOS/EOS on every call.
        self._check_can_add(self.add_bos, self.add_eos)

    # ------------------------------------------------------------------ setup

    @classmethod
    def from_preset(cls, preset):
        """Load the tokenizer stored with a preset (name or directory)."""
        return cls(presets.tokenizer_file(preset))

    def _lookup(self, piece):
        # sentencepiece maps an unknown piece to the unk id, so confirm the
        # id really holds this piece before trusting it.
        idx = self._sp.piece_to_id(piece)
        if 0 <= idx < self.vocabulary_size and self._sp.id_to_piece(idx) == piece:
            return idx
        return None

    def _check_can_add(self, add_bos, add_eos):
        if add_bos and self.bos_token_id is None:
            raise ValueError(
                f"add_bos=True but the vocabulary has no {_BOS!r} piece."
            )
        if add_eos and self.eos_token_id is None:
            raise ValueError(
                f"add_eos=True but the vocabulary has no {_EOS!r} piece."
            )

    @property
    def proto_bytes(self):
        """The serialized SentencePiece model, to save or ship elsewhere."""
        return self._proto_bytes

    @property
    def vocabulary_size(self):
        return self._sp.get_piece_size()

    def id_to_piece(self, id):
        self._check_ids([id])
        return self._sp.id_to_piece(int(id))

    def piece_to_id(self, piece):
        """The id of `piece`, or None if the vocabulary lacks it."""
        if not isinstance(piece, str):
            raise TypeError(f"piece must be a str, got {type(piece).__name__}.")
        return self._lookup(piece)

    def save_assets(self, directory):
        """Write `directory/tokenizer.model` atomically; return its path.

        A temp file in the same directory is renamed over the target, so a
        crash never leaves a half-written model behind.
        """
        path = os.path.join(os.fspath(directory), "tokenizer.model")
        with atomic_write(path) as f:
            f.write(self._proto_bytes)
        return path

    def __getstate__(self):
        # The C++ processor is rebuilt from the bytes (for pickling/workers).
        return {
            "proto": self._proto_bytes,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
        }

    def __setstate__(self, state):
        self.__init__(state["proto"], state["add_bos"], state["add_eos"])

    def __repr__(self):
        return (
            f"{type(self).__name__}(vocabulary_size={self.vocabulary_size}, "
            f"add_bos={self.add_bos}, add_eos={self.add_eos})"
        )

    # --------------------------------------------------------------- tokenize

    def tokenize(self, text, *, add_bos=None, add_eos=None):
        """str -> list[int]; list of str -> list[list[int]].

        Special pieces written in the text that the vocabulary defines as
        user symbols (`<start_of_turn>`, `<end_of_turn>`) become their single
        id, which is what the chat template relies on.
        """
        add_bos = self.add_bos if add_bos is None else bool(add_bos)
        add_eos = self.add_eos if add_eos is None else bool(add_eos)
        self._check_can_add(add_bos, add_eos)

        if isinstance(text, str):
            check_text(text)
            return self._tokenize_one(text, add_bos, add_eos)
        if isinstance(text, (list, tuple)):
            for i, t in enumerate(text):
                if not isinstance(t, str):
                    raise TypeError(
                        f"tokenize expects str or a list of str; item {i} "
                        f"is {type(t).__name__}."
                    )
                check_text(t, f"Text {i}")
            return [self._tokenize_one(t, add_bos, add_eos) for t in text]
        raise TypeError(
            f"tokenize expects str or a list of str, got {type(text).__name__}."
        )

    __call__ = tokenize

    def pieces_with_offsets(self, text):
        """[(id, start)] of `text` without BOS/EOS: each token and the UTF-8 byte where its piece starts.

        Tokenized whole, as `tokenize` does, so spans of the text (a chat's model
        turns) can be mapped to the tokens that generate would see.
        """
        check_text(text)
        return [(piece.id, piece.begin) for piece in self._sp.encode(text, return_type="proto").pieces]

    def _tokenize_one(self, text, add_bos, add_eos):
        ids = list(self._sp.encode(text, out_type=int))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    # ------------------------------------------------------------- detokenize

    def detokenize(self, ids, *, skip_special=True):
        """1-D ids -> str; 2-D ids (array or list of lists) -> list[str].

        With `skip_special` (default) pad/bos/eos are dropped, so padded
        batches and generated sequences decode to clean text. Without it,
        control pieces are written out by name (e.g. "<eos>").
        """
        if isinstance(ids, (list, tuple)):
            if len(ids) == 0:
                return ""
            nested = [_is_sequence(x) for x in ids]
            if all(nested):
                return [
                    self._detokenize_one(_as_id_list(row, 1), skip_special)
                    for row in ids
                ]
            if any(nested):
                raise ValueError(
                    "detokenize got a mix of ids and sequences; pass a 1-D "
                    "sequence of ids or a batch of sequences."
                )
            return self._detokenize_one(_as_id_list(ids, 1), skip_special)

        array = np.asarray(ids)
        if array.ndim == 1:
            return self._detokenize_one(_as_id_list(array, 1), skip_special)
        if array.ndim == 2:
            return [
                self._detokenize_one(_as_id_list(row, 1), skip_special)
                for row in array
            ]
        raise ValueError(
            f"detokenize expects a 1-D or 2-D sequence of ids, got shape "
            f"{array.shape}."
        )

    def _check_ids(self, ids):
        size = self.vocabulary_size
        for i in ids:
            if isinstance(i, (bool, np.bool_)) or not isinstance(
                i, (int, np.integer)
            ):
                raise TypeError(
                    f"Token ids must be integers, got {i!r} "
                    f"({type(i).__name__})."
                )
            if not 0 <= i < size:
                raise ValueError(
                    f"Token id {int(i)} is outside the vocabulary "
                    f"[0, {size}) (vocabulary_size={size})."
                )

    def _detokenize_one(self, ids, skip_special):
        self._check_ids(ids)
        ids = [int(i) for i in ids]
        if skip_special:
            drop = {
                i
                for i in (self.pad_token_id, self.bos_token_id, self.eos_token_id)
                if i is not None
            }
            # sentencepiece already renders control pieces as "".
            return self._sp.decode([i for i in ids if i not in drop])

        # sentencepiece decodes control pieces to "", so write them out by
        # name and decode the ordinary runs between them. Dropping the names
        # again gives exactly the skip_special=True text.
        parts, run, has_text = [], [], False
        for i in ids + [None]:
            if i is not None and not self._sp.is_control(i):
                run.append(i)
                continue
            if run:
                text = self._decode_run(run, has_text)
                has_text = has_text or bool(text)
                parts.append(text)
                run = []
            if i is not None:
                parts.append(self._sp.id_to_piece(i))
        return "".join(parts)

    def _decode_run(self, run, has_text):
        text = self._sp.decode(run)
        if has_text:
            # Models with a dummy prefix strip a leading "\u2581" at the start
            # of a decode; after earlier text that space is real, so restore it.
            piece = self._sp.id_to_piece(run[0])
            first = self._sp.decode(run[:1])
            if piece.startswith("\u2581") and not first.startswith(" "):
                text = " " + text
        return text

    # ---------------------------------------------------------- chat template

    @staticmethod
    def chat_format():
        """Gemma's turn format as data, for a runtime that renders turns itself (export's metadata).

        A dict: "turn", a `str.format` template with `{role}` and `{content}`
        (one turn, as `apply_chat_template` writes it); "generation_prompt",
        what opens the model's turn; "roles", each accepted role's name in the
        turn ("assistant" is "model"). A system message is merged into the
        first user turn (see `apply_chat_template`).
        """
        return {
            "turn": f"{_START_OF_TURN}{{role}}\n{{content}}{_END_OF_TURN}\n",
            "generation_prompt": f"{_START_OF_TURN}model\n",
            "roles": dict(_ROLE_ALIASES),
        }

    def chat_turns(self, messages):
        """The conversation as Gemma's turns: [(role, content)], role "user" or "model".

        Checked as `apply_chat_template` documents: the system message merged into
        the first user turn, aliases resolved, content whitespace-trimmed.
        """
        if not isinstance(messages, (list, tuple)):
            raise TypeError(
                f"messages must be a list of dicts, got {type(messages).__name__}."
            )
        if len(messages) == 0:
            raise ValueError("apply_chat_template needs at least one message.")

        turns = []
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise TypeError(
                    f"Message {index} must be a dict with 'role' and "
                    f"'content', got {type(message).__name__}."
                )
            if "role" not in message or "content" not in message:
                raise ValueError(
                    f"Message {index} must have 'role' and 'content' keys, "
                    f"got keys {sorted(message)}."
                )
            role, content = message["role"], message["content"]
            if role not in _ALLOWED_ROLES:
                raise ValueError(
                    f"Message {index} has unknown role {role!r}; allowed "
                    f"roles are {', '.join(repr(r) for r in _ALLOWED_ROLES)}."
                )
            if not isinstance(content, str):
                raise TypeError(
                    f"Message {index} content must be a str, got "
                    f"{type(content).__name__}."
                )
            turns.append((role, content))

        system = None
        if turns[0][0] == "system":
            system = turns.pop(0)[1]
            if not turns or _ROLE_ALIASES.get(turns[0][0]) != "user":
                raise ValueError(
                    "A system message must be followed by a user message: "
                    "Gemma has no system role, so its text is merged into "
                    "the first user turn."
                )
        for index, (role, _) in enumerate(turns):
            if role == "system":
                raise ValueError(
                    "Only the first message may have role 'system' (Gemma "
                    "merges it into the first user turn); found another "
                    f"system message at position {index + (system is not None)}."
                )

        for index, (role, _) in enumerate(turns):
            expected = "user" if index % 2 == 0 else "model"
            if _ROLE_ALIASES[role] != expected:
                raise ValueError(
                    f"Message {index + (system is not None)} has role {role!r} where Gemma's chat expects "
                    f"{expected!r}: turns alternate user, model, user, ... (after an optional first system "
                    "message). Merge consecutive messages of one role, or add the missing turn."
                )

        out = []
        for index, (role, content) in enumerate(turns):
            content = content.strip()
            if index == 0 and system is not None and system.strip():
                content = system.strip() + "\n\n" + content
            out.append((_ROLE_ALIASES[role], content))
        return out

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """Render a conversation in Gemma's turn format (without "<bos>").

        Each turn is `<start_of_turn>{role}\\n{content}<end_of_turn>\\n`
        with roles "user" and "model" ("assistant" is an alias). Gemma has
        no system role, so a leading system message is merged into the
        first user turn: system text, a blank line, then the user text.
        Content is whitespace-trimmed, as in the official Gemma template.
        `tokenize` adds BOS, so the string leaves it out.
        """
        out = [
            f"{_START_OF_TURN}{role}\n{content}{_END_OF_TURN}\n"
            for role, content in self.chat_turns(messages)
        ]
        if add_generation_prompt:
            out.append(f"{_START_OF_TURN}model\n")
        return "".join(out)


# ---------------------------------------------------------------- helpers


def check_text(text, what="The text"):
    """Refuse text that is not valid Unicode (a lone surrogate, e.g. from a bad decode).

    sentencepiece would fail with an unreadable pybind11 cast error instead.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{what} holds a lone surrogate {text[error.start]!r} at character {error.start}: "
            "it is not valid Unicode, so it cannot be tokenized. Remove it, or decode the "
            "source bytes with errors='replace'."
        ) from None


def _read_proto(proto):
    if isinstance(proto, (bytes, bytearray, memoryview)):
        return bytes(proto)
    if isinstance(proto, (str, os.PathLike)):
        path = os.fspath(proto)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"SentencePiece model file not found: {path!r}"
            )
        with open(path, "rb") as f:
            return f.read()
    raise TypeError(
        "proto must be a path to a SentencePiece model file (str or "
        f"os.PathLike) or the serialized model bytes, got {type(proto).__name__}."
    )


def _load_processor(proto_bytes, source):
    import sentencepiece as spm

    what = "bytes" if isinstance(source, (bytes, bytearray, memoryview)) else (
        f"file {os.fspath(source)!r}"
    )
    if not proto_bytes:
        raise ValueError(f"The given {what} is empty, not a SentencePiece model.")
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(proto_bytes)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError.
        raise ValueError(
            f"The given {what} is not a valid SentencePiece model: {e}"
        ) from None
    if sp.get_piece_size() == 0:
        raise ValueError(f"The given {what} is not a valid SentencePiece model.")
    return sp


def _is_sequence(x):
    return isinstance(x, (list, tuple)) or (
        isinstance(x, np.ndarray) and x.ndim >= 1
    )


def _as_id_list(ids, ndim):
    if isinstance(ids, np.ndarray):
        if ids.ndim != ndim:
            raise ValueError(
                f"Expected a {ndim}-D sequence of ids, got shape {ids.shape}."
            )
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"Token ids must be integers, got dtype {ids.dtype}.")
        return ids.tolist()
    for x in ids:
        if _is_sequence(x):
            raise ValueError(
                "Expected a 1-D sequence of ids, got a nested sequence."
            )
    return list(ids)
