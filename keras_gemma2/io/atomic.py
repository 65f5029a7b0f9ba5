"""Atomic file writes: nothing half-written is ever left at the target path."""

import contextlib
import os
import shutil
import tempfile

from keras_gemma2 import cli_startup

# Staging folders and temporary files this process is writing: removed if the command is
# interrupted or terminated (its abrupt exit skips `finally` blocks), else by their writer.
_unfinished = set()


def _remove_unfinished():
    for path in list(_unfinished):
        remove_staging(path)


cli_startup.always_on_abrupt_exit(_remove_unfinished)


def remove_staging(path):
    """Delete a staging folder or temporary file (if still there) and forget it."""
    path = os.path.abspath(path)
    for _ in range(3):  # a writer still running in another thread may add a file meanwhile
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            with contextlib.suppress(OSError):
                os.remove(path)
        if not os.path.lexists(path):
            break
    _unfinished.discard(path)


def track_staging(path):
    """`path` (a folder or file about to be written, then renamed or removed) is removed if the
    command is interrupted or terminated first; remove_staging or forget_staging ends that."""
    _unfinished.add(os.path.abspath(path))
    return path


def forget_staging(path):
    """`path` was renamed into place (or removed): nothing to clean up there any more."""
    _unfinished.discard(os.path.abspath(path))


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Yield a temp file beside `path`; on success fsync and rename it into place.

    On any failure the temp file is removed and `path` is untouched.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    track_staging(temporary)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())  # mkstemp creates 0600: the usual permissions
        os.replace(temporary, path)
    finally:
        remove_staging(temporary)


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
    path = track_staging(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))
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


def probe_write(directory):
    """Create and remove a file in `directory`; the OSError if that fails.

    Permission bits say nothing for root, nor for read-only mounts or full
    disks: only a real write does.
    """
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".keras_gemma2-write-test-")
    os.close(fd)
    os.remove(probe)


def check_writable_directory(path, what):
    """Fail now, not after training, if `path` cannot be (created as) a directory we write in.

    Writability is probed by creating and removing a file (permission bits
    say nothing for root, nor for read-only mounts or full disks); nothing
    is created when the directory does not exist yet: its nearest existing
    ancestor is probed instead.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} is a file, not a folder (pass a folder path).")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(
            f"{what} {path} cannot be created: {existing} is a file, not a folder "
            "(choose a path under a folder)."
        )
    try:
        probe_write(existing)
    except OSError as error:
        raise ValueError(
            f"{what} {path} is not writable: cannot create files in {existing} "
            f"({error.strerror or error}; choose a writable location)."
        ) from error
    return path


def check_writable_file(path, what):
    """Fail now if the file `path` cannot be written later (its folder probed as above)."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{what} {path} is a folder (pass a file path).")
    parent = os.path.dirname(path)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(
            f"{what} {path} cannot be written: {parent} is a file, not a folder "
            "(choose a path under a folder)."
        )
    check_writable_directory(parent, f"{what}'s folder")
    return path
