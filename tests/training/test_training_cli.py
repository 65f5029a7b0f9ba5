"""`keras-gemma2 train / distill / merge`: every bad input is refused before any work, and a
finished run is never thrown away (the model is saved before the plot, or rescued)."""

import json
import os
import re
import tempfile

import keras
import numpy as np
import pytest

from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Config, Gemma2Tokenizer
from keras_gemma2 import cli
from keras_gemma2.training import data
from keras_gemma2.training import merging
from keras_gemma2.training import trainer
from keras_gemma2.cli import main

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): option checks refuse
# before any model loads or step runs (the no_work fixture fails the test otherwise).

TINY = Gemma2Config.from_preset("gemma2_tiny_test")
TEXT = "\n".join(f"def function_{i}(a, b):\n    return a * {i} + b  # line {i}" for i in range(40))
SHORT = ["--batch-size", "2", "--sequence-length", "8"]
FAILED = 2  # main()'s exit status for a reported error


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(TEXT)
    return str(path)


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or taking a step fails the test: errors must come before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or trained before the bad input was refused")

    monkeypatch.setattr(cli, "_model_with_tokenizer", refuse)
    monkeypatch.setattr(trainer, "train", refuse)
    monkeypatch.setattr(merging, "average_checkpoints", refuse)
    monkeypatch.setattr(merging, "interpolate", refuse)


def error_of(argv, capsys):
    assert main(argv) == FAILED
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    return err


def train_args(text_file, sentencepiece_path, *extra, preset="gemma2_tiny_test"):
    return ["train", "--preset", preset, "--tokenizer", sentencepiece_path, "--data", text_file,
            "--steps", "2", *SHORT, *extra]


def config_file(tmp_path, name, **changes):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(TINY.replace(**changes).to_dict()))
    return str(path)


# ---- numbers and option combinations ------------------------------------------------
BAD_TRAINING_OPTIONS = [
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--steps", "-5"], "--steps must be an integer >= 1, got -5"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--sequence-length", "0"], "--sequence-length must be an integer >= 2, got 0"),
    (["--sequence-length", "1"], "--sequence-length must be an integer >= 2, got 1"),
    (["--checkpoint-every", "0"], "--checkpoint-every must be an integer >= 1, got 0"),
    (["--learning-rate", "-0.001"], "--learning-rate must be a finite number > 0, got -0.001"),
    (["--learning-rate", "0"], "--learning-rate must be a finite number > 0, got 0"),
    (["--learning-rate", "nan"], "--learning-rate must be a finite number > 0, got nan"),
    (["--seed", "-1"], "--seed must be an integer >= 0, got -1"),
    (["--eval-every", "0", "--eval-data", "X"], "--eval-every must be an integer >= 1, got 0"),
    (["--eval-batches", "0", "--eval-data", "X"], "--eval-batches must be an integer >= 1, got 0"),
    (["--eval-every", "5"], "--eval-every needs held-out text (add --eval-data"),
    (["--eval-data"], "--eval-data needs at least one file"),
]


@pytest.mark.parametrize("extra, message", BAD_TRAINING_OPTIONS)
@pytest.mark.backend_agnostic
def test_train_numbers_are_checked_before_any_work(extra, message, text_file, sentencepiece_path,
                                                     tmp_path, capsys, no_work):
    extra = [text_file if a == "X" else a for a in extra]
    # The later --option wins in argparse, so the bad value overrides the defaults in train_args.
    err = error_of(train_args(text_file, sentencepiece_path, *extra), capsys)
    assert message in err
    assert re.search(r"\(.+\)$", err.strip()), f"no fix given: {err}"


BAD_DISTILL_OPTIONS = [
    (["--temperature", "0"], "--temperature must be a finite number > 0, got 0"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
    (["--hard-label-weight", "1.5"], "--hard-label-weight must be a finite number >= 0 and <= 1, got 1.5"),
    (["--hard-label-weight", "-0.1"], "--hard-label-weight must be a finite number >= 0 and <= 1"),
    (["--top-k", "0"], "--top-k must be an integer >= 1, got 0"),
    (["--steps", "0"], "--steps must be an integer >= 1, got 0"),
    (["--offline-store", "S", "--temperature", "2"], "--temperature and --hard-label-weight apply to online"),
    (["--offline-store", "S", "--hard-label-weight", "0.5"], "apply to online distillation only"),
]


@pytest.mark.parametrize("extra, message", BAD_DISTILL_OPTIONS)
@pytest.mark.backend_agnostic
def test_distill_numbers_are_checked_before_any_work(extra, message, text_file, tmp_path, capsys, no_work):
    extra = [str(tmp_path / "store") if a == "S" else a for a in extra]
    argv = ["distill", "--teacher", "gemma2_tiny_test", "--student", "gemma2_tiny_test",
            "--data", text_file, "--steps", "2", *SHORT, *extra]
    assert message in error_of(argv, capsys)


# ---- output paths, before the first step --------------------------------------------------
@pytest.mark.backend_agnostic
def test_existing_out_is_refused_before_any_step(text_file, sentencepiece_path, tmp_path, capsys, no_work):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("a previous model")
    checkpoints = tmp_path / "ckpt"
    err = error_of(train_args(text_file, sentencepiece_path, "--out", str(out),
                              "--checkpoint-dir", str(checkpoints)), capsys)
    assert f"--out {out} already exists" in err and "choose a new path" in err
    assert not checkpoints.exists() and os.listdir(out) == ["keep.txt"]


@pytest.mark.backend_agnostic
def test_unwritable_plot_is_refused_before_any_step(text_file, sentencepiece_path, tmp_path, capsys,
                                                    no_work, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = error_of(train_args(text_file, sentencepiece_path, "--plot", str(blocker / "loss.png")), capsys)
    assert f"{blocker} is a file, not a folder" in err and "--plot" in err
    # A folder that refuses new files (read-only mount, full disk; root ignores permission bits,
    # so the failure is injected where the probe creates its file).
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkstemp = tempfile.mkstemp

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) == str(locked):
            raise OSError(30, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    err = error_of(train_args(text_file, sentencepiece_path, "--plot", str(locked / "loss.png")), capsys)
    assert f"{locked} is not writable" in err and "Read-only file system" in err
    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)
    (tmp_path / "loss_dir.png").mkdir()
    err = error_of(train_args(text_file, sentencepiece_path, "--plot", str(tmp_path / "loss_dir.png")), capsys)
    assert "is a folder (pass a file path)" in err


@pytest.mark.backend_agnostic
def test_unwritable_checkpoint_dir_is_refused_before_any_step(text_file, sentencepiece_path, tmp_path,
                                                              capsys, no_work, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = error_of(train_args(text_file, sentencepiece_path, "--checkpoint-dir", str(blocker)), capsys)
    assert f"--checkpoint-dir {blocker} is a file, not a folder" in err
    err = error_of(train_args(text_file, sentencepiece_path, "--checkpoint-dir", str(blocker / "ck")), capsys)
    assert f"{blocker} is a file, not a folder" in err

    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir).startswith(str(read_only)):
            raise OSError(30, "Read-only file system")
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    err = error_of(train_args(text_file, sentencepiece_path, "--checkpoint-dir", str(read_only)), capsys)
    assert f"--checkpoint-dir {read_only} is not writable" in err and "choose a writable location" in err


@pytest.mark.backend_agnostic
def test_overlapping_output_folders_are_refused(text_file, sentencepiece_path, tmp_path, capsys, no_work):
    same = str(tmp_path / "run")
    err = error_of(train_args(text_file, sentencepiece_path, "--out", same, "--checkpoint-dir", same), capsys)
    assert "--out" in err and "--checkpoint-dir" in err and "overlap" in err
    err = error_of(train_args(text_file, sentencepiece_path, "--out", same,
                              "--checkpoint-dir", os.path.join(same, "ck")), capsys)
    assert "overlap" in err


@pytest.mark.backend_agnostic
def test_plot_without_matplotlib_is_refused_up_front(text_file, sentencepiece_path, tmp_path, capsys,
                                                     no_work, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    err = error_of(train_args(text_file, sentencepiece_path, "--plot", str(tmp_path / "l.png")), capsys)
    assert "--plot needs matplotlib" in err


def test_model_is_saved_before_the_plot(text_file, sentencepiece_path, tmp_path, capsys, monkeypatch):
    def broken_plot(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "plot_history", broken_plot)
    out = str(tmp_path / "model")
    err = error_of(train_args(text_file, sentencepiece_path, "--out", out, "--plot",
                              str(tmp_path / "loss.png")), capsys)
    assert "writing --plot" in err and "No space left on device" in err
    assert f"the trained model is saved in {out}" in err
    import keras_gemma2

    assert keras_gemma2.from_preset(out).config == TINY


def test_failed_save_at_the_end_rescues_the_model(text_file, sentencepiece_path, tmp_path, capsys,
                                                  monkeypatch):
    out, checkpoints = str(tmp_path / "out" / "model"), str(tmp_path / "ckpt")
    real_save = Gemma2CausalLM.save_to_preset

    def disk_full_at_out(self, path, *args, **kwargs):
        if os.path.abspath(path) == out:
            raise OSError(28, "No space left on device", path)
        return real_save(self, path, *args, **kwargs)

    monkeypatch.setattr(Gemma2CausalLM, "save_to_preset", disk_full_at_out)
    err = error_of(train_args(text_file, sentencepiece_path, "--out", out,
                              "--checkpoint-dir", checkpoints), capsys)
    assert f"saving --out {out} failed" in err and "No space left on device" in err
    rescued = re.search(r"the trained model was saved to (\S+) instead", err).group(1)
    assert os.path.dirname(rescued) == str(tmp_path)  # beside the checkpoint dir
    import keras_gemma2

    saved = keras_gemma2.from_preset(rescued)
    assert saved.tokenizer is not None
    # The rescued weights are the trained ones: those of the run's last checkpoint.
    reference = Gemma2CausalLM(Gemma2Backbone(TINY))
    reference.compile(optimizer=keras.optimizers.AdamW(1e-3, weight_decay=0.01))
    assert trainer.load_checkpoint(reference, checkpoints)["step"] == 2
    for ours, theirs in zip(saved.backbone.weights, reference.backbone.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours.value),
                                      keras.ops.convert_to_numpy(theirs.value), err_msg=ours.path)


# ---- vocabulary -----------------------------------------------------------------------
@pytest.mark.backend_agnostic
def test_tokenizer_larger_than_the_vocabulary_is_refused(text_file, sentencepiece_path, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained with a bad tokenizer"))
    small = config_file(tmp_path, "small", vocabulary_size=96)
    err = error_of(train_args(text_file, sentencepiece_path, preset=small), capsys)
    assert "96-token vocabulary" in err and "has 128 pieces" in err and "--tokenizer" in err
    # distill: the teacher (with --tokenizer) ...
    err = error_of(["distill", "--teacher", small, "--tokenizer", sentencepiece_path, "--student",
                    small, "--data", text_file, "--steps", "1", *SHORT], capsys)
    assert "the teacher" in err and "96-token vocabulary" in err and "128 pieces" in err
    # ... and a student whose vocabulary differs from the teacher's.
    err = error_of(["distill", "--teacher", "gemma2_tiny_test", "--tokenizer", sentencepiece_path,
                    "--student", small, "--data", text_file, "--steps", "1", *SHORT], capsys)
    assert "128-token vocabulary and the student 96" in err


@pytest.mark.backend_agnostic
def test_invalid_config_file_is_one_line(text_file, sentencepiece_path, tmp_path, capsys):
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"vocabulary_size": 128}))
    err = error_of(train_args(text_file, sentencepiece_path, preset=str(broken)), capsys)
    assert f"config {broken} is not a valid Gemma 2 config" in err


# ---- resuming -------------------------------------------------------------------------
def make_checkpoint(directory, sentencepiece_path, steps):
    model = Gemma2CausalLM(Gemma2Backbone(TINY))
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    stream = data.token_stream(Gemma2Tokenizer(sentencepiece_path), [TEXT])
    trainer.train(model, stream, steps=steps, batch_size=2, sequence_length=8,
                   checkpoint_dir=directory, checkpoint_every=1, log=open(os.devnull, "w"))


def test_resume_beyond_steps_and_dangling_pointer(text_file, sentencepiece_path, tmp_path, capsys,
                                                  monkeypatch):
    directory = str(tmp_path / "ckpt")
    make_checkpoint(directory, sentencepiece_path, steps=2)
    monkeypatch.setattr(cli, "_model_with_tokenizer", lambda *a, **k: pytest.fail("loaded a model"))
    err = error_of(train_args(text_file, sentencepiece_path, "--checkpoint-dir", directory, "--steps", "1"),
                   capsys)
    assert "checkpoint at step 2, beyond --steps 1" in err and "pass --steps 2 or more" in err

    with open(os.path.join(directory, "latest"), "w") as f:
        f.write("step_0000009")
    err = error_of(train_args(text_file, sentencepiece_path, "--checkpoint-dir", directory), capsys)
    assert os.path.join(directory, "latest") in err and "step_0000009" in err
    assert "delete" in err and "new checkpoint directory" in err


# ---- offline store reuse ----------------------------------------------------------------
def test_offline_store_reused_with_other_data_is_refused(tiny_text_preset, text_file, tmp_path, capsys):
    teacher_preset, _ = tiny_text_preset
    store = str(tmp_path / "store")
    student = config_file(tmp_path, "student", num_layers=1)
    argv = ["distill", "--teacher", teacher_preset, "--student", student, "--data", text_file,
            "--steps", "1", *SHORT, "--top-k", "4", "--offline-store", store]
    assert main(argv) == 0
    capsys.readouterr()
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("function", "method"))
    argv[argv.index(text_file)] = str(other)
    err = error_of(argv, capsys)
    assert f"The teacher store {store} was built from other inputs" in err
    assert "token stream" in err and "data files: different" in err
    assert "Use a new store folder, or delete this one" in err
    assert sorted(os.listdir(store)) == ["batch_0000000.safetensors", "manifest.json"]
    manifest = json.load(open(os.path.join(store, "manifest.json")))
    assert set(manifest["sources"]) == {"data files", "tokenizer"}


# ---- merge ------------------------------------------------------------------------------
BAD_MERGE_OPTIONS = [
    (["A", "B", "--weights", "a,b"], "--weights must be comma-separated numbers, got 'a,b'"),
    (["A", "B", "--weights", "1"], "--weights has 1 values for 2 presets"),
    (["A", "B", "--weights", "1,2,3"], "--weights has 3 values for 2 presets"),
    (["A", "B", "--weights", "1,-1"], "--weights must be finite, non-negative and not all zero"),
    (["A", "B", "--weights", "0,0"], "--weights must be finite, non-negative and not all zero"),
    (["A", "B", "--weights", "nan,1"], "--weights must be finite"),
    (["A", "--base", "B", "--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["A", "--base", "B", "--weights", "1"], "--weights is for averaging"),
]


@pytest.mark.parametrize("extra, message", BAD_MERGE_OPTIONS)
@pytest.mark.backend_agnostic
def test_merge_options_are_checked_before_any_work(extra, message, tmp_path, capsys, no_work):
    extra = [str(tmp_path / a) if a in ("A", "B") else a for a in extra]
    err = error_of(["merge", *extra, "--out", str(tmp_path / "merged")], capsys)
    assert message in err and not (tmp_path / "merged").exists()


@pytest.mark.backend_agnostic
def test_merge_existing_out_is_refused_before_reading(tmp_path, capsys, no_work):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "x").write_text("x")
    err = error_of(["merge", "p1", "p2", "--out", str(out)], capsys)
    assert f"--out {out} already exists" in err
