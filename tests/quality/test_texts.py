"""The shipped default text (issue 17 item 4): WikiText-2's test split without ../shared, byte for byte."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from conftest import DATA


def test_default_text_is_wikitext2_unpacked_once_into_the_cache(inferos_home: Path) -> None:
    from inferos_cli.quality.texts import WIKITEXT2_TEST_SHA256, default_text

    path = default_text()
    assert path == inferos_home / "cache" / "texts" / "wikitext2-raw-test.txt"
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == WIKITEXT2_TEST_SHA256
    assert data.startswith(b"\r\n\r\n = Robert Boulter = \r\n") and len(data) > 1_000_000
    shared = DATA / "wikitext2-raw-test.txt"
    if shared.is_file():
        assert data == shared.read_bytes()
    old = time.time() - 60
    os.utime(path, (old, old))
    assert default_text() == path and path.stat().st_mtime == old  # sound: not written again
    path.write_bytes(b"damaged")
    assert default_text().read_bytes() == data  # altered: unpacked again
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temp file left


def test_the_text_and_its_attribution_ship_in_the_package() -> None:
    from importlib import resources

    notice = resources.files("inferos_cli").joinpath("data/NOTICE-wikitext2.txt").read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in notice and "Merity" in notice and "Salesforce" in notice
    assert resources.files("inferos_cli").joinpath("data/wikitext2-raw-test.txt.gz").is_file()
