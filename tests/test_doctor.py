"""`inferos doctor` on this machine: real probes, a real HTTP server for Lemonade, real subprocesses."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Iterator

import pytest
from rich.console import Console
from typer.testing import CliRunner

from inferos_cli.cli import app
from inferos_cli import doctor as diagnose
from inferos_cli.machine import host
from inferos_cli.ui.doctor_table import doctor_lines, doctor_table, summary

runner = CliRunner()


@pytest.fixture
def doctor_json(inferos_home: Path) -> dict:
    """A real doctor run (JSON) under the test's own INFEROS_HOME."""
    result = runner.invoke(app, ["doctor", "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def by_name(data: dict) -> dict[str, dict]:
    return {c["name"]: c for c in data["checks"]}


def test_json_shape_and_statuses(doctor_json: dict) -> None:
    assert set(doctor_json) == {"checks"}
    for check in doctor_json["checks"]:
        assert set(check) == {"name", "status", "detail", "fix"}
        assert check["status"] in ("ok", "warn", "fail")
        assert check["detail"]
        if check["status"] != "ok":
            assert check["fix"], check
    names = set(by_name(doctor_json))
    for expected in ("python", "os", "cpu", "ram", "onnxruntime", "gpu", "npu", "gaia", "lemonade", "model cache",
                     "settings"):
        assert expected in names


def test_cpu_provider_works(doctor_json: dict) -> None:
    cpu = by_name(doctor_json)["provider CPUExecutionProvider"]
    assert cpu["status"] == "ok" and cpu["detail"].startswith("works")
    import onnxruntime as ort

    ort_row = by_name(doctor_json)["onnxruntime"]
    assert ort.__version__ in ort_row["detail"]
    for provider in ort.get_available_providers():
        assert f"provider {provider}" in by_name(doctor_json)


@pytest.mark.skipif(sys.platform == "win32", reason="DirectML / VitisAI may exist on Windows")
def test_dml_and_vitisai_reported_absent_with_reason(doctor_json: dict) -> None:
    import onnxruntime as ort

    checks = by_name(doctor_json)
    for provider, hint in (("DmlExecutionProvider", "onnxruntime-directml"), ("VitisAIExecutionProvider", "Ryzen AI")):
        if provider in ort.get_available_providers():
            pytest.skip(f"{provider} is compiled into this onnxruntime")
        row = checks[f"provider {provider}"]
        assert row["status"] == "warn"
        assert row["detail"].startswith("absent:") and "Windows" in row["detail"]
        assert hint in row["fix"]


def test_cache_row_follows_inferos_home(doctor_json: dict, inferos_home: Path) -> None:
    assert str(inferos_home) in by_name(doctor_json)["model cache"]["detail"]


def test_cache_check_reads_free_disk(inferos_home: Path) -> None:
    check = diagnose.check_cache()
    assert str(inferos_home / "cache" / "models") in check.detail
    assert "not created yet" in check.detail and " free of " in check.detail and "GiB" in check.detail
    (inferos_home / "cache" / "models" / "m1").mkdir(parents=True)
    (inferos_home / "cache" / "models" / "m1" / "w.bin").write_bytes(b"\0" * 4096)
    assert "1 models, 4.0 KiB" in diagnose.check_cache().detail


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        if self.path == "/api/v1/health":
            body = json.dumps({"status": "ok", "model_loaded": None}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def lemonade_url() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v1"
    finally:
        server.shutdown()
        server.server_close()


def test_lemonade_health_answer(lemonade_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEMONADE_BASE_URL", lemonade_url + "/")
    check = diagnose.check_lemonade()
    assert check.status == "ok"
    assert f"{lemonade_url}/health answered" in check.detail and '"status":"ok"' in check.detail


def test_lemonade_absent_is_a_warning_with_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("LEMONADE_BASE_URL", f"http://127.0.0.1:{port}/api/v1")
    check = diagnose.check_lemonade()
    assert check.status == "warn" and f"127.0.0.1:{port}" in check.detail and "LEMONADE_BASE_URL" in check.fix


def test_lemonade_default_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    from inferos_cli.backends.lemonade import candidate_urls

    monkeypatch.delenv("LEMONADE_BASE_URL", raising=False)
    assert candidate_urls() == ["http://localhost:13305/api/v1", "http://localhost:8000/api/v1"]


@pytest.mark.skipif(sys.platform == "win32", reason="builds a POSIX executable script on PATH")
def test_gaia_on_path_reports_its_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exe = tmp_path / "gaia"
    script = "import sys\nprint('amd-gaia 0.10.1' if '--version' in sys.argv else 'usage')\n"
    exe.write_text(f"#!{sys.executable}\n{script}")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    check = diagnose.check_gaia()
    assert check.status in ("ok", "warn")  # warn only if PyPI's unrelated gaia-cli is installed here
    assert str(exe) in check.detail
    if check.status == "ok":
        assert "amd-gaia 0.10.1" in check.detail


def test_gaia_absent_warns_about_the_impostor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    check = diagnose.check_gaia()
    assert check.status == "warn" and "amd-gaia" in check.fix and "gaia-cli" in check.fix


def test_broken_settings_fail_doctor(inferos_home: Path) -> None:
    inferos_home.mkdir(parents=True, exist_ok=True)
    (inferos_home / "config.toml").write_text("[kv]\nrecent_window = 2\n", encoding="utf-8")
    result = runner.invoke(app, ["doctor", "--format", "json"])
    assert result.exit_code == 1
    row = by_name(json.loads(result.output))["settings"]
    assert row["status"] == "fail" and "kv.recent_window = 2" in row["detail"]


def test_requested_device_fallback_is_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime as ort

    if "DmlExecutionProvider" in ort.get_available_providers():
        pytest.skip("DirectML is present here")
    monkeypatch.setenv("INFEROS_SCHEDULER__PREFILL_DEVICE", "dml")
    check = diagnose.check_settings()
    assert check.status == "warn" and "prefill dml -> cpu" in check.detail


def test_plain_output_and_renderer(doctor_json: dict) -> None:
    result = runner.invoke(app, ["doctor"])  # not a terminal: plain lines
    assert result.exit_code == 0
    assert any(line.startswith("ok    provider CPUExecutionProvider: works") for line in result.output.splitlines())
    assert result.output.strip().splitlines()[-1].endswith("the CPU path works")
    console = Console(record=True, width=220)
    console.print(doctor_table(doctor_json))
    text = console.export_text()
    assert "CPUExecutionProvider" in text and "status" in text
    assert summary(doctor_json).endswith("0 fail: the CPU path works")
    assert len(doctor_lines(doctor_json)) == len(doctor_json["checks"]) + 1


def test_table_keeps_brackets_literal() -> None:
    snap = {"checks": [{"name": "x", "status": "warn", "detail": "d", "fix": "pip install 'inferos[directml]'"}]}
    console = Console(record=True, width=200)
    console.print(doctor_table(snap))
    assert "inferos[directml]" in console.export_text()


def test_optional_packages_read_from_metadata() -> None:
    from importlib import metadata

    check = diagnose.check_optional_packages()
    assert f"pyyaml {metadata.version('pyyaml')}" in check.detail  # a test extra, so installed here
    assert check.status in ("ok", "warn") and (check.status == "ok") == ("missing:" not in check.detail)


@pytest.mark.skipif(sys.platform == "win32", reason="sysfs layout with symlinks (Linux)")
def test_sysfs_gpu_and_npu_discovery(tmp_path: Path) -> None:
    assert host.linux_drm_gpus(tmp_path)[0] is None  # no /sys/class/drm at all: n/a with the reason
    card = tmp_path / "sys/class/drm/card0/device"
    card.mkdir(parents=True)
    (card / "vendor").write_text("0x1002\n")
    (card / "gpu_busy_percent").write_text("3\n")
    (tmp_path / "sys/class/drm/card0-eDP-1").mkdir()  # a connector, not a GPU
    found, how = host.linux_drm_gpus(tmp_path)
    assert found == ["card0: AMD (utilisation counter present)"] and how.endswith("sys/class/drm")
    driver = tmp_path / "sys/bus/pci/drivers/amdxdna"
    driver.mkdir(parents=True)
    dev = tmp_path / "sys/class/accel/accel0/device"
    dev.mkdir(parents=True)
    (dev / "driver").symlink_to(driver)
    found, _ = host.linux_accel_npus(tmp_path)
    assert found == ["accel0: amdxdna"]


def test_two_onnxruntime_packages_are_a_warning_with_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime and onnxruntime-gpu both ship the `onnxruntime` module (`pip install 'inferos[gpu]'`
    installs the second beside the first): doctor says so and how to keep one."""
    from inferos_cli import doctor as diagnose

    check, providers = diagnose.check_onnxruntime()
    assert check.status == "ok" and "CPUExecutionProvider" in providers  # this venv: one package
    monkeypatch.setattr(diagnose, "_distributions_of_ort", lambda: ["onnxruntime 1.31.1", "onnxruntime-gpu 1.31.1"])
    check, _ = diagnose.check_onnxruntime()
    assert check.status == "warn" and "2 packages provide the same module" in check.detail
    assert check.fix == "keep one: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
