"""The keras-gemma2 command line, run in-process on a checkpoint written to disk."""

import io
import json

import pytest

import keras_gemma2
from keras_gemma2.cli import main

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): the preset listing and argument errors
# are plain Python.


@pytest.mark.backend_agnostic
def test_presets_and_info(capsys):
    assert main(["presets"]) == 0
    assert "gemma2_instruct_27b_en" in capsys.readouterr().out
    assert main(["info", "--preset", "gemma2_27b_en"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameter_count"] == 27_227_128_320 and info["query_pre_attn_scalar"] == 144


def test_score(tiny_text_preset, capsys):
    path, model = tiny_text_preset
    assert main(["score", "--preset", path, "def f(x):"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    expected = float(model.score(["def f(x):"])[0].sum())
    assert line["log_prob"] == pytest.approx(expected, abs=1e-3)


def test_generate_streams_the_same_text_as_the_api(tiny_text_preset, capsys):
    path, model = tiny_text_preset
    assert main(["generate", "--preset", path, "--max-new-tokens", "8", "def add("]) == 0
    expected = model.generate("def add(", max_new_tokens=8)
    assert capsys.readouterr().out == expected + "\n"


def test_generate_quantizes_while_loading(tiny_text_preset, capsys):
    path, _ = tiny_text_preset
    assert main(["generate", "--preset", path, "--quantize", "int8", "--max-new-tokens", "8", "def add("]) == 0
    model = keras_gemma2.from_preset(path)
    model.quantize("int8")
    assert capsys.readouterr().out == model.generate("def add(", max_new_tokens=8) + "\n"


def test_chat_is_multi_turn(tiny_text_preset, capsys, monkeypatch):
    path, model = tiny_text_preset
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd then?\n/exit\n"))
    assert main(["chat", "--preset", path, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    conversation = model.start_chat(max_new_tokens=6)  # the same conversation, its cache kept
    first, second = conversation.send("Hello"), conversation.send("And then?")
    assert f"model> {first}\n" in out and f"model> {second}\n" in out


def test_generate_with_a_draft_prints_the_same_text(tiny_text_preset, capsys):
    path, model = tiny_text_preset
    assert main(["generate", "--preset", path, "--draft", path, "--num-draft-tokens", "3",
                 "--max-new-tokens", "9", "def add("]) == 0
    assert capsys.readouterr().out == model.generate("def add(", max_new_tokens=9) + "\n"
    assert main(["generate", "--preset", path, "--num-draft-tokens", "3", "def add("]) == 2
    assert "--draft PRESET" in capsys.readouterr().err


def test_a_long_chat_drops_its_oldest_turns_and_says_so(tiny_text_preset, capsys, monkeypatch):
    path, _ = tiny_text_preset  # a 64-token context: the third turn does not fit beside the first
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nAnd then?\nok\nmore\n/exit\n"))
    assert main(["chat", "--preset", path, "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("model> ") == 4
    assert "(dropped the 1 oldest turn(s) to stay within the model's context of 64 tokens)" in captured.err


@pytest.mark.backend_agnostic
def test_a_chat_line_that_is_not_utf8_is_refused_and_the_conversation_goes_on(tiny_text_preset, capsys, monkeypatch):
    """Such a line ended the session (exit 2, conversation lost), naming a position in the template."""
    path, model = tiny_text_preset
    # What a surrogateescape'd stdin delivers for the bytes b"hi \xff there".
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nhi \udcff there\nAnd then?\n/exit\n"))
    assert main(["chat", "--preset", path, "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert err == "error: that line is not valid UTF-8 (character 4 of it); type it again\n"
    conversation = model.start_chat(max_new_tokens=6)  # the bad line never entered the conversation
    first, second = conversation.send("Hello"), conversation.send("And then?")
    assert out.count("model> ") == 2 and f"model> {first}\n" in out and f"model> {second}\n" in out


@pytest.mark.backend_agnostic
def test_errors_are_reported_not_raised(capsys):
    assert main(["generate", "--preset", "gemma2_2b", "hi"]) == 2
    assert "Did you mean 'gemma2_2b_en'" in capsys.readouterr().err
    assert main(["generate", "--preset", "gemma2_tiny_test", "hi"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
