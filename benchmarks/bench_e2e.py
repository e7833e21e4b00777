"""End-to-end time of the main job (``make run`` / ``ibllm-lab run``) on the embedded default.

Not re-run here (it takes minutes): read from the newest full-profile ``reports/*/run.json``
that the report runner wrote; "not run" when there is none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ibllm_lab.bench import ROOT, Result, device_name


def latest_run(reports: Path) -> dict | None:
    """The newest ``run.json`` of a full-profile run under ``reports``, or None."""
    runs = []
    for path in reports.glob("*/run.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("profile") == "full":
            runs.append((str(data.get("started", "")), path, data))
    if not runs:
        return None
    started, path, data = max(runs)
    return {"path": str(path.relative_to(reports.parent)), **data}


def main_job_row(reports: Path = ROOT / "reports") -> Result:
    run = latest_run(reports)
    if run is None:
        return Result(
            group="e2e",
            case="main job (ibllm-lab run, full profile)",
            impl="ibllm_lab",
            value=None,
            unit="s",
            device=device_name(torch.device("cpu")),
            extra={"status": "not run"},
        )
    notebooks = run.get("notebooks", [])
    ok = all(n.get("status") == "ok" for n in notebooks)
    return Result(
        group="e2e",
        case="main job (ibllm-lab run, full profile)",
        impl="ibllm_lab",
        value=float(run.get("seconds", 0.0)),
        unit="s",
        device="(as recorded)",
        extra={
            "run": run["path"],
            "started": run.get("started"),
            "notebooks": len(notebooks),
            "all_ok": ok,
        },
    )
