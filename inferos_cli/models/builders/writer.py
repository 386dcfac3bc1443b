"""GraphWriter: collects ONNX nodes and streams initializers into one external data file.

Initializers over 1 KiB are written to the data file while the graph is built, so a model of any size never
sits in one protobuf (2 GiB limit) and never twice in memory. The decoder builders and the graph rewrites in
:mod:`inferos_cli.graphs` use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

_ALIGN = 64


class GraphWriter:
    """Accumulates nodes and streams initializers into one external data file."""

    def __init__(self, data_path: Path | None, prefix: str = "") -> None:
        """``data_path`` None: small initializers only (graph rewrites that add shapes and constants);
        ``prefix`` starts every generated name, to stay clear of the names of a graph being rewritten."""
        import onnx

        self.onnx = onnx
        self.data_path = data_path
        self.handle: BinaryIO | None = open(data_path, "wb") if data_path is not None else None
        self.prefix = prefix
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.names: set[str] = set()
        self.counter = 0

    def close(self) -> None:
        """Close the data file."""
        if self.handle is not None:
            self.handle.close()

    def fresh(self, base: str) -> str:
        """A new unique value name."""
        self.counter += 1
        return f"{self.prefix}{base}_{self.counter}"

    def init(self, name: str, array: np.ndarray) -> str:
        """Add an initializer; arrays over 1 KiB go to the external data file."""
        from onnx import TensorProto, helper, numpy_helper

        array = np.ascontiguousarray(array)
        if array.nbytes <= 1024:
            self.initializers.append(numpy_helper.from_array(array, name))
        elif self.handle is None or self.data_path is None:
            raise ValueError(f"{name}: {array.nbytes} bytes need an external data file, and this writer has none")
        else:
            pad = (-self.handle.tell()) % _ALIGN
            if pad:
                self.handle.write(b"\0" * pad)
            offset = self.handle.tell()
            self.handle.write(memoryview(array).cast("B"))  # the array's own buffer, no copy
            tensor = TensorProto()
            tensor.name = name
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            tensor.dims.extend(array.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            self.initializers.append(tensor)
        self.names.add(name)
        return name

    def const(self, values: Any, dtype: Any = np.int64) -> str:
        """A small constant initializer (shapes, axes, scalars)."""
        return self.init(self.fresh("const"), np.asarray(values, dtype=dtype))

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", outputs: list[str] | None = None,
             **attrs: Any) -> list[str]:
        """Add a node and return its output names."""
        from onnx import helper

        outs = outputs or [self.fresh(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(op), domain=domain or None, **attrs))
        return outs

    def op(self, op: str, *inputs: str, domain: str = "", **attrs: Any) -> str:
        """Single-output shorthand of :meth:`node`."""
        return self.node(op, list(inputs), domain=domain, **attrs)[0]

    def float_init(self, name: str, w: np.ndarray) -> str:
        """A float weight: fp16 storage is cast to fp32 in the graph (ORT folds the cast at load)."""
        if w.dtype == np.float16:
            return self.op("Cast", self.init(name + "_fp16", w), to=1)
        return self.init(name, w.astype(np.float32, copy=False))

