"""The shipped demo presets: they load offline, generate, and keep their recorded quality."""

import os

import pytest

import keras_gemma2
from keras_gemma2.training import data
from keras_gemma2.checkpoints import registry
from keras_gemma2.training import trainer
from keras_gemma2.cli import main

DEMOS = ("gemma2_demo", "gemma2_demo_teacher")


@pytest.mark.parametrize("name", DEMOS)
def test_shipped_preset_keeps_its_recorded_held_out_perplexity(name):
    entry = registry.get(name)
    model = keras_gemma2.from_preset(name)  # from package data: no network
    assert model.tokenizer is not None and model.config.to_dict() == entry["config"]
    with open(os.path.join(entry["local"], "held_out.txt"), encoding="utf-8") as f:
        text = f.read()
    stream = data.token_stream(model.tokenizer, [text])[:20000]
    assert len(stream) == entry["held_out_tokens"]
    value = trainer.perplexity(model, data.evaluation_batches(stream, 8, 128))
    assert value == pytest.approx(entry["held_out_perplexity"], rel=2e-3)


def test_distilled_student_beats_chance_and_is_smaller_than_its_teacher():
    student, teacher = (registry.get(n) for n in DEMOS)
    assert student["held_out_perplexity"] < student["config"]["vocabulary_size"] / 20
    student_params = keras_gemma2.Gemma2Config.from_dict(student["config"]).parameter_count()
    teacher_params = keras_gemma2.Gemma2Config.from_dict(teacher["config"]).parameter_count()
    assert student_params < teacher_params / 2


def test_generate_command_runs_offline_on_the_demo(capsys):
    assert main(["generate", "--preset", "gemma2_demo", "--max-new-tokens", "12", "def "]) == 0
    assert len(capsys.readouterr().out.strip()) > 0
