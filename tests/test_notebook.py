"""analysis/figures.ipynb runs headless on a fresh clone: every figure redrawn from the committed results."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_figures_notebook_executes_headless():
    notebook = nbformat.read(REPO / "analysis" / "figures.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO / "analysis")}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4  # Figs. 1A, 1B/S2, S3, S4
