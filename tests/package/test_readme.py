"""The README's usage example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_usage_example_runs():
    (code,) = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    exec(compile(code, str(README), "exec"), {})


def test_readme_stays_short():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 150
