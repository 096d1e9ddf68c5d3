"""Shared test fixtures: where ../shared lives, and small helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ZOO = SHARED / "zoo"
GOLDEN = SHARED / "golden"
MODELS = ROOT / "models"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"{SHARED} is missing: the tests need ../shared beside the project")
    return SHARED


def needs(*modules: str) -> pytest.MarkDecorator:
    """Skip a test where an optional module is missing (the minimum-version CI run installs the
    core only: protobuf and numpy, no torch/onnx/lmdb); with the extras installed it runs."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)} (an extra of caffe-surgery)")


#: Modules of caffe-surgery's extras. Where one is missing (the minimum-version CI run installs
#: only protobuf and numpy), a test failing *because of it* -- ModuleNotFoundError naming it, or
#: a subprocess that printed that error or our one-line "pip install 'caffe-surgery[...]'" -- is
#: reported as skipped with that reason (tests that need an extra need not all be marked). With
#: every extra installed (the main CI run) nothing is missing and this changes nothing.
OPTIONAL_MODULES = ("torch", "onnx", "onnxruntime", "cv2", "lmdb", "h5py", "safetensors", "plyvel")
MISSING_MODULES = frozenset(m for m in OPTIONAL_MODULES if importlib.util.find_spec(m) is None)


def _missing_module_in(text: str) -> str | None:
    for m in sorted(MISSING_MODULES):
        if (f"No module named '{m}'" in text or f"this command needs {m}," in text
                or f"{m} is not installed" in text):
            return m
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    outcome = yield
    rep = outcome.get_result()
    if not MISSING_MODULES or not rep.failed or call.excinfo is None:
        return
    exc = call.excinfo.value
    name = None
    if isinstance(exc, ModuleNotFoundError):
        root = (exc.name or "").partition(".")[0]
        name = root if root in MISSING_MODULES else None
    elif isinstance(exc, AssertionError):
        name = _missing_module_in(str(exc))
    if name is not None:
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0,
                        f"Skipped: needs {name} (an extra of caffe-surgery), not installed")


def import_generated(path: Path, name: str) -> ModuleType:
    """Import a generated ``model.py`` from ``path`` without leaving it in ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(name, None)
    return mod


@pytest.fixture
def one_torch_thread():
    """Run a test with one intra-op torch thread (restored after): the training tests run many
    tiny ops, which several spinning OpenMP threads slow down ~7x on a busy 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
