"""The notebooks run top to bottom (their code cells, in order, in one namespace), so they stay true to the code."""
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.experts
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, monkeypatch, capsys):
    monkeypatch.chdir(path.parent)
    cells = json.loads(path.read_text())["cells"]
    namespace = {}
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        code = "".join(cell["source"])
        try:
            exec(compile(code, f"{path.name} cell {i}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{path.name}: code cell {i} failed: {type(e).__name__}: {e}") from e


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3
