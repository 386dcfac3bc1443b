"""`--model` resolution, the model cache (manifest, rebuild of damaged entries), the OGA folder, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _bare_greedy import bare_greedy_text


def test_hf_folder_is_converted_once_then_cached(stories_src: Path, inferos_home: Path) -> None:
    from inferos_cli.models.resolve import pull, resolve_model

    first = pull(str(stories_src), progress=False)
    assert first.action == "converted" and first.folder.parent == inferos_home / "cache" / "models"
    assert first.folder.name.startswith("stories260K-")
    info = resolve_model(str(stories_src), progress=False)
    assert info.path == first.folder and info.num_layers == 5 and info.has_position_ids
    assert pull(str(stories_src), progress=False).action == "cached"
    int4 = pull(str(stories_src), dtype="int4", progress=False)
    assert int4.folder.name.endswith("-int4") and int4.action == "converted"
    assert json.loads((int4.folder / "inferos.json").read_text())["dtype"] == "int4"


def test_damaged_cache_is_rebuilt_never_used(stories_src: Path) -> None:
    from inferos_cli.models.resolve import list_cached, pull

    folder = pull(str(stories_src), progress=False).folder
    data = folder / "model.onnx.data"
    good = data.read_bytes()
    data.write_bytes(good[: len(good) // 2])  # a partial write
    assert list_cached()[0].status.startswith("model.onnx.data has")
    again = pull(str(stories_src), progress=False)
    assert again.action == "rebuilt" and data.read_bytes() == good
    (folder / "inferos.json").unlink()  # an interrupted conversion without a manifest
    assert pull(str(stories_src), progress=False).action == "rebuilt"


def test_damaged_cached_name_is_rebuilt_from_its_source(stories_src: Path) -> None:
    from inferos_cli.models.resolve import pull, resolve_model

    folder = pull(str(stories_src), progress=False).folder
    (folder / "tokenizer.json").write_text("{}")
    info = resolve_model(folder.name, progress=False)  # by cached name
    assert info.path == folder and json.loads((folder / "tokenizer.json").read_text())["model"]


def test_gguf_file_is_converted_with_architecture_facts(tmp_path: Path) -> None:
    from _tiny_gguf import write_tiny_gguf

    from inferos_cli.models.resolve import resolve_model

    src = tmp_path / "tiny-model.gguf"
    write_tiny_gguf(src)
    info = resolve_model(str(src), progress=False)
    assert info.name.startswith("tiny-model-") and info.source_format == "inferos"
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim, info.hidden_size) == (2, 4, 2, 16, 64)
    assert info.vocab_size == 269 and info.context_length == 256 and info.eos_token_ids == [2]
    expected = 269 * 64 + 2 * (64 * 64 * 2 + 2 * 32 * 64 + 3 * 96 * 64 + 2 * 64) + 64
    assert info.param_count == expected and info.size_class == "3b"


def test_oga_folder_loads_in_place_and_decodes_coherent_text(oga_dir: Path) -> None:
    from inferos_cli.models.resolve import pull

    folder = oga_dir.parent
    result = pull(str(folder), progress=False)
    info = result.info
    assert result.action == "in place" and result.folder == folder
    assert info.source_format == "oga" and info.uses_gqa_op and not info.has_position_ids
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim, info.vocab_size) == (30, 9, 3, 64, 49152)
    assert 100e6 < info.param_count < 170e6 and info.chat_template
    assert "Paris" in bare_greedy_text(info)


def test_onnx_file_and_folder_without_model(tmp_path: Path, stories_src: Path) -> None:
    from inferos_cli.errors import ModelError, ModelNotFoundError
    from inferos_cli.models.resolve import pull, resolve_model

    folder = pull(str(stories_src), progress=False).folder
    info = resolve_model(str(folder / "model.onnx"), progress=False)
    assert info.onnx_path == folder / "model.onnx" and info.num_layers == 5
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="not a model folder"):
        resolve_model(str(empty), progress=False)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"), progress=False)
    with pytest.raises(ModelNotFoundError, match="no model named 'no-such-model'") as err:
        resolve_model("no-such-model", progress=False)
    assert "smollm2-135m" in err.value.one_line()
    with pytest.raises(ModelError, match="unknown dtype"):
        resolve_model(str(stories_src), dtype="int2", progress=False)


def test_unsupported_architecture_is_one_line(tmp_path: Path, stories_src: Path) -> None:
    import shutil

    from inferos_cli.errors import ConversionError
    from inferos_cli.models.resolve import resolve_model

    src = tmp_path / "neox"
    shutil.copytree(stories_src, src)
    cfg_path = src / "config.json"
    cfg_path.chmod(0o644)
    cfg = json.loads(cfg_path.read_text())
    cfg["model_type"] = "gpt_neox"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConversionError) as err:
        resolve_model(str(src), progress=False)
    assert "gpt_neox" in err.value.one_line() and "\n" not in err.value.one_line()


def test_config_json_states_each_architecture(tmp_path: Path) -> None:
    """config.json names the HF class per architecture and carries the gemma facts, which read back the same;
    Qwen3, like Qwen2, adds no BOS token."""
    from inferos_cli.models.convert import HF_ARCHITECTURES, finish_tokenizer_config, hf_config
    from inferos_cli.models.hf import hf_spec
    from inferos_cli.models.weights import DecoderSpec

    base = {"hidden_size": 64, "num_layers": 3, "num_heads": 4, "num_kv_heads": 1, "head_dim": 32,
            "intermediate_size": 96, "vocab_size": 300, "context_length": 256, "bos_token_id": 2, "eos_token_ids": [1]}
    llama = hf_config(DecoderSpec(arch="llama", **base))
    assert llama["architectures"] == ["LlamaForCausalLM"] and "sliding_window" not in llama
    assert HF_ARCHITECTURES["qwen3"] == "Qwen3ForCausalLM" and HF_ARCHITECTURES["phi3"] == "Phi3ForCausalLM"
    gemma = DecoderSpec(arch="gemma3", **base, sliding_window=16, rope_local_theta=10000.0, query_pre_attn_scalar=32.0,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    cfg = hf_config(gemma)
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["rope_local_base_freq"] == 10000.0
    back = hf_spec(cfg)
    for key in ("sliding_window", "layer_types", "rope_local_theta", "query_pre_attn_scalar", "attn_softcap",
                "final_softcap", "head_dim", "num_kv_heads"):
        assert getattr(back, key) == getattr(gemma, key), key
    capped = hf_config(DecoderSpec(arch="gemma2", **base, attn_softcap=50.0, final_softcap=30.0))
    assert (capped["attn_logit_softcapping"], capped["final_logit_softcapping"]) == (50.0, 30.0)
    for arch, bos in (("qwen3", False), ("qwen2", False), ("gemma3", True)):
        folder = tmp_path / arch
        folder.mkdir()
        finish_tokenizer_config(folder, DecoderSpec(arch=arch, **base))
        assert json.loads((folder / "tokenizer_config.json").read_text())["add_bos_token"] is bos, arch
