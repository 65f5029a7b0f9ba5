"""What the `keras-gemma2` command sets up before keras (and TensorFlow or JAX) is imported.

The console script imports `keras_gemma2.cli`, which first runs the package's
`__init__`, which imports keras: several seconds during which Ctrl-C must
already exit cleanly and TensorFlow already prints its start-up logs. So the
package's `__init__` calls `prepare_if_command()` before anything else; it
does nothing unless this process is the command (`keras-gemma2 ...` or
`python -m keras_gemma2.cli ...`), so importing the library changes nothing.
Standard library only: this runs before the heavy imports.
"""

import atexit
import contextlib
import os
import re
import signal
import sys
import threading
import time

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command
EXIT_TERMINATED = 143  # 128 + SIGTERM
SHOW_BACKEND_LOGS = "--backend-logs"
# TensorFlow's C++ log threshold: 0 all, 1 no INFO, 2 no WARNING, 3 no ERROR either (this
# also hides "failed call to cuInit" on machines without a GPU). The user's value wins.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "3"}
# absl/glog-formatted C++ log lines: "I0000 00:00:1796160734.114103    8671 port.cc:153] ..."
# (before absl is initialized the time is seconds since 1970), "W0412 10:11:12.123456 ...".
_LOG_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ [^ \]]+:\d+\] ")
_ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}
# A Ctrl-C that arrives while the main thread is inside a long C++ call (an XLA
# compile) is handled by the watcher thread after this grace period.
_INTERRUPT_GRACE_S = 0.25

_prepared = False
_import_filter = None


def launched_as_command():
    """True when this process is `keras-gemma2 ...` or `python -m keras_gemma2.cli ...`."""
    if sys.argv and os.path.basename(sys.argv[0]).startswith("keras-gemma2"):
        return True  # the console script (keras-gemma2, keras-gemma2.exe, keras-gemma2-script.py)
    argv = list(getattr(sys, "orig_argv", ()))
    return "-m" in argv and argv[argv.index("-m") + 1 : argv.index("-m") + 2] == ["keras_gemma2.cli"]


def prepare_if_command():
    """`prepare()` when this process is the command; nothing when the library is imported."""
    if launched_as_command():
        prepare(sys.argv[1:])


def prepare(argv):
    """Own the process for the command (once): Ctrl-C exits 130; quiet backend start-up logs.

    Unless `--backend-logs` is in `argv`, the backends' log variables get quiet
    defaults (the user's own environment variables win), and the C++ log lines
    TensorFlow prints while it is imported, before it reads TF_CPP_MIN_LOG_LEVEL
    (oneDNN, cudart, the absl notice, each printed twice), are filtered out of
    stderr by the same threshold until `imports_done()`.
    """
    global _prepared, _import_filter
    if _prepared:
        return
    _prepared = True
    _install_interrupt_handler()
    if argv[:1] == ["export"]:
        # Export loads, traces and converts, computing nothing oneDNN speeds up; with it on,
        # TensorFlow's allocator pool keeps every freed buffer (the 2B: 2.4 GB more held).
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    if SHOW_BACKEND_LOGS in argv:
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    if level > 0:
        try:
            _import_filter = _StderrFilter(level)
        except (OSError, ValueError):  # no usable file descriptor 2: nothing to filter
            _import_filter = None


def imports_done():
    """Stop filtering stderr (the heavy imports are over): later output is never delayed."""
    global _import_filter
    if _import_filter is not None:
        _import_filter.stop()
        _import_filter = None


class _StderrFilter:
    """File descriptor 2 through a pipe; a thread forwards every line except C++ logs below `level`.

    Only for the imports (a handful of lines): the forwarding thread needs the
    GIL, so a C++ call that logged more than a pipe's buffer while holding it
    would block; `imports_done` restores the real stderr before any real work.
    """

    def __init__(self, level):
        self.level = level
        sys.stderr.flush()
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.thread = threading.Thread(target=self._forward, args=(read,), daemon=True,
                                       name="keras-gemma2-stderr-filter")
        self.thread.start()
        atexit.register(self.stop)  # an import that fails: its traceback still gets out

    def _forward(self, read):
        with os.fdopen(read, "rb") as pipe:
            for line in pipe:
                if not self._hidden(line):
                    os.write(self.saved, line)

    def _hidden(self, line):
        if line.rstrip(b"\r\n") == _ABSL_NOTICE:
            return True
        match = _LOG_LINE.match(line)
        return bool(match) and _SEVERITY[match.group(1)] < self.level

    def stop(self):
        if self.saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(self.saved, 2)  # the pipe's last writer closes: the thread drains it and ends
        self.thread.join(timeout=5)
        os.close(self.saved)
        self.saved = None


def real_stderr_fd():
    """The terminal's stderr, also while the import filter holds file descriptor 2."""
    return _import_filter.saved if _import_filter is not None and _import_filter.saved else 2


def _install_interrupt_handler():
    """Ctrl-C ends the command at once with exit status 130: no traceback, no crash.

    Why not Python's KeyboardInterrupt: raised in whatever Python code runs
    next, it unwinds through JAX's and TensorFlow's tracing and compiling (a
    long traceback), was swallowed by JAX's garbage-collection callback (the
    command then ran on and exited 0), and an interpreter shutting down while
    XLA's compile threads still run segfaults. So the handler flushes what was
    printed and calls os._exit(130): no unwinding and no interpreter shutdown.
    Python runs a signal handler only between bytecodes of the main thread,
    which can sit in one C++ call (an XLA compile) for a long time; the
    C-level handler also writes to a wakeup pipe, and a watcher thread exits
    after a short grace period if the main thread has not by then.
    SIGTERM exits the same way with 143. Before exiting, the abrupt-exit hooks
    stop child processes and remove the staging folders and temporary files
    being written (io.atomic): the library writes every file atomically (a
    temporary file renamed into place), so nothing half-written is left.
    """
    try:
        signal.signal(signal.SIGINT, _on_interrupt)
        signal.signal(signal.SIGTERM, _on_terminate)
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    except (ValueError, OSError):  # not the main thread, or no signals here: keep the default
        return
    threading.Thread(target=_watch_interrupts, args=(read,), daemon=True,
                     name="keras-gemma2-interrupt").start()


_deferred = {"active": False, "count": 0, "notice": ""}


@contextlib.contextmanager
def defer_interrupts(notice):
    """Within: the first Ctrl-C only makes `stop_requested()` true (and prints `notice`);
    a second one exits at once.

    Training uses it to finish the running step and save what was trained,
    rather than losing every step since the last checkpoint.
    """
    _deferred.update(active=True, count=0, notice=notice)
    try:
        yield
    finally:
        _deferred.update(active=False, count=0)


def stop_requested():
    """Whether a Ctrl-C asked the current defer_interrupts() block to stop."""
    return _deferred["active"] and _deferred["count"] > 0


def _on_interrupt(signum, frame):
    if not _deferred["active"]:  # inside defer_interrupts the watcher thread decides
        exit_interrupted(flush=True)


def _watch_interrupts(read):
    while True:
        data = os.read(read, 64)
        if not data:
            return
        if signal.SIGTERM in data:  # the main thread's handler exits first when it can
            time.sleep(_INTERRUPT_GRACE_S)
            exit_interrupted(flush=False, status=EXIT_TERMINATED)
        for _ in range(data.count(signal.SIGINT)):
            if _deferred["active"]:
                _deferred["count"] += 1
                if _deferred["count"] == 1:
                    _write_stderr(f"\n{_deferred['notice']}\n")
                    continue
                exit_interrupted(flush=False)
            time.sleep(_INTERRUPT_GRACE_S)  # the main thread's handler exits first when it can
            exit_interrupted(flush=False)  # the main thread may hold stdout's lock: no flush


def _write_stderr(text):
    try:
        os.write(real_stderr_fd(), text.encode())
    except OSError:
        pass


# Run, newest first, when the command is interrupted or terminated (it then exits at once,
# skipping `finally` blocks): stop child processes, remove half-written files (io.atomic).
_abrupt_exit_hooks = []
_final_hooks = []  # always_on_abrupt_exit's: after the others (children stopped first)
# Taken by the first thread that exits (the main thread's handler or the watcher), never
# given back: the other waits there for os._exit rather than run the hooks a second time.
_exiting = threading.Lock()


@contextlib.contextmanager
def on_abrupt_exit(hook):
    """Within: `hook()` runs if Ctrl-C or SIGTERM ends the command."""
    _abrupt_exit_hooks.append(hook)
    try:
        yield
    finally:
        _abrupt_exit_hooks.remove(hook)


def always_on_abrupt_exit(hook):
    """`hook()` runs, after on_abrupt_exit's, whenever Ctrl-C or SIGTERM ends the command."""
    _final_hooks.append(hook)


def _run_abrupt_exit_hooks():
    for hook in list(reversed(_abrupt_exit_hooks)) + _final_hooks:
        try:
            hook()
        except Exception:  # noqa: BLE001 - the exit goes ahead whatever a hook does
            pass


def _on_terminate(signum, frame):
    exit_interrupted(flush=True, status=EXIT_TERMINATED)


def exit_interrupted(flush, status=EXIT_INTERRUPTED):
    """Exit 130 (SIGTERM: 143) now, once the abrupt-exit hooks ran, starting the shell's prompt
    on a new line (imports nothing: the main thread may hold the import lock)."""
    _exiting.acquire()
    _run_abrupt_exit_hooks()
    if flush:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe, or the signal came inside a write
                pass
    try:
        fd = real_stderr_fd()
        if os.isatty(fd):
            os.write(fd, b"\n")
    except OSError:
        pass
    os._exit(status)
