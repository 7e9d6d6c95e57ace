"""Step `evaluate`: evaluate a model of a workspace job on every suite of the job.

    python -m tasks.evaluate --workspace WS --model merged/sar     # one merged model → out/eval/merged/sar
    python -m tasks.evaluate --workspace WS --model inputs/math_s0 # one parent (or inputs/base)
    python -m tasks.evaluate --workspace WS --inputs               # base and every parent (the DVC stage)

Results are cached by (checkpoint digest, suites, evaluation settings), so the parents and the base, which recur
across jobs, are evaluated once. Seeds are fixed by params.yaml `evaluate.seed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError
from tasks.cache import cached, checkpoint_digest
from tasks.common import step_main
from tasks.params import EvaluateCfg
from tasks.workspace import Workspace

SUMMARY = "summary.json"


# evaluation options that change where and how fast it runs, not the scores
OPERATIONAL = {"device", "threads", "workers", "allow_unisolated"}


def eval_settings(cfg: EvaluateCfg, suites: list[str], limit: int | None = None) -> dict[str, Any]:
    """The settings that determine an evaluation's scores: its cache key and the registry's `sarmerge.eval` tag."""
    settings = cfg.options().model_dump(mode="json", exclude=OPERATIONAL)
    return {**settings, "suites": sorted(suites), "limit": limit or cfg.limit}


def evaluate_dir(model_dir: Path, out: Path, cfg: EvaluateCfg, suites: list[str], *, limit: int | None = None,
                 digest: str | None = None, params: Any = None) -> dict[str, Any]:
    """Evaluate `model_dir` into `out` (through the cache when `params` is given); returns the summary."""
    from tasks.common import read_json

    settings = eval_settings(cfg, suites, limit)

    def compute(dest: Path) -> None:
        from sarmerge.evaluate import evaluate

        evaluate(model_dir, settings["suites"], cfg.options(), out=dest, limit=settings["limit"],
                 progress=sys.stderr.isatty())

    if params is None:
        compute(out)
    else:
        cached(params, "eval", {"model": checkpoint_digest(model_dir, digest), **settings}, out, compute)
    return read_json(out / SUMMARY)


def scores(summary: dict[str, Any]) -> dict[str, float]:
    """suite → the headline score (accuracy / pass@1) of an evaluation summary."""
    out = {}
    for name, s in summary.get("suites", {}).items():
        value = s.get("accuracy", s.get("pass@1"))
        if value is None:
            raise SarmergeError(f"evaluation summary: suite {name!r} has neither accuracy nor pass@1")
        out[name] = float(value)
    return out


def sandbox_record(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The isolation model-written code was scored under (the summary's `sandbox`: each field a probe's outcome), in
    the compact form the pipeline records on MLflow versions; None when no suite ran code."""
    sandbox = summary.get("sandbox")
    if not isinstance(sandbox, dict):
        return None
    probes = {k: v for k, v in sandbox.items() if isinstance(v, bool) and k != "isolated"}
    return {"mode": str(sandbox.get("mode", "unknown")), "isolated": sandbox.get("isolated") is True,
            "memory_cap": str(sandbox.get("memory_cap", "")), "missing": sorted(k for k, v in probes.items() if not v)}


def describe_sandbox(record: dict[str, Any] | None) -> str:
    """One Markdown line for a version description."""
    if record is None:
        return "**Sandbox**: no suite ran model-written code."
    if record["isolated"]:
        return (f"**Sandbox**: `{record['mode']}`, fully isolated (every probe held; memory cap "
                f"{record['memory_cap'] or 'unknown'}).")
    failed = ", ".join(record["missing"]) or "-"
    return (f"**Sandbox**: `{record['mode']}`, **NOT isolated** (failed probes: {failed}); code suites were scored "
            "only because evaluate.allow_unisolated allowed it.")


def evaluate_model(ws: Workspace, rel: str) -> dict[str, Any]:
    kind, _, name = rel.partition("/")
    if kind == "merged":
        model_dir, digest = ws.merged_dir(name), None
    elif kind == "inputs":
        model_dir = ws.input_dir(name)
        meta = ws.meta.get("base") if name == ws.job.base else ws.meta.get("parents", {}).get(name)
        digest = (meta or {}).get("sha256")
    else:
        raise SarmergeError(f"--model {rel!r}: expected merged/<method> or inputs/<name>")
    if not model_dir.is_dir():
        raise SarmergeError(f"{model_dir}: no such model in the workspace (run the step that makes it first)")
    out = ws.eval_dir(rel)
    if not out.is_dir():
        evaluate_dir(model_dir, out, ws.params.evaluate, ws.job.suites, digest=digest, params=ws.params)
    from tasks.common import read_json

    return {"model": rel, "eval": str(out), "scores": scores(read_json(out / SUMMARY))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", required=True, type=Path)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="merged/<method> or inputs/<name>")
    g.add_argument("--inputs", action="store_true", help="the base and every parent")
    args = p.parse_args(argv)

    def body() -> Any:
        ws = Workspace.open(args.workspace)
        if args.model:
            return evaluate_model(ws, args.model)
        return [evaluate_model(ws, f"inputs/{n}") for n in [ws.job.base, *ws.job.parents]]

    return step_main("tasks.evaluate", body)


if __name__ == "__main__":
    sys.exit(main())
