"""Atomic file writes: nothing half-written is ever left at the target path."""

import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Yield a temp file beside `path`; on success fsync and rename it into place.

    On any failure the temp file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp creates 0600: the usual permissions
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def current_umask():
    """The process umask, read without changing it where Linux allows (os.umask must set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def staging_directory(parent, prefix):
    """A new hidden directory in `parent` for files about to be renamed into place.

    Its name carries this process's id. A run killed before it could clean up
    (an export stages a full float copy of the weights: ~10 GB for the 2B)
    leaves one behind; the next call with the same prefix removes every one
    whose process no longer runs, so they never pile up. The directory gets
    the permissions os.makedirs would give: tempfile.mkdtemp makes it 0700,
    which would survive its rename into place and hide the result from other
    users and containers.
    """
    remove_stale_staging(parent, prefix)
    path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent)
    os.chmod(path, 0o777 & ~current_umask())
    return path


def remove_stale_staging(parent, prefix):
    """Delete `parent`'s staging directories (see staging_directory) of processes that are gone."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].split("-", 1)[0]
        if name.startswith(prefix) and pid.isdigit() and not _process_exists(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def _process_exists(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
