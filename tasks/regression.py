"""Step `regression`: re-evaluate the versions behind aliases (`@champion` — whatever a person last promoted in the
MLflow UI — and the other aliases in params.yaml) with the fixed seeds and settings recorded at registration.

    python -m tasks.regression --family tiny [--alias champion ...]

The new evaluation is paired, problem by problem, with the evaluation recorded in the version's run
(`evaluation/samples.jsonl`), with the same statistics as the gates (sarmerge/stats.py): per suite, the interval of
(now − recorded) at `regression.confidence`. A suite whose whole interval lies below −`regression.tolerance` is a
drop: the version is tagged `sarmerge.regression=drop` with the detail and the step exits 3, so the DAG task fails
visibly and its alert callback fires. When every suite's interval lies above −tolerance the version is tagged `ok`;
otherwise `inconclusive` (too few problems to tell; the detail says how many would do) — reported, not alarmed, so
noise never pages anyone. Each check is also an MLflow run with the measured scores and intervals.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError, run_cli
from sarmerge.stats import (
    PairedDifference,
    discordance_upper,
    noninferiority,
    paired_difference,
    problems_needed,
)
from tasks import registry as reg
from tasks.cache import cached
from tasks.common import emit_result, setup_logging
from tasks.params import Params, RegressionCfg, load_params

log = logging.getLogger(__name__)
EXIT_REGRESSION = 3
RECORDED_ARTIFACT = "evaluation"
STATUS = {"pass": "ok", "fail": "drop", "inconclusive": "inconclusive"}


class RegressionDetected(SarmergeError):
    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def compare_runs(now: dict[str, float], recorded: dict[str, float], *, samples_per_problem: int, cfg: RegressionCfg,
                 seed: int, resamples: int = 4000) -> tuple[str, PairedDifference, int]:
    """Status (ok | drop | inconclusive) of one suite from per-problem avg@k of the new and the recorded evaluation,
    paired on the problems both cover; also the paired difference and the problems a decision needs."""
    common = sorted(set(now) & set(recorded))
    if not common:
        raise SarmergeError("the new and the recorded evaluation share no problem (different suite data or seed?)")
    diff = paired_difference([now[i] for i in common], [recorded[i] for i in common],
                             samples_per_problem=samples_per_problem, confidence=cfg.confidence, seed=seed,
                             resamples=resamples)
    verdict = noninferiority(diff, cfg.tolerance)
    needed = problems_needed(max(cfg.tolerance, 1e-3), confidence=cfg.confidence, discordance=discordance_upper(diff))
    return STATUS[verdict], diff, needed


def _recorded_evaluation(client: Any, ref: reg.ModelRef, dest: Path) -> Path | None:
    """Download the evaluation recorded in the version's run; None when the run has none (registered elsewhere)."""
    import mlflow

    if not ref.run_id:
        return None
    names = {Path(f.path).name for f in client.list_artifacts(ref.run_id, RECORDED_ARTIFACT)}
    if not {"summary.json", "samples.jsonl"} <= names:
        return None
    dest.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(run_id=ref.run_id, artifact_path=RECORDED_ARTIFACT,
                                                    dst_path=str(dest)))


def check_version(params: Params, client: Any, ref: reg.ModelRef, alias: str) -> dict[str, Any]:
    from sarmerge.options import EvaluateOptions
    from tasks.evaluate import evaluate_dir
    from tasks.evidence import load_evaluation

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    area = params.root / "regression" / f"{ref.name}-v{ref.version}"
    recorded_dir = _recorded_evaluation(client, ref, area / f"recorded-{stamp}")
    if recorded_dir is None:
        return {"alias": alias, "uri": ref.uri, "status": "no-baseline",
                "detail": f"{ref.uri}: its run has no recorded evaluation ({RECORDED_ARTIFACT}/samples.jsonl; not "
                          "registered by the pipeline)"}
    recorded = load_evaluation(recorded_dir, f"{ref.uri} as recorded")
    settings = json.loads(ref.tags.get(reg.TAG_EVAL, "{}"))
    model_dir = area / "model"
    if not model_dir.is_dir():
        cached(params, "models", {"sha256": ref.sha256}, model_dir,
               lambda scratch: reg.download_checkpoint(client, ref, scratch))
    # evaluate as at registration: every recorded setting that determines the scores
    cfg = params.evaluate.model_copy(update={k: v for k, v in settings.items()
                                             if k in EvaluateOptions.model_fields and k != "limit"})
    limit = params.regression.limit or settings.get("limit") or params.evaluate.limit
    t0 = time.perf_counter()
    evaluate_dir(model_dir, area / f"eval-{stamp}", cfg, sorted(recorded.scores), limit=limit)
    measured = load_evaluation(area / f"eval-{stamp}", f"{ref.uri} now")
    suites: dict[str, dict[str, Any]] = {}
    for s in sorted(recorded.scores):
        k = max(measured.samples_per_problem.get(s, 1), recorded.samples_per_problem.get(s, 1))
        status, diff, needed = compare_runs(measured.per_problem.get(s, {}), recorded.per_problem[s],
                                            samples_per_problem=k, cfg=params.regression, seed=cfg.seed,
                                            resamples=params.gate.resamples)
        suites[s] = {"status": status, "now": measured.scores.get(s, 0.0), "recorded": recorded.scores[s],
                     "difference": diff.difference, "low": diff.low, "high": diff.high, "problems": diff.problems,
                     "needed": needed}
    statuses = {v["status"] for v in suites.values()}
    status = "drop" if "drop" in statuses else ("ok" if statuses == {"ok"} else "inconclusive")
    pct = f"{params.regression.confidence:.0%}"
    detail = "; ".join(
        f"{s}: {v['now']:.3f} now vs {v['recorded']:.3f} recorded, paired {v['difference']:+.3f} {pct} "
        f"[{v['low']:+.3f}, {v['high']:+.3f}] on {v['problems']} → {v['status']}"
        + (f" (underpowered: needs ≈{v['needed']})" if v["status"] == "inconclusive" else "")
        for s, v in suites.items())
    reg.set_tags(client, ref, {reg.TAG_REGRESSION: status,
                               reg.TAG_REGRESSION_DETAIL: f"{stamp} {alias}: {detail} (tolerance "
                                                          f"{params.regression.tolerance})"[:4000]})
    exp = reg.ensure_experiment(client, f"{params.pipeline.experiment}-regression")
    run = client.create_run(exp, run_name=f"regression-{ref.name}-v{ref.version}-{alias}",
                            tags={"sarmerge.model_version": ref.uri, "sarmerge.alias": alias,
                                  reg.TAG_REGRESSION: status})
    for s, v in suites.items():
        key = reg.safe_key(s)
        for metric, value in (("eval", v["now"]), ("drop", v["recorded"] - v["now"]), ("diff.low", v["low"]),
                              ("diff.high", v["high"])):
            client.log_metric(run.info.run_id, f"{metric}.{key}", value)
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("%s @%s: %s (%s) in %.1fs", ref.uri, alias, status, detail, time.perf_counter() - t0)
    return {"alias": alias, "uri": ref.uri, "version": ref.version, "status": status, "suites": suites,
            "measured": measured.scores, "recorded": recorded.scores,
            "flagged": {s: v["recorded"] - v["now"] for s, v in suites.items() if v["status"] == "drop"},
            "detail": detail, "run_id": run.info.run_id}


def run_regression(params: Params, family: str, aliases: list[str] | None = None, client: Any = None) -> dict:
    fam = params.family_named(family)
    client = client or reg.get_client()
    results = []
    for alias in aliases or params.regression.aliases:
        ref = reg.alias_ref(client, fam.merged_model, alias)
        if ref is None:
            results.append({"alias": alias, "status": "unset", "detail": f"no version of {fam.merged_model} has "
                            f"alias {alias!r}"})
            continue
        results.append(check_version(params, client, ref, alias))
    out = {"family": family, "model": fam.merged_model, "checks": results}
    dropped = [r for r in results if r["status"] == "drop"]
    if dropped:
        what = "; ".join(f"{r['uri']} (@{r['alias']}) dropped "
                         + ", ".join(f"{s} −{d:.3f}" for s, d in r["flagged"].items()) for r in dropped)
        raise RegressionDetected(f"regression: {what} (tolerance {params.regression.tolerance}, paired "
                                 f"{params.regression.confidence:.0%} interval wholly below it)", out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.regression", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True)
    p.add_argument("--alias", action="append", help="alias to check (repeatable; default: params.yaml)")
    args = p.parse_args(argv)
    setup_logging()

    def body() -> int:
        try:
            emit_result(run_regression(load_params(), args.family, args.alias))
            return 0
        except RegressionDetected as e:
            print(f"tasks.regression: REGRESSION: {e}", file=sys.stderr)
            emit_result(e.result)
            return EXIT_REGRESSION

    return run_cli("tasks.regression", body)


if __name__ == "__main__":
    sys.exit(main())
