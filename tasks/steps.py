"""The pipeline graph, declared once (SPEC §8). `plan` builds each mapped step's argument lists from this table, the
DAG (`dags/merge_on_upload.py`) makes one task per row with the row's name as task id, and `dvc.yaml`'s job stages
are rendered from it (a test keeps the committed file equal: `python -m tasks.steps --write-dvc` rewrites it).

Adding a step is one row here plus its `tasks/<module>.py`. Torch- and airflow-free: the DAG imports it at parse time.

    python -m tasks.steps               # the table
    python -m tasks.steps --write-dvc   # re-render dvc.yaml's job stages from it
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# what one task instance of a step works on: the DAG run, one parent checkpoint, one input (the base or a parent),
# one merge method, or one whole job (a workspace)
Per = Literal["run", "parent", "input", "method", "job"]


@dataclass(frozen=True)
class DvcStage:
    """How the step appears in dvc.yaml (the stages `dvc repro` runs in a job's workspace)."""

    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]
    # the stage's command when it differs from the DAG's per-item one (DVC's foreach has no list of base + parents)
    cmd: str = ""


@dataclass(frozen=True)
class Step:
    name: str  # DAG task id, plan's key for its argument lists, dvc.yaml stage name
    module: str  # runs as `python -m <module> <command> <args>`
    per: Per
    command: tuple[str, ...] = ()  # subcommand before the arguments
    item: tuple[str, str] = ("", "{}")  # (flag, format) naming one item of `per`, e.g. ("--model", "merged/{}")
    suffix: tuple[str, ...] = ()  # arguments after the item (Jinja allowed: the DAG templates them)
    after: tuple[str, ...] = ()  # upstream steps
    gpu: bool = False
    trigger_rule: str = ""  # Airflow trigger rule when not all_success
    dvc: DvcStage | None = None
    doc: str = field(default="", compare=False)

    @property
    def mapped(self) -> bool:
        return self.per != "run"

    def argv(self, workspace: str, item: str | None = None) -> list[str]:
        """One task instance's arguments (after `command`)."""
        out = ["--workspace", workspace]
        if item is not None and self.item[0]:
            out += [self.item[0], self.item[1].format(item)]
        return out


_WS = ("${job.inputs}",)
STEPS: tuple[Step, ...] = (
    Step("plan", "tasks.plan", "run", suffix=("--dag-run", "{{ run_id }}"),
         doc="claim the versions the events name, write one DVC workspace per merge job"),
    Step("fisher", "tasks.fisher", "parent", item=("--parent", "{}"), after=("plan",), gpu=True,
         dvc=DvcStage(deps=_WS, params=("fisher",), outs=("${job.out}/fisher/${key}",)),
         doc="diagonal Fisher of each parent on its domain's calibration data"),
    Step("evaluate_inputs", "tasks.evaluate", "input", item=("--model", "inputs/{}"), after=("plan",),
         dvc=DvcStage(deps=_WS, params=("evaluate", "job.suites"), outs=("${job.out}/eval/inputs",),
                      cmd="python -m tasks.evaluate --workspace . --inputs"),
         doc="evaluate the base and every parent on every suite of the job"),
    Step("merge", "tasks.merge", "method", item=("--method", "{}"), after=("fisher",),
         dvc=DvcStage(deps=(*_WS, "${job.out}/fisher"),
                      params=("merge.methods.${key}", "merge.seed", "merge.dtype"),
                      outs=("${job.out}/merged/${key}",)),
         doc="merge the parents with each method of merge.methods"),
    Step("evaluate", "tasks.evaluate", "method", item=("--model", "merged/{}"), after=("merge",),
         dvc=DvcStage(deps=("${job.out}/merged/${key}",), params=("evaluate", "job.suites"),
                      outs=("${job.out}/eval/merged/${key}",)),
         doc="evaluate each merged model on every suite of the job"),
    Step("analyze", "tasks.analyze", "job", after=("evaluate", "evaluate_inputs"),
         dvc=DvcStage(deps=(*_WS, "${job.out}/merged"), params=("analyze",), outs=("${job.out}/analysis",)),
         doc="geometry and token analysis of the job's merges"),
    Step("commit", "tasks.workspace", "job", command=("commit",), after=("analyze",),
         doc="dvc commit + push of the workspace, git commit + push of its lineage"),
    Step("register", "tasks.register", "job", command=("merged",), suffix=("--dag-run", "{{ run_id }}"),
         after=("commit",), doc="register every merged model as an MLflow model version, with its evidence"),
    Step("promote", "tasks.promote", "job", after=("register",),
         doc="paired non-inferiority gates; candidate alias (champion only with promote.auto_promote)"),
    # the ledger is settled whatever happened (failed versions become retryable)
    Step("finish", "tasks.plan", "run", command=("finish",), suffix=("--dag-run", "{{ run_id }}"),
         after=("promote",), trigger_rule="all_done", doc="settle the ledger: done, or failed and retryable"),
)
BY_NAME = {s.name: s for s in STEPS}
FOREACH = {"parent": "${job.parents}", "method": "${merge.methods}"}


def step_args(jobs: list[dict[str, Any]], methods: list[str]) -> dict[str, list[list[str]]]:
    """Each mapped step's argument lists (after its `command`) for `jobs`: plan's result, over which the DAG expands
    one task instance per list."""
    items = {
        "parent": lambda j: list(j["parents"]),
        "input": lambda j: ["base", *j["parents"]],
        "method": lambda j: methods,
        "job": lambda j: [None],
    }
    return {s.name: [s.argv(j["workspace"], item) for j in jobs for item in items[s.per](j)]
            for s in STEPS if s.mapped}


def dvc_stages() -> dict[str, Any]:
    """The job stages of dvc.yaml, rendered from the table (commands run in the workspace: `--workspace .`)."""
    out: dict[str, Any] = {}
    for s in STEPS:
        if s.dvc is None:
            continue
        key = "${key}" if s.per in FOREACH else None
        cmd = s.dvc.cmd or " ".join(["python", "-m", s.module, *s.command, *s.argv(".", key)])
        body = {"cmd": cmd, "deps": list(s.dvc.deps), "params": list(s.dvc.params), "outs": list(s.dvc.outs)}
        out[s.name] = {"foreach": FOREACH[s.per], "do": body} if s.per in FOREACH else body
    return out


class _Dumper(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)  # lists indented under their key, as people write dvc.yaml


def write_dvc(path: Path) -> None:
    """Re-render the job stages of `path`; other stages, their order and the comments above `stages:` stay."""
    text = path.read_text()
    head = text.partition("stages:\n")[0]
    stages = yaml.safe_load(text)["stages"]
    rendered = dvc_stages()
    merged = {name: rendered.get(name, body) for name, body in stages.items()}
    merged.update({k: v for k, v in rendered.items() if k not in merged})
    body = "\n\n".join("  " + yaml.dump({name: stage}, Dumper=_Dumper, sort_keys=False, width=118)
                     .replace("\n", "\n  ").rstrip() for name, stage in merged.items())
    path.write_text(f"{head}stages:\n{body}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.steps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--write-dvc", action="store_true", help="re-render dvc.yaml's job stages from the table")
    args = p.parse_args(argv)
    if args.write_dvc:
        from tasks.params import REPO_ROOT

        write_dvc(REPO_ROOT / "dvc.yaml")
        return 0
    for s in STEPS:
        print(f"{s.name:<16} {'python -m ' + ' '.join([s.module, *s.command]):<36} per {s.per:<7} "
              f"after {','.join(s.after) or '-':<24} {s.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
