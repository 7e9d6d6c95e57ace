"""Production topology vs embedded stack, same machine, same run (SPEC §8, §10): registration → merge_on_upload start
latency through the watcher (registry poll) and the webhook relay, and one merge job's wall time.

    .venv/bin/python -m bench.pipeline_production [--runs 3] [--profiles embedded,production] [--no-write]

For each profile in turn (one stack at a time, so they never compete for the CPUs): `tasks.stack up --profile P`,
`--runs` uploads per trigger path with no merge partner (short runs, spaced so that they never coalesce; families
`latw` watched only, `latp` reached by the relay only, as in bench/pipeline_latency.py), then one real merge job (a math
and a code checkpoint of the pipeline tests' tiny family: Fisher → SAR merge → evaluation → analysis → DVC push →
registration) timed from the code upload to its ledger state `done`. Writes the `pipeline-production` section of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench._report import machine, write_section
from bench.pipeline_latency import make_variants

ROOT = Path(__file__).resolve().parent.parent


def _params(tmp: Path, poll: float) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.pop("job", None)
    raw["pipeline"].update({"root": str(tmp / "root"), "retries": 1, "retry_delay_s": 1})
    raw["families"] = [{"name": "latw", "models": "latw-code", "merged_model": "latw-merged", "watcher": True},
                       {"name": "latp", "models": "latp-code", "merged_model": "latp-merged", "watcher": False},
                       {"name": "job", "models": "job-(math|code)", "merged_model": "job-merged", "watcher": True}]
    raw["pairing"].update({"enhancement": False, "sweep_unprocessed": False})
    raw["merge"]["methods"] = {"sar": {}}
    raw["fisher"].update({"examples": 4, "batch_size": 4, "max_new_tokens": 4})
    raw["evaluate"].update({"limit": 3, "batch_size": 8})
    raw["analyze"]["geometry"] = False
    raw["trigger"]["poll_interval_s"] = poll
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _wait_runs_of(api: Any, name: str, version: str, timeout: float = 600) -> None:
    """Until every run started for this version has finished (its start is what is measured; a failed run counts)."""
    from tasks.demo import dag_runs

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        mine = [r for r in dag_runs(api) if any((e["name"], e["version"]) == (name, version) for e in r["events"])]
        if mine and all(r["state"] in ("success", "failed") for r in mine):
            return
        time.sleep(1)
    raise SystemExit(f"no finished run for {name}/{version} within {timeout:.0f}s")


def run_profile(profile: str, runs: int, poll: float, tmp: Path) -> dict[str, Any]:
    from tasks.demo import dag_runs, trigger_latencies, wait_processed
    from tasks.register import register_checkpoint
    from tasks.registry import get_client
    from tasks.relay import AirflowClient
    from tasks.stack import Stack
    from tests.pipeline_support import make_family

    tmp.mkdir(parents=True)
    params = _params(tmp, poll)
    base_dir, variants = make_variants(tmp / "ckpt", 2 * runs)
    fam = make_family(tmp / "fam", [("math_s0", "math", 61), ("code_0", "code", 70)], base_seed=5)
    stack = Stack(tmp / "stack")
    load_start = os.getloadavg()[0]
    state = stack.up(profile=profile, params=params, parallelism=2, relay_models="latp-.*",
                     extra_env={"SARMERGE_PIPELINE_ROOT": str(tmp / "root")})
    try:
        env = stack.env()
        os.environ.update({"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"], "SARMERGE_PARAMS": env["SARMERGE_PARAMS"],
                           "SARMERGE_PIPELINE_ROOT": str(tmp / "root")})
        client = get_client()
        api = AirflowClient(env["AIRFLOW_API_URL"], user=env["AIRFLOW_API_USER"], password=env["AIRFLOW_API_PASSWORD"])
        base, _ = register_checkpoint(base_dir, name="lat-base", domain="base", kind="base")
        order = [("latw-code", v) for v in variants[:runs]] + [("latp-code", v) for v in variants[runs:]]
        for name, path in order:
            ref, _ = register_checkpoint(path, name=name, domain="code", base=base.uri)
            _wait_runs_of(api, name, ref.version)
            time.sleep(2)  # the next upload meets an idle stack
        rows = trigger_latencies(client, dag_runs(api))
        # one real merge job: math first (no partner: skipped), then code (fusion with math)
        jbase, _ = register_checkpoint(fam["base"], name="job-base", domain="base", kind="base")
        math, _ = register_checkpoint(fam["math_s0"], name="job-math", domain="math", base=jbase.uri,
                                      calib=fam["calib_math"])
        wait_processed(client, [("job-math", math.version)], 600, api=api)
        t0 = time.monotonic()
        code, _ = register_checkpoint(fam["code_0"], name="job-code", domain="code", base=jbase.uri,
                                      calib=fam["calib_code"])
        states = wait_processed(client, [("job-code", code.version)], 1200, api=api)
        job_s = time.monotonic() - t0
        if states != {f"job-code/{code.version}": "done"}:
            raise SystemExit(f"{profile}: the merge job ended {states}")
    finally:
        stack.down(grace=15)
    by_path: dict[str, list[float]] = {}
    for r in rows:
        family_path = {"latw-code": "watcher", "latp-code": "webhook"}.get(r["version"].split("/")[0])
        if r["path"] == family_path:
            by_path.setdefault(r["path"], []).append(r["latency_s"])
    return {"profile": profile, "started_in_s": state["started_in_s"], "latency": by_path, "job_s": round(job_s, 1),
            "load": (round(load_start, 1), round(os.getloadavg()[0], 1))}


def _cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}–{max(xs):.1f}, n={len(xs)})" if xs else "—"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="uploads per trigger path and profile (median; at least 3)")
    p.add_argument("--profiles", default="embedded,production")
    p.add_argument("--poll", type=float, default=5.0, help="watcher poll interval, s (params.yaml default 5)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.runs < 3:
        p.error("--runs must be at least 3")
    tmp = Path(tempfile.mkdtemp(prefix="sarmerge-prodbench-"))
    results = [run_profile(profile, args.runs, args.poll, tmp / profile) for profile in args.profiles.split(",")]
    lines = [
        "Registration (model version creation time in MLflow) → start of the merge_on_upload run it triggers, and one "
        "merge job (code upload → Fisher → SAR merge → evaluation → analysis → DVC push → registered, ledger `done`) "
        "on the two profiles of `python -m tasks.stack up`, one after the other in the same run "
        f"(`python -m bench.pipeline_production --runs {args.runs}`). Embedded: MLflow on sqlite + local artifacts, "
        "Airflow "
        "standalone (LocalExecutor). Production: PostgreSQL 15 (fsync off), Redis broker, moto S3 (MLflow artifacts "
        "proxied, DVC remote), Airflow CeleryExecutor with two workers (concurrency 1 each). Parallelism 2; watcher "
        f"poll {args.poll:g} s. Machine: {machine()}, a 2-core dev box shared with and loaded by other engineers' "
        "work during the run (load averages below), so absolute times are pessimistic and noisy.",
        "",
        "| profile | stack start s | watcher latency s, median (min–max) | webhook latency s, median (min–max) | "
        "merge job wall s | load avg start/end |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['profile']} | {r['started_in_s']:.0f} | {_cell(r['latency'].get('watcher', []))} | "
                     f"{_cell(r['latency'].get('webhook', []))} | {r['job_s']:.0f} | {r['load'][0]}/{r['load'][1]} |")
    body = "\n".join(lines)
    print(body)
    print(json.dumps(results))
    if not args.no_write:
        write_section("pipeline-production", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
