"""A CPU session's weights read from read-only maps of their files that inferos owns, and trimmed.

onnxruntime maps each external initializer of a CPU session privately (read-write, copy-on-write) and keeps
the mapping for as long as the initializer is alive. ``MatMulNBits`` prepacks its weights into private
memory; the 4-bit data is then released, but its ``scales`` input is not, although the int8 (``accuracy_level``
4) x86 kernel only reads the copy inside the packed buffer. So every page of every ``scales`` tensor stayed
resident from the load on, in the run's peak too (``benchmarks/README.md``, issue 15).

Here the files are mapped read-only and shared (``mmap.ACCESS_READ``) and handed to onnxruntime with
``add_external_initializers_from_files_in_memory`` and ``session.use_external_initializer_file_buffers_directly``,
so its initializers point into these maps. A page of a read-only shared file mapping is always the file's
own bytes, so ``madvise(MADV_DONTNEED)`` only drops it from this process's page tables (the page cache keeps
it) and a later read faults the same bytes back in: :meth:`WeightMaps.trimming` does that every
:data:`TRIM_EVERY_S` while onnxruntime builds the session and once after it. What a session still reads
(an embedding row, a float kernel's scales at ``accuracy_level`` 0) comes back on use and stays.

Linux only (``MADV_DONTNEED`` is only a hint on other POSIX systems; on Windows the equivalent would be
``VirtualUnlock`` on the unlocked view, which drops its pages from the working set: not implemented),
onnxruntime builds that borrow the buffers only
(:func:`borrows_file_buffers` checks it once), and ``INFEROS_WEIGHT_MAPS=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
import threading
import weakref
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # pragma: no cover
    import onnxruntime as ort

BORROW_KEY = "session.use_external_initializer_file_buffers_directly"
TRIM_EVERY_S = 0.1
# a graph file this large holds its weights inline: reading its external data names would parse them all
GRAPH_LIMIT = 64 << 20
_PROBE_FLOATS = 256  # onnxruntime copies tiny external tensors whatever the option says


def wanted() -> bool:
    """True on Linux with ``madvise`` in Python's ``mmap`` and ``INFEROS_WEIGHT_MAPS`` not ``0``."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    return os.environ.get("INFEROS_WEIGHT_MAPS", "").strip().lower() not in ("0", "false", "no", "off")


@lru_cache(maxsize=None)
def borrows_file_buffers() -> bool:
    """True when this onnxruntime uses buffers given through ``add_external_initializers_from_files_in_memory``
    in place under :data:`BORROW_KEY` (older builds ignore the key and copy them, which would double the
    memory instead): a one-node model reads its initializer from a buffer that is changed after the session
    is built; only a borrowed buffer changes the output. Cached per process."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper

        n = _PROBE_FLOATS
        w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[n], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "inferos-probe.bin"), ("offset", "0"), ("length", str(4 * n))):
            entry = w.external_data.add()
            entry.key, entry.value = key, value
        io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n]) for name in ("x", "y")]
        graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "inferos_borrow", io[:1], io[1:],
                                  initializer=[w])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 10
        buf = bytearray(np.zeros(n, dtype=np.float32).tobytes())
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.add_external_initializers_from_files_in_memory(["inferos-probe.bin"], [buf], [len(buf)])
        opts.add_session_config_entry(BORROW_KEY, "1")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        x = np.zeros(n, dtype=np.float32)
        before = sess.run(None, {"x": x})[0]
        buf[:] = np.ones(n, dtype=np.float32).tobytes()
        after = sess.run(None, {"x": x})[0]
        del sess
        return bool(np.all(before == 0.0) and np.all(after == 1.0))
    except Exception:  # noqa: BLE001 - no such API or option in this build: use onnxruntime's own loading
        return False


def external_files(onnx_path: Path) -> list[str]:
    """The external data file names (``location`` values, relative to the graph's folder) of ``onnx_path``'s
    initializers, from the graph alone (no weights read)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    names = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return sorted(names)


class WeightMaps:
    """Read-only shared maps of a graph's external data files, handed to onnxruntime as its initializers'
    memory. Keep this object alive as long as any session built with :meth:`apply` (:func:`keep_with`)."""

    def __init__(self, onnx_path: Path) -> None:
        folder = Path(onnx_path).parent
        self.names: list[str] = []
        self.maps: list[mmap.mmap] = []
        try:
            for name in external_files(onnx_path):
                with open(folder / name, "rb") as handle:
                    if os.fstat(handle.fileno()).st_size == 0:
                        continue
                    self.maps.append(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ))
                self.names.append(name)
        except BaseException:
            self.close()
            raise

    def __bool__(self) -> bool:
        return bool(self.maps)

    @property
    def nbytes(self) -> int:
        """Mapped bytes (address space, not memory)."""
        return sum(len(m) for m in self.maps)

    def apply(self, opts: "ort.SessionOptions") -> None:
        """Make a session built with ``opts`` read its external initializers from these maps in place."""
        opts.add_external_initializers_from_files_in_memory(self.names, self.maps, [len(m) for m in self.maps])
        opts.add_session_config_entry(BORROW_KEY, "1")

    def trim(self) -> None:
        """Drop every resident page of the maps from this process (they stay in the page cache)."""
        for m in self.maps:
            with contextlib.suppress(OSError, ValueError):
                m.madvise(mmap.MADV_DONTNEED)

    @contextlib.contextmanager
    def trimming(self, every_s: float = TRIM_EVERY_S) -> Iterator[None]:
        """Trim every ``every_s`` seconds while the body runs (onnxruntime releases the GIL while it builds
        a session), and once at the end."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every_s):
                self.trim()

        thread = threading.Thread(target=loop, name="inferos-trim", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.trim()

    def close(self) -> None:
        """Unmap (only once no session uses them)."""
        for m in self.maps:
            with contextlib.suppress(BufferError, ValueError):
                m.close()
        self.maps, self.names = [], []


_KEPT: "weakref.WeakKeyDictionary[Any, WeightMaps]" = weakref.WeakKeyDictionary()


def keep_with(session: Any, maps: WeightMaps) -> None:
    """Tie ``maps``' life to ``session``'s: the maps stay open while the session object is alive."""
    _KEPT[session] = maps


def for_session(onnx_path: Path, provider: str) -> WeightMaps | None:
    """Maps for a session of ``onnx_path`` on ``provider`` when this applies (CPU, :func:`wanted`,
    :func:`borrows_file_buffers`, a graph file under :data:`GRAPH_LIMIT` with external data), else None."""
    if provider != "CPUExecutionProvider" or not wanted() or not borrows_file_buffers():
        return None
    try:
        if Path(onnx_path).stat().st_size > GRAPH_LIMIT:
            return None
        maps = WeightMaps(onnx_path)
    except Exception:  # noqa: BLE001 - unreadable graph or data file: onnxruntime's own load reports it
        return None
    return maps if maps else None


def inference_session(onnx_path: Path, opts: "ort.SessionOptions", providers: list[Any], provider: str,
                      fresh_opts: Callable[[], "ort.SessionOptions"]) -> "ort.InferenceSession":
    """``ort.InferenceSession(onnx_path)``; on the CPU its weights come from trimmed read-only maps
    (:func:`for_session`), kept open with the session. Should onnxruntime refuse the maps, the session is
    built again the plain way with ``fresh_opts()`` (a model onnxruntime cannot load fails there too)."""
    import onnxruntime as ort

    maps = for_session(onnx_path, provider)
    if maps is None:
        return ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    maps.apply(opts)
    try:
        with maps.trimming():
            sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
    except Exception:  # noqa: BLE001 - retried without the maps; a real load error is raised from there
        maps.close()
        return ort.InferenceSession(str(onnx_path), sess_options=fresh_opts(), providers=providers)
    keep_with(sess, maps)
    return sess
