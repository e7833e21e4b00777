"""The papermill runner on throwaway notebooks: real papermill, real kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _tiny_notebooks import write_tiny_notebooks  # tests/ is on sys.path

from ibllm_lab import report


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run of four tiny notebooks: 02 fails, 03 requires 02, 04 is independent."""
    nb_dir = write_tiny_notebooks(tmp_path_factory.mktemp("nbs"))
    run_dir = tmp_path_factory.mktemp("reports") / "run-test"
    argv = ["--notebooks-dir", str(nb_dir), "--out", str(run_dir), "--profile", "quick"]
    code = report.cli([*argv, "-p", "scale=3"])
    data = json.loads((run_dir / "run.json").read_text())
    return code, run_dir, {nb["name"]: nb for nb in data["notebooks"]}


def test_failing_notebook_gives_nonzero_exit_and_its_cell(tiny_run):
    code, _, results = tiny_run
    assert code == 1
    err = results["02_fails"]["error"]
    assert results["02_fails"]["status"] == "failed"
    assert (err["source_cell"], err["cell_index"], err["ename"]) == (2, 3, "ValueError")
    assert "boom in cell 2" in err["evalue"] and "raise ValueError" in err["source"]


def test_run_continues_with_notebooks_that_do_not_require_the_failure(tiny_run):
    _, _, results = tiny_run
    assert results["03_needs_02"]["status"] == "skipped"
    assert "02_fails (failed)" in results["03_needs_02"]["error"]["evalue"]
    assert results["04_independent"]["status"] == "ok"
    assert results["04_independent"]["metrics"] == {"scale": 3, "profile": "quick"}


def test_parameters_profile_and_outputs_are_collected(tiny_run):
    _, run_dir, results = tiny_run
    ok = results["01_outputs"]
    assert ok["status"] == "ok" and ok["parameters"] == {"scale": 3}
    assert ok["metrics"] == {"scale": 3, "profile": "quick"}  # IBLLM_PROFILE reached the kernel
    assert ok["figures"] == ["01_outputs/figures/line.png"]
    assert ok["tables"] == ["01_outputs/tables/values.csv"]
    assert (run_dir / ok["figures"][0]).read_bytes()[:4] == b"\x89PNG"
    for name in ("01_outputs", "02_fails"):  # a failed notebook is still saved and rendered
        assert (run_dir / f"{name}.ipynb").is_file()
        assert "<html" in (run_dir / f"{name}.html").read_text()[:2000].lower()


def test_index_and_summary_link_everything(tiny_run):
    _, run_dir, _ = tiny_run
    index = (run_dir / "index.html").read_text()
    for needle in ('href="01_outputs.html"', 'src="01_outputs/figures/line.png"', "<table>",
                   "boom in cell 2", "scale", "papermill", "torch"):  # fmt: skip
        assert needle in index
    summary = (run_dir / "summary.md").read_text()
    assert "**02_fails**: failed in cell 2 (In [3]): ValueError: boom in cell 2" in summary
    assert "| [01_outputs](01_outputs.html) | ok |" in summary
    assert not list(run_dir.glob("*.tmp"))


def test_parse_assignments_literals_and_per_notebook_keys():
    got = report.parse_assignments(["n=3", "01_a:lr=1e-3", "name=abc", "flag=True"])
    assert got == {None: {"n": 3, "name": "abc", "flag": True}, "01_a": {"lr": 1e-3}}
    with pytest.raises(ValueError, match="key=value"):
        report.parse_assignments(["novalue"])


def test_unknown_parameter_or_notebook_is_refused(tmp_path):
    nb_dir = write_tiny_notebooks(tmp_path / "nbs", failing=False)
    specs = report.discover(nb_dir)
    assert [s.name for s in specs] == ["01_outputs"]
    assert specs[0].parameters == {"out_dir": "'reports/scratch/tiny'", "scale": "1"}
    with pytest.raises(ValueError, match="no selected notebook has a parameter 'scal'"):
        report.check_assignments(specs, {None: {"scal": 1}})
    assert report.discover(nb_dir, ["01"]) == specs
    base = ["--notebooks-dir", str(nb_dir), "--out", str(tmp_path / "r")]
    assert report.cli([*base, "--notebook", "07"]) == 2
    assert report.cli([*base, "-p", "scal=2"]) == 2
    assert not (tmp_path / "r").exists()


def test_relative_out_dir_is_taken_from_the_project_root(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    out = report.notebook_outputs("reports/scratch/00")
    assert out.root == tmp_path.resolve() / "reports/scratch/00" and out.root.is_dir()
    assert out.write_metrics({"a": 0.123456, "b": "x"}) == {"a": 0.1235, "b": "x"}
    with pytest.raises(TypeError, match="metric 'c'"):
        out.write_metrics({"c": [1, 2]})


def test_environment_is_restored():
    before = os.environ.get("IBLLM_PROFILE")
    with report._environment(IBLLM_PROFILE="quick"):
        assert os.environ["IBLLM_PROFILE"] == "quick"
    assert os.environ.get("IBLLM_PROFILE") == before


def test_latest_points_at_the_newest_run(tmp_path):
    for name in ("run-a", "run-b"):
        (tmp_path / name).mkdir()
        report._update_latest(tmp_path / name)
    assert (tmp_path / "latest").resolve() == (tmp_path / "run-b").resolve()
    assert Path(os.readlink(tmp_path / "latest")) == Path("run-b")
