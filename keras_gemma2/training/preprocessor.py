"""Text to the model's batches: keras-hub's CausalLMPreprocessor, and chat fine-tuning data.

`fit`, `evaluate` and `predict` accept text through `model.preprocessor`:

* plain texts (a string, a list / numpy array of strings): BOS + text (+ EOS),
  every real token a target;
* chat pairs `(prompt, response)` and conversations (lists of
  {"role", "content"} messages): rendered in Gemma's turn format, and only the
  model's turns are targets (weight 1 on the tokens after `<start_of_turn>model\\n`
  through its `<end_of_turn>\\n`; the user's tokens weigh 0), as instruction tuning is done;
* keras-hub's `{"prompts": [...], "responses": [...]}`: prompt and response
  concatenated as they are (no template), only the response a target.

Each example becomes `sequence_length + 1` tokens (truncated, or with
`pack=True` concatenated with the others and cut into windows), then inputs are
tokens 0..L-1 and labels tokens 1..L with their weights (padding weighs 0).
"""

import numpy as np

DEFAULT_SEQUENCE_LENGTH = 1024


class Gemma2CausalLMPreprocessor:
    """Strings / chat data -> ({"token_ids", "padding_mask"}, labels, sample_weight), numpy.

    `sequence_length`: positions per example (settable, as in keras-hub's
    tutorials: `model.preprocessor.sequence_length = 256`); at most the model's
    context. `add_start_token` / `add_end_token`: BOS before, EOS after plain
    texts. `pack`: concatenate examples into full windows instead of padding each.
    """

    def __init__(self, tokenizer, sequence_length=DEFAULT_SEQUENCE_LENGTH, add_start_token=True,
                 add_end_token=True, pack=False, max_sequence_length=None):
        if tokenizer is None:
            raise ValueError("A preprocessor needs a tokenizer: load a preset that has one.")
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.sequence_length = sequence_length
        self.add_start_token = bool(add_start_token)
        self.add_end_token = bool(add_end_token)
        self.pack = bool(pack)

    @property
    def sequence_length(self):
        return self._sequence_length

    @sequence_length.setter
    def sequence_length(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"sequence_length must be a positive integer, got {value!r}.")
        if self.max_sequence_length is not None and value > self.max_sequence_length:
            raise ValueError(
                f"sequence_length={value} exceeds the model's context of {self.max_sequence_length} "
                f"tokens; set preprocessor.sequence_length to at most {self.max_sequence_length}."
            )
        self._sequence_length = int(value)

    # ---- one example at a time ---------------------------------------------------------
    def examples(self, x):
        """[(ids, weights)] for every example of `x`, checked before any is tokenized."""
        kind, items = text_kind(x)
        if kind is None:
            raise ValueError(
                f"Expected text: a string, a list or numpy array of strings, (prompt, response) "
                f"pairs, lists of chat messages or {{'prompts', 'responses'}}; got {describe(x)}."
            )
        if not items:
            raise ValueError("No text given: pass at least one string, pair or conversation.")
        for index, item in enumerate(items):
            _check_item(kind, item, index)
        make = {"text": self._text, "pair": self._pair, "chat": self._chat, "raw_pair": self._raw_pair}[kind]
        return [make(item) for item in items]

    def _text(self, text):
        ids = self.tokenizer.tokenize(text, add_bos=self.add_start_token, add_eos=self.add_end_token)
        return np.asarray(ids, "int32"), np.ones(len(ids), "float32")

    def _pair(self, pair):
        prompt, response = pair
        return self._chat([{"role": "user", "content": prompt}, {"role": "model", "content": response}])

    def _chat(self, messages):
        turns = self.tokenizer.chat_turns(messages)
        template = self.tokenizer.chat_format()
        opening = template["generation_prompt"]  # "<start_of_turn>model\n"
        text, targets = "", []  # targets: (begin, end) in UTF-8 bytes of the model's turn bodies
        for role, content in turns:
            turn = template["turn"].format(role=role, content=content)
            if role == "model":
                begin = len((text + opening).encode("utf-8"))
                targets.append((begin, len((text + turn).encode("utf-8"))))
            text += turn
        ids, weights = self._with_start_token(*self._weighted(text, targets))
        return np.asarray(ids, "int32"), np.asarray(weights, "float32")

    def _raw_pair(self, pair):
        prompt, response = pair
        text = prompt + response
        begin = len(prompt.encode("utf-8"))
        ids, weights = self._with_start_token(*self._weighted(text, [(begin, len(text.encode("utf-8")))]))
        if self.add_end_token:
            ids, weights = ids + [self.tokenizer.eos_token_id], weights + [1.0]
        return np.asarray(ids, "int32"), np.asarray(weights, "float32")

    def _with_start_token(self, ids, weights):
        """BOS (never a target) before `ids` when add_start_token."""
        if not self.add_start_token:
            return ids, weights
        return [self.tokenizer.bos_token_id] + ids, [0.0] + weights

    def _weighted(self, text, targets):
        """Token ids of `text` (tokenized whole, as generate sees it) and 1 for those inside `targets`."""
        pieces = self.tokenizer.pieces_with_offsets(text)
        weights = [float(any(begin <= start < end for begin, end in targets)) for _, start in pieces]
        return [piece_id for piece_id, _ in pieces], weights

    # ---- batches -------------------------------------------------------------------------
    def __call__(self, x, y=None, sample_weight=None):
        """(x, labels, sample_weight) numpy arrays of text `x` (labels come from the text)."""
        if y is not None or sample_weight is not None:
            raise ValueError(
                "Text inputs carry their own labels (the next tokens) and weights; pass only x, "
                "or tokenize yourself and pass {'token_ids', 'padding_mask'} with labels."
            )
        return self.batch(self.examples(x))

    def batch(self, examples):
        rows = self.sequence_length + 1
        if self.pack:
            ids = np.concatenate([e[0] for e in examples])
            weights = np.concatenate([e[1] for e in examples])
            examples = [(ids[s:s + rows], weights[s:s + rows]) for s in range(0, len(ids), rows)]
            examples = [e for e in examples if len(e[0]) > 1]
        token_ids = np.zeros((len(examples), rows), "int32")
        padding_mask = np.zeros((len(examples), rows), "int32")
        target_weights = np.zeros((len(examples), rows), "float32")
        for row, (ids, weights) in enumerate(examples):
            kept = min(len(ids), rows)  # truncated to the sequence length
            token_ids[row, :kept], target_weights[row, :kept] = ids[:kept], weights[:kept]
            padding_mask[row, :kept] = 1
        x = {"token_ids": token_ids[:, :-1], "padding_mask": padding_mask[:, :-1]}
        return x, token_ids[:, 1:], (target_weights[:, 1:] * padding_mask[:, 1:]).astype("float32")


# ---- what kind of text an input is ----------------------------------------------------
def _is_str(value):
    return isinstance(value, (str, bytes, np.str_, np.bytes_))


def _as_str(value, index=0):
    if not isinstance(value, (bytes, np.bytes_)):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"Text {index} is bytes that are not UTF-8 (byte {error.start + 1} is 0x{value[error.start]:02x}): "
            "decode it with its own encoding and pass str, e.g. data.decode('latin-1')."
        ) from None


def _is_pair(value):
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_str(v) for v in value)


def _is_conversation(value):
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(m, dict) for m in value)


def text_kind(x):
    """("text" | "pair" | "chat" | "raw_pair", items) for text input, (None, None) for anything else.

    Mixed batches (strings with token ids, pairs with plain strings) raise ValueError.
    """
    if _is_str(x):
        return "text", [_as_str(x)]
    if isinstance(x, (list, tuple, np.ndarray)) and len(x) == 0:
        raise ValueError(
            f"x is an empty {type(x).__name__}: there is nothing to train on or evaluate. Pass at least one text "
            "(a string, a (prompt, response) pair or a conversation), or a {'token_ids', 'padding_mask'} batch."
        )
    if isinstance(x, dict) and set(x) == {"prompts", "responses"}:
        prompts, responses = (list(np.asarray(x[k], dtype=object).reshape(-1)) for k in ("prompts", "responses"))
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; pass one response per prompt.")
        if not all(_is_str(v) for v in prompts + responses):
            return None, None
        return "raw_pair", [(_as_str(p), _as_str(r)) for p, r in zip(prompts, responses)]
    if isinstance(x, np.ndarray):
        if x.dtype.kind in "USO" and x.size and all(_is_str(v) for v in x.reshape(-1)):
            return "text", [_as_str(v, i) for i, v in enumerate(x.reshape(-1))]
        if x.dtype.kind in "US":
            return "text", []  # an empty array of strings: refused by `examples`
        return None, None
    if not isinstance(x, (list, tuple)) or not x:
        return None, None
    kinds = ["text" if _is_str(v) else "pair" if _is_pair(v) else "chat" if _is_conversation(v) else None
             for v in x]
    for index, (kind, item) in enumerate(zip(kinds, x)):
        if kind is None and isinstance(item, (list, tuple)) and any(_is_str(v) for v in item):
            raise ValueError(
                f"Item {index} is {describe(item)} ({item!r:.80}): a chat pair is exactly two strings, "
                "(prompt, response); pass pairs like ('What is 2+2?', '4'), or plain strings."
            )
    if all(k is None for k in kinds):
        return None, None
    if len(set(kinds)) > 1:
        first = kinds.index(None) if None in kinds else next(i for i, k in enumerate(kinds) if k != kinds[0])
        raise ValueError(
            f"Mixed batch: item 0 is {describe(x[0])} but item {first} is {describe(x[first])}. "
            "Pass all strings (or all (prompt, response) pairs, or all conversations), or tokenize "
            "everything yourself and pass {'token_ids', 'padding_mask'}."
        )
    kind = kinds[0]
    if kind == "text":
        return kind, [_as_str(v, i) for i, v in enumerate(x)]
    if kind == "pair":
        return kind, [(_as_str(p, i), _as_str(r, i)) for i, (p, r) in enumerate(x)]
    return kind, list(x)


def describe(value):
    if _is_str(value):
        return "a string"
    if isinstance(value, np.ndarray):
        return f"a numpy array of dtype {value.dtype}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _check_item(kind, item, index):
    if kind == "text":
        if not item.strip():
            raise ValueError(f"Text {index} is empty; remove it or give it some text.")
    elif kind in ("pair", "raw_pair"):
        prompt, response = item
        if not prompt.strip():
            raise ValueError(f"Chat pair {index} has an empty prompt; every pair needs both sides.")
        if not response.strip():
            raise ValueError(
                f"Chat pair {index} has an empty response: there would be nothing to learn from it. "
                "Remove the pair or write its response."
            )
    elif not any(m.get("role") in ("model", "assistant") and str(m.get("content", "")).strip() for m in item):
        raise ValueError(
            f"Conversation {index} has no non-empty model turn: there would be nothing to learn "
            "from it. Add the model's reply or remove the conversation."
        )
