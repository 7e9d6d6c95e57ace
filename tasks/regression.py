"""Step `regression`: re-evaluate the versions behind aliases (`@champion` — whatever a person last promoted in the
MLflow UI — and the other aliases in params.yaml) with the fixed seeds and settings recorded at registration.

    python -m tasks.regression --family tiny [--alias champion ...]

A suite scoring more than `regression.tolerance` below the score recorded on the version (`sarmerge.scores`) tags
the version `sarmerge.regression=drop` with the detail and exits 3, so the DAG task fails visibly and its alert
callback fires. A clean check tags `sarmerge.regression=ok`. Each check is also an MLflow run with the measured scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

from sarmerge.errors import SarmergeError
from tasks import registry as reg
from tasks.cache import cached
from tasks.common import emit_result, setup_logging
from tasks.params import Params, load_params

log = logging.getLogger(__name__)
EXIT_REGRESSION = 3


class RegressionDetected(SarmergeError):
    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def check_version(params: Params, client: Any, ref: reg.ModelRef, alias: str) -> dict[str, Any]:
    from tasks.evaluate import evaluate_dir, scores

    recorded_raw = ref.tags.get(reg.TAG_SCORES)
    if not recorded_raw:
        return {"alias": alias, "uri": ref.uri, "status": "no-baseline",
                "detail": f"{ref.uri} has no {reg.TAG_SCORES} tag (not registered by the pipeline)"}
    recorded: dict[str, float] = json.loads(recorded_raw)
    settings = json.loads(ref.tags.get(reg.TAG_EVAL, "{}"))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    area = params.root / "regression" / f"{ref.name}-v{ref.version}"
    model_dir = area / "model"
    if not model_dir.is_dir():
        cached(params, "models", {"sha256": ref.sha256}, model_dir,
               lambda scratch: reg.download_checkpoint(client, ref, scratch))
    cfg = params.evaluate.model_copy(update={k: v for k, v in settings.items()
                                             if k in ("seed", "backend", "batch_size", "max_new_tokens")})
    limit = params.regression.limit or settings.get("limit") or params.evaluate.limit
    t0 = time.perf_counter()
    summary = evaluate_dir(model_dir, area / f"eval-{stamp}", cfg, sorted(recorded), limit=limit)
    measured = scores(summary)
    drops = {s: recorded[s] - measured.get(s, 0.0) for s in recorded}
    flagged = {s: d for s, d in drops.items() if d > params.regression.tolerance}
    detail = "; ".join(f"{s}: {measured.get(s, 0.0):.3f} vs recorded {recorded[s]:.3f}" for s in sorted(recorded))
    status = "drop" if flagged else "ok"
    reg.set_tags(client, ref, {reg.TAG_REGRESSION: status,
                               reg.TAG_REGRESSION_DETAIL: f"{stamp} {alias}: {detail} (tolerance "
                                                          f"{params.regression.tolerance})"[:4000]})
    exp = reg.ensure_experiment(client, f"{params.pipeline.experiment}-regression")
    run = client.create_run(exp, run_name=f"regression-{ref.name}-v{ref.version}-{alias}",
                            tags={"sarmerge.model_version": ref.uri, "sarmerge.alias": alias,
                                  reg.TAG_REGRESSION: status})
    for s, v in measured.items():
        client.log_metric(run.info.run_id, f"eval.{reg.safe_key(s)}", v)
        client.log_metric(run.info.run_id, f"drop.{reg.safe_key(s)}", drops.get(s, 0.0))
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("%s @%s: %s (%s) in %.1fs", ref.uri, alias, status, detail, time.perf_counter() - t0)
    return {"alias": alias, "uri": ref.uri, "status": status, "measured": measured, "recorded": recorded,
            "drops": drops, "flagged": flagged, "detail": detail}


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
        raise RegressionDetected(f"regression: {what} (tolerance {params.regression.tolerance})", out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.regression", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True)
    p.add_argument("--alias", action="append", help="alias to check (repeatable; default: params.yaml)")
    args = p.parse_args(argv)
    setup_logging()
    try:
        emit_result(run_regression(load_params(), args.family, args.alias))
        return 0
    except RegressionDetected as e:
        print(f"tasks.regression: REGRESSION: {e}", file=sys.stderr)
        emit_result(e.result)
        return EXIT_REGRESSION
    except SarmergeError as e:
        print(f"tasks.regression: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
