"""The notebooks run top to bottom in a real Jupyter kernel (nbclient), so they stay true to the code.

Each notebook holds `assert` cells on what it computes (differences from references, probabilities, FLOPs),
so a wrong number fails here, not only an exception. The committed notebooks keep their outputs for readers;
the test executes a copy in memory and never writes them back.
"""
import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 600  # seconds per cell: the first run of a kernel compiles it (Numba), which is slow on 2 cores
# Appended to the copy being run: the kernel must be this interpreter, running this checkout's minislm.
WHO_RUNS = "import json, sys, minislm; print(json.dumps([sys.prefix, minislm.__file__]))"


def run(path):
    """Execute a copy of the notebook in a fresh kernel (cwd notebooks/) -> the executed copy."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(WHO_RUNS))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=nb.metadata.kernelspec.name, allow_errors=True,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute(env=env)
    return nb


@pytest.mark.experts
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_its_checks_hold(path):
    before = path.read_bytes()
    nb = run(path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, (f"{path.name}: code cell {i} failed: {errors[0].ename}: {errors[0].evalue}\n"
                            f"{cell.source}")
        assert cell.execution_count is not None, f"{path.name}: code cell {i} did not run"
    prefix, module = json.loads(code[-1].outputs[0].text)
    assert Path(prefix).resolve() == Path(sys.prefix).resolve(), "the kernel is another Python"
    assert Path(module).resolve().parent.parent == ROOT, f"the kernel imported minislm from {module}"
    assert path.read_bytes() == before, "running the test changed the committed notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebooks_have_outputs_and_assertions(path):
    # readers on the web see what the code printed, and every notebook checks what it computes
    nb = json.loads(path.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(c["execution_count"] is not None for c in code), f"{path.name}: committed without running it"
    assert not [o for c in code for o in c["outputs"] if o["output_type"] == "error"], f"{path.name}: has errors"
    assert any(line.lstrip().startswith("assert ") for c in code for line in "".join(c["source"]).splitlines())
    assert len(path.read_bytes()) < 200_000, f"{path.name}: outputs too large for a reader"


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3
