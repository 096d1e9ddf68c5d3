"""The README's commands cannot drift: CI runs the README's test command, and the main job's
surgery commands run here (onnx-graphsurgeon runs its README examples as tests)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from surgery.cli import main

from .conftest import needs

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_cmd = next(b.strip() for b in _bash_blocks() if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), "the README's test command and .ci/run differ"


def test_readme_main_job_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    main_cmd = next(b.strip() for b in _bash_blocks() if "surgery " in b and "pytest" not in b)
    monkeypatch.chdir(ROOT)
    verbs = [c.strip() for c in main_cmd.split("&&") if c.strip().startswith("surgery ")]
    assert verbs, "the README's main job runs no surgery verb"
    for cmd in verbs:
        argv = [a.replace("/tmp/", f"{tmp_path}/") for a in shlex.split(cmd)[1:]]
        assert main(argv) == 0, cmd


def test_readme_python_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's Python API example, on GoogLeNet's train_val with the golden weights."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    shared = ROOT.parent / "shared"
    train_val = shared / "zoo/bvlc_googlenet/train_val.prototxt"
    weights = shared / "golden/googlenet/weights.caffemodel"
    code = code.replace('"train_val.prototxt"', repr(str(train_val)))
    code = code.replace('"pretrained.caffemodel"', repr(str(weights)))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    import surgery

    out = surgery.load(tmp_path / "ft.prototxt", tmp_path / "ft.caffemodel")
    heads = [lay for lay in out.layers if lay.name.endswith("classifier_ft")]
    assert len(heads) == 3 and all(h.params[0].data.shape == (7, 1024) for h in heads)
    assert out.layer("conv1/7x7_s2").params[0].lr_mult == 0


def _walkthroughs() -> list[tuple[str, str, str]]:
    """``(name, language, code)`` of every README block whose first line is
    ``# walkthrough: NAME``."""
    text = (ROOT / "README.md").read_text()
    out = []
    for lang, code in re.findall(r"```(bash|python)\n(.*?)```", text, flags=re.S):
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        m = re.match(r"#\s*walkthrough:\s*(\S+)", first)
        if m:
            out.append((m.group(1), lang, code))
    return out


#: The optional modules a walkthrough needs (skipped where one is missing: the minimum-version
#: CI run has the core only); every other walkthrough runs on the core.
WALKTHROUGH_NEEDS = {
    "hed-eltwise": ("onnx", "onnxruntime", "torch"),  # verify --backends onnxruntime,torch
    "features-pool5": ("torch",),
    "two-stage-torch": ("torch",),
    "torch-to-caffemodel": ("torch", "safetensors", "cv2"),
    "data-lmdb": ("lmdb",),
}


@pytest.mark.parametrize(
    "name,lang,code",
    [pytest.param(*w, marks=needs(*WALKTHROUGH_NEEDS.get(w[0], ()))) for w in _walkthroughs()],
    ids=[w[0] for w in _walkthroughs()] or None,
)
def test_readme_walkthrough_runs(name: str, lang: str, code: str, tmp_path: Path) -> None:
    """Each walkthrough runs as written, from the project root, ``/tmp/`` -> a fresh folder."""
    import os
    import subprocess
    import sys

    code = code.replace("/tmp/", f"{tmp_path}/")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    if lang == "bash":
        cmd = ["bash", "-euo", "pipefail", "-c", code]
    else:
        cmd = [sys.executable, "-c", code]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, (
        f"walkthrough {name} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    )
