"""Record the reference Caffe's preprocessed inputs for tests/preprocess_cases.py.

Run once (CI has no Caffe) after building the reference Caffe::

    python tools/record_preprocess_golden.py [--caffe ~/.cache/caffe-surgery/refcaffe/pycaffe]

For each case (CaffeNet with a mean file, GoogLeNet and SqueezeNet with mean values) it writes,
in a temporary folder, the case's image into an LMDB as one BGR ``Datum`` (as
``convert_imageset`` stores it), the mean file our writer makes (CaffeNet) at the path the
train_val names, and the published train_val with only its TEST data layer's ``source`` and
``batch_size`` changed. pycaffe then runs ``net.forward(end="data")`` in TEST (the data layer's
top feeding the net) and ``caffe.io.Transformer`` (set_transpose, set_channel_swap,
set_raw_scale(255), set_mean) on the 0-1 image of the net input's size. Output:
tests/data/preprocess_golden.npz: ``<case>/data`` (the (1, 3, crop, crop) data top, stored
losslessly as tests/preprocess_cases.py's ``encode`` says), ``<case>/shape``, and
``<case>/transformer_sha256`` (SHA-256 of the Transformer's float32 bytes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.data_cases import key, write_lmdb  # noqa: E402
from tests.preprocess_cases import (  # noqa: E402
    CAFFENET_MEAN,
    CASES,
    ZOO,
    centre,
    encode,
    image01,
    make_image,
    mean_image,
)

CAFFE_SCRIPT = r"""
import json, os, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
for c in json.loads(sys.argv[1]):
    os.chdir(c["folder"])
    net = caffe.Net("net.prototxt", caffe.TEST)
    net.forward(end="data")
    data = net.blobs["data"].data.copy()
    del net
    size = c["size"]
    t = caffe.io.Transformer({"data": (1, 3, size, size)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    mean = np.load("mean.npy")
    t.set_mean("data", mean)
    img = np.load("image01.npy")
    tr = t.preprocess("data", img)[None].astype(np.float32)
    np.savez("out.npz", data=data, transformer=tr)
print("recorded")
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--caffe", default=str(Path.home() / ".cache/caffe-surgery/refcaffe/pycaffe"))
    ap.add_argument("-o", default=str(ROOT / "tests" / "data" / "preprocess_golden.npz"))
    args = ap.parse_args()
    from surgery.caffe_io import datum_bytes, load, net_to_text
    from surgery.data.mean import write_mean

    out: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for name, (rel, (h, w), size) in CASES.items():
            folder = Path(tmp) / name
            folder.mkdir()
            img = make_image(h, w)
            write_lmdb(folder / "db", [(key(0, "im.png"), datum_bytes(
                np.ascontiguousarray(img[..., ::-1].transpose(2, 0, 1)), label=0))])
            net = load(ZOO / rel)
            for lay in net.layers:
                if lay.type == "Data" and lay.include and lay.include[0].phase == "TEST":
                    lay.attrs["source"] = "db"
                    lay.attrs["batch_size"] = 1
            (folder / "net.prototxt").write_text(net_to_text(net), encoding="utf-8")
            if name == "caffenet":
                (folder / CAFFENET_MEAN).parent.mkdir(parents=True)
                write_mean(folder / CAFFENET_MEAN, mean_image())
                c0 = (256 - size) // 2
                mean = mean_image()[:, c0:c0 + size, c0:c0 + size]
            else:
                mean = np.array([104.0, 117.0, 123.0])
            np.save(folder / "mean.npy", mean)
            np.save(folder / "image01.npy", image01(centre(img, size)))
            jobs.append({"folder": str(folder), "size": size})
        subprocess.run([args.caffe, "-c", CAFFE_SCRIPT, json.dumps(jobs)], check=True)
        for name in CASES:
            with np.load(Path(tmp) / name / "out.npz") as z:
                data, tr = z["data"], z["transformer"]
            assert data.dtype == tr.dtype == np.float32
            out[f"{name}/data"] = encode(data)
            out[f"{name}/shape"] = np.array(data.shape)
            out[f"{name}/transformer_sha256"] = np.array(hashlib.sha256(tr.tobytes()).hexdigest())
            print(f"{name}: data {data.shape}, transformer == data: {np.array_equal(tr, data)}")
    np.savez_compressed(args.o, **out)
    print(f"wrote {args.o}: {len(out)} arrays, {Path(args.o).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
