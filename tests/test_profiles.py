"""Profiles: the guide's values, merging, size classes, user profiles, precedence and YAML configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from inferos_cli.cli import app
from inferos_cli.errors import ConfigError, ProfileError, UsageError
from inferos_cli.models.params import parse_param_count, size_class
from inferos_cli.models.resolve import param_count_for
from inferos_cli.profiles import available, profile_list_snapshot, resolve_settings
from inferos_cli.ui.profile_table import policy_lines, policy_table, policy_toml, profile_list_table

runner = CliRunner()

# (profile, recent_window, thresholds or None, scheduler mode, prefill, decode, max_delta_ppl, kv mode)
GUIDE = [
    ("3b", 128, (0.8, 0.6, 0.4), "gpu_only", None, None, 0.5, None),
    ("7b", 64, (0.7, 0.5, 0.3), "hybrid", "dml", "npu", 0.5, None),
    ("13b", 32, (0.6, 0.4, 0.2), "hybrid", "dml", "npu", 0.5, None),
    ("20b", 32, (0.6, 0.4, 0.2), "hybrid", "dml", "npu", 0.5, None),
    ("chat", 128, None, "hybrid", None, "npu", 0.3, "latency_optimized"),
    ("batch", 32, None, "hybrid", "dml", None, 0.5, "throughput_optimized"),
    ("quality", 256, None, "gpu_only", None, None, 0.1, "quality_optimized"),
]


@pytest.mark.parametrize("row", GUIDE, ids=[r[0] for r in GUIDE])
def test_builtin_profiles_carry_the_guide_values(row: tuple) -> None:
    name, window, thresholds, mode, prefill, decode, ppl, kv_mode = row
    pol = resolve_settings(name, use_env=False, use_config=False).policy
    assert pol.kv.recent_window == window
    if thresholds:
        lt = pol.kv.level_thresholds
        assert (lt.L1_int8, lt.L2_int4, lt.L3_evict) == thresholds
    assert pol.scheduler.mode == mode
    if prefill:
        assert pol.scheduler.prefill_device == prefill
    if decode:
        assert pol.scheduler.decode_device == decode
    assert pol.quality.max_delta_ppl == ppl
    if kv_mode:
        assert pol.kv.mode == kv_mode


@pytest.mark.parametrize(
    ("count", "expected"),
    [(None, None), (0, None), (135_000_000, "3b"), (3_000_000_000, "3b"), (7_000_000_000, "7b"),
     (8_030_000_000, "7b"), (13_000_000_000, "13b"), (20_000_000_000, "20b"), (70_000_000_000, "20b")],
)
def test_size_class_from_param_count(count: int | None, expected: str | None) -> None:
    assert size_class(count) == expected


def test_size_class_applies_first_then_use_case() -> None:
    resolved = resolve_settings("chat", param_count=7_000_000_000, use_env=False, use_config=False)
    pol = resolved.policy
    assert resolved.profiles == ["7b", "chat"]
    assert pol.kv.recent_window == 128  # chat on top of 7b
    assert (pol.kv.level_thresholds.L1_int8, pol.kv.level_thresholds.L3_evict) == (0.7, 0.3)  # from 7b
    assert pol.scheduler.prefill_device == "dml"  # from 7b
    assert pol.scheduler.decode_device == "npu"
    assert pol.quality.max_delta_ppl == 0.3  # chat
    assert resolved.sources["kv.level_thresholds.L1_int8"] == "profile:7b (size class)"
    assert resolved.sources["kv.recent_window"] == "profile:chat"


def test_explicit_size_class_is_not_applied_twice() -> None:
    resolved = resolve_settings("chat,7b", param_count=7_000_000_000, use_env=False, use_config=False)
    assert resolved.profiles == ["chat", "7b"]
    assert resolved.policy.kv.recent_window == 64  # 7b named last wins


def test_comma_list_merges_left_to_right() -> None:
    assert resolve_settings("7b,quality", use_env=False, use_config=False).policy.kv.recent_window == 256
    assert resolve_settings("quality,7b", use_env=False, use_config=False).policy.kv.recent_window == 64


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError) as info:
        resolve_settings("nosuch", use_env=False, use_config=False)
    line = info.value.one_line()
    assert "nosuch" in line
    for name in ("3b", "7b", "13b", "20b", "chat", "batch", "quality"):
        assert name in line


def test_user_profile_in_inferos_home(inferos_home: Path) -> None:
    folder = inferos_home / "profiles"
    folder.mkdir(parents=True)
    (folder / "tiny.toml").write_text('description = "mine"\n[kv]\nrecent_window = 48\n', encoding="utf-8")
    (folder / "chat.toml").write_text('kind = "use"\ndescription = "my chat"\n[kv]\nrecent_window = 96\n',
                                      encoding="utf-8")
    assert available()["tiny"] == folder / "tiny.toml"
    assert resolve_settings("tiny", use_env=False, use_config=False).policy.kv.recent_window == 48
    assert resolve_settings("chat", use_env=False, use_config=False).policy.kv.recent_window == 96  # shadows
    rows = {r["name"]: r for r in profile_list_snapshot()["profiles"]}
    assert rows["tiny"]["kind"] == "user" and rows["tiny"]["source"] == str(folder / "tiny.toml")
    assert rows["7b"]["source"] == "built-in (7b.toml)"


def test_invalid_user_profile_names_the_profile(inferos_home: Path) -> None:
    folder = inferos_home / "profiles"
    folder.mkdir(parents=True)
    (folder / "bad.toml").write_text("[kv]\nrecent_window = 4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        resolve_settings("bad", use_env=False, use_config=False)
    assert "kv.recent_window = 4 (from profile:bad)" in info.value.one_line()
    assert "16..512" in info.value.one_line()


def test_precedence_flag_env_file_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[kv]\nrecent_window = 48\nsink_tokens = 2\n", encoding="utf-8")
    monkeypatch.setenv("INFEROS_KV__RECENT_WINDOW", "40")
    flags = {"kv": {"recent_window": 100, "sink_tokens": None}}
    r = resolve_settings("7b", config_path=cfg, flags=flags)
    assert r.policy.kv.recent_window == 100 and r.sources["kv.recent_window"] == "flag"
    assert r.policy.kv.sink_tokens == 2 and r.sources["kv.sink_tokens"] == f"config:{cfg}"  # None flag ignored
    r = resolve_settings("7b", config_path=cfg)
    assert r.policy.kv.recent_window == 40 and r.sources["kv.recent_window"] == "env"
    monkeypatch.delenv("INFEROS_KV__RECENT_WINDOW")
    r = resolve_settings("7b", config_path=cfg)
    assert r.policy.kv.recent_window == 48 and r.sources["kv.recent_window"] == f"config:{cfg}"
    r = resolve_settings("7b")
    assert r.policy.kv.recent_window == 64 and r.sources["kv.recent_window"] == "profile:7b"
    r = resolve_settings(None)
    assert r.policy.kv.recent_window == 128 and r.sources["kv.recent_window"] == "default"


GUIDE_YAML = """\
infer_os:
  profile: 7b
  quality:
    max_delta_ppl: 0.4
    min_accept_rate: 0.6
  kv:
    mode: dynamic
    recent_window: 96
    sink_tokens: 4
    group_size: 64
    level_thresholds:
      L1_int8: 0.75
      L2_int4: 0.55
      L3_evict: 0.35
  io:
    enable_iobinding: true
    dml_pool_bytes: 2048MiB
    host_pool_bytes: 4GiB
  scheduler:
    mode: hybrid
    prefill_device: dml
    decode_device: npu
  loops:
    fast_ms: 1
    mid_ms: 10
    slow_ms: 100
"""


def test_yaml_guide_config_is_accepted(tmp_path: Path) -> None:
    cfg = tmp_path / "infer_os.yaml"
    cfg.write_text(GUIDE_YAML, encoding="utf-8")
    r = resolve_settings(None, config_path=cfg)
    pol = r.policy
    assert r.profiles == ["7b"]  # the file's own profile key
    assert pol.kv.recent_window == 96 and pol.kv.group_size == 64
    assert pol.kv.level_thresholds.L2_int4 == 0.55
    assert pol.io.dml_pool_bytes == 2048 * 1024**2 and pol.io.host_pool_bytes == 4 * 1024**3
    assert pol.quality.min_accept_rate == 0.6
    assert r.sources["kv.recent_window"] == f"config:{cfg}"


def test_toml_config_profile_key_and_cli_profile_override(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('profile = "batch"\n', encoding="utf-8")
    assert resolve_settings(None, config_path=cfg).profiles == ["batch"]
    assert resolve_settings("quality", config_path=cfg).profiles == ["quality"]


def test_param_count_parsing_and_real_model(oga_dir: Path) -> None:
    assert parse_param_count("7B") == 7_000_000_000
    assert parse_param_count("135M") == 135_000_000
    assert parse_param_count("13e9") == 13_000_000_000
    with pytest.raises(UsageError):
        parse_param_count("seven")
    count = param_count_for(str(oga_dir.parent))
    assert count is not None and 100_000_000 < count < 200_000_000  # SmolLM2-135M
    assert size_class(count) == "3b"


def test_profiles_show_7b_json() -> None:
    result = runner.invoke(app, ["profiles", "show", "7b", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    kv = data["policy"]["kv"]
    assert kv["recent_window"] == 64
    assert kv["level_thresholds"] == {"L1_int8": 0.7, "L2_int4": 0.5, "L3_evict": 0.3}
    assert data["policy"]["scheduler"]["decode_device"] == "npu"
    assert data["sources"]["kv.recent_window"] == "profile:7b"


def test_profiles_show_ignores_env_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFEROS_KV__RECENT_WINDOW", "40")
    data = json.loads(runner.invoke(app, ["profiles", "show", "7b", "-f", "json"]).output)
    assert data["policy"]["kv"]["recent_window"] == 64


def test_profiles_show_with_model_applies_size_class(oga_dir: Path) -> None:
    result = runner.invoke(app, ["profiles", "show", "chat", "--model", str(oga_dir.parent), "-f", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["profiles"] == ["3b", "chat"] and data["size_class"] == "3b"
    assert data["sources"]["kv.level_thresholds.L1_int8"] == "profile:3b (size class)"


def test_profiles_show_toml_round_trips(tmp_path: Path) -> None:
    result = runner.invoke(app, ["profiles", "show", "chat", "--params", "13B", "--format", "toml"])
    assert result.exit_code == 0, result.output
    assert "recent_window = 128  # profile:chat" in result.output
    cfg = tmp_path / "round.toml"
    cfg.write_text(result.output, encoding="utf-8")
    again = resolve_settings(None, config_path=cfg, use_env=False)
    expected = resolve_settings("chat", param_count=13_000_000_000, use_env=False, use_config=False)
    assert again.policy == expected.policy


def test_profiles_list_formats() -> None:
    result = runner.invoke(app, ["profiles", "list", "--format", "json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)["profiles"]
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds["7b"] == "size" and kinds["chat"] == "use" and kinds["int4"] == "preset"
    assert [r["name"] for r in rows][:4] == ["3b", "7b", "13b", "20b"]
    plain = runner.invoke(app, ["profiles", "list"])
    assert plain.exit_code == 0 and "quality\tuse\t" in plain.output


def test_renderers_are_pure() -> None:
    snap = profile_list_snapshot()
    console = Console(record=True, width=200)
    console.print(profile_list_table(snap))
    assert "int4-k8v4" in console.export_text()
    from inferos_cli.profiles import policy_snapshot

    psnap = policy_snapshot(resolve_settings("7b", use_env=False, use_config=False))
    console = Console(record=True, width=200)
    console.print(policy_table(psnap))
    text = console.export_text()
    assert "kv.level_thresholds.L1_int8" in text and "profile:7b" in text and "2147483648 B (2.0 GiB)" in text
    assert any(line.startswith("kv.recent_window\t64\tprofile:7b") for line in policy_lines(psnap))
    assert "[kv.level_thresholds]" in policy_toml(psnap)


def test_yaml_without_pyyaml_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    cfg = tmp_path / "infer_os.yml"
    cfg.write_text(GUIDE_YAML, encoding="utf-8")
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` raise ImportError
    with pytest.raises(ConfigError) as info:
        resolve_settings(None, config_path=cfg)
    assert "PyYAML" in info.value.one_line() and "inferos[yaml]" in info.value.one_line()


def test_yaml_unknown_section_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "x.yaml"
    cfg.write_text("infer_os:\n  kvcache:\n    recent_window: 64\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown setting section 'kvcache'"):
        resolve_settings(None, config_path=cfg)


def test_param_count_of_hf_folder_and_gguf_without_loading(stories_src: Path, tmp_path: Path) -> None:
    count = param_count_for(str(stories_src))
    assert count is not None and 250_000 < count < 270_000  # stories260K
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("a", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("b", np.zeros((3,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert param_count_for(str(path)) == 35
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(Exception, match="not a readable GGUF"):
        param_count_for(str(bad))


def test_env_value_that_breaks_a_profile_group_is_blamed_on_env(inferos_home: Path) -> None:
    """Issue 17 item 10a through the real CLI: an env threshold under the 3b profile names the env layer."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "INFEROS_HOME": str(inferos_home), "INFEROS_KV__LEVEL_THRESHOLDS__L1_INT8": "0.1"}
    done = subprocess.run([sys.executable, "-m", "inferos_cli", "config", "show", "--profile", "3b"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "kv.level_thresholds (from env)" in done.stderr and "profile:3b" not in done.stderr
