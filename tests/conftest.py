"""Shared test fixtures: where ../shared lives, and small helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

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
