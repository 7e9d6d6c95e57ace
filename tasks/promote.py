"""Step `gate`/`promote`: apply the paired non-inferiority gates of params.yaml to a job's merged versions and set the
aliases.

    python -m tasks.promote --workspace WS

Every merged version gets `sarmerge.gate` = pass | fail | inconclusive (pass only when every gate passes; fail when
any gate's interval lies wholly below its margin), one `sarmerge.gate.<gate>` tag per gate with its verdict and
interval, the evidence description with links to its report and per-sample verdicts, and a model card whose
Hub front matter carries the lineage and the evaluation results. The best version that passes every gate (highest
mean score; the primary method wins ties) gets the alias `candidate`; with `promote.auto_promote` it also becomes
`champion`. An inconclusive version is never promoted automatically: a person decides in the MLflow UI, reading the
evidence. Re-running sets the same tags, description, card and aliases (idempotent).
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
TAG_GATE_PREFIX = "sarmerge.gate."


def gate_tags(ev: Any) -> dict[str, str]:
    """The version tags of an Evidence: the overall verdict, a summary, and one tag per gate with its interval."""
    tags = {reg.TAG_GATE: ev.verdict,
            reg.TAG_GATE_DETAIL: "; ".join(f"{g.verdict} {g.name}: {g.detail}" for g in ev.gates)[:4000]}
    tags |= {f"{TAG_GATE_PREFIX}{reg.safe_key(g.name)}": g.tag_value() for g in ev.gates}
    return tags


def write_card(ws: Workspace, ev: Any, ref: reg.ModelRef) -> Path | None:
    """The merged model's README.md with Hub front matter and the evaluation results (known only now)."""
    from sarmerge.merge import model_card

    manifest_file = ws.merged_dir(ev.method) / "merge_manifest.json"
    if not manifest_file.is_file():
        log.warning("%s: no merge manifest; model card left as merged", manifest_file)
        return None
    job = ws.job
    lineage = [p.model or name for name, p in job.parents.items()] + [ws.meta.get("base", {}).get("uri", job.base)]
    label = f"merged ({ev.method})"
    evaluation = {s: {"accuracy": v, "ci95": list(ev.ci95.get(label, {}).get(s, ())) or None,
                      "problems": ev.differences.get("base", {}).get(s).problems
                      if ev.differences.get("base", {}).get(s) else None}
                  for s, v in ev.scores.items()}
    card = ws.tmp / "card" / ev.method / "README.md"
    card.parent.mkdir(parents=True, exist_ok=True)
    card.write_text(model_card(read_json(manifest_file), evaluation=evaluation, base_models=lineage,
                               model_name=f"{ref.name} v{ref.version}"))
    return card


def promote(ws: Workspace, client: Any = None) -> dict[str, Any]:
    from tasks import evidence

    params = ws.params
    registered = read_json(ws.tmp / "registered.json")
    client = client or reg.get_client()
    rows = []
    for item in registered:
        ev = evidence.collect(ws, item["method"])
        ref = reg.get_ref(client, item["name"], item["version"])
        reg.set_tags(client, ref, gate_tags(ev))
        if ref.run_id:
            experiment_id = client.get_run(ref.run_id).info.experiment_id
            client.update_model_version(ref.name, ref.version, description=evidence.describe(
                ws, ev, run_id=ref.run_id, experiment_id=experiment_id))
            card = write_card(ws, ev, ref)
            if card is not None:
                client.log_artifact(ref.run_id, str(card), reg.CHECKPOINT_ARTIFACT)
        rows.append({"method": item["method"], "ref": ref, "verdict": ev.verdict, "mean": ev.mean_score,
                     "scores": ev.scores, "gates": [g.as_dict() for g in ev.gates]})
    passing = [r for r in rows if r["verdict"] == "pass"]
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
        log.warning("job %s: no merged version passed every gate (%s); no alias set", ws.job.id,
                    ", ".join(f"{r['method']}: {r['verdict']}" for r in rows))
    return {
        "job": ws.job.id,
        "versions": [{"method": r["method"], "uri": r["ref"].uri, "gate": r["verdict"], "scores": r["scores"],
                      "gates": r["gates"]} for r in rows],
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
