"""docs/security.md names, for each rule, the tests that hold it: every test it names exists, so a renamed or
removed test cannot leave a rule silently unproven."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def named_tests() -> list[tuple[str, str]]:
    """(file under tests/, test name) of every `file::test` and following `::test` in the doc's tables."""
    named, current = [], None
    for line in (ROOT / "docs" / "security.md").read_text().splitlines():
        if not line.startswith("|"):
            continue
        for file, test in re.findall(r"`([\w/]+\.py)?::(\w+)", line):
            current = file or current
            named.append((current, test))
    return named


def test_every_test_the_security_doc_names_exists():
    named = named_tests()
    assert len(named) > 80
    files = {path.name: path.read_text() for path in (ROOT / "tests").rglob("test_*.py")}  # tests/<folder>/<file>
    missing = [f"{file}::{test}" for file, test in named if f"def {test}(" not in files.get(Path(file).name, "")]
    assert not missing, missing
