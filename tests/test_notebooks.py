"""Every notebook follows the conventions and runs under nbval in the quick profile.

nbval runs in a child pytest (``--nbval-lax --nbval-current-env``) with
``IBLLM_PROFILE=quick``, one notebook per test, so a failure names its notebook and cell.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

from ibllm_lab import report, studies

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = [
    "00_quickstart", "01_joint_embedding", "02_instruction_tuning", "03_gate_inspection",
    "04_embedding_arithmetic", "05_visual_cache", "06_benchmark_ablations", "07_real_checkpoints",
]  # fmt: skip
ids = [p.stem for p in NOTEBOOKS]


def test_the_ordered_notebooks_are_all_there():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    assert all(report.NOTEBOOK_PATTERN.match(p.name) for p in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_conventions(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs"
    title, params = nb.cells[0], nb.cells[1]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    for word in ("Inputs", "Outputs"):
        assert word in title.source, f"first cell must describe {word}"
    assert params.metadata.get("tags") == ["parameters"]
    _check_parameters_cell(params.source)
    sources = [c.source for c in code[1:]]
    assert not any(line.startswith(("def ", "class ")) for s in sources for line in s.split("\n"))
    assert "write_metrics(" in sources[-1], "the last cell writes the metrics"


def _check_parameters_cell(source: str) -> None:
    """Literals only, one per line, each with a comment; ``out_dir`` is one of them."""
    tree = ast.parse(source)
    names = []
    lines = source.split("\n")
    for node in tree.body:
        assert isinstance(node, ast.Assign) and len(node.targets) == 1, ast.unparse(node)
        ast.literal_eval(node.value)  # raises on anything but a literal
        names.append(node.targets[0].id)
        assert "#" in lines[node.end_lineno - 1], f"{names[-1]}: comment its meaning and values"
    assert "out_dir" in names and "seed" in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_under_nbval_in_the_quick_profile(path):
    env = {**os.environ, "IBLLM_PROFILE": "quick"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
           "--nbval-current-env", "--nbval-cell-timeout=600", str(path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_real_checkpoints_notebook_runs_on_given_paths(tmp_path, monkeypatch):
    """07 with every path given (the quick embedded default's files stand in for real ones):
    the "real files" branch loads them by path and answers from each feature file."""
    monkeypatch.setenv("IBLLM_PROFILE", "quick")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on shared cores: see the notebooks' set-up cells
    try:
        default = studies.embedded_default(progress=False)
    finally:
        torch.set_num_threads(threads)
    paths = {
        "llama_dir": default.llama_dir, "llama_type": "", "features_dir": default.feature_dir,
        "adapter_checkpoint": default.adapters["finetune"], "cache_index": default.cache_path,
    }  # fmt: skip
    params = [f"07_real_checkpoints:{k}={str(v)!r}" for k, v in paths.items()]
    argv = ["--notebook", "07", "--profile", "quick", "--out", str(tmp_path / "run")]
    assert report.cli([*argv, *[a for p in params for a in ("-p", p)]]) == 0
    metrics = json.loads((tmp_path / "run" / "07_real_checkpoints" / "metrics.json").read_text())
    assert metrics["ran on"] == "real files" and metrics["components found"] == 6
    assert metrics["answers generated"] == 1 + len(list(default.feature_dir.glob("*.pt")))
