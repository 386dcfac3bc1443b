"""One-node probes of onnxruntime's CPU kernels: does this build run a given ``GroupQueryAttention`` form?

A probe rather than a look at the kernel registry: ``get_all_opkernel_def()`` can crash the process on some
GPU builds of onnxruntime. Used by the fused int8 and the fp16 KV graphs to decide whether they apply.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def gqa_decode_step(past_type: int, io_type: int, extra_inputs: list[str], initializers: dict[str, np.ndarray],
                    **attrs: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Run one decode step of a one-head ``GroupQueryAttention`` (head_dim 16, 4 cached tokens of ones) on
    the CPU provider. ``extra_inputs`` are the node's inputs after ``total_sequence_length`` ("" for absent),
    named from ``initializers``. Returns (output, present key), or None when the node does not load or run."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        d = 16
        vi = helper.make_tensor_value_info
        node = helper.make_node(
            "GroupQueryAttention", ["q", "", "", "pk", "pv", "seqlens", "total", *extra_inputs], ["out", "k", "v"],
            domain="com.microsoft", num_heads=1, kv_num_heads=1, **attrs)
        graph = helper.make_graph(
            [node], "inferos_gqa_probe",
            [vi("q", io_type, [1, 1, 3 * d]), vi("pk", past_type, [1, 1, 4, d]), vi("pv", past_type, [1, 1, 4, d]),
             vi("seqlens", TensorProto.INT32, [1]), vi("total", TensorProto.INT32, [])],
            [vi("out", io_type, None), vi("k", past_type, None), vi("v", past_type, None)],
            [numpy_helper.from_array(a, n) for n, a in initializers.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 10
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        past = np.ones((1, 1, 4, d), helper.tensor_dtype_to_np_dtype(past_type))
        q = np.full((1, 1, 3 * d), 0.1, helper.tensor_dtype_to_np_dtype(io_type))
        out, k, _ = sess.run(None, {"q": q, "pk": past, "pv": past, "seqlens": np.array([4], np.int32),
                                    "total": np.array(5, np.int32)})
        return out, k
    except Exception:  # no such kernel / attributes in this onnxruntime
        return None
