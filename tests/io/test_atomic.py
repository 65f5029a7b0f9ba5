"""Staging folders: a killed writer's leftovers are removed by the next writer, a live one's never."""

import os
import subprocess
import sys

import keras
import pytest

from helpers import tiny
from keras_gemma2 import cli_startup
from keras_gemma2.checkpoints import presets
from keras_gemma2.io import atomic
from keras_gemma2.training import trainer

# Backend-agnostic: runs once, under conftest.AGNOSTIC_BACKEND (jax): staging folders and atomic writes
# are file-system operations.
pytestmark = pytest.mark.backend_agnostic


def _staging_left_by_a_killed_process(parent, prefix):
    """A staging folder whose process was killed before it could clean up."""
    script = (
        "import os, sys; from keras_gemma2.io import atomic; "
        "atomic.staging_directory(sys.argv[1], sys.argv[2]); os._exit(9)"
    )
    subprocess.run([sys.executable, "-c", script, str(parent), prefix], check=False,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    (left,) = [n for n in os.listdir(parent) if n.startswith(prefix)]
    return left


def test_the_next_staging_removes_a_killed_runs_folder(tmp_path):
    prefix = ".keras_gemma2-test-"
    dead = _staging_left_by_a_killed_process(tmp_path, prefix)
    (tmp_path / dead / "weights.bin").write_bytes(b"\0" * 1024)
    live = atomic.staging_directory(tmp_path, prefix)  # this process: alive
    other = tmp_path / ".other-tool-123-x"  # another prefix: never touched
    other.mkdir()
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(live), other.name])
    atomic.staging_directory(tmp_path, prefix)
    assert os.path.isdir(live)  # a running process's staging is kept


def test_staging_folders_get_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic.staging_directory(tmp_path, ".keras_gemma2-test-")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o755


def _hooks_then_listing(parent, listed):
    """A stand-in for a writer called mid-save: run the abrupt-exit hooks (what Ctrl-C / SIGTERM
    do before the command exits), note what `parent` then holds, and stop the save."""
    def stop_here(*args, **kwargs):
        cli_startup._run_abrupt_exit_hooks()
        listed.append(sorted(os.listdir(parent)))
        raise RuntimeError("stopped mid-save")

    return stop_here


def test_an_abrupt_exit_removes_the_staging_of_a_save_a_checkpoint_and_an_atomic_write(tmp_path, monkeypatch):
    """An interrupted or terminated command skips `finally` blocks: a preset's staging folder,
    a training checkpoint's `.step_N.partial` and an atomic write's temporary file were left."""
    listed = []
    monkeypatch.setattr(presets.safetensors_files, "write_sharded", _hooks_then_listing(tmp_path, listed))
    with pytest.raises(RuntimeError, match="stopped mid-save"):
        tiny().save_to_preset(str(tmp_path / "preset"))

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    model = tiny()
    model.compile(optimizer=keras.optimizers.SGD())
    model.optimizer.build(model.trainable_variables)
    monkeypatch.setattr(trainer.safetensors_files, "write_file", _hooks_then_listing(checkpoints, listed))
    with pytest.raises(RuntimeError, match="stopped mid-save"):
        trainer.save_checkpoint(model, str(checkpoints), 3, [])

    with pytest.raises(RuntimeError, match="stopped mid-save"):
        with atomic.atomic_write(tmp_path / "file.bin") as f:
            f.write(b"half")
            _hooks_then_listing(tmp_path, listed)()
    assert listed == [[], [], ["checkpoints"]]
