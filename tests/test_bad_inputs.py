"""Every verb on every bad input: one clear line, exit 2, nothing written, bounded time and memory.

The corpus is built here (``_corpus``), from the LeNet golden net and weights and from bytes
written by hand. Each bad input has a *kind* (the role it plays on a command line: ``net``,
``weights``, ``recipe``, ``npz``, ``golden``, ``opt``); every verb template in ``VERBS`` that has
a ``{kind}`` slot is run with it, the other slots filled with good files. So a new verb needs one
line in ``VERBS`` (``test_every_verb_is_covered`` fails until it has one), and a new bad input one
entry in the corpus.

All command lines run in a few child processes (``tests/_cli_driver.py`` calls
``surgery.cli.main`` for each and reports back), under ``resource`` limits: address space, CPU
seconds and file size for the process, a wall-clock alarm and a peak-RSS measurement per case.

Asserted for each run: exit code 2, exactly one line on stderr that names the bad file (or the
bad option), no traceback, no file created, changed or removed in the corpus folder (inputs
byte-identical, no temporaries), time and memory within bounds.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import GOLDEN, ROOT

DRIVER = Path(__file__).with_name("_cli_driver.py")
LENET = GOLDEN / "lenet"

#: Per-case bounds. Peak RSS is the whole process's (torch and onnxruntime loaded), so the
#: bound is a margin over the driver's own baseline, measured in the first case.
CASE_SECONDS = 20.0
CASE_EXTRA_MB = 400.0
#: Per-process limits, enforced by the kernel (resource.setrlimit in the child).
PROCESS_AS_BYTES = 8 << 30  # torch + onnxruntime reserve a lot of address space
PROCESS_CPU_SECONDS = 240
PROCESS_FSIZE_BYTES = 256 << 20

# -- the verbs ---------------------------------------------------------------------------------
#: verb (as in ``surgery --help``; "export onnx" for sub-verbs) -> command-line templates.
#: Slots: {net} {weights} {recipe} {npz} {golden} the inputs; {out} {outw} {outdir} targets
#: (never existing); {opt} is replaced by the option words of an ``opt`` case.
VERBS: dict[str, list[list[str]]] = {
    "info": [["info", "{net}", "--weights", "{weights}"]],
    "upgrade": [["upgrade", "{net}", "-o", "{out}", "--weights", "{weights}",
                 "--out-weights", "{outw}"]],
    "rename-heads": [["rename-heads", "{net}", "--num-output", "3", "--weights", "{weights}",
                      "--out-weights", "{outw}", "-o", "{out}"]],
    "freeze": [["freeze", "{net}", "--layers", "conv*", "-o", "{out}"]],
    "unfreeze": [["unfreeze", "{net}", "--layers", "conv*", "-o", "{out}"]],
    "lr": [["lr", "{net}", "--layers", "ip*", "--lr-mult", "10,20", "-o", "{out}"]],
    "deploy": [["deploy", "{net}", "-o", "{out}", "--weights", "{weights}"]],
    "fc-to-conv": [["fc-to-conv", "{net}", "--weights", "{weights}", "--out-weights", "{outw}",
                    "-o", "{out}"]],
    "apply": [["apply", "{recipe}", "--net", "{net}", "--weights", "{weights}", "-o", "{out}",
               "--out-weights", "{outw}"]],
    "insert-eltwise": [["insert-eltwise", "{net}", "-o", "{out}", "--bottoms", "conv1",
                        "conv1", "--operation", "sum"]],
    "insert-gate": [["insert-gate", "{net}", "-o", "{out}", "--at", "conv1", "--weights",
                     "{weights}", "--out-weights", "{outw}"]],
    "transplant": [["transplant", "{net}", "--from", "{weights}", "-o", "{outw}",
                    "--report", "{out}"]],
    "export onnx": [["export", "onnx", "{net}", "--weights", "{weights}", "-o", "{out}"]],
    "export torch": [["export", "torch", "{net}", "--weights", "{weights}", "-o", "{outdir}"]],
    "init": [["init", "{net}", "-o", "{outw}"]],
    "cut": [["cut", "{net}", "--at", "conv1", "--weights", "{weights}", "--out-weights",
             "{outw}", "-o", "{out}"]],
    "import-torch": [["import-torch", "{torchdir}", "--net", "{net}", "--weights", "{weights}",
                      "-o", "{outw}"],
                     ["import-torch", "{torchdir}", "--state-dict", "{statedict}", "-o",
                      "{outw}"]],
    "extract": [["extract", "{net}", "--weights", "{weights}", "--blobs", "conv1", "--input",
                 "{npz}", "-o", "{outnpz}"]],
    "diff": [["diff", "{net}", "in/good.prototxt", "--weights", "{weights}",
              "in/good.caffemodel"]],
    "draw": [["draw", "{net}", "-o", "{outdot}"]],
    "mean": [["mean", "{mean}", "-o", "{outnpy}"]],
    "data": [["data", "{net}", "--layer", "data", "--count", "1"]],
    "train": [["train", "{solver}", "--max-iter", "1"]],
    "convert": [["convert", "{net}", "-o", "{outdir}", "--to", "onnx", "--verify", "none",
                 "--jobs", "1"]],
    "verify": [["verify", "{net}", "--weights", "{weights}", "--backends",
                "onnxruntime,torch"],
               ["verify", "{net}", "--weights", "{weights}", "--backends", "onnxruntime",
                "--input", "{npz}"],
               ["verify", "{net}", "--weights", "{weights}", "--backends", "onnxruntime",
                "--golden", "{golden}"]],
}

#: Verbs whose command lines get the ``opt`` cases (option words appended).
OPT_VERBS = {
    "rename-heads": [["rename-heads", "{net}", "--weights", "{weights}", "--out-weights",
                      "{outw}", "-o", "{out}", "{opt}"]],
    "lr": [["lr", "{net}", "--layers", "ip*", "-o", "{out}", "{opt}"]],
    "transplant": [["transplant", "{net}", "--from", "{weights}", "-o", "{outw}", "{opt}"]],
    "verify": [["verify", "{net}", "--weights", "{weights}", "--backends", "onnxruntime",
                "{opt}"]],
}

# -- the corpus --------------------------------------------------------------------------------


@dataclass
class Bad:
    """One bad input: a file name in the corpus folder (or a path), and what it is for."""

    kind: str
    name: str
    why: str
    verbs: tuple[str, ...] | None = None
    """Restrict to these verbs (None: every verb with a slot of this kind)."""
    words: tuple[str, ...] = ()
    """For ``opt``: the option words; the error line must contain ``mention``."""
    mention: str | None = None
    """What the error line must name (default: the file name)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _ld(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _layer_v2(name: str, type_: str, blobs: list[bytes]) -> bytes:
    body = _ld(1, name.encode()) + _ld(2, type_.encode())
    for b in blobs:
        body += _ld(7, b)
    return _ld(100, body)


def _blob(shape: list[int], floats: bytes, packed: bool = True) -> bytes:
    dims = b"".join(_varint(d) for d in shape)
    out = _ld(7, _ld(1, dims))
    if packed:
        out += _ld(5, floats)
    else:
        for i in range(0, len(floats), 4):
            out += _key(5, 5) + floats[i:i + 4]
    return out


NET_HEAD = 'name: "t"\nlayer { name: "data" type: "Input" top: "data" ' \
           "input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }\n"


def _conv(extra: str = "", name: str = "conv1") -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "data" top: "{name}" '
            f"convolution_param {{ num_output: 2 kernel_size: 3 {extra} }} }}\n")


def _nets() -> dict[str, tuple[bytes, str]]:
    """name -> (content, why)."""
    good = (LENET / "net.prototxt").read_bytes()
    t = {
        "empty.prototxt": (b"", "zero-length definition"),
        "noname.prototxt": (b'name: "x"\n', "a net without layers"),
        "syntax.prototxt": (NET_HEAD.encode() + b"layer { name: \n", "syntax error"),
        "garbage.prototxt": (bytes(range(256)) * 40, "binary garbage"),
        "nul.prototxt": (good[:200] + b"\0\0\0" + good[200:], "NUL bytes in the text"),
        "latin1.prototxt": (b'name: "\xe9\xff"\n' + good, "invalid UTF-8"),
        "deep.prototxt": (b"layer { " * 20000 + b"}" * 20000, "20k nested messages"),
        "cycle.prototxt": ((NET_HEAD
                            + 'layer { name: "a" type: "ReLU" bottom: "b" top: "a" }\n'
                            + 'layer { name: "b" type: "ReLU" bottom: "a" top: "b" }\n'
                            ).encode(), "a cycle / undefined bottom"),
        "missing_bottom.prototxt": ((NET_HEAD + 'layer { name: "r" type: "ReLU" '
                                     'bottom: "nope" top: "r" }\n').encode(), "unknown bottom"),
        "dims_zero.prototxt": (NET_HEAD.replace("dim: 8 dim: 8", "dim: 0 dim: 8").encode()
                               + _conv().encode(), "input dim 0"),
        "dims_neg.prototxt": (NET_HEAD.replace("dim: 8 dim: 8", "dim: -3 dim: 8").encode()
                              + _conv().encode(), "input dim -3"),
        "dims_huge.prototxt": (NET_HEAD.replace("dim: 8 dim: 8",
                                                "dim: 1099511627776 dim: 8").encode()
                               + _conv().encode(), "input dim 2^40"),
        "dims_100.prototxt": (('name: "t"\nlayer { name: "data" type: "Input" top: "data" '
                               "input_param { shape { " + "dim: 1 " * 100 + "} } }\n"
                               + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }\n'
                               ).encode(), "100-dim input"),
        "dilation0.prototxt": ((NET_HEAD + _conv("dilation: 0")).encode(), "dilation 0"),
        "pad_huge.prototxt": ((NET_HEAD + _conv("pad: 4000000000")).encode(), "pad 4e9"),
        "softmax_axis.prototxt": ((NET_HEAD + _conv() + 'layer { name: "sm" type: "Softmax" '
                                   'bottom: "conv1" top: "sm" softmax_param { axis: 9 } }\n'
                                   ).encode(), "softmax axis 9"),
        "dropout2.prototxt": ((NET_HEAD + _conv() + 'layer { name: "dr" type: "Dropout" '
                               'bottom: "conv1" top: "dr" dropout_param { dropout_ratio: 2 } }\n'
                               ).encode(), "dropout_ratio 2"),
        "num_output_huge.prototxt": ((NET_HEAD + _conv().replace("num_output: 2",
                                                                 "num_output: 67108864")
                                      ).encode(), "num_output 2^26"),
        "nul_blob.prototxt": ((NET_HEAD + 'layer { name: "r" type: "ReLU" bottom: "data" '
                               'top: "r\\000x" }\n').encode(), "NUL in a blob name"),
        "v1_unknown.prototxt": (b'name: "t"\nlayers { name: "a" type: 99 }\n',
                                "V1 enum out of range"),
    }
    return t


def _weights() -> dict[str, tuple[bytes, str]]:
    good = (LENET / "weights.caffemodel").read_bytes()
    f4 = struct.pack("<f", 1.0)
    return {
        "empty.caffemodel": (b"", "zero-length weights"),
        "text.caffemodel": ((LENET / "net.prototxt").read_bytes(), "a prototxt as weights"),
        "garbage.caffemodel": (bytes(range(256)) * 64, "garbage bytes"),
        "truncated.caffemodel": (good[: len(good) // 2], "truncated"),
        "groups.caffemodel": (_key(1, 3) * 200_000, "200 kB of group-start bytes"),
        "group_in_layer.caffemodel": (_ld(100, _key(9, 3) * 100_000), "deep groups in a layer"),
        "wrong_shape.caffemodel": (_layer_v2("conv1", "Convolution", [
            _blob([20, 5, 5, 1], f4 * 500), _blob([20], f4 * 20)]),
            "conv1 weights of the right count, wrong shape"),
        "wrong_count.caffemodel": (_layer_v2("conv1", "Convolution", [
            _blob([20, 1, 5, 5], f4 * 7), _blob([20], f4 * 20)]), "blob data shorter than shape"),
        "huge_shape.caffemodel": (_layer_v2("conv1", "Convolution", [
            _blob([1 << 20, 1 << 20, 1 << 20], f4 * 4)]), "shape of 2^60 elements"),
        "neg_shape.caffemodel": (_layer_v2("conv1", "Convolution", [
            _blob([(1 << 64) - 5], f4 * 4)]), "negative dim"),
        "one_blob.caffemodel": (_layer_v2("conv1", "Convolution", [
            _blob([20, 1, 5, 5], f4 * 500)]), "1 blob where Caffe expects 2"),
        "long_len.caffemodel": (_key(100, 2) + _varint(1 << 62) + b"abc", "absurd length"),
        "nul_name.caffemodel": (_layer_v2("conv\x001", "Convolution", [
            _blob([20], f4 * 20)]), "NUL in a layer name"),
    }


def _recipes() -> dict[str, tuple[bytes, str]]:
    return {
        "syntax.toml": (b"[[step]\nop = \n", "TOML syntax error"),
        "deep.toml": (b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n", "deep TOML arrays"),
        "deep_tables.toml": (b"x = " + b"{a = " * 3000 + b"1" + b"}" * 3000 + b"\n",
                             "deep TOML inline tables"),
        "output5.toml": (b"output = 5\n[[step]]\nop = \"freeze\"\nlayers = [\"conv*\"]\n",
                         "output = 5"),
        "netlist.toml": (b"net = [1, 2]\n[[step]]\nop = \"freeze\"\nlayers = [\"conv*\"]\n",
                         "net = [...]"),
        "badop.toml": (b"[[step]]\nop = \"nope\"\n", "unknown op"),
        "steps_str.toml": (b"step = \"freeze\"\n", "step is a string"),
        "latin1.toml": (b"# \xff\xfe\n[[step]]\nop = \"freeze\"\n", "invalid UTF-8"),
    }


def _means() -> dict[str, tuple[bytes, str]]:
    return {
        "empty.binaryproto": (b"", "zero-length mean"),
        "garbage.binaryproto": (bytes(range(256)) * 8, "garbage bytes"),
        "text.binaryproto": (b'name: "x"\n', "text, not a BlobProto"),
        "groups.binaryproto": (_key(1, 3) * 100_000, "deep groups"),
        "huge.binaryproto": (_varint(1 << 3 | 0) + _varint(1 << 40) + _ld(5, b"\0" * 8),
                             "num 2^40 with two floats"),
        "bad.npy": (b"\x93NUMPY\x01\x00" + b"\xff" * 40, "broken .npy header"),
    }


def _solvers() -> dict[str, tuple[bytes, str]]:
    return {
        "empty_solver.prototxt": (b"", "zero-length solver"),
        "garbage_solver.prototxt": (bytes(range(256)) * 8, "binary solver"),
        "nonet_solver.prototxt": (b"base_lr: 0.01\nmax_iter: 1\n", "solver without a net"),
        "badnet_solver.prototxt": (b'net: "empty.prototxt"\nbase_lr: 0.01\nmax_iter: 1\n'
                                   b'lr_policy: "fixed"\n', "solver naming an empty net"),
        "nan_solver.prototxt": (b'net: "good.prototxt"\nbase_lr: nan\nmax_iter: 1\n'
                                b'lr_policy: "fixed"\n', "base_lr nan"),
        "deep_solver.prototxt": (b"net_param { " + b"layer { " * 5000 + b"}" * 5001,
                                 "deeply nested"),
    }


def _state_dicts() -> dict[str, tuple[bytes, str]]:
    import pickle

    class Evil:  # unpickling this would write in/PWNED
        def __reduce__(self):
            return (open, ("PWNED", "w"))

    return {
        "empty.pt": (b"", "zero-length state dict"),
        "garbage.pt": (bytes(range(256)) * 8, "garbage"),
        "evil.pt": (pickle.dumps(Evil()), "a pickle that runs code"),
        "text.safetensors": (b"not safetensors", "not safetensors"),
        "huge_header.safetensors": (struct.pack("<Q", 1 << 50) + b"{}", "absurd header size"),
    }


def _npz_files(tmp: Path) -> dict[str, tuple[bytes, str]]:
    import io

    import numpy as np

    def npz(**arrays: object) -> bytes:
        b = io.BytesIO()
        np.savez(b, **arrays)
        return b.getvalue()

    good = npz(data=np.zeros((2, 1, 28, 28), np.float32))
    return {
        "wrong_shape.npz": (npz(data=np.zeros((2, 3, 5, 5), np.float32)), "wrong input shape"),
        "wrong_name.npz": (npz(other=np.zeros((2, 1, 28, 28), np.float32),
                               more=np.zeros((2, 1, 28, 28), np.float32)), "wrong names"),
        "truncated.npz": (good[: len(good) // 2], "truncated npz"),
        "garbage.npz": (b"PK\x03\x04" + bytes(500), "broken zip"),
        "object.npz": (npz(data=np.array([object()], dtype=object)), "pickled objects"),
        "strings.npz": (npz(data=np.array(["a", "b"])), "string array"),
        "empty.npz": (b"", "zero-length"),
    }


def _goldens(root: Path) -> list[str]:
    """Broken golden folders (copies of the LeNet one with one file damaged)."""
    import io

    import numpy as np

    def npz(**arrays: object) -> bytes:
        b = io.BytesIO()
        np.savez(b, **arrays)
        return b.getvalue()

    variants = {
        "g_meta_garbage": {"meta.json": b"{not json"},
        "g_meta_list": {"meta.json": b"[1, 2, 3]"},
        "g_meta_types": {"meta.json": b'{"tolerance": "x", "inputs": 5, "outputs": {}}'},
        "g_probes_garbage": {"probes.json": b"\xff\xfe{"},
        "g_probes_types": {"probes.json": b'{"prob": {"shape": "x", "index": 5}}'},
        "g_input_truncated": {"input.npz": (LENET / "input.npz").read_bytes()[:300]},
        "g_input_mismatch": {"input.npz": npz(data=np.zeros((3, 2), np.float32))},
        "g_outputs_mismatch": {"outputs.npz": npz(prob=np.zeros((7,), np.float32))},
        "g_no_input": {"input.npz": None},
    }
    names = []
    for name, files in variants.items():
        d = root / name
        d.mkdir()
        for f in ("input.npz", "meta.json", "outputs.npz", "probes.json"):
            content = files.get(f, (LENET / f).read_bytes())
            if content is not None:
                (d / f).write_bytes(content)
        names.append(name)
    return names


#: Option cases: (verbs, words, what the line must mention).
OPTS: list[tuple[str, tuple[str, ...], str, str]] = [
    ("rename-heads", ("--num-output", "100000000"), "--max-bytes", "absurd size"),
    ("rename-heads", ("--num-output", "0"), "--num-output", "zero outputs"),
    ("rename-heads", ("--num-output", "3", "--seed", "-1"), "--seed", "negative seed"),
    ("rename-heads", ("--num-output", "3", "--lr-mult", "nan,1"), "--lr-mult", "lr nan"),
    ("lr", ("--lr-mult", "inf"), "--lr-mult", "lr inf"),
    ("lr", ("--lr-mult", "1", "--decay-mult", "nan"), "--decay-mult", "decay nan"),
    ("lr", ("--bogus-option",), "--bogus-option", "unknown option (argparse)"),
    ("transplant", ("--seed", "-1"), "--seed", "negative seed"),
    ("transplant", ("--on-mismatch", "sometimes"), "--on-mismatch", "bad choice (argparse)"),
    ("verify", ("--seed", "-1"), "--seed", "negative seed"),
    ("verify", ("--tolerance", "nan"), "--tolerance", "tolerance nan"),
]

#: (verb, bad file) pairs that legitimately succeed -> what their stdout must contain.
SUCCEEDS = {
    ("rename-heads", "num_output_huge.prototxt"): "wrote",  # the head gets num_output 3
    ("info", "wrong_shape.caffemodel"): "error",  # info lists the problem, as designed
    ("info", "one_blob.caffemodel"): "error",
    # import-torch replaces conv1 (held by the torch model): --weights' conv1 is not used
    ("import-torch", "wrong_shape.caffemodel"): "wrote",
    ("import-torch", "one_blob.caffemodel"): "wrote",
    # diff compares what is written (exit 1: they differ), whether Caffe would run it or not
    ("diff", "wrong_shape.caffemodel"): "",
    ("diff", "one_blob.caffemodel"): "",
}
#: Nets that parse but that Caffe would refuse: draw and diff show them (exit 0 / 1).
_SEMANTIC = ("dims_zero", "dims_neg", "dims_huge", "dilation0", "pad_huge",
             "softmax_axis", "dropout2", "num_output_huge", "nul_blob")  # (dims_100: unparsed)
SUCCEEDS.update({(verb, f"{n}.prototxt"): "" for verb in ("draw", "diff") for n in _SEMANTIC
                 if verb == "draw" or n != "nul_blob"})  # no conv1 for diff's weights: exit 2
#: Batch verbs report each input's failure in their table (convert: error / invalid /
#: unsupported, exit 1 or 0); they run on a few inputs only (a worker process each).
BATCH = {"convert": ("syntax.prototxt", "garbage.prototxt", "deep.prototxt", "empty.prototxt",
                     "dims_huge.prototxt", "dilation0.prototxt", "fifo", "zero")}
#: Errors that rightly name another file than the bad input (the file at fault).
MENTIONS = {"badnet_solver.prototxt": "empty.prototxt"}

SPECIAL = ["fifo", "/dev/zero", "/dev/urandom", "folder", "missing"]


# -- running -----------------------------------------------------------------------------------
def _limits() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (PROCESS_AS_BYTES, PROCESS_AS_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (PROCESS_CPU_SECONDS, PROCESS_CPU_SECONDS))
    resource.setrlimit(resource.RLIMIT_FSIZE, (PROCESS_FSIZE_BYTES, PROCESS_FSIZE_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_cases(cases: list[dict], tmp: Path) -> dict[str, dict]:
    """Run the cases in one driver process; returns id -> result."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp / "tmpdir"),
               SURGERY_CASE_SECONDS=str(CASE_SECONDS), OMP_NUM_THREADS="1")
    (tmp / "tmpdir").mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(DRIVER)], input=json.dumps(cases),
                          capture_output=True, text=True, env=env, preexec_fn=_limits,
                          timeout=PROCESS_CPU_SECONDS * 2)
    results = {}
    for line in proc.stdout.splitlines():
        r = json.loads(line)
        results[r["id"]] = r
    if len(results) != len(cases):
        done = len(results)
        raise AssertionError(
            f"driver died (rc {proc.returncode}) at case {cases[done]['id']}: "
            f"{proc.stderr[-2000:]}")
    return results


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _digest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_fifo():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fill(template: list[str], slots: dict[str, str], opt: tuple[str, ...] = ()) -> list[str]:
    argv: list[str] = []
    for word in template:
        if word == "{opt}":
            argv.extend(opt)
        else:
            argv.append(word.format(**slots))
    return argv


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the corpus holds a torch export and the verbs under test include the exports: the core
    # run on the oldest versions (no torch, no onnx) covers the core verbs in their own tests
    pytest.importorskip("torch")
    pytest.importorskip("onnxruntime")
    root = tmp_path_factory.mktemp("corpus")
    c = root / "in"
    c.mkdir()
    shutil.copy(LENET / "net.prototxt", c / "good.prototxt")
    shutil.copy(LENET / "weights.caffemodel", c / "good.caffemodel")
    shutil.copy(LENET / "input.npz", c / "good.npz")
    g = c / "good_golden"
    g.mkdir()
    for f in ("input.npz", "meta.json", "outputs.npz", "probes.json"):
        shutil.copy(LENET / f, g / f)
    (c / "good.toml").write_text('[[step]]\nop = "freeze"\nlayers = ["conv*"]\n')
    (c / "good_solver.prototxt").write_text('net: "good.prototxt"\nbase_lr: 0.01\n'
                                            'lr_policy: "fixed"\nmax_iter: 1\n')
    import numpy as np

    np.save(c / "good.npy", np.zeros((1, 28, 28), np.float32))
    for table in (_nets(), _weights(), _recipes(), _npz_files(c), _means(), _solvers(),
                  _state_dicts()):
        for name, (content, _why) in table.items():
            (c / name).write_bytes(content)
    _goldens(c)
    from surgery.cli import main

    assert main(["export", "torch", str(c / "good.prototxt"), "--weights",
                 str(c / "good.caffemodel"), "-o", str(c / "good_torch")]) == 0
    os.mkfifo(c / "fifo")
    (c / "folder").mkdir()
    for p in c.rglob("*"):  # inputs are read-only: a write to one fails loudly
        if p.is_file():
            p.chmod(0o444)
    return root


def _all_cases(root: Path) -> list[dict]:
    c = root / "in"
    good = {"net": "in/good.prototxt", "weights": "in/good.caffemodel", "recipe": "in/good.toml",
            "npz": "in/good.npz", "golden": "in/good_golden", "out": "out/o.prototxt",
            "outw": "out/o.caffemodel", "outdir": "out/export", "outnpz": "out/o.npz",
            "outdot": "out/o.dot", "outnpy": "out/o.npy", "torchdir": "in/good_torch",
            "statedict": "in/good_torch/weights.safetensors", "mean": "in/good.npy",
            "solver": "in/good_solver.prototxt"}
    bad: list[tuple[str, str, str]] = []  # (kind, path relative to root, why)
    for kind, table in (("net", _nets()), ("weights", _weights()), ("recipe", _recipes()),
                        ("npz", _npz_files(c)), ("mean", _means()), ("solver", _solvers()),
                        ("statedict", _state_dicts())):
        for name, (_content, why) in table.items():
            bad.append((kind, f"in/{name}", why))
    for name in sorted(p.name for p in c.iterdir() if p.name.startswith("g_")):
        bad.append(("golden", f"in/{name}", name))
    for kind in ("net", "weights", "recipe", "npz", "mean", "solver", "statedict"):
        for special in SPECIAL:
            path = special if special.startswith("/") else f"in/{special}"
            bad.append((kind, path, special))
    watch = {"empty": [str(root / "out"), str(root / "tmpdir")], "frozen": [str(c)]}
    cases = []
    for kind, path, why in bad:
        for verb, templates in VERBS.items():
            for i, tpl in enumerate(templates):
                if f"{{{kind}}}" not in " ".join(tpl):
                    continue
                base = os.path.basename(path)
                if verb in BATCH and base not in BATCH[verb]:
                    continue
                argv = _fill(tpl, {**good, kind: path})
                cases.append({"id": f"{verb}#{i} {kind}={path}", "argv": argv, "cwd": str(root),
                              "mention": os.path.basename(path), "why": why, **watch,
                              "batch": verb in BATCH,
                              "ok": "" if verb in BATCH else
                              SUCCEEDS.get((verb, os.path.basename(path)))})
    for verb, words, mention, why in OPTS:
        for i, tpl in enumerate(OPT_VERBS[verb]):
            argv = _fill(tpl, good, words)
            cases.append({"id": f"{verb}#{i} {' '.join(words)}", "argv": argv, "cwd": str(root),
                          "mention": mention, "why": why, **watch})
    return cases


def test_every_verb_is_covered() -> None:
    """A new verb must get a line in VERBS."""
    from surgery.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    verbs = set()
    for name, p in sub.choices.items():
        nested = [a for a in p._actions if a.dest == "target"]
        if nested:
            verbs.update(f"{name} {t}" for t in nested[0].choices)
        else:
            verbs.add(name)
    assert sorted(verbs - set(VERBS)) == []


def test_bad_inputs(corpus: Path) -> None:
    cases = _all_cases(corpus)
    before = _snapshot(corpus / "in")
    digest = _digest(corpus / "in")
    (corpus / "out").mkdir(exist_ok=True)
    (corpus / "tmpdir").mkdir(exist_ok=True)
    # Two processes: the light verbs, and those that load torch/onnxruntime.
    heavy = [c for c in cases if c["argv"][0] in ("export", "verify")]
    light = [c for c in cases if c not in heavy]
    results = {**run_cases(light, corpus), **run_cases(heavy, corpus)}
    baseline = min(r["peak_rss_mb"] for r in results.values())
    failures = []
    for case in cases:
        r = results[case["id"]]
        err_lines = r["stderr"].splitlines()
        problems = []
        if r["exc"]:
            problems.append("raised " + r["exc"].strip().splitlines()[-1])
        if case.get("ok") is not None:
            if r["rc"] not in (0, 1) or case["ok"] not in r["stdout"]:
                problems.append(f"expected exit 0 or 1 with {case['ok']!r} in the output")
            if case.get("batch") and not any(w in r["stdout"] for w in ("error", "invalid",
                                                                        "unsupported")):
                problems.append("the batch report does not flag the input")
        elif r["rc"] != 2:
            problems.append(f"exit {r['rc']}")
        if "Traceback" in r["stderr"]:
            problems.append("traceback on stderr")
        if case.get("ok") is not None:
            pass
        elif len(err_lines) != 1:
            problems.append(f"{len(err_lines)} stderr lines")
        elif case["mention"] not in err_lines[0] and MENTIONS.get(
                case["mention"], "\0") not in err_lines[0]:
            problems.append(f"error does not name {case['mention']!r}")
        if r["seconds"] > CASE_SECONDS:
            problems.append(f"took {r['seconds']} s")
        if r["peak_rss_mb"] > baseline + CASE_EXTRA_MB:
            problems.append(f"peak RSS {r['peak_rss_mb']} MB")
        if r["left"] and case.get("ok") is None:
            problems.append(f"left {r['left']}")
        if r["changed"]:
            problems.append(f"changed {r['changed']}")
        if problems:
            failures.append(f"{case['id']} ({case['why']}): {'; '.join(problems)}\n"
                            f"    stderr: {r['stderr'][-300:]!r}")
    assert _snapshot(corpus / "in") == before
    assert _digest(corpus / "in") == digest
    assert not failures, f"{len(failures)} of {len(cases)} runs failed:\n" + "\n".join(failures)
