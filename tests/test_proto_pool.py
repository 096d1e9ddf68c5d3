"""Our schema lives beside other modules generated from Caffe's caffe.proto (issue 8 item 10).

pycaffe's ``caffe_pb2`` (and other converters' copies) register a file named ``caffe.proto``
with messages ``caffe.*`` in protobuf's default descriptor pool; ours used to as well, so
whichever came second failed with "duplicate file name caffe.proto". The stand-in for pycaffe's
module is our own generated module as protoc wrote it (default pool): the same file name,
package and messages as any caffe_pb2 generated from Caffe's caffe.proto.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gen_proto  # noqa: E402

GENERATED = ROOT / "surgery" / "_proto" / "caffe_pb2.py"

SCRIPT = r"""
import sys
from google.protobuf import text_format
from google.protobuf.internal import api_implementation

def ours():
    from surgery import caffe_io
    return caffe_io.caffe_pb2

def theirs():
    sys.path.insert(0, sys.argv[2])
    import caffe_pb2
    return caffe_pb2

first, second = (ours, theirs) if sys.argv[1] == "ours-first" else (theirs, ours)
mods = {f.__name__: f() for f in (first, second)}
text = 'name: "n" layer { name: "c" type: "Convolution" bottom: "data" top: "c" ' \
       'convolution_param { num_output: 3 kernel_size: 1 } }'
msgs = {k: text_format.Parse(text, m.NetParameter()) for k, m in mods.items()}
wire = {k: m.SerializeToString() for k, m in msgs.items()}
assert wire["ours"] == wire["theirs"], wire
back = mods["ours"].NetParameter.FromString(wire["theirs"])
assert text_format.MessageToString(back) == text_format.MessageToString(msgs["theirs"])
assert back.DESCRIPTOR.full_name == "caffe.NetParameter"

# the library itself works after the other module was imported
import surgery
from surgery import caffe_io
net = caffe_io.net_from_proto(back)
assert net.layers[0].attrs["num_output"] == 3
print(api_implementation.Type(), "ok")
"""


@pytest.fixture(scope="module")
def other_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A caffe_pb2 registering caffe.proto in the default pool, as pycaffe's does."""
    folder = tmp_path_factory.mktemp("pycaffe_standin")
    code = GENERATED.read_text(encoding="utf-8")
    assert code.count(gen_proto.PRIVATE_POOL) == 1
    (folder / "caffe_pb2.py").write_text(
        code.replace(gen_proto.PRIVATE_POOL, gen_proto.DEFAULT_POOL), encoding="utf-8")
    return folder


@pytest.mark.parametrize("impl", ["upb", "python"])
@pytest.mark.parametrize("order", ["ours-first", "theirs-first"])
def test_both_schemas_in_one_process(other_module: Path, order: str, impl: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": impl}
    proc = subprocess.run([sys.executable, "-W", "error", "-c", SCRIPT, order, str(other_module)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [impl, "ok"]


def test_stand_in_really_clashes_in_the_default_pool(other_module: Path, tmp_path: Path) -> None:
    """Two default-pool modules for caffe.proto cannot coexist: the test above is meaningful."""
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "caffe_twin_pb2.py").write_text((other_module / "caffe_pb2.py").read_text())
    code = (f"import sys; sys.path[:0] = [{str(other_module)!r}, {str(twin)!r}]\n"
            "import caffe_pb2\nimport caffe_twin_pb2\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "caffe.proto" in proc.stderr


def test_generated_module_uses_a_private_pool() -> None:
    from surgery._proto import caffe_pb2

    code = GENERATED.read_text(encoding="utf-8")
    assert gen_proto.DEFAULT_POOL not in code and gen_proto.PRIVATE_POOL in code
    from google.protobuf import descriptor_pool

    assert caffe_pb2.DESCRIPTOR.pool is not descriptor_pool.Default()
    assert caffe_pb2.DESCRIPTOR.name == "caffe.proto" and caffe_pb2.DESCRIPTOR.package == "caffe"
