"""The example notebooks (``examples/*.ipynb``): each is stored without outputs (fast), and each
runs from top to bottom in a fresh kernel of this interpreter (slow). A notebook added to
``examples/`` is picked up by the glob, with no change here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
CELL_TIMEOUT = 120
"""Seconds a cell may take; each notebook runs in seconds."""
def test_examples_holds_notebooks():
    assert NOTEBOOKS, "examples/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_is_stored_without_outputs(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    dirty = [i for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} hold outputs or an execution count; "
                       f"clear them (jupyter nbconvert --clear-output --inplace {path.name})")


def _stderr(notebook) -> list[str]:
    """The stderr text of every code cell's outputs (a warning there fails the test)."""
    return [output["text"] for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.outputs
            if output.output_type == "stream" and output.name == "stderr"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    # Jupyter's directories in tmp_path, before jupyter_core is imported: the kernel spec of
    # this interpreter first on JUPYTER_PATH (whatever other python3 kernel is installed), the
    # connection files, IPython's profile; platformdirs paths (no migration warning).
    jupyter = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    import nbformat
    from ipykernel.kernelspec import write_kernel_spec
    from nbclient import NotebookClient

    write_kernel_spec(jupyter / "kernels" / "python3")  # argv: this sys.executable
    notebook = nbformat.read(path, as_version=4)
    work = tmp_path / "cwd"  # the kernel's working directory: nothing lands in the repository
    work.mkdir()
    NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                   resources={"metadata": {"path": str(work)}}).execute()
    assert not _stderr(notebook), f"{path.name} wrote to stderr: {_stderr(notebook)}"
