"""Where derived graphs live (inferos_cli/graphs/naming.py): never in a model folder the user owns, in inferos'
cache keyed by the source model, beside the model only in folders inferos made itself (issue 17, item 7)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from _engines import load_engine

from inferos_cli import paths
from inferos_cli.engine.sampling import GenerationConfig
from inferos_cli.graphs import naming
from inferos_cli.graphs.attention import attention_op_graph
from inferos_cli.graphs.exact import exact_info
from inferos_cli.graphs.kv_segments import RewriteSpec, rewritten_graph
from inferos_cli.graphs.last_logits import last_logits_graph
from inferos_cli.models.info import inspect_folder

CPU = {"scheduler": {"mode": "cpu"}}


def user_copy(src: Path, dst: Path) -> Path:
    """A plain, writable copy of a model folder, as a user (or Lemonade, or GAIA) keeps one."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.inferos-*", ".*"))
    dst.chmod(0o755)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry of ``folder`` (hidden ones included) with the sha256 of its bytes."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() if f.is_file() else "dir" for f in folder.iterdir()}


@pytest.fixture(scope="module")
def tiny_gqa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GGUF converted with GroupQueryAttention (RoPE from position_ids: it has an Attention-op twin)."""
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.models.convert import convert_gguf

    root = tmp_path_factory.mktemp("tiny_gqa")
    write_tiny_gguf(root / "tiny.gguf")
    return convert_gguf(root / "tiny.gguf", root / "model", attention="gqa", accuracy_level=0)


def test_writable_model_folders_stay_byte_identical(oga_dir: Path, tiny_gqa: Path, tmp_path: Path) -> None:
    """Runs that derive every graph (last-position logits, int8-fused, KV rewrite, exact-compute twin, the
    Attention-op twin) leave writable copies of an onnxruntime-genai folder and of a conversion byte-identical:
    no new file, no changed one. Every derived graph is in the cache, its weights hard-linked there."""
    oga = user_copy(oga_dir.parent, tmp_path / "lemonade" / "smollm2")
    tiny = user_copy(tiny_gqa, tmp_path / "mine" / "tiny")
    assert naming.writable(oga) and naming.writable(tiny)
    before = {oga: snapshot(oga), tiny: snapshot(tiny)}

    made: list[tuple[Path, Path]] = []  # (derived graph, its source folder)
    for profile in (None, "int8"):  # int8-fused (+ logits graph), then the segmented int8 rewrite
        eng = load_engine(oga, profile, flags=CPU)
        events = list(eng.generate(eng.encode_prompt("Hi"), GenerationConfig(max_tokens=4)))
        assert events[-1].kind == "done"
        made.append((Path(eng.plan.onnx_path), oga))
    exact, changed = exact_info(inspect_folder(oga))
    assert changed
    made.append((Path(exact.onnx_path), oga))
    tiny_info = inspect_folder(tiny)
    for graph in (attention_op_graph(tiny_info.onnx_path), last_logits_graph(tiny_info.onnx_path),
                  rewritten_graph(tiny_info, RewriteSpec(group_size=16, rotate_keys=False)).path):
        assert graph is not None
        made.append((graph, tiny))
    eng = load_engine(tiny, "baseline", flags=CPU)
    assert list(eng.generate([1, 5, 70], GenerationConfig(max_tokens=3)))[-1].kind == "done"

    assert snapshot(oga) == before[oga] and snapshot(tiny) == before[tiny]
    infixes = {path.name.split(".inferos-")[1].split("-")[0] for path, _ in made}
    assert infixes == {"kvf", "kv", "exact", "attn", "logits"}, made
    for path, source in made:
        assert naming.graphs_dir() in path.parents and path.is_file()
        assert (path.parent / "model.onnx.data").samefile(source / "model.onnx.data")  # a link, not a copy


def test_graphs_of_one_source_share_one_folder_keyed_by_its_files(tiny_gqa: Path, tmp_path: Path) -> None:
    """One cache folder per source model (one link of the weights for all its graphs); a changed data file
    (size or modification time) names a new folder, so a stale graph is never used."""
    tiny = user_copy(tiny_gqa, tmp_path / "tiny")
    src = tiny / "model.onnx"
    logits, attn = last_logits_graph(src), attention_op_graph(src)
    assert logits is not None and attn is not None and logits.parent == attn.parent
    assert logits.parent.name == naming.source_key(src)
    st = (tiny / "model.onnx.data").stat()
    os.utime(tiny / "model.onnx.data", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    moved = last_logits_graph(src)
    assert moved is not None and moved.parent != logits.parent and moved.is_file()


def test_inferos_own_folders_keep_graphs_beside(tiny_gqa: Path) -> None:
    own = paths.models_dir() / "tiny"
    shutil.copytree(tiny_gqa, own, ignore=shutil.ignore_patterns("*.inferos-*", ".*"))
    graph = last_logits_graph(own / "model.onnx")
    assert graph is not None and graph.parent == own
    assert not naming.graphs_dir().exists()


def test_weights_are_copied_where_no_link_is_possible(tiny_gqa: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Across file systems a hard link fails; a symbolic link would not do (onnxruntime refuses external data
    that resolves outside the model's folder), so the weights are copied, once per source, with a note."""
    tiny = user_copy(tiny_gqa, tmp_path / "tiny")
    before = snapshot(tiny)

    def no_link(*_: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(naming.os, "link", no_link)
    info = inspect_folder(tiny)
    res = rewritten_graph(info, RewriteSpec(group_size=16, rotate_keys=False))
    data = res.path.parent / "model.onnx.data"
    assert "weights copied" in res.note and not data.samefile(tiny / "model.onnx.data")
    assert data.read_bytes() == (tiny / "model.onnx.data").read_bytes()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])  # the copy is usable
    assert any(i.name == "input_ids" for i in sess.get_inputs())
    assert snapshot(tiny) == before
