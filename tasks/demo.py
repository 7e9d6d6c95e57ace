"""The embedded demo (README's first command, via scripts/demo.sh): a checkpoint upload becomes a merged, evaluated,
versioned model in MLflow without a human.

    python -m tasks.demo [--dir runs/demo] [--family DIR] [--keep]

1. starts MLflow, Airflow standalone and the webhook relay on loopback ports (tasks/stack.py);
2. builds the tiny RLVR family with the zoo (`sarmerge zoo tiny`, cached by the zoo) unless --family is given;
3. uploads with `sarmerge register`: the base, the math specialist (no partner yet: recorded as skipped), then the
   code specialist, whose registration alone starts merge_on_upload: Fisher → SAR and the comparison methods →
   evaluation → analysis → DVC → registered merged versions → paired gates → alias `candidate` when every gate
   passes (at the default 64 problems per suite the gates are underpowered and say `inconclusive`, so a person
   decides in the MLflow UI with the evidence);
4. waits, then prints the result table, the trigger latencies, the UI URLs, and the command that stops everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError, run_cli
from tasks import registry as reg
from tasks.params import REPO_ROOT, Params, load_params
from tasks.stack import BIN, Stack

FINAL = ("done", "skipped", "failed")


def _ts(iso: str | None) -> float | None:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() if iso else None


def check_airflow(api: Any) -> None:
    """Fail fast, and clearly, when a component of the Airflow stack has died (rather than waiting for a timeout)."""
    health = api.request("GET", "/api/v2/monitor/health", timeout=30)
    down = [k for k in ("scheduler", "triggerer", "dag_processor") if health.get(k, {}).get("status") != "healthy"]
    if down:
        raise SarmergeError(f"Airflow {', '.join(down)} unhealthy: {health} (see the stack's logs/airflow.log)")


def wait_processed(client: Any, keys: list[tuple[str, str]], timeout: float, poll: float = 2.0,
                   api: Any = None) -> dict[str, str]:
    """Wait until the ledger mirror tag of every version says done / skipped / failed."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    unhealthy_since = None
    while time.monotonic() < deadline:
        states = {f"{n}/{v}": client.get_model_version(n, v).tags.get(reg.TAG_STATE, "") for n, v in keys}
        if all(s in FINAL for s in states.values()):
            return states
        if api is not None:
            try:
                check_airflow(api)
                unhealthy_since = None
            except (SarmergeError, OSError) as e:  # heartbeats and the API lag on a loaded machine: allow 5 min
                unhealthy_since = unhealthy_since or time.monotonic()
                if time.monotonic() - unhealthy_since > 300:
                    raise SarmergeError(f"Airflow unhealthy for 5 minutes: {e}") from e
        time.sleep(poll)
    raise SarmergeError(f"versions not processed within {timeout:.0f}s: {states}")


def dag_runs(api: Any, dag_id: str = "merge_on_upload") -> list[dict[str, Any]]:
    runs = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?order_by=start_date&limit=100")["dag_runs"]
    for r in runs:
        events = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{r['dag_run_id']}/upstreamAssetEvents")
        r["events"] = []
        for e in events.get("asset_events", []):
            extra = e.get("extra") or {}
            payload = extra.get("payload", extra) if extra.get("from_trigger") else extra
            if "name" in payload:
                r["events"].append({"name": payload["name"], "version": str(payload["version"]),
                                    "source": payload.get("source", "?"), "at": e.get("timestamp")})
    return runs


def wait_runs_finished(api: Any, timeout: float, dag_id: str = "merge_on_upload") -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]
        if runs and all(r["state"] in ("success", "failed") for r in runs):
            return dag_runs(api, dag_id)
        time.sleep(2)
    raise SarmergeError(f"{dag_id}: runs still active after {timeout:.0f}s")


def trigger_latencies(client: Any, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Registration (version creation) → start of the first DAG run each trigger path started for it."""
    first: dict[tuple[str, str, str], float] = {}
    for r in runs:
        start = _ts(r.get("start_date"))
        for e in r["events"]:
            key = (e["name"], e["version"], e["source"])
            if start is not None and (key not in first or start < first[key]):
                first[key] = start
    rows = []
    for (name, version, source), start in sorted(first.items()):
        created = client.get_model_version(name, version).creation_timestamp / 1000
        rows.append({"version": f"{name}/{version}", "path": source, "latency_s": round(start - created, 2)})
    return rows


def result_table(client: Any, params: Params) -> str:
    lines = []
    for fam in params.families:
        versions = [reg.ModelRef.from_version(mv) for mv in
                    reg.search_versions(client, f"name = '{fam.merged_model}'")]
        if not versions:
            continue
        aliases = {}
        for alias in (params.promote.candidate_alias, params.promote.champion_alias):
            ref = reg.alias_ref(client, fam.merged_model, alias)
            if ref:
                aliases.setdefault(ref.version, []).append(alias)
        suites = sorted({s for v in versions for s in json.loads(v.tags.get(reg.TAG_SCORES, "{}"))})
        head = f"{'model':<34}" + "".join(f"{s:>12}" for s in suites) + f"  {'gate':<13}aliases"
        lines += [f"\n{fam.merged_model} (family {fam.name})", head, "-" * len(head)]
        by_job: dict[str, list[reg.ModelRef]] = {}
        for v in sorted(versions, key=lambda v: int(v.version)):
            by_job.setdefault(v.tags.get(reg.TAG_JOB, "?"), []).append(v)
        for job, members in by_job.items():
            run = client.get_run(members[0].run_id)
            metrics = run.data.metrics
            parents = members[0].tags.get(reg.TAG_PARENTS, "").split(",")
            lines.append(f"job {job}: {' + '.join(p.removeprefix('models:/') for p in parents)}")
            for v in members:
                scores = json.loads(v.tags.get(reg.TAG_SCORES, "{}"))
                label = f"  v{v.version} {v.tags.get(reg.TAG_METHOD, '?')}"
                lines.append(f"{label:<34}" + "".join(f"{scores.get(s, float('nan')):>12.3f}" for s in suites)
                             + f"  {v.tags.get(reg.TAG_GATE, '?'):<13}{','.join(aliases.get(v.version, []))}")
            parent_names = sorted({k.split(".")[1] for k in metrics if k.startswith("parent.")})
            for p in parent_names:
                row = [metrics.get(f"parent.{p}.{reg.safe_key(s)}", float("nan")) for s in suites]
                lines.append(f"{'  parent ' + p:<34}" + "".join(f"{x:>12.3f}" for x in row))
            row = [metrics.get(f"base.{reg.safe_key(s)}", float("nan")) for s in suites]
            lines.append(f"{'  base':<34}" + "".join(f"{x:>12.3f}" for x in row))
    return "\n".join(lines)


def build_family(out: Path) -> Path:
    """The tiny RLVR family from the zoo (`sarmerge zoo tiny`; the zoo caches it, so later demos take seconds)."""
    print("demo: building the tiny RLVR family (SFT base + GRPO specialists; minutes on 2 cores the first time, "
          "then cached) ...", flush=True)
    proc = subprocess.run([str(BIN / "sarmerge"), "zoo", "tiny", "--out", str(out), "--overwrite"], cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SarmergeError(f"`sarmerge zoo tiny --out {out}` failed (exit {proc.returncode})")
    return out


def _register(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    shown = ["sarmerge", *cmd[1:]] if cmd[0].endswith("sarmerge") else cmd
    print("$ " + " ".join(shlex.quote(c) for c in shown if c != "--json"), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SarmergeError(f"register failed: {proc.stderr.strip()[-1500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  → {out['uri']} ({'registered' if out['created'] else 'already registered'})", flush=True)
    return out


def run_demo(directory: Path, family_dir: Path | None, keep: bool, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    stack = Stack(directory)
    stack.down(grace=20)
    if not keep and directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_root = directory / "pipeline"
    family = family_dir or build_family(directory / "family")
    print(f"demo: starting MLflow, Airflow standalone and the webhook relay (state in {directory}) ...", flush=True)
    state = stack.up(extra_env={"SARMERGE_PIPELINE_ROOT": str(pipeline_root)})
    urls = state["urls"]
    print(f"demo: up in {state['started_in_s']:.0f}s — MLflow {urls['mlflow']}  Airflow {urls['airflow']}", flush=True)
    env = {**os.environ, **stack.env(), "SARMERGE_PIPELINE_ROOT": str(pipeline_root)}
    os.environ.update({k: env[k] for k in ("MLFLOW_TRACKING_URI", "SARMERGE_PIPELINE_ROOT")})
    params = load_params()
    fam = params.families[0]
    names = {d: f"{fam.name}-{d}" for d in ("math", "code")}
    if not all(fam.matches(n) for n in names.values()):
        raise SarmergeError(f"params.yaml family {fam.name!r} (models {fam.models!r}) must match "
                            f"{list(names.values())}")
    cli = [str(BIN / "sarmerge"), "register"]
    base = _register([*cli, str(family / "base"), "--name", f"{fam.name}-base", "--kind", "base", "--json"], env)
    client = reg.get_client(env["MLFLOW_TRACKING_URI"])
    from tasks.relay import AirflowClient

    api = AirflowClient(urls["airflow"], user=env["AIRFLOW_API_USER"], password=env["AIRFLOW_API_PASSWORD"])
    t_upload = time.monotonic()
    math = _register([*cli, str(family / "math_s0"), "--name", names["math"], "--domain", "math", "--base",
                      base["uri"], "--calib", str(family / "calib_math.jsonl"), "--json"], env)
    print("demo: waiting for the pipeline to see it (the first upload has no partner yet) ...", flush=True)
    wait_processed(client, [(math["name"], math["version"])], timeout, api=api)
    code = _register([*cli, str(family / "code_s0"), "--name", names["code"], "--domain", "code", "--base",
                      base["uri"], "--calib", str(family / "calib_code.jsonl"), "--json"], env)
    print("demo: the upload alone starts merge_on_upload; waiting for merged, evaluated, registered versions ...",
          flush=True)
    states = wait_processed(client, [(code["name"], code["version"])], timeout, api=api)
    runs = wait_runs_finished(api, timeout)
    t_done = time.monotonic()
    table = result_table(client, params)
    latencies = trigger_latencies(client, runs)
    summary = {
        "urls": urls, "states": states, "latencies": latencies,
        "runs": [{"run_id": r["dag_run_id"], "state": r["state"], "events": r["events"]} for r in runs],
        "wall_s": {"total": round(t_done - t0, 1), "stack_up": state["started_in_s"],
                   "upload_to_registered": round(t_done - t_upload, 1)},
    }
    (directory / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(table)
    print("\ntrigger latency (registration → DAG run start):")
    for row in latencies:
        print(f"  {row['version']:<24} {row['path']:<8} {row['latency_s']:>6.1f}s")
    failed = [r["dag_run_id"] for r in runs if r["state"] != "success"]
    if failed:
        print(f"\nWARNING: DAG runs failed: {failed} (see the Airflow UI)")
    print(f"""
MLflow UI:  {urls['mlflow']}/#/models/{fam.merged_model}  (evidence in each version's description and run;
            promote a version by giving it the alias `champion`)
Airflow UI: {urls['airflow']}/dags/merge_on_upload  (user sarmerge, password in {directory / 'secrets.env'})
demo wall time: {summary['wall_s']['total']:.0f}s (stack {summary['wall_s']['stack_up']:.0f}s, upload → registered \
{summary['wall_s']['upload_to_registered']:.0f}s)
stop everything: bash scripts/stop-demo.sh   (stops the processes by PID; state stays in {directory})""")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=REPO_ROOT / "runs" / "demo")
    p.add_argument("--family", type=Path, default=None, help="an existing family folder (default: build with the zoo)")
    p.add_argument("--keep", action="store_true", help="keep the previous demo's registry and runs")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the pipeline")
    args = p.parse_args(argv)
    return run_cli("demo", lambda: run_demo(args.dir.resolve(), args.family.resolve() if args.family else None,
                                            args.keep, args.timeout),
                   hint="\n(the stack may still be running: bash scripts/stop-demo.sh)")


if __name__ == "__main__":
    sys.exit(main())
