"""The repository stands alone: no file in it reads or links a path outside it (a sibling
workspace, an absolute path of the machine it was written on)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: Paths that only exist beside a developer's checkout.
OUTSIDE = re.compile(r"\.\./shared\b|(?<![\w.])shared/(?:fixtures|seeds|DESIGN)|/work/main\b")
TEXT = {".py", ".md", ".sh", ".toml", ".yml", ".yaml", ".json", ".txt", ".cfg", ".ini", ""}


def tracked_files() -> list[Path]:
    names = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if not names:  # not a git checkout (a copy, an unpacked archive): every file but tool caches
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file()
            and not any(part.startswith(".") or part == "node_modules" for part in p.relative_to(ROOT).parts)
        ]
    return [ROOT / n for n in names]


def test_no_file_refers_to_a_path_outside_the_repository():
    offenders = []
    for path in tracked_files():
        if path.suffix not in TEXT or not path.is_file() or path.name == "uv.lock" or path == Path(__file__):
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in OUTSIDE.finditer(text)]
    assert offenders == []


def test_the_data_the_tests_replay_is_in_the_repository():
    fixtures = ROOT / "tests" / "fixtures" / "jasmin-0.11.1"
    assert (fixtures / "README.md").is_file()
    assert sum(1 for _ in (fixtures / "real-capture.jsonl").open()) == 269
    assert sum(1 for _ in (fixtures / "real-capture.stock.jsonl").open()) == 82
    assert (ROOT / "docs" / "architecture.md").is_file()
