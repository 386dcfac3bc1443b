"""Host facts read from the OS (the one ``cpu_model`` that doctor and bench share)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from inferos_cli.machine import host


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_cpu_model_is_what_proc_cpuinfo_says() -> None:
    text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    if match is None:
        pytest.skip("this kernel's cpuinfo has no 'model name'")
    assert host.cpu_model() == match.group(1).strip()


def test_memory_and_cores_are_read() -> None:
    total, available = host.memory()
    assert total > 0 and 0 < available <= total
    physical, logical = host.cpu_cores()
    assert logical and logical >= 1 and (physical is None or physical <= logical)


def test_run_program_reports_what_could_not_run(tmp_path: Path) -> None:
    code, out = host.run_program([str(tmp_path / "no-such-program")])
    assert code is None and "could not start" in out
    code, out = host.run_program([sys.executable, "-c", "print('hi')"])
    assert code == 0 and out == "hi"
