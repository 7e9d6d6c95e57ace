"""Step `gate`/`promote`: apply the gate rules of params.yaml to a job's merged versions and set the aliases.

    python -m tasks.promote --workspace WS

Every merged version gets `sarmerge.gate` = pass | fail and the per-rule detail. The best version that passes every
gate (highest mean score; the primary method wins ties) gets the alias `candidate`; with `promote.auto_promote` it
also becomes `champion`. Otherwise a person promotes in the MLflow UI, reading the evidence in the description.
Re-running sets the same tags and aliases (idempotent).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from tasks import registry as reg
from tasks.common import read_json, step_main
from tasks.workspace import Workspace

log = logging.getLogger(__name__)


def promote(ws: Workspace, client: Any = None) -> dict[str, Any]:
    from tasks import evidence

    params = ws.params
    registered = read_json(ws.tmp / "registered.json")
    client = client or reg.get_client()
    rows = []
    for item in registered:
        ev = evidence.collect(ws, item["method"])
        ref = reg.get_ref(client, item["name"], item["version"])
        reg.set_tags(client, ref, {reg.TAG_GATE: "pass" if ev.passed else "fail",
                                   reg.TAG_GATE_DETAIL: "; ".join(f"{'ok' if g.passed else 'FAIL'} {g.name}: {g.detail}"
                                                                  for g in ev.gates)[:4000]})
        rows.append({"method": item["method"], "ref": ref, "passed": ev.passed, "mean": ev.mean_score,
                     "scores": ev.scores, "gates": [g.__dict__ for g in ev.gates]})
    passing = [r for r in rows if r["passed"]]
    best = max(passing, key=lambda r: (r["mean"], r["method"] == params.merge.primary), default=None)
    aliases = []
    if best is not None:
        name = best["ref"].name
        client.set_registered_model_alias(name, params.promote.candidate_alias, best["ref"].version)
        aliases.append(params.promote.candidate_alias)
        if params.promote.auto_promote:
            client.set_registered_model_alias(name, params.promote.champion_alias, best["ref"].version)
            aliases.append(params.promote.champion_alias)
        log.info("%s → %s", best["ref"].uri, ", ".join(aliases))
    else:
        log.warning("job %s: no merged version passed every gate; no alias set", ws.job.id)
    return {
        "job": ws.job.id,
        "versions": [{"method": r["method"], "uri": r["ref"].uri, "gate": "pass" if r["passed"] else "fail",
                      "scores": r["scores"]} for r in rows],
        "candidate": best["ref"].uri if best else None,
        "aliases": aliases,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.promote", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", required=True, type=Path)
    args = p.parse_args(argv)
    return step_main("tasks.promote", lambda: promote(Workspace.open(args.workspace)))


if __name__ == "__main__":
    sys.exit(main())
