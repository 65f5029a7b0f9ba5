"""Edge export: LiteRT / SavedModel signatures driven by the on-device runner (export/runner.py)."""

import os
import sys

import keras
import numpy as np
import pytest

import keras_gemma2
from conftest import TINY
from helpers import randomize_weights

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "export"))
from runner import Runner  # noqa: E402

ON_TF = keras.backend.backend() == "tensorflow"
needs_tf = pytest.mark.skipif(not ON_TF, reason="in-process export traces with TensorFlow; other backends go through a child process (tested once)")
# Prompts shorter than, equal to and longer than the window (4): the ring is exercised in prefill and decode.
PROMPTS = ([2, 5, 9], [2, 5, 9, 17, 33, 40, 41], list(range(2, 15)))
CACHE = 24


@pytest.fixture(scope="module")
def tiny_model():
    keras.utils.set_random_seed(0)
    model = keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(TINY))
    return randomize_weights(model)


def _reference(model, prompt):
    tokens = model.generate(np.array([prompt]), max_new_tokens=CACHE - len(prompt), stop_token_ids=[])
    return [int(t) for t in np.asarray(tokens[0])]


@needs_tf
@pytest.mark.parametrize("format", ["litert", "saved_model"])
def test_float_export_generates_the_same_tokens(tiny_model, tmp_path, format):
    path = tmp_path / ("m.tflite" if format == "litert" else "saved")
    keras_gemma2.export(tiny_model, path, format=format, cache_length=CACHE, prefill_lengths=(4, 8, 16))
    runner = Runner.load(str(path))
    assert runner.metadata["cache_slots"] == [4, CACHE, 4]  # sliding layers: a ring of the window
    for prompt in PROMPTS:
        # Up to the last cache slot: decoding runs past the window many times over.
        assert runner.generate(prompt, max_new_tokens=CACHE - len(prompt)) == _reference(tiny_model, prompt)


@needs_tf
def test_litert_file_uses_builtin_ops_only(tiny_model, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    path = tmp_path / "m.tflite"
    keras_gemma2.export(tiny_model, path, quantization="int8", cache_length=CACHE, prefill_lengths=(8,))
    interpreter = Interpreter(model_path=str(path))
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    assert not {op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "VAR_HANDLE", "READ_VARIABLE")}
    assert set(interpreter.get_signature_list()) == {"prefill_8", "decode"}


@pytest.fixture(scope="module")
def demo_teacher():
    # A trained model with its own tokenizer and held-out text: quantization error is meaningful.
    return keras_gemma2.from_preset("gemma2_demo_teacher", dtype="float32")


def _held_out_ids(model):
    from keras_gemma2 import preset_registry

    directory = preset_registry.get("gemma2_demo_teacher")["local"]
    with open(os.path.join(directory, "held_out.txt"), encoding="utf-8") as f:
        return model.tokenizer.tokenize(f.read()[:3000])[:200]


@needs_tf
def test_int8_litert_agrees_on_top1_and_is_a_quarter_of_float(demo_teacher, tmp_path):
    ids = _held_out_ids(demo_teacher)
    expected = np.asarray(demo_teacher({"token_ids": np.array([ids])}))[0].argmax(-1)[:-1]
    sizes = {}
    for quantization in (None, "int8"):
        path = tmp_path / f"{quantization}.tflite"
        keras_gemma2.export(demo_teacher, path, quantization=quantization, cache_length=256, prefill_lengths=(16,))
        sizes[quantization] = os.path.getsize(path)
        predicted = Runner.load(str(path)).teacher_forced_argmax(ids, prompt_length=1)
        agreement = (predicted == expected).mean()
        assert agreement >= (1.0 if quantization is None else 0.95), (quantization, agreement)
    # 2.2M parameters: graph overhead and the int8 lookup copy keep it a bit above 1/4.
    assert sizes["int8"] <= 0.32 * sizes[None], sizes
    # Text in, text out, as an app: the runner tokenizes with the exported tokenizer file.
    runner = Runner.load(str(tmp_path / "None.tflite"))
    assert runner.generate("def ", max_new_tokens=12) == demo_teacher.generate("def ", max_new_tokens=12)
    assert "".join(runner.stream("def ", max_new_tokens=12)) == runner.generate("def ", max_new_tokens=12)


@needs_tf
def test_int4_litert_through_ai_edge_quantizer(demo_teacher, tmp_path):
    pytest.importorskip("ai_edge_quantizer")
    paths = {q: tmp_path / f"{q}.tflite" for q in ("int8", "int4")}
    for quantization, path in paths.items():
        keras_gemma2.export(demo_teacher, path, quantization=quantization, cache_length=64, prefill_lengths=(16,))
    assert os.path.getsize(paths["int4"]) < os.path.getsize(paths["int8"])
    ids = _held_out_ids(demo_teacher)[:64]
    expected = np.asarray(demo_teacher({"token_ids": np.array([ids])}))[0].argmax(-1)[:-1]
    agreement = (Runner.load(str(paths["int4"])).teacher_forced_argmax(ids) == expected).mean()
    assert agreement >= 0.6, agreement  # channel-wise int4 on a tiny model: measured 0.84 on 255 steps


@pytest.mark.skipif(ON_TF, reason="the child-process path is for non-TensorFlow backends")
def test_export_from_another_backend_runs_a_tensorflow_child(tiny_model, tmp_path):
    path = tmp_path / "m.tflite"
    keras_gemma2.export(tiny_model, path, cache_length=CACHE, prefill_lengths=(16,))
    prompt = PROMPTS[2]
    assert Runner.load(str(path)).generate(prompt, max_new_tokens=8) == _reference(tiny_model, prompt)[:8]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"format": "onnx"}, "Unknown export format"),
        ({"quantization": "int2"}, "Unknown quantization"),
        ({"path": "model.bin"}, ".tflite suffix"),
        ({"format": "saved_model", "path": "model.tflite"}, "SavedModel is a directory"),
        ({"format": "saved_model", "quantization": "int8"}, "LiteRT only"),
        ({"cache_length": 65}, "outside [1, 64]"),
        ({"prefill_lengths": (8, 32)}, "exceed cache_length"),
        ({"prefill_lengths": (0,)}, "positive integers"),
    ],
)
def test_bad_arguments_fail_before_any_work(tiny_model, tmp_path, kwargs, message):
    kwargs = {"path": "m.tflite", "cache_length": 16, **kwargs}
    if kwargs.get("format") == "saved_model" and kwargs["path"] == "m.tflite":
        kwargs["path"] = "saved"
    kwargs["path"] = tmp_path / kwargs["path"]
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        keras_gemma2.export(tiny_model, **kwargs)
    assert os.listdir(tmp_path) == []  # nothing written


def test_unwritable_path_and_unmerged_lora_are_refused(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(TINY))
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="Choose a writable directory"):
        keras_gemma2.export(model, blocker / "m.tflite", cache_length=16, prefill_lengths=(8,))
    model.enable_lora(2)
    with pytest.raises(ValueError, match="merge_lora"):
        keras_gemma2.export(model, tmp_path / "m.tflite", cache_length=16, prefill_lengths=(8,))


def test_cli_export_and_its_errors(tmp_path, capsys):
    from keras_gemma2 import cli

    path = tmp_path / "demo.tflite"
    assert cli.main(["export", "--preset", "gemma2_demo", str(path), "--quantization", "int8",
                     "--cache-length", "64", "--prefill-lengths", "16"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["demo.json", "demo.tflite", "demo.tokenizer.model"]
    assert Runner.load(str(path)).generate("def ", max_new_tokens=4)
    assert cli.main(["export", "--preset", "gemma2_demo", str(tmp_path / "x.tflite"), "--format", "onnx"]) == 2
    assert "Unknown export format" in capsys.readouterr().err
