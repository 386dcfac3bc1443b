"""Texts inferos ships for scoring and prompts, so ``eval`` and ``bench`` have a default without ``../shared``.

The WikiText-2 raw test split ships gzip-compressed in ``inferos_cli/data/`` (CC BY-SA 3.0, attribution in
``data/NOTICE-wikitext2.txt``); :func:`default_text` decompresses it once into the inferos cache and returns
the plain file's path (the CLI's ``--text`` takes a path).
"""

from __future__ import annotations

import gzip
import hashlib
from importlib import resources
from pathlib import Path

from inferos_cli import paths
from inferos_cli.errors import InferosError

WIKITEXT2_TEST = "wikitext2-raw-test.txt"
WIKITEXT2_TEST_SHA256 = "71fa921e51ba607b4364d8787d05f4513b41b33732dd3504ff1af8952c6e7e77"


def default_text() -> Path:
    """The WikiText-2 raw test split as a plain file in ``<cache>/texts/`` (written atomically on first use, or
    again when the cached copy is missing or altered)."""
    target = paths.cache_dir() / "texts" / WIKITEXT2_TEST
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == WIKITEXT2_TEST_SHA256:
        return target
    packed = resources.files("inferos_cli").joinpath(f"data/{WIKITEXT2_TEST}.gz").read_bytes()
    data = gzip.decompress(packed)
    if hashlib.sha256(data).hexdigest() != WIKITEXT2_TEST_SHA256:
        raise InferosError(f"the packaged {WIKITEXT2_TEST}.gz is damaged", "reinstall inferos")
    paths.atomic_write_bytes(target, data)
    return target
