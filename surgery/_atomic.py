"""Write a set of output files (and folders) atomically: all of them or none.

Every verb that writes files goes through this module, so a failure, a Ctrl-C or a ``kill``
never leaves a half-written file at a path the user named, nor one new file beside an old one.

How to use it (the whole API)::

    from surgery import _atomic

    with _atomic.outputs() as out:           # one transaction
        out.write_text("net.prototxt", text)  # or write_bytes(target, data)
        tmp = out.file("w.caffemodel")        # a temporary path beside the target: fill it
        with open(tmp, "wb") as f:            #   with any writer (np.save, onnx.save ...)
            f.write(blob)
        d = out.folder("model_dir")           # a temporary folder beside the target: fill it
        (d / "model.py").write_text(src)
        out.remove("old_companion.data")      # removed at the commit, with the renames
    # leaving the block without an exception renames every temporary onto its target

Rules:

1. Each output is written to a temporary beside its target, named
   ``.NAME.surgery-tmp-PID-RANDOM`` (same folder, so the final rename is atomic and never
   copies). Nothing exists at the target path until the commit.
2. The commit happens when the outermost ``with`` block ends without an exception: every
   temporary is renamed onto its target, with SIGINT and SIGTERM blocked for those few
   renames. A rename that fails puts the targets renamed before it back as they were.
3. On an exception (any, ``KeyboardInterrupt`` included) every temporary is removed and no
   target is touched. While a transaction is open in the main thread and SIGTERM has Python's
   default action, SIGTERM raises :class:`Terminated` (a ``SystemExit`` with code 143), so it
   cleans up exactly as Ctrl-C does (which exits 130 in the CLI).
4. A SIGKILL cannot be caught: it can leave only temporaries with the recognisable name above.
   Each transaction, when it starts, removes the stale temporaries in its targets' folders:
   those made on this host (RANDOM starts with a hash of the host name) whose process is no
   longer running. (A SIGKILL in the microseconds of the
   commit's renames can leave some targets new and the others old, never a partial file.)
5. Transactions nest: an ``outputs()`` block (or a helper that opens one, such as
   :func:`surgery.caffe_io.save`) inside another joins the outer one, and only the outermost
   commits. So a verb wraps all its writes in one ``with _atomic.outputs():`` and every
   writer called inside becomes part of one set. Do not read a target back inside the block
   (it is written at the commit); use :func:`standalone` around code that must write and read
   its own scratch files (e.g. a temporary folder).
6. A folder output replaces an existing target only when the caller says so
   (``replace=True``); the swap is one ``renameat2(RENAME_EXCHANGE)`` on Linux (else two
   renames), and the old folder is removed after the swap.
7. Files get the mode of the file they replace, else ``0666 & ~umask`` (as ``open()``).
   Temporaries are flushed to disk (fsync) before the renames, and the folders after them, so
   a power cut also leaves each target old or complete.
8. Two outputs naming one path, a target that is an existing folder (for a file) or a
   missing parent folder are refused before anything is written.

Errors are :class:`~surgery.errors.SurgeryError` naming the path ("PATH: cannot write: ...").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import SurgeryError

__all__ = [
    "Outputs",
    "Terminated",
    "outputs",
    "standalone",
    "write_text",
    "write_bytes",
    "clean_stale",
    "is_temporary",
    "TEMP_MARK",
    "current",
    "sigterm_as_exit",
]

PathLike = str | os.PathLike[str]

#: The part of every temporary's name that marks it as ours.
TEMP_MARK = ".surgery-tmp-"
_TEMP_RE = re.compile(r"^\..*\.surgery-tmp-(\d+)-([0-9a-f]{4})[0-9a-f]{4}$", re.DOTALL)
# The first 4 hex digits of RANDOM name the host: a folder shared over the network may hold
# another machine's temporaries, whose PIDs mean nothing here; those are never removed.
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:4]
_NAME_MAX = 200  # leave room for the suffix within the usual 255-byte name limit


class Terminated(SystemExit):
    """SIGTERM received: raised in the main thread so that ``finally`` blocks run (exit 143)."""

    def __init__(self) -> None:
        super().__init__(143)


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def is_temporary(name: str) -> bool:
    """Whether a file name is one of our temporaries (``.NAME.surgery-tmp-PID-RANDOM``)."""
    return _TEMP_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True
    return True


def clean_stale(folder: PathLike) -> list[str]:
    """Remove the temporaries in ``folder`` left by processes that no longer run.

    Returns:
        The names removed (errors are ignored: cleaning is best effort).
    """
    removed: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or m.group(2) != _HOST or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except OSError:
            pass
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False when not supported here."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), b)


def _remove(path: str) -> None:
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _sync(path: str) -> None:
    """fsync a file or a folder (best effort: some file systems refuse it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _sync(os.path.join(root, name))
        _sync(root)


def _cannot(path: PathLike, exc: OSError | str) -> SurgeryError:
    why = exc if isinstance(exc, str) else (exc.strerror or str(exc))
    return SurgeryError(f"{os.fspath(path)}: cannot write: {why}")


class Outputs:
    """One set of outputs written all together or not at all; see the module docstring."""

    def __init__(self) -> None:
        # target (absolute) -> (temporary, is_folder, replace)
        self._items: dict[str, tuple[str, bool, bool]] = {}
        self._scratch: list[str] = []
        self._removals: list[str] = []
        self._cleaned: set[str] = set()
        self.committed = False

    # -- reserving temporaries ---------------------------------------------------------------
    def _reserve(self, target: PathLike, folder: bool, replace: bool) -> Path:
        path = os.path.abspath(os.fspath(target))
        if path in self._items:
            raise SurgeryError(f"{os.fspath(target)}: named twice as an output; give two "
                               "different paths")
        parent, name = os.path.split(path)
        if not name:
            raise _cannot(target, "not a file name")
        if not os.path.isdir(parent):
            raise _cannot(target, f"folder {parent} does not exist")
        if not folder and os.path.isdir(path):
            raise _cannot(target, "it is a folder")
        if folder and os.path.exists(path) and not os.path.isdir(path):
            raise _cannot(target, "it exists and is not a folder")
        if folder and os.path.isdir(path) and not replace:
            raise _cannot(target, "the folder exists")
        if parent not in self._cleaned:
            self._cleaned.add(parent)
            clean_stale(parent)
        tmp = self._new_name(parent, name)
        self._items[path] = (tmp, folder, replace)  # first: a signal below still removes it
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                mode = 0o666 & ~_umask()
                try:
                    st = os.stat(path)
                    if stat.S_ISREG(st.st_mode):
                        mode = stat.S_IMODE(st.st_mode)
                except OSError:
                    pass
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.fchmod(fd, mode)
                finally:
                    os.close(fd)
        except OSError as exc:
            del self._items[path]
            raise _cannot(target, exc) from None
        return Path(tmp)

    @staticmethod
    def _new_name(parent: str, name: str) -> str:
        short = name[:_NAME_MAX]
        while True:  # 4 random hex digits: draw again on the rare clash
            tmp = os.path.join(parent, f".{short}{TEMP_MARK}{os.getpid()}-{_HOST}"
                                       f"{secrets.token_hex(2)}")
            if not os.path.lexists(tmp):
                return tmp

    def file(self, target: PathLike) -> Path:
        """Reserve a temporary file for ``target`` and return its path (an empty file).

        Write it with any writer; it is renamed onto ``target`` at the commit.

        Raises:
            SurgeryError: ``target`` is already an output of this set, is a folder, or its
                folder does not exist or is not writable.
        """
        return self._reserve(target, folder=False, replace=True)

    def folder(self, target: PathLike, *, replace: bool = False) -> Path:
        """Reserve a temporary folder for ``target`` and return its path (an empty folder).

        Args:
            target: the folder to create.
            replace: replace an existing ``target`` folder as a whole at the commit (the
                caller has checked that it may: e.g. it is a previous output of ours).

        Raises:
            SurgeryError: ``target`` exists and ``replace`` is false, or it is not a folder.
        """
        return self._reserve(target, folder=True, replace=replace)

    def remove(self, target: PathLike) -> None:
        """Remove the file ``target`` at the commit, as part of the set (an obsolete companion
        of a replaced output, such as the ONNX ``.data`` file the old model used).

        Raises:
            SurgeryError: ``target`` is also an output of this set, or is a folder.
        """
        path = os.path.abspath(os.fspath(target))
        if path in self._items:
            raise SurgeryError(f"{os.fspath(target)}: both written and removed")
        if os.path.isdir(path) and not os.path.islink(path):
            raise _cannot(target, "it is a folder")
        if path not in self._removals:
            self._removals.append(path)

    def scratch(self, beside: PathLike) -> Path:
        """A temporary folder beside ``beside``, removed when the transaction ends either way.

        For writers that must put several files in one folder before they are moved into
        place (e.g. ONNX external data); move them onto :meth:`file` temporaries.
        """
        parent = os.path.dirname(os.path.abspath(os.fspath(beside)))
        tmp = self._new_name(parent, os.path.basename(os.fspath(beside)) or "out")
        self._scratch.append(tmp)
        try:
            os.mkdir(tmp, 0o700)
        except OSError as exc:
            self._scratch.remove(tmp)
            raise _cannot(beside, exc) from None
        return Path(tmp)

    def write_bytes(self, target: PathLike, data: bytes) -> None:
        """Write ``data`` as ``target`` (at the commit)."""
        tmp = self.file(target)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as exc:
            raise _cannot(target, exc) from None

    def write_text(self, target: PathLike, text: str) -> None:
        """Write ``text`` (UTF-8) as ``target`` (at the commit)."""
        self.write_bytes(target, text.encode("utf-8"))

    @property
    def targets(self) -> list[str]:
        """The absolute target paths of this set, in the order they were added."""
        return list(self._items)

    # -- ending ------------------------------------------------------------------------------
    def abort(self) -> None:
        """Remove every temporary; no target is touched."""
        masked = _block_signals()  # a second Ctrl-C must not interrupt the cleanup
        try:
            for tmp, _, _ in self._items.values():
                _remove(tmp)
            for tmp in self._scratch:
                _remove(tmp)
            self._items.clear()
            self._scratch.clear()
            self._removals.clear()
        finally:
            _unblock_signals(masked)

    def commit(self) -> None:
        """Rename every temporary onto its target (all or none).

        Raises:
            SurgeryError: a rename failed; the targets are as they were before.
        """
        for tmp in self._scratch:
            _remove(tmp)
        self._scratch.clear()
        # On disk before the renames: after a power cut a target is old or new, never empty.
        for tmp, folder, _ in self._items.values():
            if folder:
                _sync_tree(tmp)
            else:
                _sync(tmp)
        masked = _block_signals()
        done: list[tuple[str, str | None, str]] = []  # (target, backup of the old one, tmp)
        try:
            for target in self._removals:
                if target in self._items or not os.path.lexists(target):
                    continue
                backup = self._new_name(*os.path.split(target))
                try:
                    os.rename(target, backup)
                except OSError as exc:
                    self._rollback(done)
                    raise _cannot(target, exc) from None
                done.append((target, backup, backup))
            for target, (tmp, folder, _) in self._items.items():
                try:
                    done.append(self._install(target, tmp, folder))
                except OSError as exc:
                    self._rollback(done)
                    raise _cannot(target, exc) from None
            for parent in {os.path.dirname(t) for t, _, _ in done}:
                _sync(parent)  # the renames themselves
            for _, backup, _ in done:
                if backup is not None:
                    _remove(backup)
            self.committed = True
            self._items.clear()
            self._removals.clear()
        finally:
            _unblock_signals(masked)

    def _install(self, target: str, tmp: str, folder: bool) -> tuple[str, str | None, str]:
        parent, name = os.path.split(target)
        backup: str | None = None
        if folder:
            if os.path.isdir(target):
                if _exchange(tmp, target):
                    return target, tmp, tmp  # tmp now holds the old folder
                backup = self._new_name(parent, name)
                os.rename(target, backup)
                try:
                    os.rename(tmp, target)
                except OSError:
                    os.rename(backup, target)
                    raise
                return target, backup, tmp
            os.rename(tmp, target)
            return target, None, tmp
        if os.path.lexists(target):
            backup = self._new_name(parent, name)
            try:
                os.link(target, backup, follow_symlinks=False)
            except OSError:
                backup = None  # no hard links here: this file cannot be rolled back
        try:
            os.replace(tmp, target)
        except OSError:
            if backup is not None:
                _remove(backup)
            raise
        return target, backup, tmp

    @staticmethod
    def _rollback(done: list[tuple[str, str | None, str]]) -> None:
        for target, backup, tmp in reversed(done):
            try:
                if backup is None:
                    _remove(target)
                elif os.path.isdir(backup) and not os.path.islink(backup):
                    if not _exchange(backup, target):
                        os.rename(target, tmp)
                        os.rename(backup, target)
                    _remove(backup)
                else:
                    os.replace(backup, target)
            except OSError:
                pass


# -- the current transaction (per thread) ------------------------------------------------------
_local = threading.local()


def _stack() -> list[Outputs | None]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack  # type: ignore[no-any-return]


def current() -> Outputs | None:
    """The transaction open in this thread, if any."""
    stack = _stack()
    return stack[-1] if stack else None


@contextlib.contextmanager
def outputs() -> Iterator[Outputs]:
    """Open a transaction (or join the one already open in this thread); see the module doc.

    Raises:
        SurgeryError: from the writes or the commit; every temporary is removed.
    """
    outer = current()
    if outer is not None:
        yield outer
        return
    tx = Outputs()
    stack = _stack()
    stack.append(tx)
    installed = _install_sigterm()
    try:
        try:
            yield tx
        except BaseException:
            tx.abort()
            raise
        try:
            tx.commit()
        except BaseException:
            tx.abort()
            raise
    finally:
        stack.pop()
        if installed is not None:
            signal.signal(signal.SIGTERM, installed)  # type: ignore[arg-type]


@contextlib.contextmanager
def standalone() -> Iterator[None]:
    """Suspend the current transaction: writes inside happen at once (their own sets)."""
    stack = _stack()
    stack.append(None)
    try:
        yield
    finally:
        stack.pop()


def write_text(path: PathLike, text: str) -> None:
    """Write one text file atomically (joins the current transaction, if any)."""
    with outputs() as out:
        out.write_text(path, text)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write one binary file atomically (joins the current transaction, if any)."""
    with outputs() as out:
        out.write_bytes(path, data)


# -- signals -----------------------------------------------------------------------------------
def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _install_sigterm() -> object | None:
    """Make SIGTERM raise :class:`Terminated` while a transaction is open (main thread only)."""
    if not _main_thread():
        return None
    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous is not signal.SIG_DFL:
            return None
        signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):
        return None
    return previous


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """For programs (the CLI): inside, SIGTERM raises :class:`Terminated` (cleanup, exit 143).

    Only in the main thread and when SIGTERM has its default action; restored on exit.
    """
    previous = _install_sigterm()
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)  # type: ignore[arg-type]


_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _block_signals() -> set[signal.Signals] | None:
    try:
        return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    except (AttributeError, OSError, ValueError):
        return None


def _unblock_signals(previous: set[signal.Signals] | None) -> None:
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
