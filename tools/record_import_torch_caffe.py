"""Record what the real Caffe computes from a caffemodel written by ``to_caffemodel``.

Run once (CI has no Caffe); writes ``tests/data/import_torch_caffe.npz``, read by
``tests/test_import_torch.py::test_caffe_reads_the_written_caffemodel_as_torch_computes``::

    python tools/record_import_torch_caffe.py --pycaffe /root/.cache/caffe-surgery/refcaffe/pycaffe

1. A small BatchNorm net (``tests/data/import_torch_net.prototxt``: convolutions, BatchNorm
   with a real-looking factor 999.98, Scale, PReLU, InnerProduct) is exported to torch with
   Caffe's fillers, then every tensor is redrawn from a seeded generator (as after training;
   BatchNorm statistics included) and kept as ``state/<name>``.
2. ``to_caffemodel`` writes the caffemodel; the reference Caffe (its own process, the system
   python) runs it in TEST on a seeded input and its ``prob`` and ``ip`` blobs are stored.
3. Also checked and printed, not stored: in a TRAIN step, Caffe leaves the statistics of a
   BatchNorm layer with ``use_global_stats: true`` (``surgery freeze --bn-stats``) unchanged and
   updates the one without it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
NET = ROOT / "tests" / "data" / "import_torch_net.prototxt"
OUT = ROOT / "tests" / "data" / "import_torch_caffe.npz"
BN_FACTOR = 999.98  # as in real trained nets (open_nsfw): exercises the scaled form's rounding

CAFFE_RUN = r"""
import json, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
proto, weights, inp, out = sys.argv[1:5]
net = caffe.Net(proto, weights, caffe.TEST)
x = np.load(inp)["data"]
net.blobs["data"].reshape(*x.shape)
net.blobs["data"].data[...] = x
net.forward()
np.savez(out, prob=net.blobs["prob"].data, ip=net.blobs["ip"].data)
"""

CAFFE_TRAIN = r"""
import json, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
solver_path, weights = sys.argv[1:3]
solver = caffe.SGDSolver(solver_path)
solver.net.copy_from(weights)
before = {n: [b.data.copy() for b in solver.net.params[n]] for n in ("bn1", "bn2")}
x = solver.net.blobs["data"].data
x[...] = np.random.default_rng(0).normal(0, 1, x.shape)
solver.step(1)
changed = {n: any(not np.array_equal(a, b.data) for a, b in zip(before[n], solver.net.params[n]))
           for n in before}
print(json.dumps(changed))
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pycaffe", required=True, help="the reference Caffe's python wrapper")
    args = ap.parse_args(argv)

    import surgery
    from surgery import ops
    from surgery.export import to_caffemodel, to_torch

    net = surgery.load(NET)
    model = to_torch(net, missing="fill", seed=0)
    rng = np.random.default_rng(20261204)
    state: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if name.endswith("running_var"):
            v = rng.uniform(0.5, 2.0, shape)
        elif name.endswith("running_mean"):
            v = rng.normal(0.0, 0.5, shape)
        else:
            v = rng.normal(0.0, 0.5, shape)
        state[name] = v.astype(np.float32)
    x = rng.normal(0.0, 1.0, (2, 3, 12, 12)).astype(np.float32)

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        weights = d / "w.caffemodel"
        to_caffemodel(state, net, weights, caffe_names=model.caffe_names, bn_factor=BN_FACTOR)
        np.savez(d / "in.npz", data=x)
        (d / "run.py").write_text(CAFFE_RUN)
        subprocess.run([args.pycaffe, str(d / "run.py"), str(NET), str(weights),
                        str(d / "in.npz"), str(d / "out.npz")], check=True)
        got = dict(np.load(d / "out.npz"))
        np.savez_compressed(OUT, input=x, caffe_prob=got["prob"], caffe_ip=got["ip"],
                            **{f"state/{k}": v for k, v in state.items()})
        print(f"wrote {OUT}: prob {got['prob'].shape}, ip {got['ip'].shape}")

        # freeze --bn-stats, as Caffe trains it: bn1 pinned, bn2 not
        frozen, _ = ops.freeze(net, until="scale1", bn_stats=True)
        surgery.save(frozen, d / "frozen.prototxt")
        (d / "solver.prototxt").write_text(
            f'net: "{d / "frozen.prototxt"}"\nbase_lr: 0.1\nlr_policy: "fixed"\n'
            'max_iter: 1\nsolver_mode: CPU\n')
        (d / "train.py").write_text(CAFFE_TRAIN)
        res = subprocess.run([args.pycaffe, str(d / "train.py"), str(d / "solver.prototxt"),
                              str(weights)], check=True, capture_output=True, text=True)
        changed = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"Caffe TRAIN step after freeze --until scale1 --bn-stats: BatchNorm blobs "
              f"changed: {changed}")
        if changed != {"bn1": False, "bn2": True}:
            print("UNEXPECTED", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
