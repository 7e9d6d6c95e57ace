"""Pipeline trigger latency (SPEC §10): registration of a model version → start of the merge_on_upload run it causes,
through the registry watcher (pull; target ≤ 60 s) and through the webhook relay (push; target ≤ 5 s).

    .venv/bin/python -m bench.pipeline_latency [--runs 5] [--demo-json runs/demo/demo.json] [--no-write]

Brings up the embedded stack (MLflow + Airflow standalone + relay) with two families: `latw` watched by the registry
poller only (the relay ignores it) and `latp` reached by the relay only (no watcher). Each upload is a new checkpoint
with no merge partner, so its run is short; uploads are spaced so that runs do not coalesce. Writes the `pipeline`
section of BENCHMARKS.md (with the demo's wall time when --demo-json points at a finished `scripts/demo.sh`).
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

import yaml

from bench._report import machine, write_section

ROOT = Path(__file__).resolve().parent.parent


def make_variants(out: Path, n: int) -> tuple[Path, list[Path]]:
    """A tiny base and `n` checkpoints differing from it in one tensor (distinct content, no training)."""
    import torch
    from safetensors.torch import load_file, save_file

    from sarmerge.zoo.tiny import save_checkpoint, tiny_model

    model, tok = tiny_model(seed=123)
    base = save_checkpoint(model.to(torch.bfloat16), tok, out / "base")
    weights = load_file(base / "model.safetensors")
    variants = []
    for i in range(n):
        d = out / f"v{i}"
        save_checkpoint(model, tok, d)
        changed = dict(weights)
        name = next(k for k in changed if k.endswith("q_proj.weight"))
        changed[name] = (changed[name].float() + 0.01 * (i + 1)).to(changed[name].dtype)
        save_file(changed, d / "model.safetensors", metadata={"format": "pt"})
        variants.append(d)
    return base, variants


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="uploads per path (median over them; at least 3)")
    p.add_argument("--parallelism", type=int, default=None, help="Airflow core.parallelism (default: the stack's)")
    p.add_argument("--poll", type=float, default=5.0, help="watcher poll interval, s (params.yaml default 5)")
    p.add_argument("--demo-json", type=Path, default=None)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.runs < 3:
        p.error("--runs must be at least 3")

    from tasks.demo import dag_runs, trigger_latencies
    from tasks.register import register_checkpoint
    from tasks.registry import get_client
    from tasks.relay import AirflowClient
    from tasks.stack import Stack

    tmp = Path(tempfile.mkdtemp(prefix="sarmerge-latency-"))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.pop("job", None)
    raw["pipeline"]["root"] = str(tmp / "root")
    raw["families"] = [{"name": "latw", "models": "latw-code", "merged_model": "latw-merged", "watcher": True},
                       {"name": "latp", "models": "latp-code", "merged_model": "latp-merged", "watcher": False}]
    raw["pairing"].update({"fusion": False, "enhancement": False, "sweep_unprocessed": False})
    raw["trigger"]["poll_interval_s"] = args.poll
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    base_dir, variants = make_variants(tmp / "ckpt", 2 * args.runs)
    stack = Stack(tmp / "stack")
    t0 = time.monotonic()
    load_start = os.getloadavg()[0]
    up_kw = {"parallelism": args.parallelism} if args.parallelism else {}
    state = stack.up(params=params, relay_models="latp-.*", extra_env={"SARMERGE_PIPELINE_ROOT": str(tmp / "root")},
                     **up_kw)
    try:
        env = stack.env()
        os.environ.update({"MLFLOW_TRACKING_URI": env["MLFLOW_TRACKING_URI"], "SARMERGE_PARAMS": str(params)})
        client = get_client()
        api = AirflowClient(env["AIRFLOW_API_URL"], user=env["AIRFLOW_API_USER"], password=env["AIRFLOW_API_PASSWORD"])
        base, _ = register_checkpoint(base_dir, name="lat-base", domain="base", kind="base")
        order = [("latw-code", v) for v in variants[: args.runs]] + [("latp-code", v) for v in variants[args.runs:]]
        for name, path in order:
            ref, _ = register_checkpoint(path, name=name, domain="code", base=base.uri)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:  # wait for its run to finish: each upload meets an idle stack
                mine = [r for r in dag_runs(api) if any((e["name"], e["version"]) == (name, ref.version)
                                                        for e in r["events"])]
                if mine and all(r["state"] in ("success", "failed") for r in mine):
                    break
                time.sleep(1)
            time.sleep(2)
        rows = trigger_latencies(client, dag_runs(api))
    finally:
        stack.down(grace=15)
    by_path: dict[str, list[float]] = {}
    for r in rows:
        family_path = {"latw-code": "watcher", "latp-code": "webhook"}[r["version"].split("/")[0]]
        if r["path"] == family_path:
            by_path.setdefault(r["path"], []).append(r["latency_s"])
    load = os.getloadavg()[0]
    lines = [
        "Registration (model version creation time in MLflow) → start of the merge_on_upload DAG run it triggers, "
        "on the embedded stack (MLflow sqlite server, Airflow 3.3.2 standalone, LocalExecutor, parallelism "
        f"{state['parallelism']}). "
        f"{args.runs} uploads per path, each after the previous run finished (an idle stack, no coalescing); "
        f"watcher poll interval {args.poll:g} s. Load average {load_start:.1f} at the start. "
        f"Machine: {machine()}, load average {load:.1f} at the end (shared with other engineers' jobs). "
        f"Stack start-up (db migrate, MLflow, Airflow, relay): {state['started_in_s']:.0f} s.",
        "",
        "| path | median s | min s | max s | SPEC §10 target | n |",
        "|---|---|---|---|---|---|",
    ]
    targets = {"watcher": "≤ 60 s", "webhook": "≤ 5 s"}
    for path in ("watcher", "webhook"):
        xs = by_path.get(path, [])
        if xs:
            lines.append(f"| {path} ({'registry poll' if path == 'watcher' else 'MLflow webhook → relay'}) | "
                         f"{statistics.median(xs):.1f} | {min(xs):.1f} | {max(xs):.1f} | {targets[path]} | {len(xs)} |")
    ratio = (statistics.median(by_path["watcher"]) / statistics.median(by_path["webhook"])
             if by_path.get("watcher") and by_path.get("webhook") else None)
    if ratio:
        lines.append(f"\nWatcher / push median ratio in the same run: {ratio:.1f}×. The watcher's latency is about "
                     "half a poll interval plus the scheduler's loop; the push path adds only the relay's checks and "
                     "one API call.")
    if args.demo_json and args.demo_json.exists():
        demo = json.loads(args.demo_json.read_text())
        w = demo["wall_s"]
        lines.append(f"\nEmbedded demo (`bash scripts/demo.sh`, setup already done, tiny zoo family cached): "
                     f"{w['total']:.0f} s wall in total — stack start {w['stack_up']:.0f} s, first upload → merged "
                     f"versions registered, evaluated and gated {w['upload_to_registered']:.0f} s.")
    body = "\n".join(lines)
    print(body)
    print(json.dumps({"latencies": rows, "total_s": round(time.monotonic() - t0, 1)}))
    if not args.no_write:
        write_section("pipeline", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
