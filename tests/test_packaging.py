"""The project's install files agree with each other and pin what must be pinned."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_requirements() -> list[str]:
    project = _pyproject()["project"]
    reqs = list(project["dependencies"])
    extras = project["optional-dependencies"]
    reqs += extras["notebooks"]
    reqs += [r for r in extras["dev"] if not r.startswith("ibllm-lab")]
    return reqs


def _environment_pip_requirements() -> list[str]:
    """The pip section of environment.yml, read without a YAML dependency (flat list)."""
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = []
    for line in lines[start + 1 :]:
        m = re.match(r"^\s{6}- (.+)$", line)
        if not m:
            break
        reqs.append(m.group(1).strip())
    return [r for r in reqs if r != "-e ."]


def test_environment_yml_mirrors_pyproject():
    assert sorted(_environment_pip_requirements()) == sorted(_pyproject_requirements())


def test_torch_is_pinned_to_the_local_cpu_build():
    torch_reqs = [r for r in _pyproject_requirements() if re.match(r"^torch\b", r)]
    assert torch_reqs == ["torch==2.13.0"]


def test_console_command_is_declared():
    assert _pyproject()["project"]["scripts"]["ibllm-lab"] == "ibllm_lab.cli:main"


def test_library_import_needs_no_notebook_extras():
    """Importing the library must not import papermill, ipywidgets, umap or jupyter."""
    import subprocess
    import sys

    code = (
        "import sys, ibllm_lab, ibllm_lab.model, ibllm_lab.cache;"
        "bad = [m for m in ('papermill', 'ipywidgets', 'umap', 'jupyterlab', 'nbval')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["README.md", "Makefile", ".ci/run", "environment.yml"])
def test_top_level_files_exist(name):
    assert (ROOT / name).is_file()


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci/run").read_text()
