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
   longer running. A commit of more than one rename first writes a journal
   (``.surgery-commit.surgery-tmp-PID-RANDOM``, with a pointer to it in each other folder of
   the set); a SIGKILL among the renames leaves it behind, and the next run in any of those
   folders finishes the renames (roll forward) before it removes temporaries, so even then
   the set ends up all new. A target written by someone else after the kill is left alone.
5. Transactions nest: an ``outputs()`` block (or a helper that opens one, such as
   :func:`surgery.caffe_io.save`) inside another joins the outer one, and only the outermost
   commits. So a verb wraps all its writes in one ``with _atomic.outputs():`` and every
   writer called inside becomes part of one set. Do not read a target back inside the block
   (it is written at the commit); use :func:`standalone` around code that must write and read
   its own scratch files (e.g. a temporary folder).
6. A folder output replaces an existing target only when the caller says so
   (``replace=True``): the old folder is renamed aside, the new one into place (both in the
   journal), and the old one removed after.
7. Files get the mode of the file they replace, else ``0666 & ~umask`` (as ``open()``).
   Temporaries are flushed to disk (fsync) before the renames, and the folders after them, so
   a power cut also leaves each target old or complete.
8. Two outputs naming one path, a target that is an existing folder (for a file) or a
   missing parent folder are refused before anything is written.

Errors are :class:`~surgery.errors.SurgeryError` naming the path ("PATH: cannot write: ...").
"""

from __future__ import annotations

import contextlib
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
    def stale(name: str) -> bool:
        m = _TEMP_RE.match(name)
        return m is not None and m.group(2) == _HOST and not _pid_alive(int(m.group(1)))

    journals = [e for e in entries if e.name.startswith(f".{_JOURNAL}{TEMP_MARK}")]
    if any(stale(e.name) for e in journals):  # first finish the commits they record
        for entry in journals:
            if stale(entry.name):
                _roll_forward(entry.path)
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return removed
    for entry in entries:
        if not stale(entry.name):
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
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        plan: list[_Step] = []
        for target in self._removals:
            if target not in self._items and os.path.lexists(target):
                plan.append(_Step("remove", None, target, self._new_name(*os.path.split(target))))
        for target, (tmp, folder, _) in self._items.items():
            existed = os.path.lexists(target)
            backup = self._new_name(*os.path.split(target)) if existed else None
            plan.append(_Step("folder" if folder else "file", tmp, target, backup, existed))
        if len(plan) == 1 and plan[0].kind == "file":
            plan[0].backup = None  # one os.replace: atomic by itself, nothing to roll back
        masked = _block_signals()
        journals: list[str] = []
        try:
            if len(plan) > 1 or any(st.kind == "folder" and st.existed for st in plan):
                try:
                    journals = self._write_journals(plan)
                except OSError as exc:
                    raise _cannot(plan[0].target, exc) from None
            done: list[_Step] = []
            for st in plan:
                try:
                    st.apply()
                except OSError as exc:
                    _rollback(done)
                    for j in journals:
                        _remove(j)
                    raise _cannot(st.target, exc) from None
                done.append(st)
            for parent in {os.path.dirname(st.target) for st in plan}:
                _sync(parent)  # the renames themselves
            for st in plan:
                if st.backup is not None:
                    _remove(st.backup)
            for j in reversed(journals):  # the pointers, then the main journal
                _remove(j)
            self.committed = True
            self._items.clear()
            self._removals.clear()
        finally:
            _unblock_signals(masked)

    def _write_journals(self, plan: list[_Step]) -> list[str]:
        """Record the renames before doing any (rule 4): a SIGKILL among them is finished by
        the next run. Pointers in the other folders first, the main journal last: its
        appearance is the commit point. Returns ``[main, *pointers]``."""
        folders = list(dict.fromkeys(os.path.dirname(st.target) for st in plan))
        main = self._new_name(folders[0], _JOURNAL)
        pointers = [self._new_name(f, _JOURNAL) for f in folders[1:]]
        try:
            for ptr in pointers:
                _write_json(ptr, {"main": main})
            _write_json(main, {"pointers": pointers, "plan": [st.as_list() for st in plan]})
        except OSError:
            for j in (main, *pointers):
                _remove(j)
            raise
        return [main, *pointers]


_JOURNAL = "surgery-commit"


class _Step:
    """One rename of a commit: ``kind`` is file, folder or remove."""

    def __init__(self, kind: str, tmp: str | None, target: str, backup: str | None,
                 existed: bool = True) -> None:
        self.kind, self.tmp, self.target, self.backup = kind, tmp, target, backup
        self.existed = existed

    def as_list(self) -> list[object]:
        return [self.kind, self.tmp, self.target, self.backup, self.existed]

    def apply(self) -> None:
        if self.kind == "remove":
            os.rename(self.target, self.backup)  # type: ignore[arg-type]
        elif self.kind == "folder":
            assert self.tmp is not None
            if self.backup is not None and os.path.lexists(self.target):
                os.rename(self.target, self.backup)
                try:
                    os.rename(self.tmp, self.target)
                except OSError:
                    os.rename(self.backup, self.target)
                    raise
            else:
                os.rename(self.tmp, self.target)
        else:
            assert self.tmp is not None
            if self.backup is not None:
                try:
                    os.link(self.target, self.backup, follow_symlinks=False)
                except OSError:
                    self.backup = None  # no hard links here: this file cannot be rolled back
            try:
                os.replace(self.tmp, self.target)
            except OSError:
                if self.backup is not None:
                    _remove(self.backup)
                raise

    def undo(self) -> None:
        if self.kind == "remove":
            os.rename(self.backup, self.target)  # type: ignore[arg-type]
        elif self.kind == "folder":
            assert self.tmp is not None
            os.rename(self.target, self.tmp)
            if self.backup is not None:
                os.rename(self.backup, self.target)
        elif self.backup is not None:
            os.replace(self.backup, self.target)
        elif not self.existed:
            _remove(self.target)
        # else: the old file had no backup (no hard links): keep the new one rather than none

    def redo(self, since: float) -> None:
        """Finish this step after a SIGKILL (roll forward), unless the target changed since."""
        if self.kind == "remove":
            if os.path.lexists(self.target) and not _newer(self.target, since):
                _remove(self.target)
            return
        assert self.tmp is not None
        if not os.path.lexists(self.tmp):
            return  # done before the kill
        if os.path.lexists(self.target) and _newer(self.target, since):
            _remove(self.tmp)  # someone wrote the target after the kill: theirs wins
            return
        if self.kind == "file":
            os.replace(self.tmp, self.target)
            return
        if os.path.lexists(self.target):  # the old folder, not yet moved aside
            if self.backup is None:
                _remove(self.tmp)
                return
            os.rename(self.target, self.backup)
        os.rename(self.tmp, self.target)


def _newer(path: str, since: float) -> bool:
    try:
        return os.lstat(path).st_mtime > since
    except OSError:
        return False


def _rollback(done: list[_Step]) -> None:
    for st in reversed(done):
        try:
            st.undo()
        except OSError:
            pass


def _write_json(path: str, data: object) -> None:
    """Write a small JSON file complete or not at all (via a temporary), flushed to disk."""
    import json

    part = Outputs._new_name(os.path.dirname(path), _JOURNAL + "-part")
    try:
        with open(part, "w", encoding="utf-8") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(part, path)
    except OSError:
        _remove(part)
        raise
    _sync(os.path.dirname(path))


def _roll_forward(journal: str) -> None:
    """Finish the commit a killed process recorded in ``journal`` (or a pointer to it)."""
    import json

    try:
        with open(journal, encoding="utf-8") as f:
            data = json.load(f)
        main = data.get("main", journal)
        if main != journal:
            if not os.path.exists(main):  # killed before the commit point: nothing renamed
                _remove(journal)
                return
            with open(main, encoding="utf-8") as f:
                data = json.load(f)
        since = os.lstat(main).st_mtime
        plan = [_Step(*st) for st in data["plan"]]
        pointers = [str(p) for p in data["pointers"]]
    except (OSError, ValueError, TypeError, KeyError):
        _remove(journal)
        return
    for st in plan:
        try:
            st.redo(since)
        except OSError:
            pass
    for st in plan:
        if st.backup is not None:
            _remove(st.backup)
    for ptr in pointers:
        _remove(ptr)
    _remove(main)


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
