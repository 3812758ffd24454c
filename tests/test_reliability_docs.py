"""docs/reliability.md names, per guarantee, the test that checks it: every named test must exist, so the table
cannot drift from the suite (the suite itself runs them)."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def _test_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.name.startswith("test_")}


def test_every_test_named_in_reliability_md_exists():
    references = TEST_REFERENCE.findall((ROOT / "docs" / "reliability.md").read_text(encoding="utf-8"))
    assert len(references) >= 40  # the table is there and parsed
    missing = []
    for file, name in sorted(set(references)):
        path = ROOT / file
        if not path.is_file() or name not in _test_functions(path):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"


def test_every_reliability_test_is_in_the_table():
    documented = {(file, name) for file, name in TEST_REFERENCE.findall((ROOT / "docs" / "reliability.md").read_text())}
    undocumented = [f"{path.name}::{name}" for path in sorted((ROOT / "tests").glob("test_reliability_*.py"))
                    if path.name != Path(__file__).name
                    for name in sorted(_test_functions(path)) if (f"tests/{path.name}", name) not in documented]
    assert not undocumented, f"tests/test_reliability_*.py tests missing from docs/reliability.md: {undocumented}"
