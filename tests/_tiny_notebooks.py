"""Throwaway notebooks for the runner and browser tests (real papermill, real kernel)."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

WRITES_OUTPUTS = """\
import matplotlib.pyplot as plt
import pandas as pd

from ibllm_lab import report, runtime

out = report.notebook_outputs(out_dir)
fig, ax = plt.subplots(figsize=(3, 2))
ax.plot([0, 1], [0, scale])
out.save_figure(fig, "line")
out.save_table(pd.DataFrame({"step": [0, 1], "value": [0, scale]}), "values")"""

METRICS = 'out.write_metrics({"scale": scale, "profile": runtime.profile()})'


def notebook(cells: list[str], requires: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    """A notebook: markdown title, a tagged parameters cell, then ``cells``."""
    params = new_code_cell('out_dir = "reports/scratch/tiny"  # outputs folder\nscale = 1  # int')
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[new_markdown_cell("# tiny"), params, *map(new_code_cell, cells)])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    if requires:
        nb.metadata["ibllm"] = {"requires": list(requires)}
    return nb


def write_tiny_notebooks(folder: Path, failing: bool = True) -> Path:
    """01 writes a figure, a table and metrics; 02 fails in cell 2; 03 requires 02; 04 is
    independent of 02 and runs."""
    folder.mkdir(parents=True, exist_ok=True)
    books = {"01_outputs": notebook([WRITES_OUTPUTS, METRICS])}
    if failing:
        books["02_fails"] = notebook(['raise ValueError("boom in cell 2")', "x = 1"])
        books["03_needs_02"] = notebook(["x = 1"], requires=("02_fails",))
        independent = METRICS.replace("out.", "report.notebook_outputs(out_dir).")
        books["04_independent"] = notebook(["from ibllm_lab import report, runtime", independent])
    for name, nb in books.items():
        nbformat.write(nb, folder / f"{name}.ipynb")
    return folder
