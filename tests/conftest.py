"""Shared tiny configs and fixtures for the whole suite, and where backend-agnostic tests run.

Every test runs under each Keras backend (test.sh runs the suite three times) unless it is
marked `backend_agnostic`: behaviour that no backend can change (argument checks that run
before any tensor op, config and preset parsing, the tokenizer, file formats and atomic
writes, CLI argument errors) runs once, under AGNOSTIC_BACKEND, and is deselected under
the others. Numerics, compiled generation, training steps, quantized layers, export
tracing and signal handling under each runtime stay unmarked: they run everywhere.
"""

import hashlib

import keras
import numpy as np
import pytest


# The backend that runs the backend-agnostic tests: JAX starts fastest of the three (the CLI
# tests start the command in child processes), and it is the backend users train with.
AGNOSTIC_BACKEND = "jax"


def pytest_collection_modifyitems(config, items):
    if keras.backend.backend() == AGNOSTIC_BACKEND:
        return
    kept, agnostic = [], []
    for item in items:
        (agnostic if item.get_closest_marker("backend_agnostic") else kept).append(item)
    if agnostic:
        config.hook.pytest_deselected(items=agnostic)
        items[:] = kept


def pytest_report_header(config):
    where = "here" if keras.backend.backend() == AGNOSTIC_BACKEND else f"under {AGNOSTIC_BACKEND} only"
    return f"keras backend: {keras.backend.backend()}; backend_agnostic tests run {where}"


@pytest.fixture(scope="session")
def Runner():
    """The standalone on-device runner's class, loaded from export/runner.py by path.

    The runner is not part of the package (it runs where keras_gemma2 is not
    installed), so tests load its file as the phone app would ship it.
    """
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "export", "runner.py")
    spec = importlib.util.spec_from_file_location("runner", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Runner


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def sentencepiece_path(tmp_path_factory):
    """Path to a tiny 128-piece SentencePiece model with Gemma's specials."""
    from helpers import train_test_sentencepiece

    return train_test_sentencepiece(tmp_path_factory.mktemp("sentencepiece"))


@pytest.fixture
def read_only_dir(monkeypatch):
    """A directory nothing can be written into, even by root (tests run as root here and in CI).

    Root ignores permission bits, so as root the folder is bind-mounted read-only (EROFS);
    where mounting is not allowed, every write under it is made to fail with EROFS instead.
    """
    import errno
    import os
    import pathlib
    import shutil
    import subprocess
    import tempfile

    # Outside pytest's tmp_path: pytest may rename old tmp folders away while a mount is on one.
    folder = pathlib.Path(tempfile.mkdtemp(prefix="keras_gemma2-read-only-"))
    (folder / "existing.txt").write_text("kept")
    if os.geteuid() != 0:
        os.chmod(folder, 0o500)
        yield folder
        os.chmod(folder, 0o700)
        shutil.rmtree(folder, ignore_errors=True)
        return
    mounted = subprocess.run(
        f"mount --bind '{folder}' '{folder}' && mount -o remount,ro,bind '{folder}'",
        shell=True, capture_output=True,
    ).returncode == 0
    if mounted:
        try:
            yield folder
        finally:
            subprocess.run(["umount", str(folder)], capture_output=True)
            shutil.rmtree(folder, ignore_errors=True)
        return

    inside = str(folder)

    def refusing(function, path_of):
        def wrapper(*args, **kwargs):
            path = path_of(args, kwargs)
            if path is not None and os.path.abspath(os.fspath(path)).startswith(inside):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return function(*args, **kwargs)

        return wrapper

    for module, name in ((os, "open"), (os, "mkdir"), (os, "makedirs")):
        monkeypatch.setattr(module, name, refusing(getattr(module, name), lambda a, k: a[0]))
    for name in ("mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, refusing(getattr(tempfile, name), lambda a, k: k.get("dir")))
    yield folder
    monkeypatch.undo()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_text_preset(tmp_path_factory, sentencepiece_path):
    """(path, model): tiny_model's weights with the tiny tokenizer, saved as a preset.

    Shared like tiny_model: a test must leave the model as it was.
    """
    from helpers import tiny
    from keras_gemma2 import Gemma2Tokenizer

    model = tiny(tokenizer=Gemma2Tokenizer(sentencepiece_path))
    path = str(tmp_path_factory.mktemp("tiny_text_preset") / "preset")
    model.save_to_preset(path)
    return path, model


def _fingerprint(model):
    """What a reading test must leave as it was: weights, adapters, quantization, sampler, switches."""
    digest = hashlib.sha1()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    state = (model.backbone.lora_targets, model.dtype_policy.name, getattr(model, "_compiled_sampler", None),
             model.jit_compile, model.tokenizer, [type(v).__name__ for v in model.weights])
    return digest.hexdigest(), repr(state)


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny config with randomize_weights(seed=0), one model for the whole session.

    Its compiled programs (forward, prefill, decode loops) are built once and reused by
    every test that takes it. A test that changes its model (fit, quantize, LoRA, a
    compiled sampler, another tokenizer) builds its own with helpers.tiny(): a change
    to this one fails the test that made it (_shared_models_unchanged).
    """
    from helpers import tiny

    return tiny()


@pytest.fixture(autouse=True)
def _shared_models_unchanged(request):
    """A test that takes a shared model (directly or through a fixture) must leave it as it was."""
    shared = {}
    if "tiny_model" in request.fixturenames:
        shared["tiny_model"] = request.getfixturevalue("tiny_model")
    if "tiny_text_preset" in request.fixturenames:
        shared["tiny_text_preset"] = request.getfixturevalue("tiny_text_preset")[1]
    before = {name: _fingerprint(model) for name, model in shared.items()}
    yield
    for name, model in shared.items():
        assert _fingerprint(model) == before[name], (
            f"this test changed the shared {name} model: build a model of its own with helpers.tiny()"
        )
