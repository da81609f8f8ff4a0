"""docs/dfp-compatibility.md names the tests behind its supported rows: every test it names
exists, so a renamed or deleted test cannot leave a row claiming a check that is gone."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = re.compile(r"`(test_[a-z0-9_]+\.py)?(?:::)?(test_[A-Za-z0-9_]+)?(\*)?`")


def test_every_test_the_compatibility_doc_names_exists():
    defined = {}
    for path in (ROOT / "tests").glob("test_*.py"):
        tree = ast.parse(path.read_text())
        defined[path.name] = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    text = (ROOT / "docs" / "dfp-compatibility.md").read_text()
    current, missing, named = None, [], 0
    for match in REFERENCE.finditer(text):
        file, test, prefix = match.groups()
        if file:
            current = file
            if file not in defined:
                missing.append(file)
        if test and current is not None:
            named += 1
            found = defined.get(current, ())
            if not (any(n.startswith(test) for n in found) if prefix else test in found):
                missing.append(f"{current}::{test}")
    assert named > 50 and missing == [], missing
