"""The report and an executed notebook render in a real browser (headless Chromium).

Skips when /usr/bin/chromium is absent (Debian: apt-get install chromium)."""

from __future__ import annotations

import json

import pytest
from _tiny_notebooks import write_tiny_notebooks  # tests/ is on sys.path

from ibllm_lab import report

pytestmark = pytest.mark.skipif(
    not report.chromium_available(),
    reason=f"{report.CHROMIUM} not found: apt-get install -y --no-install-recommends chromium",
)


@pytest.fixture(scope="module")
def checked_run(tmp_path_factory):
    nb_dir = write_tiny_notebooks(tmp_path_factory.mktemp("nbs"))
    run_dir = tmp_path_factory.mktemp("reports") / "run-browser"
    argv = ["--notebooks-dir", str(nb_dir), "--out", str(run_dir), "--profile", "quick"]
    code = report.cli([*argv, "--notebook", "01", "--notebook", "02", "--browser-check"])
    records = json.loads((run_dir / "browser.json").read_text())
    return code, run_dir, {r["page"]: r for r in records}


def test_index_and_notebook_pages_show_figures_and_tables(checked_run):
    _, run_dir, pages = checked_run
    assert set(pages) == {"index.html", "01_outputs.html", "02_fails.html"}
    for page in ("index.html", "01_outputs.html"):
        rec = pages[page]
        assert rec["ok"], rec
        assert rec["images"] >= 1 and rec["tables"] >= 1 and rec["errors"] == []
        shot = run_dir / rec["screenshot"]
        assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 5000


def test_error_outputs_are_found_in_the_rendered_page(checked_run):
    code, _, pages = checked_run
    assert code == 1
    failed = pages["02_fails.html"]
    assert not failed["ok"]
    assert any("ValueError" in err for err in failed["errors"])


def test_dom_counter_on_a_plain_page(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(
        "<html><body><table><tr><td>1</td></tr></table><img src='data:image/png;base64,'>"
        "<div data-mime-type='application/vnd.jupyter.stderr'><pre>Traceback (most recent "
        "call last)\nKeyError: 'x'</pre></div></body></html>"
    )
    check = report.browser_check(page)
    assert (check.images, check.tables, check.screenshot) == (1, 1, None)
    assert len(check.errors) == 1 and "KeyError" in check.errors[0]
