"""Step `analyze`: the update-geometry report of a workspace job (parents and every merged model against the base).

    python -m tasks.analyze --workspace WS

Writes `out/analysis` (report.json, PNG plots, report.html / report.md), logged to MLflow beside each merged version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tasks.common import step_main
from tasks.workspace import Workspace


def analyze(ws: Workspace) -> dict[str, Any]:
    out = ws.analysis_dir
    if out.is_dir():
        return {"analysis": str(out), "skipped": "already present"}
    if not ws.params.analyze.geometry:
        from sarmerge.checkpoint import atomic_output_dir

        with atomic_output_dir(out) as tmp:
            (tmp / "report.md").write_text("# Analysis\n\nGeometry report disabled (params.yaml `analyze.geometry: "
                                           "false`).\n")
        return {"analysis": str(out), "skipped": "analyze.geometry is false"}
    from sarmerge.analysis import geometry_report

    names = [*ws.job.parents, *(f"merged-{m}" for m in ws.params.merge.methods)]
    models = [ws.input_dir(n) for n in ws.job.parents] + [ws.merged_dir(m) for m in ws.params.merge.methods]
    report = geometry_report(ws.base_dir, models, out, names=names, eps=ws.params.analyze.epsilon,
                             progress=sys.stderr.isatty())
    summary = {label: {"sparsity": m.get("sparsity")} for label, m in report["model"]["models"].items()}
    return {"analysis": str(out), "models": summary}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", required=True, type=Path)
    args = p.parse_args(argv)
    return step_main("tasks.analyze", lambda: analyze(Workspace.open(args.workspace)))


if __name__ == "__main__":
    sys.exit(main())
