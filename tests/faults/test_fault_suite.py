"""The short fault suite (`bench/faults.py --quick`) as part of the test run: two replicas under a
broker kill, SIGTERMs, a SIGKILL, a Redis outage and a Stripe storm, with ~1,000 fuzzed messages
on both transports. The full run (`uv run python bench/faults.py`) takes minutes: see the README."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_quick_fault_suite_loses_nothing_doubles_nothing_and_never_crashes():
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "faults.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=280,
        cwd=ROOT,
    )
    line = next((ln for ln in result.stdout.splitlines() if ln.startswith("faults:")), "")
    print(line)
    assert result.returncode == 0, f"{line}\n{result.stderr[-3000:]}"
    figures = dict(part.split("=", 1) for part in line.split()[1:])
    for name in ("lost", "doubled", "wrongly_dead_lettered", "crashes", "escalations", "unclean_exits"):
        assert figures[name] == "0", name
    assert int(figures["fuzz_dead_lettered"]) > 0
