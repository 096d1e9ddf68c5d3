"""solver.prototxt -> SolverConfig (surgery.train.solver): Caffe's rules and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")  # surgery.train needs the `train` extra

from surgery.errors import ParseError, SolverError  # noqa: E402
from surgery.train.solver import load_solver  # noqa: E402

NET = """name: "tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
  include { phase: TEST } }
"""


def _write(tmp: Path, solver: str, net: str | None = NET, net_name: str = "net.prototxt") -> Path:
    if net is not None:
        (tmp / net_name).write_text(net)
    s = tmp / "solver.prototxt"
    s.write_text(solver)
    return s


def test_defaults_and_the_net_relative_to_the_solver(tmp_path: Path, monkeypatch) -> None:
    s = _write(tmp_path, 'net: "net.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\n'
                         "max_iter: 10\ntest_iter: 2\ntest_interval: 5\n")
    monkeypatch.chdir(tmp_path.parent)  # not found from the cwd: the solver's folder is used
    cfg = load_solver(s)
    assert cfg.base_lr == pytest.approx(0.01) and cfg.max_iter == 10
    assert cfg.train_state.phase == "TRAIN" and [t.phase for t in cfg.test_states] == ["TEST"]
    assert cfg.test_nets == [cfg.train_net] and cfg.test_iter == [2]
    assert any("relative to the solver's folder" in n for n in cfg.notes)
    # Caffe's proto defaults
    assert (cfg.type, cfg.average_loss, cfg.iter_size, cfg.clip_gradients) == ("SGD", 1, 1, -1)
    assert cfg.test_initialization and cfg.snapshot_after_train
    assert cfg.snapshot_prefix == str(s.with_suffix(""))  # unset: the solver's path


def test_cwd_wins_over_the_solver_folder(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "sub").mkdir()
    s = _write(tmp_path / "sub", 'net: "net.prototxt"\nlr_policy: "fixed"\nmax_iter: 1\n')
    (tmp_path / "net.prototxt").write_text(NET.replace('"tiny"', '"cwd"'))
    monkeypatch.chdir(tmp_path)
    cfg = load_solver(s)
    assert cfg.train_net.name == "cwd"
    assert any("working directory" in n for n in cfg.notes)


def test_missing_net_names_both_places(tmp_path: Path, monkeypatch) -> None:
    s = _write(tmp_path, 'net: "nope.prototxt"\nlr_policy: "fixed"\nmax_iter: 1\n', net=None)
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(SolverError) as e:
        load_solver(s)
    msg = str(e.value)
    assert str(tmp_path.parent / "nope.prototxt") in msg and str(tmp_path / "nope.prototxt") in msg


def test_unknown_and_refused_fields_named_at_once(tmp_path: Path) -> None:
    s = _write(tmp_path, 'net: "net.prototxt"\nlr_policy: "fixed"\nmax_iter: 1\n'
                         "warmup_iter: 100\nbogus { a: 1 }\ndebug_info: true\n"
                         "snapshot_format: HDF5\n")
    with pytest.raises(SolverError) as e:
        load_solver(s)
    msg = str(e.value)
    assert "4 solver field(s) refused" in msg
    for name in ("warmup_iter", "bogus", "debug_info", "snapshot_format"):
        assert name in msg


@pytest.mark.parametrize("text,needle", [
    ('net: "net.prototxt"\nlr_policy: "fixed"\n', "max_iter is missing"),
    ('net: "net.prototxt"\nlr_policy: "step"\nmax_iter: 3\n', "needs stepsize"),
    ('net: "net.prototxt"\nlr_policy: "cosine"\nmax_iter: 3\n', "lr_policy 'cosine'"),
    ('net: "net.prototxt"\nlr_policy: "fixed"\nmax_iter: 3\ntype: "RMSProp"\nmomentum: 0.9\n',
     "momentum cannot be used with RMSProp"),
    ('train_net: "net.prototxt"\nlr_policy: "fixed"\nmax_iter: 3\ntest_iter: 4\n',
     "no test net"),
    ('lr_policy: "fixed"\nmax_iter: 3\n', "no train net"),
    ('net: "net.prototxt"\nlr_policy: "fixed"\nmax_iter: 3\nsolver_type: ADAM\ntype: "Adam"\n',
     "keep only type"),
])
def test_bad_solvers(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(SolverError, match=needle):
        load_solver(_write(tmp_path, text))


def test_legacy_solver_type_and_train_test_nets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "test.prototxt").write_text(NET)
    s = _write(tmp_path, 'train_net: "net.prototxt"\ntest_net: "test.prototxt"\ntest_iter: 3\n'
                         'lr_policy: "multistep"\nstepvalue: 2\nstepvalue: 4\nmax_iter: 5\n'
                         "solver_type: NESTEROV\ntrain_state { stage: \"a\" }\n"
                         'snapshot_prefix: "."\n')
    cfg = load_solver(s)
    assert cfg.type == "Nesterov" and cfg.stepvalue == [2, 4] and len(cfg.test_nets) == 1
    assert cfg.train_state.stages == ("a",)
    assert cfg.snapshot_prefix == str(Path(".") / "solver")  # a folder: + the solver's stem


def test_parse_error_has_file_and_line(tmp_path: Path) -> None:
    s = _write(tmp_path, 'net: "net.prototxt"\nmax_iter: "ten"\n')
    with pytest.raises(ParseError, match=r"solver.prototxt:2"):
        load_solver(s)


def test_reading_a_solver_imports_no_torch(tmp_path: Path) -> None:
    import subprocess
    import sys

    s = _write(tmp_path, 'net: "net.prototxt"\nlr_policy: "fixed"\nmax_iter: 1\n')
    code = ("import sys; from surgery.train.solver import load_solver; "
            f"load_solver({str(s)!r}); sys.exit(1 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_solver_types_match_the_optimizers() -> None:
    from surgery.train import optim, solver

    assert tuple(optim.SOLVER_TYPES) == solver.SOLVER_TYPES
