"""Record what the real Caffe solver prints and learns, for tests/test_train_caffe_refs.py.

Run once with the project's venv, where the reference Caffe is built
(``/root/.cache/caffe-surgery/refcaffe/pycaffe``):

    python tools/record_solver_refs.py [--out tests/data]

It writes a tiny dataset (HDF5, read by Caffe's HDF5Data layer), a conv + ReLU + InnerProduct
net, initial weights (our caffemodel writer), and for every case (every solver type, every
lr_policy, iter_size + clip_gradients + L1 + a frozen layer) a solver; runs pycaffe's
``caffe.get_solver(solver)``, ``net.copy_from(init)``, ``solve()`` (Caffe's C++ loop) with
``display: 1``, and records from Caffe's log every ``Iteration N (...), loss = X``,
``Iteration N, lr = X`` and ``Test net output #k: name = v``, plus the final blobs. Two cases
are also resumed by Caffe from their iteration-10 ``.solverstate`` (stored too), to test that
a Caffe solverstate resumes here as it resumes in Caffe.

Outputs: ``solver_refs.json`` (cases, logs, final blobs), ``solver_refs.npz`` (data, labels,
initial weights), ``solver_refs_<case>_iter_10.{caffemodel,solverstate}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PYCAFFE = Path("/root/.cache/caffe-surgery/refcaffe/pycaffe")
MAX_ITER = 20

NET = """name: "refnet"
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TRAIN }
  hdf5_data_param { source: "train.txt" batch_size: 4 } }
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }
  hdf5_data_param { source: "test.txt" batch_size: 4 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" CONV_PARAMS
  convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
  include { phase: TEST } }
"""

COMMON = (f"test_iter: 2\ntest_interval: 5\ndisplay: 1\nmax_iter: {MAX_ITER}\n"
          "weight_decay: 0.005\nsnapshot: 10\nsnapshot_prefix: \"snap\"\nsolver_mode: CPU\n")

#: case -> (solver lines, frozen conv)
CASES: dict[str, tuple[str, bool]] = {
    "sgd_fixed": ('type: "SGD"\nbase_lr: 0.05\nmomentum: 0.9\nlr_policy: "fixed"\n', False),
    "sgd_step": ('type: "SGD"\nbase_lr: 0.05\nmomentum: 0.9\nlr_policy: "step"\n'
                 "stepsize: 7\ngamma: 0.5\n", False),
    "sgd_exp": ('base_lr: 0.05\nmomentum: 0.9\nlr_policy: "exp"\ngamma: 0.95\n', False),
    "sgd_inv": ('base_lr: 0.05\nmomentum: 0.9\nlr_policy: "inv"\ngamma: 0.1\npower: 0.75\n',
                False),
    "sgd_multistep": ('base_lr: 0.05\nmomentum: 0.9\nlr_policy: "multistep"\nstepvalue: 5\n'
                      "stepvalue: 12\ngamma: 0.3\n", False),
    "sgd_poly": ('base_lr: 0.05\nmomentum: 0.9\nlr_policy: "poly"\npower: 1.5\n', False),
    "sgd_sigmoid": ('base_lr: 0.05\nmomentum: 0.9\nlr_policy: "sigmoid"\ngamma: -0.3\n'
                    "stepsize: 10\n", False),
    "nesterov_step": ('type: "Nesterov"\nbase_lr: 0.05\nmomentum: 0.9\nlr_policy: "step"\n'
                      "stepsize: 7\ngamma: 0.5\n", False),
    "adagrad": ('type: "AdaGrad"\nbase_lr: 0.05\nlr_policy: "fixed"\n', False),
    "rmsprop": ('type: "RMSProp"\nbase_lr: 0.01\nrms_decay: 0.95\nlr_policy: "fixed"\n', False),
    "adadelta": ('type: "AdaDelta"\nbase_lr: 1.0\nmomentum: 0.95\ndelta: 1e-6\n'
                 'lr_policy: "fixed"\n', False),
    "adam": ('type: "Adam"\nbase_lr: 0.01\nmomentum: 0.9\nmomentum2: 0.999\n'
             'lr_policy: "fixed"\n', False),
    "sgd_itersize_clip_l1_frozen": ('base_lr: 0.05\nmomentum: 0.9\nlr_policy: "fixed"\n'
                                    'iter_size: 2\nclip_gradients: 0.5\n'
                                    'regularization_type: "L1"\n', True),
}
RESUMED = ("sgd_step", "adam")

CAFFE_SCRIPT = r"""
import sys, json, numpy as np, caffe
caffe.set_mode_cpu()
solver, init, out, resume = sys.argv[1:5]
s = caffe.get_solver(solver)
if resume != "-":
    s.restore(resume)
else:
    s.net.copy_from(init)
s.solve()
blobs = {name: [b.data.astype(float).ravel().tolist() for b in bl]
         for name, bl in s.net.params.items()}
json.dump(blobs, open(out, "w"))
"""

_MSG = re.compile(r"\] (.*)$")


def parse_log(text: str) -> dict:
    """Caffe's log lines -> {"loss": {iter: x}, "lr": {iter: x}, "test": [{iter, outputs}]}."""
    loss: dict[int, float] = {}
    lr: dict[int, float] = {}
    tests: list[dict] = []
    test_iter = None
    for line in text.splitlines():
        m = _MSG.search(line)
        if not m:
            continue
        msg = m.group(1)
        if mm := re.match(r"Iteration (\d+)(?: \(.*\))?, loss = (\S+)", msg):
            loss[int(mm.group(1))] = float(mm.group(2))
        elif mm := re.match(r"Iteration (\d+), lr = (\S+)", msg):
            lr[int(mm.group(1))] = float(mm.group(2))
        elif mm := re.match(r"Iteration (\d+), Testing net", msg):
            test_iter = int(mm.group(1))
            tests.append({"iter": test_iter, "outputs": {}})
        elif mm := re.match(r"\s*Test net output #\d+: (\S+) = (\S+)", msg):
            tests[-1]["outputs"][mm.group(1)] = float(mm.group(2))
    return {"loss": loss, "lr": lr, "test": tests}


def make_files(work: Path, frozen: bool, rng_seed: int = 0) -> dict[str, np.ndarray]:
    """Data, net and initial weights (init.caffemodel) for one case in ``work``."""
    import dataclasses

    from surgery import caffe_io
    from surgery.fillers import fill
    from surgery.net import Param, freeze_array

    rng = np.random.default_rng(rng_seed)
    arrays = {
        "train_data": rng.standard_normal((16, 2, 5, 5)).astype(np.float32),
        "train_label": rng.integers(0, 3, 16).astype(np.float32),
        "test_data": rng.standard_normal((8, 2, 5, 5)).astype(np.float32),
        "test_label": rng.integers(0, 3, 8).astype(np.float32),
        "conv_w": fill({"type": "xavier"}, (3, 2, 3, 3), rng).astype(np.float32),
        "conv_b": (rng.standard_normal(3) * 0.1).astype(np.float32),
        "ip_w": fill({"type": "xavier"}, (3, 27), rng).astype(np.float32),
        "ip_b": (rng.standard_normal(3) * 0.1).astype(np.float32),
    }
    write_case_files(work, arrays, frozen)
    net = caffe_io.load(work / "net.prototxt")
    for layer, (w, b) in (("conv", ("conv_w", "conv_b")), ("ip", ("ip_w", "ip_b"))):
        lay = net.layer(layer)
        params = list(lay.params) + [Param() for _ in range(2 - len(lay.params))]
        lay.params = [dataclasses.replace(params[0], data=freeze_array(arrays[w])),
                      dataclasses.replace(params[1], data=freeze_array(arrays[b]))]
    caffe_io.save(net, weights=work / "init.caffemodel")
    return arrays


def write_case_files(work: Path, arrays: dict[str, np.ndarray], frozen: bool) -> None:
    """The HDF5 files, their lists and the net (also used by the CI test)."""
    import h5py

    for split in ("train", "test"):
        with h5py.File(work / f"{split}.h5", "w") as f:
            f["data"] = arrays[f"{split}_data"]
            f["label"] = arrays[f"{split}_label"]
        (work / f"{split}.txt").write_text(f"{work / (split + '.h5')}\n")
    conv = "param { lr_mult: 0 } param { lr_mult: 0 }" if frozen else ""
    (work / "net.prototxt").write_text(NET.replace("CONV_PARAMS", conv))


def solver_text(case: str) -> str:
    return 'net: "net.prototxt"\n' + COMMON + CASES[case][0]


def run_caffe(work: Path, resume: str = "-") -> tuple[dict, dict]:
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    script = work / "run_caffe.py"
    script.write_text(CAFFE_SCRIPT)
    r = subprocess.run([str(PYCAFFE), str(script), "solver.prototxt", "init.caffemodel",
                        "blobs.json", resume], cwd=work, env=env, capture_output=True,
                       text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"caffe failed:\n{r.stderr[-3000:]}")
    return parse_log(r.stderr), json.loads((work / "blobs.json").read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests" / "data"))
    args = ap.parse_args()
    out = Path(args.out)
    refs: dict = {"max_iter": MAX_ITER, "net": NET, "common": COMMON, "cases": {}}
    arrays = None
    for case, (_, frozen) in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            arrays = make_files(work, frozen)
            (work / "solver.prototxt").write_text(solver_text(case))
            log, blobs = run_caffe(work)
            entry = {"solver": solver_text(case), "frozen": frozen, "log": log,
                     "final": blobs}
            if case in RESUMED:
                for ext in ("caffemodel", "solverstate"):
                    shutil.copy(work / f"snap_iter_10.{ext}",
                                out / f"solver_refs_{case}_iter_10.{ext}")
                rlog, rblobs = run_caffe(work, resume="snap_iter_10.solverstate")
                entry["resumed"] = {"log": rlog, "final": rblobs}
            refs["cases"][case] = entry
            print(f"{case}: loss[0]={log['loss'][0]} loss[{MAX_ITER}]={log['loss'][MAX_ITER]}")
    assert arrays is not None
    np.savez(out / "solver_refs.npz", **arrays)
    (out / "solver_refs.json").write_text(json.dumps(refs, indent=0, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
