"""Run many ``surgery`` command lines in one process and report each one's outcome.

Used by ``tests/test_bad_inputs.py``: starting one interpreter per case would cost most of the
test's time in imports. The parent starts this script with ``resource`` limits (address space,
CPU seconds, file size); each case also gets a wall-clock alarm here, and its peak resident memory
is measured on its own (``/proc/self/clear_refs`` resets the high-water mark between cases).

Input (stdin): JSON ``[{"id": ..., "argv": [...], "cwd": "..."}, ...]``.
Output: one JSON line per case on stdout, flushed as soon as the case ends, so a crash of the
whole process still tells which case caused it::

    {"id", "rc", "stderr", "stdout", "exc", "seconds", "peak_rss_mb"}

``exc`` is the traceback of anything other than ``SystemExit`` that escaped ``main`` (a bug).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback


class _Timeout(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Timeout()


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return -1.0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run_case(argv: list[str], cwd: str, seconds: float) -> dict:
    from surgery.cli import main

    old_cwd = os.getcwd()
    os.chdir(cwd)
    # Capture at the descriptor level too: C libraries write to fd 2 directly.
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        os.dup2(out_f.fileno(), 1)
        os.dup2(err_f.fileno(), 2)
        py_out, py_err = io.StringIO(), io.StringIO()
        sys.stdout, sys.stderr = py_out, py_err
        rc: int | None = None
        exc = None
        _reset_peak()
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                py_err.write(str(e.code) + "\n")
        except _Timeout:
            exc = f"timeout after {seconds} s"
        except BaseException:  # noqa: BLE001 - the point is to catch everything
            exc = traceback.format_exc()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            elapsed = time.perf_counter() - t0
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            os.chdir(old_cwd)
        peak = _peak_rss_mb()
        out_f.seek(0)
        err_f.seek(0)
        fd_out = out_f.read().decode("utf-8", "replace")
        fd_err = err_f.read().decode("utf-8", "replace")
    return {
        "rc": rc,
        "stdout": py_out.getvalue() + fd_out,
        "stderr": py_err.getvalue() + fd_err,
        "exc": exc,
        "seconds": round(elapsed, 3),
        "peak_rss_mb": round(peak, 1),
    }


def _tree(root: str) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def _clear(folder: str) -> list[str]:
    """Remove everything under ``folder``; return what was there."""
    left = []
    for n in sorted(os.listdir(folder)):
        p = os.path.join(folder, n)
        left.append(n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    return left


def main() -> None:
    """Read the cases from stdin and run them; see the module docstring.

    Each case may name ``empty`` folders (must be empty afterwards: outputs, temporaries; the
    leftovers are reported and removed) and ``frozen`` folders (must not change at all).
    """
    cases = json.load(sys.stdin)
    seconds = float(os.environ.get("SURGERY_CASE_SECONDS", "20"))
    signal.signal(signal.SIGALRM, _alarm)
    real_out = os.fdopen(os.dup(1), "w")
    for case in cases:
        frozen = {d: _tree(d) for d in case.get("frozen", [])}
        result = run_case(case["argv"], case.get("cwd", "."), seconds)
        result["id"] = case["id"]
        result["left"] = [f"{d}/{n}" for d in case.get("empty", []) for n in _clear(d)]
        result["changed"] = [d for d, before in frozen.items() if _tree(d) != before]
        real_out.write(json.dumps(result) + "\n")
        real_out.flush()


if __name__ == "__main__":
    main()
