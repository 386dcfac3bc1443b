"""A CPU session's weights from trimmed read-only file maps (engine/weightmaps.py): onnxruntime borrows the
maps, the weight file is not left resident after the session is built, and the logits are bit-identical to
onnxruntime's own loading. Measured in child processes through /proc/self/smaps (Linux only)."""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inferos_cli.engine import weightmaps
from inferos_cli.machine.rss import mapped_file_rss

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")

CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, {tests!r})
from _engines import load_engine
from inferos_cli.machine.rss import mapped_file_rss
eng = load_engine({model!r}, None, threads=1)
after_load = mapped_file_rss([{data!r}])
cache = eng.new_cache(1, capacity=32)
first = eng.forward(np.array([[1, 504, 3458, 282, 4649, 314]], dtype=np.int64), cache)
step = eng.forward(np.array([[12]], dtype=np.int64), cache, phase="decode")
np.save({out!r}, np.concatenate([first.ravel(), step.ravel()]))
print(json.dumps({{"after_load": after_load}}))
"""


def _child(model: Path, out: Path, **env: str) -> dict:
    code = CHILD.format(tests=str(Path(__file__).resolve().parents[1]), model=str(model),
                        data=str(model / "model.onnx.data"), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@linux
def test_this_onnxruntime_borrows_in_memory_files() -> None:
    import onnxruntime as ort

    if tuple(int(p) for p in ort.__version__.split(".")[:2]) < (1, 32):
        pytest.skip(f"onnxruntime {ort.__version__}: the borrowing option was checked on 1.32")
    assert weightmaps.borrows_file_buffers()


@linux
def test_trim_drops_only_this_processes_pages(tmp_path: Path) -> None:
    f = tmp_path / "w.bin"
    payload = np.arange(1 << 20, dtype=np.float32)  # 4 MiB
    payload.tofile(f)
    graph = tmp_path / "g.onnx"
    from onnx import TensorProto, helper, save

    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[payload.size], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", "0"), ("length", str(payload.nbytes))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [payload.size]) for n in ("x", "y")]
    model = helper.make_model(helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g", io[:1], io[1:],
                                                initializer=[w]), opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 10
    save(model, graph)
    maps = weightmaps.WeightMaps(graph)
    assert maps.names == ["w.bin"] and maps.nbytes == payload.nbytes
    view = np.frombuffer(maps.maps[0], dtype=np.float32)
    assert float(view.sum(dtype=np.float64)) == float(payload.sum(dtype=np.float64))  # every page read
    assert mapped_file_rss([f]) >= payload.nbytes // 2
    maps.trim()
    assert mapped_file_rss([f]) == 0
    assert np.array_equal(view, payload)  # the same bytes fault back in
    del view
    maps.close()


def test_switch_and_providers_that_do_not_take_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFEROS_WEIGHT_MAPS", "0")
    assert not weightmaps.wanted()
    monkeypatch.delenv("INFEROS_WEIGHT_MAPS")
    assert weightmaps.wanted() == (sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED"))
    graph = tmp_path / "g.onnx"
    graph.write_bytes(b"")
    assert weightmaps.for_session(graph, "CUDAExecutionProvider") is None
    assert weightmaps.for_session(graph, "CPUExecutionProvider") is None  # not a graph: onnxruntime reports it


@linux
def test_weight_file_not_resident_after_load_and_logits_identical(oga_dir: Path, tmp_path: Path) -> None:
    if not weightmaps.borrows_file_buffers():
        pytest.skip("this onnxruntime copies in-memory external data files")
    model = oga_dir.parent
    mapped = _child(model, tmp_path / "maps.npy")
    plain = _child(model, tmp_path / "plain.npy", INFEROS_WEIGHT_MAPS="0")
    # onnxruntime's own mapping keeps every MatMulNBits scales tensor resident (16.6 MiB here); the trimmed
    # maps keep nothing after the load
    assert plain["after_load"] > 8 << 20
    assert mapped["after_load"] < 1 << 20
    assert np.array_equal(np.load(tmp_path / "maps.npy"), np.load(tmp_path / "plain.npy"))
