"""Export's default lengths fit the model, and a CLI export shows its stages as it goes."""

import argparse
import inspect
import json
import os
import re

import keras
import pytest

import keras_gemma2
from helpers import TINY
from keras_gemma2 import Gemma2Config, cli
from keras_gemma2.edge import plan
from keras_gemma2.edge.plan import export_lengths, plan_export

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): the default lengths come from
# the config alone.


@pytest.mark.parametrize("preset, cache_length, prefill_lengths, expected", [
    ("gemma2_demo", None, None, (512, (32, 128, 512))),  # context 512: the old 1024 did not fit
    ("gemma2_demo", 128, None, (128, (32, 128))),  # the old bucket 512 exceeded this cache
    ("gemma2_tiny_test", None, None, (64, (32,))),
    ("gemma2_tiny_test", 16, None, (16, (16,))),  # no default bucket fits: the cache length
    ("gemma2_2b_en", None, None, (1024, (32, 128, 512))),
    ("gemma2_2b_en", 2048, [64], (2048, (64,))),  # given values are kept
])
@pytest.mark.backend_agnostic
def test_default_lengths_are_derived_from_the_model(preset, cache_length, prefill_lengths, expected):
    config = Gemma2Config.from_preset(preset)
    assert export_lengths(config, cache_length, prefill_lengths) == expected


def test_the_library_export_uses_the_same_defaults(tmp_path):
    defaults = inspect.signature(keras_gemma2.export).parameters
    assert defaults["cache_length"].default is None and defaults["prefill_lengths"].default is None
    keras.utils.set_random_seed(0)
    model = keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(TINY))
    plan = plan_export(model, tmp_path / "m.tflite", "litert", None, None, None)
    assert (plan.cache_length, plan.prefill_lengths) == export_lengths(TINY)
    plan = plan_export(model, tmp_path / "m.tflite", "litert", None, 16, None)
    assert (plan.cache_length, plan.prefill_lengths) == (16, (16,))


@pytest.mark.backend_agnostic
def test_the_cli_states_and_uses_the_library_defaults():
    """`keras-gemma2 export --help` states export()'s defaults, from edge/plan.py, and hides the child's options."""
    (commands,) = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    command = commands.choices["export"]
    options = {action.dest: action for action in command._actions}
    library = inspect.signature(keras_gemma2.export).parameters
    for name in ("format", "quantization", "cache_length", "prefill_lengths"):
        assert options[name].default == library[name].default, name
        assert options[name].help == plan.HELP[name], name
    text = " ".join(command.format_help().split())
    for stated in ("(default: from the path's suffix)", "(default: none, float32)",
                   f"(default: {plan.CACHE_LENGTH_TEXT})", f"(default: {plan.PREFILL_LENGTHS_TEXT})"):
        assert stated in text, stated
    assert "--tensorflow-child" not in text and "--stop-ids" not in text


def test_cli_export_of_the_demo_preset_with_the_defaults_shows_its_stages(tmp_path, capsys):
    """`keras-gemma2 export --preset gemma2_demo out.tflite`: failed with the old defaults.

    Under JAX and PyTorch the export runs in a TensorFlow child process, whose
    stages come through as they happen.
    """
    path = tmp_path / "demo.tflite"
    assert cli.main(["export", "--preset", "gemma2_demo", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"wrote {path}\n"
    with open(tmp_path / "demo.json") as f:
        metadata = json.load(f)
    assert (metadata["cache_length"], metadata["prefill_lengths"]) == (512, [32, 128, 512])
    lines = captured.err.splitlines()
    assert lines[:2] == ["export: loading gemma2_demo", "export: cache length 512, prefill buckets 32 128 512"]
    stages = [re.fullmatch(r"export \[[#.]+\] (\d+)/(\d+) (.+) \(\d+ s\)", line) for line in lines[2:]]
    assert all(stages), lines
    steps = [(int(m[1]), int(m[2])) for m in stages]
    total = steps[0][1]
    assert steps == [(i, total) for i in range(1, total + 1)]  # numbered in order, the last one N/N
    names = [m[3] for m in stages]
    expected = [f"tracing the {s} signature" for s in ("prefill_32", "prefill_128", "prefill_512", "decode")]
    expected += ["saving the SavedModel", "converting to LiteRT (the longest step)",
                 "writing the tokenizer and metadata"]
    if keras.backend.backend() != "tensorflow":  # the TensorFlow child's stages, passed through
        expected = ["saving a float32 copy of the weights for a TensorFlow process",
                    "loading the weights in a TensorFlow process", *expected]
    assert names == expected
    assert sorted(os.listdir(tmp_path)) == ["demo.json", "demo.tflite", "demo.tokenizer.model"]


@pytest.mark.parametrize("format, quantization, stage", [
    ("litert", "int8", "writing each of the 3 blocks' int8 weights"),
    ("litert", "int4", "writing each of the 3 blocks' int4 weights"),
    ("saved_model", "int8", "quantizing a copy of the model to int8 in Keras"),
])
def test_progress_counts_every_stage_of_the_export(tmp_path, format, quantization, stage):
    """The bar's length is the number of stages reported, whatever the format and backend."""
    keras.utils.set_random_seed(0)
    model = keras_gemma2.Gemma2CausalLM(keras_gemma2.Gemma2Backbone(TINY))
    calls = []
    path = tmp_path / ("m.tflite" if format == "litert" else "saved")
    keras_gemma2.export(model, path, format=format, quantization=quantization, cache_length=16,
                        prefill_lengths=(8,), progress=lambda *call: calls.append(call))
    total = calls[0][2]
    assert [(step, steps) for _, step, steps in calls] == [(i, total) for i in range(1, total + 1)]
    assert stage in [name for name, _, _ in calls]
