"""Shared tiny configs and fixtures for the whole suite."""


import numpy as np
import pytest

from helpers import TINY


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
    """(path, model): the tiny config with random weights and the tiny tokenizer, saved as a preset."""
    from helpers import randomize_weights
    from keras_gemma2 import Gemma2Backbone, Gemma2CausalLM, Gemma2Tokenizer

    model = randomize_weights(
        Gemma2CausalLM(Gemma2Backbone(TINY), tokenizer=Gemma2Tokenizer(sentencepiece_path))
    )
    path = str(tmp_path_factory.mktemp("tiny_text_preset") / "preset")
    model.save_to_preset(path)
    return path, model
