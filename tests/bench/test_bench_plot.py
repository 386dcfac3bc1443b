"""`inferos bench --plot`: the files are written and are valid images (PNG magic, SVG XML, HTML with the SVG
inlined and no external resources)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferos_cli.cli import app

pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")


@pytest.fixture(scope="module")
def snapshot(stories_onnx: Path, tinystories_text: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("plot")
    png = out / "bench.png"
    result = CliRunner().invoke(app, [
        "bench", "--model", str(stories_onnx), "--compare", "baseline,chat+baseline", "--batch-sizes", "1,2",
        "--seq-lengths", "16,32", "--gen-tokens", "4", "--repeats", "1", "--warmup", "0",
        "--text", str(tinystories_text), "--format", "json", "--plot", str(png)], env={"INFEROS_HOME": str(out / "h")})
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in result.stderr
    return json.loads(result.stdout)


def test_png_from_the_cli_is_a_png(snapshot: dict[str, Any]) -> None:
    assert snapshot["rows"]  # the fixture asserted the PNG magic of the file the CLI wrote


def test_svg_is_valid_xml_with_one_line_per_config(snapshot: dict[str, Any], tmp_path: Path) -> None:
    from inferos_cli.ui.plot import write_plot

    svg = write_plot(snapshot, tmp_path / "b.svg")
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text(encoding="utf-8")
    assert "baseline" in text and "chat+baseline" in text and "decode tokens/s" in text


def test_html_is_self_contained(snapshot: dict[str, Any], tmp_path: Path) -> None:
    from inferos_cli.ui.plot import write_plot

    page = write_plot(snapshot, tmp_path / "b.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page and "</svg>" in page
    assert "<script" not in page and "http://" not in page.split("<svg", 1)[0].replace("http://www.w3.org", "")
    svg = page[page.index("<svg"):page.index("</svg>") + len("</svg>")]
    ET.fromstring(svg)
    assert "| batch |" in page  # the Markdown table rides along


def test_series_holds_means_and_sds_per_config(snapshot: dict[str, Any]) -> None:
    from inferos_cli.ui.plot import series

    data = series(snapshot, 1, "decode_tps")
    assert set(data) == {"baseline", "chat+baseline"}
    xs, ys, sds = data["baseline"]
    assert xs == [16, 32] and all(y > 0 for y in ys) and sds == [0.0, 0.0]


def test_missing_matplotlib_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    from inferos_cli.errors import UsageError
    from inferos_cli.ui import plot

    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(UsageError, match="needs matplotlib") as err:
        plot.check_plot_path(tmp_path / "x.png")
    assert "pip install 'inferos[plot]'" in err.value.one_line()
