"""The streaming converter: every tensor read once with plain reads, layers produced one at a time, bytes
reported as progress, and a peak RSS bounded by one layer (not the model) on a GGUF of several large tensors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _tiny_gguf import add_vocab, vocab, write_tiny_gguf

MIB = 1 << 20


def write_q4_0_gguf(path: Path, *, layers: int, hidden: int, ffn: int, seed: int = 0) -> dict[str, int]:
    """A llama GGUF of random Q4_0 blocks (the tiny test vocabulary, tied head), written tensor by tensor
    (``add_tensor_info`` + ``write_tensor_data``); returns {tensor name: bytes}."""
    import gguf

    rng = np.random.default_rng(seed)
    tokens = vocab()[0]
    writer = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((writer.add_block_count, layers), (writer.add_context_length, 256),
                       (writer.add_embedding_length, hidden), (writer.add_feed_forward_length, ffn),
                       (writer.add_head_count, hidden // 64), (writer.add_head_count_kv, hidden // 64)):
        add(value)
    writer.add_layer_norm_rms_eps(1e-5)
    add_vocab(writer)
    plan: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (len(tokens), hidden))]
    for i in range(layers):
        p = f"blk.{i}."
        plan += [(p + "attn_norm.weight", (hidden,)), (p + "attn_q.weight", (hidden, hidden)),
                 (p + "attn_k.weight", (hidden, hidden)), (p + "attn_v.weight", (hidden, hidden)),
                 (p + "attn_output.weight", (hidden, hidden)), (p + "ffn_norm.weight", (hidden,)),
                 (p + "ffn_gate.weight", (ffn, hidden)), (p + "ffn_up.weight", (ffn, hidden)),
                 (p + "ffn_down.weight", (hidden, ffn))]
    plan.append(("output_norm.weight", (hidden,)))
    sizes = {}
    for name, dims in plan:
        if len(dims) == 1:
            sizes[name] = dims[0] * 4
            writer.add_tensor_info(name, dims, np.dtype(np.float32), sizes[name])
        else:
            rows, cols = dims
            sizes[name] = rows * cols // 32 * 18
            writer.add_tensor_info(name, (rows, cols // 32 * 18), np.dtype(np.uint8), sizes[name],
                                   raw_dtype=gguf.GGMLQuantizationType.Q4_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, dims in plan:
        if len(dims) == 1:
            writer.write_tensor_data(np.ones(dims, np.float32))
            continue
        blocks = np.frombuffer(rng.bytes(sizes[name]), np.uint8).reshape(-1, 18).copy()
        blocks[:, :2] = np.array([0.0045], np.float16).view(np.uint8)  # d (fp16), then 16 bytes of nibbles
        writer.write_tensor_data(blocks.reshape(dims[0], -1))
        del blocks
    writer.close()
    return sizes


# The measured process is started from this small launcher, not from pytest: on Linux a child's ru_maxrss
# starts at its parent's RSS at fork (the forked address space is counted until exec), and pytest may be big.
LAUNCHER = """import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(usage.ru_maxrss * 1024)  # kilobytes on Linux
sys.exit(os.waitstatus_to_exitcode(status))
"""


def pull_peak_rss(gguf: Path, home: Path) -> tuple[int, str]:
    """``inferos pull gguf`` in a child process: (its exact peak RSS in bytes from ``wait4``, its stderr)."""
    env = dict(os.environ, INFEROS_HOME=str(home))
    done = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "inferos_cli", "pull", str(gguf)],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1]), done.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in kilobytes on Linux")
def test_pull_peak_rss_is_bounded_by_a_layer_not_the_model(tmp_path: Path) -> None:
    """A 3-layer GGUF of 61 MB Q4_0 matrices (~670 MB): the child's peak stays within the issue's bound
    (1 GiB + the largest tensor) and, against a pull of the same file shape with tiny tensors (the
    interpreter, imports, tokenizer and graph: everything but the weights), within 3 layers' bytes above it.
    The streaming converter holds the embedding and one layer at a time: the layer's blocks re-expressed as
    MatMulNBits weights (~1.1x its bytes) plus the fused q/k/v and gate/up copies (~1x), the one read buffer;
    a converter that kept every weight (and the pages of a memory map) would need about 2x the model."""
    hidden, ffn, layers = 4096, 26624, 3
    big, small = tmp_path / "big.gguf", tmp_path / "small.gguf"
    try:
        sizes = write_q4_0_gguf(big, layers=layers, hidden=hidden, ffn=ffn)
        write_q4_0_gguf(small, layers=1, hidden=64, ffn=128)
        baseline, _ = pull_peak_rss(small, tmp_path / "home-small")
        peak, err = pull_peak_rss(big, tmp_path / "home-big")
        largest = max(sizes.values())
        layer = sum(n for name, n in sizes.items() if name.startswith("blk.0."))
        model = sum(sizes.values())
        assert largest > 60e6 and model > 600 * MIB
        assert "convert" in err
        assert peak <= (1 << 30) + largest, f"peak {peak / MIB:.0f} MiB"
        assert peak - baseline <= 3 * layer < 2 * model, \
            f"peak {peak / MIB:.0f} MiB, baseline {baseline / MIB:.0f} MiB, layer {layer / MIB:.0f} MiB"
    finally:
        for path in (big, small, tmp_path / "home-small", tmp_path / "home-big"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def test_every_tensor_is_read_once_and_bytes_are_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversion reads each GGUF tensor exactly once (no second pass for the metadata): floats whole,
    block matrices a few rows at a time; the ``convert`` stage reports bytes read, rising to the file's tensor
    bytes, before the ``write`` stage."""
    import gguf

    from inferos_cli.models import gguf as reader_module
    from inferos_cli.models.convert import convert_gguf

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, tied=False)
    reads: list[str] = []
    for method in ("read", "blocks"):
        original = getattr(reader_module.TensorFile, method)
        monkeypatch.setattr(reader_module.TensorFile, method,
                            lambda self, name, original=original: (reads.append(name), original(self, name))[1])
    calls: list[tuple[str, int, int]] = []
    convert_gguf(path, tmp_path / "out", progress=lambda *a: calls.append(a))
    names = [t.name for t in gguf.GGUFReader(str(path)).tensors]
    assert sorted(set(reads)) == sorted(names)  # blocks() returns None for a float matrix, then read()
    assert len(reads) - len(set(reads)) == sum(1 for t in gguf.GGUFReader(str(path)).tensors
                                                if len(t.shape) == 2 and t.tensor_type.name in ("F32", "F16", "BF16"))
    total = sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)
    done = [d for stage, d, t in calls if stage == "convert" and t == total]
    assert done == sorted(done) and done[-1] == total and len(done) == len(names) + 1
    assert [c[0] for c in calls][-2:] == ["write", "write"]


def test_layers_stream_and_metadata_needs_no_second_pass(tmp_path: Path) -> None:
    """``gguf_weights`` gives lazy layers; param count and storage come from the layers already produced."""
    from inferos_cli.models.gguf import gguf_spec, gguf_weights, open_gguf
    from inferos_cli.models.weights import (LazyLayers, describe_storage, layer_summary, param_count, store,
                                            store_embedding)

    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    reader = open_gguf(path)
    spec = gguf_spec(reader, {t.name: t for t in reader.tensors})
    weights = gguf_weights(reader, spec, "llama", None, store, store_embedding)
    assert isinstance(weights.layers, LazyLayers) and len(weights.layers) == spec.num_layers
    listed = [weights.layers[i] for i in range(spec.num_layers)]
    eager = type(weights)(weights.embed, listed, weights.final_norm, weights.lm_head)
    weights.layers.load = None  # type: ignore[assignment]  # a second pass would fail here
    assert param_count(weights, tied=True) == param_count(eager, tied=True)
    assert describe_storage(weights) == describe_storage(eager) == {"Q8_0->8bit": 1, "Q4_1->4bit": 14}
    assert weights.layers.summary(0) == layer_summary(listed[0])


def test_safetensors_reads_on_access(stories_src: Path) -> None:
    """``name in tensors`` reads nothing; each access reads its bytes, counted toward the total."""
    from inferos_cli.models.hf import read_safetensors

    tensors = read_safetensors(stories_src)
    assert "model.norm.weight" in tensors and "nope" not in tensors and tensors.done == 0
    norm = tensors["model.norm.weight"]
    assert norm.dtype == np.float32 and tensors.done == norm.nbytes and tensors.total > norm.nbytes
