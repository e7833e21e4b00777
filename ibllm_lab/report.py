"""Run the notebooks with papermill and write ``reports/<run>/``; the notebooks' output helpers.

Two sides of one contract:

- **Inside a notebook**: ``out = report.notebook_outputs(out_dir)`` gives the folder that the
  runner collects. ``out.save_figure(fig, name)`` (PNG under ``figures/``, shown once, closed),
  ``out.save_table(df, name)`` (CSV under ``tables/``), ``out.write_metrics(d)`` (the last cell:
  ``metrics.json``, flat ``{name: number | str}``; these are the report's headline numbers).
- **The runner** (``ibllm-lab run``): executes ``notebooks/NN_*.ipynb`` in order with papermill
  into ``reports/<run>/``, renders each executed notebook to HTML, collects figures, tables and
  metrics, and writes ``run.json``, ``index.html`` and ``summary.md``. A failing notebook is
  reported with its failing cell; the run goes on with every notebook that does not require it
  (hard requirements are data: the notebook metadata ``{"ibllm": {"requires": ["NN_name"]}}``).
  The exit code is non-zero when a notebook failed or was skipped.

``browser_check`` opens the written HTML in headless Chromium, dumps the DOM and takes a
screenshot, so that a test can check that figures and tables really render.

papermill, nbformat and nbconvert are imported inside the functions that need them, so that
importing this module needs only the core dependencies.
"""

from __future__ import annotations

import argparse
import ast
import csv
import html
import io
import json
import logging
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from html.parser import HTMLParser
from importlib import metadata
from pathlib import Path
from typing import Any

from ibllm_lab import runtime
from ibllm_lab.io import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

NOTEBOOK_PATTERN = re.compile(r"^\d\d_[A-Za-z0-9_]+\.ipynb$")
KERNEL_NAME = "python3"
# Packages whose versions go into run.json / index.html (distribution names).
REPORTED_PACKAGES = tuple(
    "ibllm-lab torch numpy faiss-cpu sentencepiece pandas matplotlib umap-learn ipywidgets "
    "ipykernel papermill nbformat nbconvert nbval".split()
)
CHROMIUM = "/usr/bin/chromium"
# TOOLCHAIN.md: without the network flags Chromium keeps trying hosts it cannot reach.
CHROMIUM_FLAGS = tuple(
    "--headless --no-sandbox --disable-gpu --disable-background-networking "
    "--disable-component-update --disable-sync --no-first-run --hide-scrollbars".split()
)


# ----------------------------------------------------------------------------- small helpers


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: cwd) holding ``pyproject.toml``;
    ``start`` itself when there is none. Notebooks run with their own folder as cwd
    (JupyterLab, nbval), so their relative ``out_dir`` is resolved against this."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return start


def seed_everything(seed: int) -> None:
    """Fix Python's, NumPy's and torch's random generators."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def package_versions(names: Sequence[str] = REPORTED_PACKAGES) -> dict[str, str]:
    """``{distribution: version}`` (``"not installed"`` when absent), plus Python's."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# ------------------------------------------------------------------ inside a notebook


@dataclass
class NotebookOutputs:
    """The folder one notebook writes its figures, tables and metrics to."""

    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save_figure(self, fig: Any, name: str, dpi: int = 110) -> None:
        """Save a matplotlib figure as ``figures/<name>.png``, show it once, close it
        (returns nothing, so that no repr follows the picture in the notebook)."""
        import matplotlib.pyplot as plt

        path = self.root / "figures" / f"{name}.png"
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        atomic_write_bytes(path, buffer.getvalue())
        if _in_ipython():
            from IPython.display import Image, display

            display(Image(filename=str(path)))
        plt.close(fig)

    def save_table(self, df: Any, name: str) -> Any:
        """Write a pandas DataFrame to ``tables/<name>.csv``; return it (so a cell shows it)."""
        path = self.root / "tables" / f"{name}.csv"
        atomic_write_text(path, df.to_csv(index=False))
        return df

    def write_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``metrics.json`` (flat, JSON scalars; floats rounded to 4 places); return it."""
        clean: dict[str, Any] = {}
        for key, value in metrics.items():
            if hasattr(value, "item"):  # numpy / torch scalars
                value = value.item()
            if not isinstance(value, (int, float, str, bool)) and value is not None:
                raise TypeError(f"metric {key!r} must be a number or a string, got {type(value)}")
            clean[str(key)] = round(value, 4) if isinstance(value, float) else value
        atomic_write_text(self.root / "metrics.json", json.dumps(clean, indent=2) + "\n")
        return clean


def _in_ipython() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return get_ipython() is not None


def notebook_outputs(out_dir: str | Path) -> NotebookOutputs:
    """The outputs folder for a notebook's ``out_dir`` parameter; a relative path is taken
    from the project root (the runner always passes an absolute one)."""
    path = Path(out_dir)
    if not path.is_absolute():
        path = project_root() / path
    return NotebookOutputs(path)


# ------------------------------------------------------------------ notebooks as data


@dataclass
class NotebookSpec:
    """One notebook to run: its name (file stem), path, declared parameters and the
    notebooks it hard-requires (metadata ``ibllm.requires``)."""

    name: str
    path: Path
    parameters: dict[str, str] = field(default_factory=dict)  # name -> declared default (source)
    requires: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> NotebookSpec:
        import nbformat

        nb = nbformat.read(path, as_version=4)
        requires = list(nb.metadata.get("ibllm", {}).get("requires", []))
        return cls(path.stem, path, parameter_defaults(nb), requires)


def parameter_defaults(nb: Any) -> dict[str, str]:
    """``{name: default expression}`` of the cell tagged ``parameters`` (no kernel needed)."""
    for cell in nb.cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse(cell.source)
            return {
                target.id: ast.unparse(node.value)
                for node in tree.body
                if isinstance(node, (ast.Assign, ast.AnnAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Name)
            }
    return {}


def discover(notebook_dir: Path, select: Sequence[str] = ()) -> list[NotebookSpec]:
    """The ``NN_*.ipynb`` notebooks of a folder in order; ``select`` keeps those whose name
    or number prefix is listed (``"01"`` or ``"01_joint_embedding"``)."""
    paths = sorted(p for p in Path(notebook_dir).glob("*.ipynb") if NOTEBOOK_PATTERN.match(p.name))
    specs = [NotebookSpec.read(p) for p in paths]
    if not select:
        return specs
    chosen = [s for s in specs if any(_named(s, k) for k in select)]
    missing = [k for k in select if not any(_named(s, k) for s in specs)]
    if missing:
        names = ", ".join(s.name for s in specs)
        raise ValueError(f"no notebook named {missing} in {notebook_dir}; have: {names}")
    return chosen


def _named(spec: NotebookSpec, key: str) -> bool:
    return key in (spec.name, spec.name.split("_")[0])


def parse_assignments(items: Sequence[str]) -> dict[str | None, dict[str, Any]]:
    """Parse ``-p`` options: ``key=value`` (every notebook that declares ``key``) or
    ``NN_name:key=value`` (one notebook). Values are Python literals, else strings.
    Returns ``{notebook name or None: {key: value}}``."""
    out: dict[str | None, dict[str, Any]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        if not sep or not target:
            raise ValueError(f"parameter {item!r} is not key=value")
        notebook, _, key = target.rpartition(":")
        try:
            parsed: Any = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(notebook or None, {})[key] = parsed
    return out


def parameters_for(spec: NotebookSpec, assignments: Mapping[str | None, Mapping[str, Any]]):
    """The ``-p`` values that apply to one notebook (only keys it declares)."""
    common = {k: v for k, v in assignments.get(None, {}).items() if k in spec.parameters}
    return {**common, **assignments.get(spec.name, {})}


def check_assignments(specs: Sequence[NotebookSpec], assignments) -> None:
    """Refuse ``-p`` keys no selected notebook declares (a typo would silently do nothing)."""
    by_name = {s.name: s for s in specs}
    for notebook, values in assignments.items():
        targets = [by_name[notebook]] if notebook in by_name else specs
        if notebook is not None and notebook not in by_name:
            raise ValueError(f"-p {notebook}:...: no such notebook selected")
        for key in values:
            if not any(key in s.parameters for s in targets):
                raise ValueError(f"-p {key}=...: no selected notebook has a parameter {key!r}")


# ------------------------------------------------------------------ executing


@dataclass
class NotebookResult:
    """What one notebook run gave: status "ok" | "failed" | "skipped", and its outputs."""

    name: str
    status: str
    seconds: float = 0.0
    parameters: dict[str, Any] = field(default_factory=dict)
    executed: str | None = None  # executed .ipynb, relative to the run folder
    html: str | None = None  # rendered .html, relative to the run folder
    metrics: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    # cell_index (executed copy), source_cell (source notebook), exec_count, ename, evalue, source
    error: dict[str, Any] | None = None


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the kernels started inside the block."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def execute_notebook(
    spec: NotebookSpec,
    run_dir: Path,
    profile: str,
    parameters: Mapping[str, Any],
    cell_timeout: int | None = None,
) -> NotebookResult:
    """Execute one notebook with papermill into ``run_dir/<name>.ipynb`` (outputs folder
    ``run_dir/<name>/``), render it to HTML and collect what it wrote."""
    import papermill as pm

    out_dir = run_dir / spec.name
    if out_dir.exists():
        shutil.rmtree(out_dir)
    params = {**parameters, "out_dir": str(out_dir)}
    executed = run_dir / f"{spec.name}.ipynb"
    result = NotebookResult(spec.name, "ok", parameters=dict(parameters), executed=executed.name)
    start = time.perf_counter()
    with _environment(IBLLM_PROFILE=profile):
        try:
            pm.execute_notebook(
                str(spec.path),
                str(executed),
                parameters=params,
                kernel_name=KERNEL_NAME,
                cwd=str(spec.path.parent),
                progress_bar=False,
                execution_timeout=cell_timeout,
            )
        except Exception as err:  # a failing cell, or a dead kernel / timeout: report either
            result.status, result.error = "failed", _error_record(err)
    result.seconds = round(time.perf_counter() - start, 1)
    if result.error and result.error["cell_index"] is not None and executed.exists():
        result.error["source_cell"] = _source_cell_index(executed, result.error["cell_index"])
    if executed.exists():
        result.html = render_html(executed).name
    _collect(result, out_dir, run_dir)
    return result


def _error_record(err: Exception) -> dict[str, Any]:
    """Where and why: papermill's failing cell (index in the executed copy, execution count,
    source) and the exception's name and value; only name and value for other errors."""
    return {
        "cell_index": getattr(err, "cell_index", None),
        "exec_count": getattr(err, "exec_count", None),
        "source": getattr(err, "source", ""),
        "ename": getattr(err, "ename", type(err).__name__),
        "evalue": getattr(err, "evalue", str(err)),
    }


def _source_cell_index(executed: Path, cell_index: int) -> int:
    """Index in the source notebook of the executed notebook's cell ``cell_index``
    (papermill inserts an ``injected-parameters`` cell, and error banners when saving)."""
    import nbformat

    cells = nbformat.read(executed, 4).cells
    cells = [c for c in cells if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
    cells = cells[:cell_index]
    return cell_index - sum("injected-parameters" in c.metadata.get("tags", []) for c in cells)


def render_html(ipynb: Path) -> Path:
    """Render an executed notebook to a self-contained HTML file beside it."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(ipynb, 4))
    out = ipynb.with_suffix(".html")
    atomic_write_text(out, body)
    return out


def _collect(result: NotebookResult, out_dir: Path, run_dir: Path) -> None:
    metrics = out_dir / "metrics.json"
    if metrics.is_file():
        result.metrics = json.loads(metrics.read_text())
    result.figures = [str(p.relative_to(run_dir)) for p in sorted(out_dir.glob("figures/*.png"))]
    result.tables = [str(p.relative_to(run_dir)) for p in sorted(out_dir.glob("tables/*.csv"))]


# ------------------------------------------------------------------ the run as a whole


@dataclass
class RunReport:
    """Everything ``run.json`` records about one run."""

    run_dir: Path
    profile: str
    notebooks: list[NotebookResult]
    assignments: dict[str, dict[str, Any]]
    versions: dict[str, str]
    started: str
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.status == "ok" for r in self.notebooks)

    def to_json(self) -> str:
        data = asdict(self)
        data["run_dir"] = str(self.run_dir)
        return json.dumps(data, indent=2, default=str) + "\n"


def run_notebooks(
    specs: Sequence[NotebookSpec],
    run_dir: Path,
    profile: str,
    assignments: Mapping[str | None, Mapping[str, Any]] | None = None,
    cell_timeout: int | None = None,
) -> RunReport:
    """Execute ``specs`` in order into ``run_dir``; skip a notebook whose hard requirement
    failed or was skipped; write ``run.json``, ``index.html`` and ``summary.md``."""
    from tqdm.auto import tqdm

    assignments = {k: dict(v) for k, v in (assignments or {}).items()}
    check_assignments(specs, assignments)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report = RunReport(run_dir, profile, [], _json_keys(assignments), package_versions(), started)
    t0 = time.perf_counter()
    progress = tqdm(specs, desc="notebooks", unit="nb")
    for spec in progress:
        progress.set_postfix_str(spec.name)
        result = _run_or_skip(spec, report, assignments, cell_timeout)
        report.notebooks.append(result)
        _log_result(result)
        write_report(report)  # after each notebook, so a killed run still leaves an index
    report.seconds = round(time.perf_counter() - t0, 1)
    write_report(report)
    return report


def _run_or_skip(spec, report, assignments, cell_timeout) -> NotebookResult:
    done = {r.name: r.status for r in report.notebooks}
    blocked = [req for req in spec.requires if done.get(req) != "ok"]
    if blocked:
        why = ", ".join(f"{req} ({done.get(req, 'not run')})" for req in blocked)
        return NotebookResult(spec.name, "skipped", error={"ename": "requires", "evalue": why})
    params = parameters_for(spec, assignments)
    return execute_notebook(spec, report.run_dir, report.profile, params, cell_timeout)


def describe_failure(result: NotebookResult) -> str:
    """One line: where and why a notebook failed or was skipped."""
    err = result.error or {}
    if result.status == "skipped":
        return f"skipped: requires {err.get('evalue')}"
    where = ""
    if err.get("source_cell") is not None:
        where = f"cell {err['source_cell']} (In [{err.get('exec_count')}]): "
    return f"failed in {where}{err.get('ename')}: {err.get('evalue')}"


def _log_result(result: NotebookResult) -> None:
    if result.status == "ok":
        log.info("%s: ok in %.1f s", result.name, result.seconds)
    else:
        log.error("%s: %s", result.name, describe_failure(result))


def _json_keys(assignments: Mapping[str | None, Any]) -> dict[str, Any]:
    return {("*" if k is None else k): v for k, v in assignments.items()}


# ------------------------------------------------------------------ index.html / summary.md


def write_report(report: RunReport) -> None:
    """Write ``run.json``, ``index.html`` and ``summary.md`` into the run folder (atomically)."""
    atomic_write_text(report.run_dir / "run.json", report.to_json())
    atomic_write_text(report.run_dir / "index.html", render_index(report))
    atomic_write_text(report.run_dir / "summary.md", render_summary(report))


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:2px 8px;
font-size:90%;text-align:left}th{background:#f3f3f3}.ok{color:#070}.failed,.skipped{color:#b00}
section{border-top:2px solid #ddd;margin-top:1.5em}img{max-width:100%;border:1px solid #eee}
figure{display:inline-block;margin:.3em;width:31%;vertical-align:top}pre{background:#f8f8f8;
padding:.5em;overflow-x:auto}
"""


class Markup(str):
    """A table cell that is already HTML (not escaped)."""


def _cell(value: Any) -> str:
    return value if isinstance(value, Markup) else html.escape(str(value))


def _html_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _short(cell: str) -> str:
    """A CSV cell for display: floats to 4 significant digits."""
    try:
        value = float(cell)
    except ValueError:
        return cell
    return cell if value.is_integer() and "." not in cell else f"{value:.4g}"


def _csv_table(path: Path, max_rows: int = 12) -> str:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return "<p>(empty table)</p>"
    body = [[_short(c) for c in row] for row in rows[1 : max_rows + 1]]
    extra = len(rows) - 1 - max_rows
    more = f"<p>{extra} more rows in the CSV.</p>" if extra > 0 else ""
    return _html_table(body, rows[0]) + more


def _notebook_section(r: NotebookResult, run_dir: Path) -> str:
    e = html.escape
    links = " · ".join(
        f'<a href="{e(p)}">{label}</a>'
        for p, label in ((r.html, "notebook (HTML)"), (r.executed, "executed .ipynb"))
        if p
    )
    parts = [
        f'<section id="{e(r.name)}"><h2>{e(r.name)} <span class="{r.status}">{r.status}'
        f"</span></h2><p>{links} · {r.seconds:.1f} s</p>"
    ]
    if r.error:
        parts.append(f"<p class='failed'>{e(describe_failure(r))}</p>")
        if r.error.get("source"):
            parts.append(f"<pre>{e(r.error['source'])}</pre>")
    if r.parameters:
        parts.append(_html_table(sorted(r.parameters.items()), ["parameter", "value"]))
    if r.metrics:
        parts.append(_html_table(list(r.metrics.items()), ["metric", "value"]))
    for fig in r.figures:
        parts.append(
            f'<figure><a href="{e(fig)}"><img src="{e(fig)}" alt="{e(Path(fig).stem)}">'
            f"</a><figcaption>{e(Path(fig).stem)}</figcaption></figure>"
        )
    for table in r.tables:
        parts.append(f'<h3><a href="{e(table)}">{e(Path(table).name)}</a></h3>')
        parts.append(_csv_table(run_dir / table))
    return "\n".join(parts) + "</section>"


def render_index(report: RunReport) -> str:
    """The run's ``index.html``: status, headline numbers, figures and tables per notebook."""
    e = html.escape
    overview = _html_table(
        [
            (
                Markup(f'<a href="#{e(n.name)}">{e(n.name)}</a>'),
                n.status,
                f"{n.seconds:.1f}",
                ", ".join(f"{k}={v}" for k, v in list(n.metrics.items())[:4]),
            )
            for n in report.notebooks
        ],
        ["notebook", "status", "seconds", "headline"],
    )
    status = "all notebooks ok" if report.ok else "some notebooks failed or were skipped"
    sections = "\n".join(_notebook_section(r, report.run_dir) for r in report.notebooks)
    versions = _html_table(sorted(report.versions.items()), ["package", "version"])
    params = _html_table(
        [(nb, k, v) for nb, kv in report.assignments.items() for k, v in kv.items()],
        ["notebook", "parameter", "value"],
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ibllm-lab run "
        f"{e(report.run_dir.name)}</title><style>{_CSS}</style></head><body>"
        f"<h1>ibllm-lab run {e(report.run_dir.name)}</h1><p>profile <b>{e(report.profile)}</b>"
        f" · started {e(report.started)} · {report.seconds:.1f} s · {status}</p>{overview}"
        f"{sections}<section><h2>Parameters (-p)</h2>{params}<h2>Package versions</h2>"
        f"{versions}</section></body></html>\n"
    )


def render_summary(report: RunReport) -> str:
    """The run's ``summary.md``."""
    lines = [
        f"# ibllm-lab run {report.run_dir.name}",
        "",
        f"Profile `{report.profile}`, started {report.started}, {report.seconds:.1f} s. "
        f"Open [index.html](index.html) for figures and tables.",
        "",
        "| notebook | status | seconds | headline numbers |",
        "| --- | --- | --- | --- |",
    ]
    for r in report.notebooks:
        link = f"[{r.name}]({r.html})" if r.html else r.name
        head = ", ".join(f"{k} = {v}" for k, v in r.metrics.items())
        lines.append(f"| {link} | {r.status} | {r.seconds:.1f} | {head} |")
    failures = [r for r in report.notebooks if r.status != "ok"]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            lines.append(f"- **{r.name}**: {describe_failure(r)}")
    lines += ["", "## Package versions", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(report.versions.items())]
    return "\n".join(lines) + "\n"


def _update_latest(run_dir: Path) -> None:
    """Point ``reports/latest`` at this run (a relative symlink, swapped atomically)."""
    link = run_dir.parent / "latest"
    tmp = run_dir.parent / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    try:
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:  # no symlinks (some file systems): a text file naming the run instead
        atomic_write_text(run_dir.parent / "latest.txt", run_dir.name + "\n")


# ------------------------------------------------------------------ browser check


@dataclass
class BrowserCheck:
    """What headless Chromium rendered: counts of ``<img>`` (with a source) and ``<table>``,
    error outputs found, and the screenshot path."""

    path: Path
    images: int
    tables: int
    errors: list[str]
    screenshot: Path | None


class _DomCounter(HTMLParser):
    """Counts images and tables and collects the text of error outputs in a DOM dump."""

    ERROR_MIME = "application/vnd.jupyter.stderr"

    def __init__(self) -> None:
        super().__init__()
        self.images = self.tables = 0
        self.errors: list[str] = []
        self._stderr_depth = 0  # >0 while inside a stderr / error output element
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "img" and a.get("src"):
            self.images += 1
        elif tag == "table":
            self.tables += 1
        if self._stderr_depth:
            self._stderr_depth += tag not in _VOID_TAGS
        elif a.get("data-mime-type") == self.ERROR_MIME:
            self._stderr_depth = 1

    def handle_endtag(self, tag: str) -> None:
        if self._stderr_depth and tag not in _VOID_TAGS:
            self._stderr_depth -= 1
            if not self._stderr_depth:
                text = "".join(self._text)
                if "Traceback" in text or "Error" in text:
                    self.errors.append(text.strip()[:500])
                self._text = []

    def handle_data(self, data: str) -> None:
        if self._stderr_depth:
            self._text.append(data)
        elif "Traceback (most recent call last)" in data:
            self.errors.append(data.strip()[:500])


_VOID_TAGS = {"img", "br", "hr", "meta", "link", "input", "source", "wbr", "col", "area", "base"}


def chromium_available(executable: str = CHROMIUM) -> bool:
    return Path(executable).is_file() and os.access(executable, os.X_OK)


def _chromium(args: Sequence[str], executable: str, timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="ibllm-chromium-") as profile_dir:
        cmd = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def browser_check(
    html_path: Path,
    screenshot: Path | None = None,
    window: tuple[int, int] = (1280, 4000),
    executable: str = CHROMIUM,
    timeout: float = 120.0,
) -> BrowserCheck:
    """Open ``html_path`` in headless Chromium: dump the rendered DOM (counting ``<img>`` and
    ``<table>`` elements and error outputs) and, if asked, save a PNG screenshot."""
    if not chromium_available(executable):
        raise FileNotFoundError(f"{executable} not found: apt-get install chromium")
    url = Path(html_path).resolve().as_uri()
    budget = ["--virtual-time-budget=5000", "--run-all-compositor-stages-before-draw"]
    dom = _chromium([*budget, "--dump-dom", url], executable, timeout)
    counter = _DomCounter()
    counter.feed(dom)
    if screenshot is not None:
        screenshot = Path(screenshot).resolve()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        size = f"--window-size={window[0]},{window[1]}"
        _chromium([*budget, f"--screenshot={screenshot}", size, url], executable, timeout)
        if not screenshot.is_file():
            raise RuntimeError(f"chromium wrote no screenshot to {screenshot}")
    return BrowserCheck(Path(html_path), counter.images, counter.tables, counter.errors, screenshot)


def browser_check_run(run_dir: Path, executable: str = CHROMIUM) -> list[dict[str, Any]]:
    """Check a run's ``index.html`` and every executed notebook's HTML in headless Chromium;
    screenshots go to ``run_dir/screenshots/``. A page passes when it shows at least as many
    images as the notebook saved figures, a table when it saved tables (the index: all of
    them), and no error output. Returns one record per page; also written to ``browser.json``."""
    data = json.loads((run_dir / "run.json").read_text())
    books = [nb for nb in data["notebooks"] if nb.get("html")]
    pages = [("index.html", sum(len(nb["figures"]) for nb in books), 1)]
    pages += [(nb["html"], len(nb["figures"]), min(1, len(nb["tables"]))) for nb in books]
    records = []
    for page, want_images, want_tables in pages:
        shot = run_dir / "screenshots" / f"{Path(page).stem}.png"
        check = browser_check(run_dir / page, shot, executable=executable)
        ok = check.images >= want_images and check.tables >= want_tables and not check.errors
        records.append(
            {
                "page": page,
                "ok": ok,
                "images": check.images,
                "tables": check.tables,
                "want_images": want_images,
                "want_tables": want_tables,
                "errors": check.errors,
                "screenshot": str(shot.relative_to(run_dir)),
            }
        )
        log.log(logging.INFO if ok else logging.ERROR, "browser %s: %s", page, records[-1])
    atomic_write_text(run_dir / "browser.json", json.dumps(records, indent=2) + "\n")
    return records


# ------------------------------------------------------------------ command line


def default_run_name() -> str:
    return datetime.now(timezone.utc).strftime("run-%Y%m%d-%H%M%S")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ibllm-lab run",
        description="Execute notebooks/NN_*.ipynb with papermill into reports/<run>/ and write "
        "index.html and summary.md. Exit code 1 when a notebook failed or was skipped.",
    )
    p.add_argument(
        "--notebook",
        "-n",
        action="append",
        default=[],
        help="run only this notebook (name or number, e.g. 01); repeatable",
    )
    p.add_argument(
        "--profile",
        choices=runtime.PROFILES,
        default=None,
        help="quick (tests) or full; default: IBLLM_PROFILE or full",
    )
    p.add_argument(
        "-p",
        "--parameter",
        action="append",
        default=[],
        metavar="[NB:]KEY=VALUE",
        help="override a notebook parameter (a Python literal); repeatable",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="run folder (default: reports/run-<UTC timestamp>)"
    )
    p.add_argument(
        "--notebooks-dir",
        type=Path,
        default=None,
        help="folder of NN_*.ipynb (default: <project>/notebooks)",
    )
    # a safety net for a hung cell, not a speed target: notebook 00's first cell builds the
    # embedded default (world, encoders, base LM, both phases), which took about 14 minutes on
    # a 2-core machine 1.8-2 times slower than the one of benchmarks/results, and timed out at
    # 900 s there beside another job
    p.add_argument("--cell-timeout", type=int, default=2400, help="seconds per cell (2400)")
    p.add_argument(
        "--browser-check",
        action="store_true",
        help="afterwards open the pages in headless Chromium (screenshots/)",
    )
    p.add_argument(
        "--check-only",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="run no notebooks: only the browser check of an existing run",
    )
    return p


def cli(argv: Sequence[str]) -> int:
    """``ibllm-lab run``: see ``build_parser``."""
    args = build_parser().parse_args(list(argv))
    if args.check_only is not None:
        return 0 if all(r["ok"] for r in browser_check_run(args.check_only.resolve())) else 1
    root = project_root(Path(__file__).resolve().parent)
    notebook_dir = args.notebooks_dir or root / "notebooks"
    try:
        specs = discover(notebook_dir, args.notebook)
        assignments = parse_assignments(args.parameter)
        check_assignments(specs, assignments)
    except ValueError as err:
        log.error("%s", err)
        return 2
    if not specs:
        log.error("no NN_*.ipynb notebooks in %s", notebook_dir)
        return 2
    run_dir = (args.out or root / "reports" / default_run_name()).resolve()
    profile = args.profile or runtime.profile()
    report = run_notebooks(specs, run_dir, profile, assignments, args.cell_timeout)
    if run_dir.parent.name == "reports":
        _update_latest(run_dir)
    log.info("report: %s", run_dir / "index.html")
    browser_ok = all(r["ok"] for r in browser_check_run(run_dir)) if args.browser_check else True
    return 0 if report.ok and browser_ok else 1


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
