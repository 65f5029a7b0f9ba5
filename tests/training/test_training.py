"""Training loop, data, checkpoints (kill and resume), and the train / distill CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config, Gemma2Tokenizer
from keras_gemma2.training import data
from keras_gemma2.training import trainer
from keras_gemma2.io import safetensors_files
from keras_gemma2.cli import main

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): data files, batches of ids and
# argument checks are host-side numpy, refused before the first step.

TINY = Gemma2Config.from_preset("gemma2_tiny_test")
TEXT = "\n".join(
    f"def function_{i}(a, b):\n    return a * {i} + b  # the {i}th line of code" for i in range(60)
)


@pytest.fixture
def text_files(tmp_path):
    train, held_out = tmp_path / "train.txt", tmp_path / "eval.txt"
    train.write_text(TEXT)
    held_out.write_text(TEXT[:400])
    return str(train), str(held_out)


def compiled_model(sentencepiece_path, seed=0):
    keras.utils.set_random_seed(seed)
    model = Gemma2CausalLM(Gemma2Backbone(TINY), tokenizer=Gemma2Tokenizer(sentencepiece_path))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    return model


def weights(model):
    return {v.path: keras.ops.convert_to_numpy(v.value) for v in model.backbone.weights}


# ---- data ---------------------------------------------------------------------
@pytest.mark.backend_agnostic
def test_bad_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.read_texts([str(tmp_path / "missing.txt")])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        data.read_texts([str(tmp_path / "empty.txt")])
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ValueError, match="Cannot read data file"):
        data.read_texts([str(tmp_path / "binary.txt")])
    with pytest.raises(ValueError, match="No data files"):
        data.read_texts([])
    with pytest.raises(ValueError, match="is a folder; pass the text files in it"):
        data.read_texts([str(tmp_path)])


@pytest.mark.backend_agnostic
def test_batches_are_a_function_of_the_step(sentencepiece_path):
    stream = data.token_stream(Gemma2Tokenizer(sentencepiece_path), [TEXT])
    first = data.batch_at(stream, 3, 4, 16)
    np.testing.assert_array_equal(first["token_ids"], data.batch_at(stream, 3, 4, 16)["token_ids"])
    assert not np.array_equal(first["token_ids"], data.batch_at(stream, 4, 4, 16)["token_ids"])
    with pytest.raises(ValueError, match="fewer than one sequence"):
        data.batch_at(stream[:10], 0, 2, 16)


@pytest.mark.backend_agnostic
def test_sequence_longer_than_the_model_is_refused(sentencepiece_path):
    model = compiled_model(sentencepiece_path)
    with pytest.raises(ValueError, match="sequence length 65 exceeds the model's max_sequence_length 64"):
        trainer.train(model, np.arange(500) % 128, steps=1, batch_size=2, sequence_length=65)


# ---- checkpoints -----------------------------------------------------------------
def test_resumed_training_equals_uninterrupted_training(sentencepiece_path, tmp_path):
    stream = data.token_stream(Gemma2Tokenizer(sentencepiece_path), [TEXT])
    quiet = open(os.devnull, "w")
    straight = compiled_model(sentencepiece_path)
    trainer.train(straight, stream, steps=6, batch_size=2, sequence_length=16, log=quiet)

    interrupted = compiled_model(sentencepiece_path)
    directory = str(tmp_path / "ckpt")
    trainer.train(interrupted, stream, steps=4, batch_size=2, sequence_length=16,
                   checkpoint_dir=directory, checkpoint_every=2, log=quiet)
    resumed = compiled_model(sentencepiece_path, seed=123)  # different init: must be overwritten
    history = trainer.train(resumed, stream, steps=6, batch_size=2, sequence_length=16,
                             checkpoint_dir=directory, checkpoint_every=2, log=quiet)
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for path, value in weights(straight).items():
        np.testing.assert_allclose(weights(resumed)[path], value, atol=1e-5, err_msg=path)


def test_crash_while_saving_keeps_the_previous_checkpoint(sentencepiece_path, tmp_path, monkeypatch):
    stream = data.token_stream(Gemma2Tokenizer(sentencepiece_path), [TEXT])
    model = compiled_model(sentencepiece_path)
    directory = str(tmp_path / "ckpt")
    quiet = open(os.devnull, "w")
    trainer.train(model, stream, steps=2, batch_size=2, sequence_length=16,
                   checkpoint_dir=directory, checkpoint_every=2, log=quiet)
    saved = weights(model)

    def power_cut(path, tensors, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("power cut")

    monkeypatch.setattr(safetensors_files, "write_file", power_cut)
    with pytest.raises(OSError, match="power cut"):
        trainer.train(model, stream, steps=4, batch_size=2, sequence_length=16,
                       checkpoint_dir=directory, checkpoint_every=2, log=quiet)
    monkeypatch.undo()
    restored = compiled_model(sentencepiece_path, seed=5)
    state = trainer.load_checkpoint(restored, directory)
    assert state["step"] == 2
    for path, value in saved.items():
        np.testing.assert_array_equal(weights(restored)[path], value)


def test_resume_directory_from_another_architecture(sentencepiece_path, tmp_path):
    stream = data.token_stream(Gemma2Tokenizer(sentencepiece_path), [TEXT])
    directory = str(tmp_path / "ckpt")
    quiet = open(os.devnull, "w")
    trainer.train(compiled_model(sentencepiece_path), stream, steps=1, batch_size=2,
                   sequence_length=16, checkpoint_dir=directory, checkpoint_every=1, log=quiet)
    other = Gemma2CausalLM(Gemma2Backbone(TINY.replace(num_layers=2)))
    other.compile()
    with pytest.raises(ValueError, match="another architecture .*num_layers: 3 there vs 2 here"):
        trainer.train(other, stream, steps=2, batch_size=2, sequence_length=16,
                       checkpoint_dir=directory, log=quiet)


def test_killed_process_resumes_losing_at_most_one_interval(sentencepiece_path, text_files, tmp_path):
    """SIGKILL a real `keras-gemma2 train` process, start it again, check where it resumes."""
    directory = str(tmp_path / "ckpt")
    command = [
        sys.executable, "-m", "keras_gemma2.cli", "train", "--preset", "gemma2_tiny_test",
        "--tokenizer", sentencepiece_path, "--data", text_files[0], "--steps", "400",
        "--batch-size", "2", "--sequence-length", "16", "--checkpoint-dir", directory,
        "--checkpoint-every", "3",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pointer = os.path.join(directory, "latest")
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(pointer) and int(open(pointer).read().split("_")[1]) >= 6:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    output = process.communicate()[0]
    killed_at = max(int(part.split("/")[0]) for part in output.replace("\r", "\n").split() if "/400" in part)
    saved = int(open(pointer).read().split("_")[1])
    assert killed_at - saved <= 3, (killed_at, saved)

    command[command.index("400")] = str(saved + 2)
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step {saved}" in resumed.stdout


# ---- the CLI --------------------------------------------------------------------------
def test_train_and_distill_commands(sentencepiece_path, text_files, tmp_path, capsys):
    train_file, eval_file = text_files
    teacher_dir, student_dir = str(tmp_path / "teacher"), str(tmp_path / "student")
    plot = str(tmp_path / "loss.png")
    common = ["--data", train_file, "--eval-data", eval_file, "--eval-every", "3",
              "--batch-size", "2", "--sequence-length", "16", "--steps", "6"]
    assert main(["train", "--preset", "gemma2_tiny_test", "--tokenizer", sentencepiece_path,
                 "--out", teacher_dir, *common]) == 0
    output = capsys.readouterr().out
    assert "held-out perplexity" in output and "tok/s" in output

    student_config = tmp_path / "student.json"
    student_config.write_text(json.dumps(TINY.replace(num_layers=2, hidden_dim=16).to_dict()))
    assert main(["distill", "--teacher", teacher_dir, "--student", str(student_config),
                 "--plot", plot, "--out", student_dir, "--checkpoint-dir", str(tmp_path / "ck"),
                 *common]) == 0
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    import keras_gemma2

    student = keras_gemma2.from_preset(student_dir)
    assert student.config.num_layers == 2 and student.tokenizer is not None


def test_offline_distill_command(sentencepiece_path, text_files, tmp_path):
    train_file, _ = text_files
    teacher_dir = str(tmp_path / "teacher")
    assert main(["train", "--preset", "gemma2_tiny_test", "--tokenizer", sentencepiece_path,
                 "--data", train_file, "--steps", "2", "--batch-size", "2",
                 "--sequence-length", "16", "--out", teacher_dir]) == 0
    store = str(tmp_path / "store")
    assert main(["distill", "--teacher", teacher_dir, "--student", "gemma2_tiny_27b_style_test",
                 "--data", train_file, "--steps", "3", "--batch-size", "2", "--sequence-length",
                 "16", "--offline-store", store, "--top-k", "5"]) == 0
    assert sorted(f for f in os.listdir(store) if f.startswith("batch_")) == [
        "batch_0000000.safetensors", "batch_0000001.safetensors", "batch_0000002.safetensors"
    ]


# ---- argument checks (before the first step) --------------------------------------------
BAD_TRAIN_ARGUMENTS = [
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
    ({"steps": -3}, "steps must be an integer >= 1, got -3"),
    ({"steps": 2.5}, "steps must be an integer >= 1, got 2.5"),
    ({"steps": True}, "steps must be an integer >= 1, got True"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
    ({"sequence_length": 0}, "sequence_length must be an integer >= 2, got 0"),
    ({"sequence_length": 1}, "sequence_length must be an integer >= 2, got 1"),
    ({"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1, got 0"),
    ({"eval_every": 0}, "eval_every must be an integer >= 1, got 0"),
    ({"seed": -1}, "seed must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize("change, message", BAD_TRAIN_ARGUMENTS)
@pytest.mark.backend_agnostic
def test_train_arguments_are_checked_before_the_first_step(change, message, sentencepiece_path, tmp_path):
    model = compiled_model(sentencepiece_path)
    before = weights(model)
    arguments = dict(steps=2, batch_size=2, sequence_length=8, checkpoint_dir=str(tmp_path / "ck"),
                     checkpoint_every=1, eval_every=None, seed=0)
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        trainer.train(model, np.arange(500) % 128, log=open(os.devnull, "w"), **arguments)
    assert not (tmp_path / "ck").exists()
    for path, value in weights(model).items():
        np.testing.assert_array_equal(value, before[path])


@pytest.mark.backend_agnostic
def test_uncompiled_model_and_short_data_are_refused(sentencepiece_path):
    model = Gemma2CausalLM(Gemma2Backbone(TINY))
    with pytest.raises(ValueError, match="not compiled; call model.compile"):
        trainer.train(model, np.arange(500) % 128, steps=1, batch_size=2, sequence_length=8)
    with pytest.raises(ValueError, match="The data has 8 tokens, fewer than one sequence of 8"):
        trainer.train(compiled_model(sentencepiece_path), np.arange(8), steps=1, batch_size=2,
                       sequence_length=8)


@pytest.mark.backend_agnostic
def test_unwritable_checkpoint_dir_is_refused_before_the_first_step(sentencepiece_path, tmp_path,
                                                                    monkeypatch):
    import tempfile

    model = compiled_model(sentencepiece_path)
    stream = np.arange(500) % 128
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir .* is a file, not a folder"):
        trainer.train(model, stream, steps=1, batch_size=2, sequence_length=8, checkpoint_dir=str(blocker))
    with pytest.raises(ValueError, match="cannot be created: .* is a file, not a folder"):
        trainer.train(model, stream, steps=1, batch_size=2, sequence_length=8,
                       checkpoint_dir=str(blocker / "ck"))
    # Read-only mount or full disk (root ignores permission bits: the failure is injected where
    # the writability probe creates its file, which is what a real read-only folder refuses).
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) == str(tmp_path / "ro"):
            raise OSError(30, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(model, "train_on_batch", lambda *a, **k: pytest.fail("a step was taken"))
    with pytest.raises(ValueError, match="checkpoint_dir .*ro is not writable.*Read-only file system"):
        trainer.train(model, stream, steps=1, batch_size=2, sequence_length=8,
                       checkpoint_dir=str(tmp_path / "ro"))


def test_resume_beyond_steps_and_broken_checkpoints_are_clear_errors(sentencepiece_path, tmp_path):
    stream = data.token_stream(Gemma2Tokenizer(sentencepiece_path), [TEXT])
    directory = str(tmp_path / "ckpt")
    quiet = open(os.devnull, "w")
    trainer.train(compiled_model(sentencepiece_path), stream, steps=3, batch_size=2, sequence_length=8,
                   checkpoint_dir=directory, checkpoint_every=1, log=quiet)
    model = compiled_model(sentencepiece_path, seed=1)
    before = weights(model)
    with pytest.raises(ValueError, match=r"checkpoint at step 3, beyond steps=2 .*pass steps >= 3"):
        trainer.train(model, stream, steps=2, batch_size=2, sequence_length=8,
                       checkpoint_dir=directory, log=quiet)
    for path, value in weights(model).items():  # nothing was loaded into the model
        np.testing.assert_array_equal(value, before[path])
    # steps equal to the saved step: nothing left to do, not an error.
    history = trainer.train(model, stream, steps=3, batch_size=2, sequence_length=8,
                             checkpoint_dir=directory, log=quiet)
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]

    pointer = os.path.join(directory, "latest")
    with open(pointer, "w") as f:
        f.write("step_0000042")
    with pytest.raises(ValueError, match=r"pointer .*latest names 'step_0000042', but .*step_0000042"
                                         r".*state.json is not a checkpoint .*delete .*latest"):
        trainer.train(model, stream, steps=50, batch_size=2, sequence_length=8,
                       checkpoint_dir=directory, log=quiet)
    with open(pointer, "w") as f:
        f.write("step_0000003")
    with open(os.path.join(directory, "step_0000003", "state.json"), "w") as f:
        f.write('{"step": 3, "conf')
    with pytest.raises(ValueError, match=r"checkpoint .*step_0000003 is damaged"):
        trainer.load_checkpoint(model, directory)


def test_eval_batches_without_eval_every_are_evaluated_at_the_end(sentencepiece_path):
    stream = data.token_stream(Gemma2Tokenizer(sentencepiece_path), [TEXT])
    eval_batches = data.evaluation_batches(stream[:100], 2, 8, max_batches=1)
    history = trainer.train(compiled_model(sentencepiece_path), stream, steps=2, batch_size=2,
                             sequence_length=8, eval_batches=eval_batches, log=open(os.devnull, "w"))
    assert [r["step"] for r in history if "eval_perplexity" in r] == [2]
