"""What `keras-gemma2` prints: one-line errors, --version, defaults in --help, the sampler it
chose, and no TensorFlow start-up logs unless asked for."""

import argparse
import contextlib
import errno
import os
import re
import subprocess
import sys

import pytest

from keras_gemma2 import Gemma2Config, cli
from keras_gemma2.io import safetensors_files
from keras_gemma2.version import __version__

# Tests marked backend_agnostic run once, under conftest.AGNOSTIC_BACKEND (jax): argument parsing, help text and
# one-line errors; the TensorFlow-logs test sets KERAS_BACKEND=tensorflow in its own children.


def _one_error_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


# ---- failures: one line and an exit status, never a traceback ------------------
@pytest.mark.parametrize("code, fix", [
    (errno.ENOSPC, "free some space on that disk"),
    (errno.EROFS, "file system is read-only"),
    (errno.EACCES, "check its permissions"),
])
@pytest.mark.backend_agnostic
def test_a_failed_write_names_the_path_and_the_fix(tiny_text_preset, tmp_path, monkeypatch, capsys, code, fix):
    """A full disk or a read-only folder (tests run as root: the failure is injected)."""
    path, _ = tiny_text_preset

    @contextlib.contextmanager
    def failing_write(target, mode="wb"):
        raise OSError(code, os.strerror(code), os.fspath(target))
        yield  # pragma: no cover

    monkeypatch.setattr(safetensors_files, "atomic_write", failing_write)
    out = tmp_path / "merged"
    assert cli.main(["merge", path, path, "--out", str(out)]) == cli.EXIT_REJECTED
    line = _one_error_line(capsys.readouterr().err)
    assert os.strerror(code) in line and str(tmp_path) in line and fix in line, line


@pytest.mark.backend_agnostic
def test_a_closed_stdout_is_an_error_not_a_silent_success(tiny_text_preset):
    """`keras-gemma2 generate ... >&-` exited 0 having written nothing (Python drops prints
    to a stdout that was closed at start-up); a stdout that fails on write is an error too."""
    path, _ = tiny_text_preset
    command = [sys.executable, "-m", "keras_gemma2.cli", "generate", "--preset", path, "--max-new-tokens", "3", "hi"]
    closed = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *command], stderr=subprocess.PIPE, text=True,
                            timeout=300)
    assert closed.returncode == 2
    assert "standard output is closed" in _one_error_line(closed.stderr)
    with open("/dev/full", "w") as full:
        failed = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    assert failed.returncode == 2 and "No space left on device" in _one_error_line(failed.stderr)


@pytest.mark.backend_agnostic
def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    def broken(preset):
        raise KeyError("head_dim")

    monkeypatch.setattr(Gemma2Config, "from_preset", broken)
    assert cli.main(["info", "--preset", "gemma2_tiny_test"]) == cli.EXIT_UNEXPECTED
    line = _one_error_line(capsys.readouterr().err)
    assert "unexpected KeyError: 'head_dim'" in line and "--debug" in line
    assert cli.DEBUG_VARIABLE in line
    with pytest.raises(KeyError):
        cli.main(["info", "--preset", "gemma2_tiny_test", "--debug"])
    with pytest.raises(KeyError):
        cli.main(["--debug", "info", "--preset", "gemma2_tiny_test"])
    monkeypatch.setenv(cli.DEBUG_VARIABLE, "1")
    with pytest.raises(KeyError):
        cli.main(["info", "--preset", "gemma2_tiny_test"])


@pytest.mark.backend_agnostic
def test_a_multi_line_message_becomes_one_line(monkeypatch, capsys):
    def broken(preset):
        raise RuntimeError("The export process failed: ValueError: bad\nTraceback (most recent call last):\n  x")

    monkeypatch.setattr(Gemma2Config, "from_preset", broken)
    assert cli.main(["info", "--preset", "gemma2_tiny_test"]) == cli.EXIT_REJECTED
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("error: The export process failed: ValueError: bad [2 more lines"), line


# ---- --version and --help ----------------------------------------------------------
@pytest.mark.backend_agnostic
def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"keras-gemma2 {__version__}\n"


def _subparsers(parser):
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


@pytest.mark.backend_agnostic
def test_every_option_in_every_command_states_its_default():
    parser = cli.build_parser()
    parsers = {"keras-gemma2": parser, **_subparsers(parser)}
    assert {"generate", "chat", "train", "distill", "export", "merge"} <= set(parsers)
    missing = []
    for name, command in parsers.items():
        for action in command._actions:
            if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            if action.help == argparse.SUPPRESS:  # hidden (export's child options): not in --help
                continue
            formatter = command._get_formatter()
            formatter.add_argument(action)
            text = " ".join(formatter.format_help().split())
            if not re.search(r"\((default: [^)]|required\))", text) or "default: None" in text:
                missing.append(f"{name} {action.option_strings[-1]}: {text}")
    assert not missing, "\n".join(missing)


# ---- the sampler the flags ask for -----------------------------------------------
@pytest.mark.parametrize("flags, chosen", [
    (["--top-p", "0.9"], "top_p (from --top-p"),
    (["--top-k", "5", "--temperature", "0.7"], "top_k (from --top-k"),
    (["--min-p", "0.1"], "min_p (from --min-p"),
    (["--temperature", "0.8", "--seed", "1"], "temperature (from --temperature"),
    (["--top-p", "0.9", "--top-k", "5"], "top_p (from --top-p"),
])
@pytest.mark.backend_agnostic
def test_sampling_flags_choose_the_sampler_and_say_so(flags, chosen, capsys):
    args = cli.build_parser().parse_args(["generate", "--preset", "p", "hi", *flags])
    assert cli._choose_sampler(args) == chosen.split(" ")[0]
    assert capsys.readouterr().err == f"sampler: {chosen}; pass --sampler to choose another)\n"


@pytest.mark.backend_agnostic
def test_no_flag_is_greedy_and_an_explicit_sampler_wins(capsys):
    for argv, expected in ((["hi"], "greedy"), (["--sampler", "top_k", "--top-p", "0.5", "hi"], "top_k")):
        args = cli.build_parser().parse_args(["generate", "--preset", "p", *argv])
        assert cli._choose_sampler(args) == expected
        assert capsys.readouterr().err == ""


def test_generate_with_temperature_samples_instead_of_failing_or_being_greedy(tiny_text_preset, capsys):
    path, model = tiny_text_preset
    flags = ["--temperature", "0.8", "--top-k", "20", "--seed", "3", "--max-new-tokens", "8"]
    assert cli.main(["generate", "--preset", path, *flags, "def add("]) == 0
    captured = capsys.readouterr()
    assert "sampler: top_k (from --top-k" in captured.err
    expected = "".join(model.generate("def add(", stream=True, sampler="top_k", temperature=0.8, top_k=20,
                                      seed=3, max_new_tokens=8))
    assert captured.out == expected + "\n"


# ---- no TensorFlow start-up logs unless asked ---------------------------------------
# absl/glog-formatted lines ("I0000 00:00:1796160734.114103  8671 port.cc:153] oneDNN ...").
_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ \S+:\d+\] |^WARNING: All log messages before absl", re.M)


@pytest.mark.backend_agnostic
def test_tensorflow_start_up_logs_are_hidden_unless_asked_for(tiny_text_preset):
    """oneDNN, cudart (each printed twice), cpu_feature_guard, cuInit: hidden by default;
    the user's TF_CPP_MIN_LOG_LEVEL or --backend-logs brings them back."""
    path, _ = tiny_text_preset
    command = [sys.executable, "-m", "keras_gemma2.cli", "generate", "--preset", path,
               "--max-new-tokens", "2", "def"]
    environment = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    environment["KERAS_BACKEND"] = "tensorflow"  # the backend that prints them
    runs = {
        "quiet": subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "user's variable": subprocess.Popen(command, env={**environment, "TF_CPP_MIN_LOG_LEVEL": "0"},
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE),
        "--backend-logs": subprocess.Popen(command[:3] + ["--backend-logs"] + command[3:], env=environment,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE),
    }
    results = {name: process.communicate(timeout=600) for name, process in runs.items()}
    quiet = results["quiet"][1].decode(errors="replace")
    assert not _LOG_LINE.search(quiet) and quiet == "", quiet
    for name, process in runs.items():
        assert process.returncode == 0, (name, results[name][1][-3000:])
    assert len({results[name][0] for name in runs}) == 1  # the same generated text
    for name in ("user's variable", "--backend-logs"):
        assert _LOG_LINE.search(results[name][1].decode(errors="replace")), name
