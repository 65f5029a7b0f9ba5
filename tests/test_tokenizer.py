"""Gemma2Tokenizer against a real (tiny) trained SentencePiece model."""

import os
import pickle

import numpy as np
import pytest

from helpers import TINY
from helpers import TEST_VOCABULARY_SIZE, train_test_sentencepiece
from keras_gemma2.checkpoints import presets
from keras_gemma2.tokenizer import Gemma2Tokenizer

# Backend-agnostic: runs once, under conftest.AGNOSTIC_BACKEND (jax): the tokenizer is SentencePiece
# and Python on host strings and ids; no Keras backend takes part.
pytestmark = pytest.mark.backend_agnostic

ROUND_TRIP_TEXTS = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "x  =  [1, 2, 3]   # several   spaces",
    "  leading and trailing spaces  ",
    "\n\nblank lines\n\n\nhere\n",
    "Numbers: 2024, 3.14 and 1000000.",
    "UPPER lower MiXeD {braces} (parens) <angle> 'quotes' \"double\"",
    "",
]

# The official Gemma 2 chat template (tokenizer_config.json of the Gemma 2
# instruction-tuned checkpoints), used as the reference rendering.
GEMMA2_JINJA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + "
    "'<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(sentencepiece_path):
    return Gemma2Tokenizer(sentencepiece_path)


@pytest.fixture(scope="module")
def proto(sentencepiece_path):
    with open(sentencepiece_path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------- test vocab


def test_test_vocab_matches_tiny_config(sentencepiece_path, tokenizer):
    # The tiny model's embedding table must cover every id the vocab emits.
    assert tokenizer.vocabulary_size == TEST_VOCABULARY_SIZE
    assert TINY.vocabulary_size == TEST_VOCABULARY_SIZE == 128


def test_test_vocab_training_is_deterministic(tmp_path, proto):
    path = train_test_sentencepiece(tmp_path / "again.model")
    assert path == str(tmp_path / "again.model")
    with open(path, "rb") as f:
        assert f.read() == proto


def test_test_vocab_directory_argument(tmp_path):
    path = train_test_sentencepiece(tmp_path / "new_dir")
    assert path == os.path.join(str(tmp_path / "new_dir"), "tokenizer.model")
    assert os.path.isfile(path)


# -------------------------------------------------------------- construction


def test_load_from_path_pathlike_and_bytes(sentencepiece_path, proto):
    import pathlib

    from_str = Gemma2Tokenizer(sentencepiece_path)
    from_pathlike = Gemma2Tokenizer(pathlib.Path(sentencepiece_path))
    from_bytes = Gemma2Tokenizer(proto)
    from_bytearray = Gemma2Tokenizer(bytearray(proto))
    text = "Hello, world!"
    expected = from_str.tokenize(text)
    for tok in (from_pathlike, from_bytes, from_bytearray):
        assert tok.proto_bytes == proto
        assert isinstance(tok.proto_bytes, bytes)
        assert tok.tokenize(text) == expected


def test_missing_file_names_path(tmp_path):
    missing = str(tmp_path / "nope" / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="nope"):
        Gemma2Tokenizer(missing)


@pytest.mark.parametrize(
    "junk", [b"this is not a sentencepiece model", b"\x00" * 16, b""]
)
def test_junk_bytes_raise_value_error(junk):
    with pytest.raises(ValueError, match="SentencePiece model"):
        Gemma2Tokenizer(junk)


def test_junk_file_raises_value_error_naming_file(tmp_path):
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"definitely not a model")
    with pytest.raises(ValueError, match="bad.model"):
        Gemma2Tokenizer(str(bad))


@pytest.mark.parametrize("wrong", [None, 123, ["a.model"], {"proto": b""}])
def test_wrong_type_raises_type_error(wrong):
    with pytest.raises(TypeError, match="proto"):
        Gemma2Tokenizer(wrong)


# --------------------------------------------------------------- special ids


def test_special_ids_looked_up_by_piece(tokenizer):
    expected = {
        "pad_token_id": "<pad>",
        "eos_token_id": "<eos>",
        "bos_token_id": "<bos>",
        "unk_token_id": "<unk>",
        "start_of_turn_id": "<start_of_turn>",
        "end_of_turn_id": "<end_of_turn>",
    }
    for attr, piece in expected.items():
        idx = getattr(tokenizer, attr)
        assert isinstance(idx, int), attr
        assert tokenizer.id_to_piece(idx) == piece
    # Layout the helper trained (turn markers are NOT at Gemma's 106/107).
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    assert (tokenizer.bos_token_id, tokenizer.unk_token_id) == (2, 3)
    assert (tokenizer.start_of_turn_id, tokenizer.end_of_turn_id) == (4, 5)


@pytest.fixture(scope="module")
def odd_vocab_path(tmp_path_factory):
    # Different ids, no <bos>, an unk piece with another name and no turn
    # markers: every lookup must follow the pieces, not fixed numbers.
    return train_test_sentencepiece(
        tmp_path_factory.mktemp("odd"),
        unk_id=0,
        eos_id=1,
        pad_id=2,
        bos_id=-1,
        unk_piece="<unknown>",
        user_defined_symbols=["\n"],
    )


def test_missing_pieces_give_none(odd_vocab_path):
    tok = Gemma2Tokenizer(odd_vocab_path, add_bos=False)
    assert tok.unk_token_id is None  # "<unk>" would map to id 0 = "<unknown>"
    assert tok.bos_token_id is None
    assert tok.start_of_turn_id is None
    assert tok.end_of_turn_id is None
    assert tok.eos_token_id == 1
    assert tok.pad_token_id == 2
    assert tok.piece_to_id("<start_of_turn>") is None
    assert tok.piece_to_id("<unknown>") == 0


def test_add_bos_without_bos_piece_raises(odd_vocab_path):
    with pytest.raises(ValueError, match="<bos>"):
        Gemma2Tokenizer(odd_vocab_path)
    tok = Gemma2Tokenizer(odd_vocab_path, add_bos=False)
    assert tok.tokenize("hello")[0] != 1
    with pytest.raises(ValueError, match="<bos>"):
        tok.tokenize("hello", add_bos=True)


def test_vocabulary_and_piece_lookups(tokenizer):
    assert tokenizer.vocabulary_size == 128
    for idx in range(tokenizer.vocabulary_size):
        piece = tokenizer.id_to_piece(idx)
        assert isinstance(piece, str) and piece
        assert tokenizer.piece_to_id(piece) == idx
    assert tokenizer.id_to_piece(np.int64(2)) == "<bos>"
    assert tokenizer.piece_to_id("no such piece") is None
    with pytest.raises(ValueError, match="128"):
        tokenizer.id_to_piece(128)
    with pytest.raises(ValueError, match="-1"):
        tokenizer.id_to_piece(-1)
    with pytest.raises(TypeError):
        tokenizer.piece_to_id(5)


# ------------------------------------------------------------------ tokenize


def test_tokenize_returns_ints_with_bos_first(tokenizer):
    ids = tokenizer.tokenize("Hello, world!")
    assert isinstance(ids, list) and all(type(i) is int for i in ids)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in ids[1:]
    assert tokenizer.eos_token_id not in ids
    assert all(0 <= i < tokenizer.vocabulary_size for i in ids)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer("Hello, world!") == ids


def test_bos_eos_overrides(tokenizer):
    text = "Hello, world!"
    plain = tokenizer.tokenize(text, add_bos=False)
    assert tokenizer.tokenize(text) == [tokenizer.bos_token_id] + plain
    assert tokenizer.tokenize(text, add_eos=True) == (
        [tokenizer.bos_token_id] + plain + [tokenizer.eos_token_id]
    )
    assert tokenizer.tokenize(text, add_bos=False, add_eos=True) == (
        plain + [tokenizer.eos_token_id]
    )
    assert tokenizer.tokenize("") == [tokenizer.bos_token_id]
    assert tokenizer.tokenize("", add_bos=False) == []


def test_constructor_defaults_for_bos_eos(proto):
    tok = Gemma2Tokenizer(proto, add_bos=False, add_eos=True)
    plain = Gemma2Tokenizer(proto).tokenize("abc", add_bos=False)
    assert tok.tokenize("abc") == plain + [tok.eos_token_id]
    assert tok.tokenize("abc", add_bos=True, add_eos=False) == (
        [tok.bos_token_id] + plain
    )


def test_tokenize_batch(tokenizer):
    texts = ["Hello, world!", "def f(x):\n    return x", ""]
    batch = tokenizer.tokenize(texts)
    assert batch == [tokenizer.tokenize(t) for t in texts]
    assert tokenizer.tokenize(tuple(texts)) == batch
    assert tokenizer(texts, add_bos=False) == [
        tokenizer.tokenize(t, add_bos=False) for t in texts
    ]
    assert tokenizer.tokenize([]) == []


@pytest.mark.parametrize("bad", [5, None, b"bytes", ["ok", 3]])
def test_tokenize_wrong_type(tokenizer, bad):
    with pytest.raises(TypeError):
        tokenizer.tokenize(bad)


def test_special_pieces_in_text_are_single_ids(tokenizer):
    text = "<start_of_turn>user\nHi there<end_of_turn>\n"
    ids = tokenizer.tokenize(text)
    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.start_of_turn_id]
    assert ids.count(tokenizer.start_of_turn_id) == 1
    assert ids.count(tokenizer.end_of_turn_id) == 1
    # Nothing else spells part of the marker (e.g. "<", "start", "_").
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert "<" not in "".join(
        p for p in pieces if p not in ("<start_of_turn>", "<end_of_turn>", "<bos>")
    )
    assert pieces[-2:] == ["<end_of_turn>", "\n"]


def test_control_pieces_in_text_are_not_special(tokenizer):
    # "<bos>"/"<eos>" are control pieces: user text cannot forge them.
    ids = tokenizer.tokenize("<bos> and <eos>", add_bos=False)
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.eos_token_id not in ids


def test_unknown_character_maps_to_unk(tokenizer):
    # The 128-piece test vocab has no byte fallback and never saw "é".
    assert tokenizer.tokenize("\u00e9", add_bos=False) == [tokenizer.unk_token_id]


# ---------------------------------------------------------------- detokenize


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.tokenize(text, add_eos=True)
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.detokenize(np.asarray(ids, dtype=np.int32)) == text
    assert tokenizer.detokenize(np.asarray(ids, dtype=np.int64)) == text
    assert tokenizer.detokenize(tuple(ids)) == text


def test_round_trip_is_not_trivial(tokenizer):
    # Guards the round trip from passing by decoding to a constant.
    a = tokenizer.detokenize(tokenizer.tokenize("abc"))
    b = tokenizer.detokenize(tokenizer.tokenize("xyz"))
    assert (a, b) == ("abc", "xyz")
    # Merges happened: fewer tokens than characters for common words.
    assert len(tokenizer.tokenize("the and is in", add_bos=False)) < len(
        "the and is in"
    )


def test_detokenize_batch_padded_array(tokenizer):
    texts = ROUND_TRIP_TEXTS[:4]
    rows = tokenizer.tokenize(texts, add_eos=True)
    width = max(len(r) for r in rows) + 2
    batch = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int32)
    for i, row in enumerate(rows):
        batch[i, : len(row)] = row
    out = tokenizer.detokenize(batch)
    assert out == texts
    # Ragged list of lists and list of 1-D arrays.
    assert tokenizer.detokenize(rows) == texts
    assert tokenizer.detokenize([np.asarray(r) for r in rows]) == texts
    assert tokenizer.detokenize(np.zeros((0, 3), dtype=np.int32)) == []


def test_detokenize_empty(tokenizer):
    assert tokenizer.detokenize([]) == ""
    assert tokenizer.detokenize(np.array([], dtype=np.int32)) == ""
    assert tokenizer.detokenize([tokenizer.bos_token_id]) == ""


def test_detokenize_keep_special(tokenizer):
    hello = tokenizer.tokenize("Hello", add_bos=False)
    world = tokenizer.tokenize(" world", add_bos=False)
    ids = (
        [tokenizer.bos_token_id]
        + hello
        + [tokenizer.pad_token_id]
        + world
        + [tokenizer.eos_token_id]
    )
    assert tokenizer.detokenize(ids) == "Hello world"
    assert tokenizer.detokenize(ids, skip_special=False) == (
        "<bos>Hello<pad> world<eos>"
    )


def test_detokenize_keep_special_with_dummy_prefix_vocab(tmp_path):
    # With a dummy prefix, sentencepiece strips the leading space of a
    # decode; the space after a special piece in mid-text must survive.
    tok = Gemma2Tokenizer(
        train_test_sentencepiece(tmp_path, add_dummy_prefix=True)
    )
    world = tok.tokenize("world", add_bos=False)
    assert tok.id_to_piece(world[0]).startswith("\u2581")
    ids = tok.tokenize("hello", add_eos=True) + world
    kept = tok.detokenize(ids, skip_special=False)
    assert kept == "<bos>hello<eos> world"
    assert tok.detokenize(ids) == "hello world"
    assert kept.replace("<bos>", "").replace("<eos>", "") == "hello world"


def test_detokenize_keeps_turn_markers(tokenizer):
    text = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text


@pytest.mark.parametrize("bad_id", [128, 1000, -1])
def test_detokenize_out_of_range(tokenizer, bad_id):
    with pytest.raises(ValueError, match=rf"{bad_id}.*128"):
        tokenizer.detokenize([2, 10, bad_id])
    with pytest.raises(ValueError, match=rf"{bad_id}.*128"):
        tokenizer.detokenize(np.array([[2, 10], [bad_id, 11]]))


def test_detokenize_bad_inputs(tokenizer):
    with pytest.raises(TypeError):
        tokenizer.detokenize(np.array([1.0, 2.0]))
    with pytest.raises(TypeError):
        tokenizer.detokenize([1, 2.5])
    with pytest.raises(ValueError):
        tokenizer.detokenize(np.zeros((2, 2, 2), dtype=np.int32))
    with pytest.raises(ValueError):
        tokenizer.detokenize([1, [2, 3]])
    with pytest.raises(ValueError):
        tokenizer.detokenize(np.int32(5))


# -------------------------------------------------------------- save / pickle


def test_save_assets_round_trip(tokenizer, proto, tmp_path):
    target = tmp_path / "assets"
    path = tokenizer.save_assets(str(target))
    assert path == os.path.join(str(target), "tokenizer.model")
    with open(path, "rb") as f:
        assert f.read() == proto
    assert os.listdir(target) == ["tokenizer.model"]  # no temp left over
    reloaded = Gemma2Tokenizer(path)
    text = "def add(a, b):\n    return a + b"
    assert reloaded.tokenize(text) == tokenizer.tokenize(text)
    # Saving again overwrites in place.
    assert tokenizer.save_assets(target) == path
    assert os.listdir(target) == ["tokenizer.model"]


def test_save_assets_never_half_written(tokenizer, tmp_path, monkeypatch):
    old = tmp_path / "tokenizer.model"
    old.write_bytes(b"previous contents")

    def failing_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        tokenizer.save_assets(tmp_path)
    assert old.read_bytes() == b"previous contents"
    assert os.listdir(tmp_path) == ["tokenizer.model"]


def test_pickle_round_trip(proto):
    tok = Gemma2Tokenizer(proto, add_bos=True, add_eos=True)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.proto_bytes == proto
    assert (clone.add_bos, clone.add_eos) == (True, True)
    assert clone.tokenize("Hello") == tok.tokenize("Hello")


def test_from_preset_delegates_to_checkpoints(monkeypatch, sentencepiece_path):
    calls = []

    def tokenizer_file(preset):
        calls.append(preset)
        return sentencepiece_path

    monkeypatch.setattr(presets, "tokenizer_file", tokenizer_file)
    tok = Gemma2Tokenizer.from_preset("gemma2_tiny_test")
    assert calls == ["gemma2_tiny_test"]
    assert isinstance(tok, Gemma2Tokenizer)


# ------------------------------------------------------------- chat template


SYSTEM_CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "model", "content": "4"},
]


def test_chat_template_with_system_exact(tokenizer):
    expected = (
        "<start_of_turn>user\n"
        "You are a terse assistant.\n\nWhat is 2 + 2?<end_of_turn>\n"
        "<start_of_turn>model\n"
        "4<end_of_turn>\n"
    )
    assert (
        tokenizer.apply_chat_template(
            SYSTEM_CONVERSATION, add_generation_prompt=False
        )
        == expected
    )
    with_prompt = tokenizer.apply_chat_template(SYSTEM_CONVERSATION)
    assert with_prompt == expected + "<start_of_turn>model\n"
    assert not with_prompt.startswith("<bos>")


def test_chat_template_assistant_alias(tokenizer):
    as_model = [
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    as_assistant = [dict(m) for m in as_model]
    as_assistant[1]["role"] = "assistant"
    out = tokenizer.apply_chat_template(as_assistant)
    assert out == tokenizer.apply_chat_template(as_model)
    assert out == (
        "<start_of_turn>user\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_chat_format_renders_what_apply_chat_template_does(tokenizer):
    """The turn format as data (export's metadata, an on-device runner) is apply_chat_template's."""
    chat = tokenizer.chat_format()
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    rendered = "".join(
        chat["turn"].format(role=chat["roles"][m["role"]], content=m["content"]) for m in messages
    )
    assert rendered + chat["generation_prompt"] == tokenizer.apply_chat_template(messages)
    assert type(tokenizer).chat_format() == chat  # no tokenizer file needed


def _render_official(messages, add_generation_prompt):
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    # Same environment settings transformers uses for chat templates.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(GEMMA2_JINJA_TEMPLATE).render(
        messages=messages,
        bos_token="<bos>",
        add_generation_prompt=add_generation_prompt,
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "Hello"}],
        [
            {"role": "user", "content": "  Write code:\n"},
            {"role": "assistant", "content": "def f():\n    pass\n\n"},
            {"role": "user", "content": "Thanks!"},
        ],
        [
            {"role": "user", "content": "a"},
            {"role": "model", "content": "b"},
        ],
    ],
)
def test_chat_template_matches_official_gemma2(
    tokenizer, messages, add_generation_prompt
):
    official = _render_official(messages, add_generation_prompt)
    ours = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt
    )
    assert "<bos>" + ours == official


def test_chat_template_system_matches_official_with_manual_merge(tokenizer):
    # The official Gemma 2 template rejects "system"; merging by hand into
    # the first user turn must give the same string as our merge.
    system, user = SYSTEM_CONVERSATION[0], SYSTEM_CONVERSATION[1]
    merged = [
        {"role": "user", "content": system["content"] + "\n\n" + user["content"]}
    ] + SYSTEM_CONVERSATION[2:]
    official = _render_official(merged, True)
    assert "<bos>" + tokenizer.apply_chat_template(SYSTEM_CONVERSATION) == official


def test_chat_template_tokenizes_markers_as_single_ids(tokenizer):
    messages = SYSTEM_CONVERSATION + [{"role": "user", "content": "And 3 + 3?"}]
    prompt = tokenizer.apply_chat_template(messages)
    ids = tokenizer.tokenize(prompt)
    assert ids[0] == tokenizer.bos_token_id
    assert ids[1] == tokenizer.start_of_turn_id
    # 3 rendered turns + the generation prompt; 3 closed turns.
    assert ids.count(tokenizer.start_of_turn_id) == 4
    assert ids.count(tokenizer.end_of_turn_id) == 3
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    assert not any(
        "turn" in p for p in pieces if p not in ("<start_of_turn>", "<end_of_turn>")
    )
    assert tokenizer.detokenize(ids) == prompt


def test_chat_template_errors(tokenizer):
    with pytest.raises(ValueError, match="at least one"):
        tokenizer.apply_chat_template([])
    with pytest.raises(ValueError, match=r"'tool'.*'user'"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="first"):
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": "hi"},
                {"role": "system", "content": "late"},
            ]
        )
    with pytest.raises(ValueError, match="followed by a user"):
        tokenizer.apply_chat_template([{"role": "system", "content": "alone"}])
    with pytest.raises(ValueError, match="followed by a user"):
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": "s"},
                {"role": "model", "content": "m"},
                {"role": "user", "content": "u"},
            ]
        )
    with pytest.raises(ValueError, match="first"):
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": "s"},
                {"role": "system", "content": "again"},
                {"role": "user", "content": "u"},
            ]
        )
    with pytest.raises(ValueError, match="content"):
        tokenizer.apply_chat_template([{"role": "user"}])
    with pytest.raises(TypeError):
        tokenizer.apply_chat_template([{"role": "user", "content": 3}])
    with pytest.raises(TypeError):
        tokenizer.apply_chat_template("hello")
    with pytest.raises(TypeError):
        tokenizer.apply_chat_template(["hello"])


# ----------------------------------------------------- real Gemma vocabulary


@pytest.mark.skipif(
    not os.environ.get("KERAS_GEMMA2_TOKENIZER"),
    reason="set KERAS_GEMMA2_TOKENIZER to a real Gemma tokenizer.model",
)
def test_real_gemma_vocabulary_ids():
    tok = Gemma2Tokenizer(os.environ["KERAS_GEMMA2_TOKENIZER"])
    assert tok.vocabulary_size == 256000
    assert tok.pad_token_id == 0
    assert tok.eos_token_id == 1
    assert tok.bos_token_id == 2
    assert tok.unk_token_id == 3
    assert tok.start_of_turn_id == 106
    assert tok.end_of_turn_id == 107
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.tokenize(prompt)
    assert ids[:2] == [2, 106] and ids.count(107) == 1
    assert tok.detokenize(ids) == prompt
