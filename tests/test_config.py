"""`inferos config init|show`: the starter file, INFEROS_HOME, and effective settings with their sources."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inferos_cli import paths
from inferos_cli.cli import app
from inferos_cli.configfile import starter_config
from inferos_cli.profiles import resolve_settings
from inferos_cli.settings import Policy, flatten

runner = CliRunner()


def test_starter_config_parses_and_sets_nothing() -> None:
    text = starter_config()
    data = tomllib.loads(text)
    assert flatten(data) == {}  # every value commented out: profiles keep working
    for key in flatten(Policy().model_dump()):
        assert f"# {key.split('.')[-1]} = " in text, key
    assert "16..512" in text and "one of: dml, npu, cuda, cpu" in text


def test_init_writes_into_inferos_home(inferos_home: Path) -> None:
    result = runner.invoke(app, ["config", "init"])
    assert result.exit_code == 0, result.output
    target = inferos_home / "config.toml"
    assert paths.config_file() == target and target.is_file()
    assert str(target) in result.output
    assert not list(inferos_home.glob(".config.toml.*"))  # no temp file left behind


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    target = tmp_path / "mine.toml"
    target.write_text("# keep me\n", encoding="utf-8")
    result = runner.invoke(app, ["config", "init", "--path", str(target)])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--force" in result.output
    assert target.read_text(encoding="utf-8") == "# keep me\n"
    result = runner.invoke(app, ["config", "init", "--path", str(target), "--force"])
    assert result.exit_code == 0 and "[kv.level_thresholds]" in target.read_text(encoding="utf-8")


def test_uncommented_value_takes_effect_from_inferos_home(inferos_home: Path) -> None:
    assert runner.invoke(app, ["config", "init"]).exit_code == 0
    target = inferos_home / "config.toml"
    text = target.read_text(encoding="utf-8")
    text = text.replace("# recent_window = 128", "recent_window = 48").replace('# profile = "chat"', 'profile = "7b"')
    target.write_text(text, encoding="utf-8")
    result = runner.invoke(app, ["config", "show", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["config"] == str(target)
    assert data["profiles"] == ["7b"]
    assert data["policy"]["kv"]["recent_window"] == 48
    assert data["sources"]["kv.recent_window"] == f"config:{target}"
    assert data["policy"]["scheduler"]["decode_device"] == "npu"  # from the file's profile


def test_show_reports_env_and_profile_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFEROS_KV__SINK_TOKENS", "8")
    result = runner.invoke(app, ["config", "show", "--profile", "batch", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["policy"]["kv"]["sink_tokens"] == 8 and data["sources"]["kv.sink_tokens"] == "env"
    assert data["sources"]["kv.recent_window"] == "profile:batch"


def test_show_with_explicit_config_and_toml_output(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[io]\ndml_pool_bytes = "1GiB"\n', encoding="utf-8")
    result = runner.invoke(app, ["config", "show", "--config", str(cfg), "--format", "toml"])
    assert result.exit_code == 0, result.output
    assert f"dml_pool_bytes = 1073741824  # config:{cfg}" in result.output
    plain = runner.invoke(app, ["config", "show", "--config", str(cfg)])
    assert f"io.dml_pool_bytes\t1073741824 B (1.0 GiB)\tconfig:{cfg}" in plain.output


def test_show_invalid_config_is_one_line_exit_1(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[kv.level_thresholds]\nL1_int8 = 0.3\nL2_int4 = 0.5\n", encoding="utf-8")
    result = runner.invoke(app, ["config", "show", "--config", str(cfg)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid setting kv.level_thresholds")
    assert "L1_int8=0.3" in lines[0] and f"config:{cfg}" in lines[0]


def test_show_missing_and_malformed_config(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", "--config", str(tmp_path / "none.toml")])
    assert result.exit_code == 1 and "config file not found" in result.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[kv\nrecent_window = ", encoding="utf-8")
    result = runner.invoke(app, ["config", "show", "--config", str(broken)])
    assert result.exit_code == 1 and "is not valid TOML" in result.output


def test_inferos_config_env_points_at_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "elsewhere.toml"
    cfg.write_text("[loops]\nslow_ms = 250\n", encoding="utf-8")
    monkeypatch.setenv("INFEROS_CONFIG", str(cfg))
    assert resolve_settings(None).policy.loops.slow_ms == 250


def test_unreadable_config_and_unwritable_target(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "show", "--config", str(tmp_path)])
    assert result.exit_code == 1 and result.output.startswith(f"error: cannot read {tmp_path}")
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    result = runner.invoke(app, ["config", "init", "--path", str(blocker / "sub" / "config.toml")])
    assert result.exit_code == 1 and result.output.startswith("error: cannot write")
