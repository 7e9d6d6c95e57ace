"""Step `fisher`: diagonal Fisher of one parent (or all) of a workspace job, on its own domain's calibration data.

    python -m tasks.fisher --workspace WS [--parent NAME]

Cached by (checkpoint digest, data digest, Fisher settings): a checkpoint that takes part in several jobs is
estimated once. Output `out/fisher/<parent>` (the `fisher@<parent>` stage of dvc.yaml). A killed estimate resumes
from its partial sums on retry.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError
from sarmerge.layout import sha256_file
from tasks.cache import cached, checkpoint_digest
from tasks.common import step_main
from tasks.workspace import Workspace

log = logging.getLogger(__name__)


def fisher_for(ws: Workspace, parent: str) -> dict[str, Any]:
    job, cfg = ws.job, ws.params.fisher
    if parent not in job.parents:
        raise SarmergeError(f"--parent {parent!r}: not a parent of job {job.id} (parents: {sorted(job.parents)})")
    out = ws.fisher_dir(parent)
    if out.is_dir():
        return {"parent": parent, "fisher": str(out), "cached": True, "skipped": "already present"}
    domain = job.parents[parent].domain
    data = ws.calib(domain)
    if not data.is_file():
        raise SarmergeError(f"{data}: calibration data for domain {domain!r} is missing from the workspace inputs")
    model_dir = ws.input_dir(parent)
    known = ws.meta.get("parents", {}).get(parent, {}).get("sha256")
    options = cfg.options()
    # where and how fast it runs does not change the result
    settings = options.model_dump(mode="json", exclude={"device", "threads", "checkpoint_every"})
    key = {"model": checkpoint_digest(model_dir, known), "data": sha256_file(data), "settings": settings,
           "support_of": checkpoint_digest(ws.base_dir, ws.meta.get("base", {}).get("sha256"))
           if cfg.support_only else None}

    def compute(dest: Path) -> None:
        from sarmerge.fisher import run_fisher

        run_fisher(model_dir, data, dest, options, support_of=ws.base_dir if cfg.support_only else None,
                   resume=True, state_dir=ws.tmp / "fisher-state" / parent, progress=sys.stderr.isatty())

    hit = cached(ws.params, "fisher", key, out, compute)
    return {"parent": parent, "fisher": str(out), "cached": hit}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.fisher", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", required=True, type=Path)
    p.add_argument("--parent", default=None, help="one parent (default: every parent of the job)")
    args = p.parse_args(argv)

    def body() -> Any:
        ws = Workspace.open(args.workspace)
        names = [args.parent] if args.parent else list(ws.job.parents)
        return [fisher_for(ws, n) for n in names]

    return step_main("tasks.fisher", body)


if __name__ == "__main__":
    sys.exit(main())
