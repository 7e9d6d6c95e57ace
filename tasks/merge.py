"""Step `merge`: merge a workspace job's parents with one method of `params.yaml` `merge.methods`.

    python -m tasks.merge --workspace WS --method sar

Writes `out/merged/<method>` (the `merge@<method>` stage of dvc.yaml) through the merge engine, atomically: a killed
merge leaves no half model, and a retry after a finished merge does nothing. Deterministic for the seed in params.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError
from tasks.common import step_main
from tasks.params import Params
from tasks.workspace import Workspace


def check_methods(params: Params, source: str = "params.yaml") -> None:
    """Validate every `merge.methods` entry against its method's schema: when the params load (plan, stack up), not
    in the merge step after Fisher has run."""
    from pydantic import ValidationError

    from sarmerge.methods import get_method
    from sarmerge.options import describe_errors

    for name, parameters in params.merge.methods.items():
        where = f"{source}: merge.methods.{name}"
        try:
            get_method(name).params.model_validate(parameters)
        except SarmergeError as e:
            raise SarmergeError(f"{where}: {e}") from None
        except ValidationError as e:
            raise SarmergeError(describe_errors(e, where)) from None


def merge_config(ws: Workspace, method: str) -> dict[str, Any]:
    """The merge YAML (as a dict) for one method; Fisher stores are passed only to methods that read them."""
    from sarmerge.config import parse_config
    from sarmerge.methods import get_method

    methods = ws.params.merge.methods
    if method not in methods:
        raise SarmergeError(f"--method {method!r}: not in params.yaml merge.methods {sorted(methods)}")
    parameters = dict(methods[method])
    spec = get_method(method)
    uses_fisher = spec.needs_fisher(spec.params.model_validate(parameters))
    models = []
    for name in ws.job.parents:
        entry: dict[str, Any] = {"model": str(ws.input_dir(name))}
        if uses_fisher:
            entry["fisher"] = str(ws.fisher_dir(name))
        models.append(entry)
    raw = {"method": method, "base_model": str(ws.base_dir), "models": models, "parameters": parameters,
           "seed": ws.params.merge.seed, "dtype": ws.params.merge.dtype}
    parse_config(raw, source=f"params.yaml merge.methods.{method}")  # validate before any tensor is read
    return raw


def merge(ws: Workspace, method: str) -> dict[str, Any]:
    out = ws.merged_dir(method)
    if out.is_dir():
        return {"method": method, "merged": str(out), "skipped": "already present"}
    from sarmerge.config import parse_config
    from sarmerge.merge import run_merge

    cfg = parse_config(merge_config(ws, method), source=f"params.yaml merge.methods.{method}")
    manifest = run_merge(cfg, out, threads=int(os.environ.get("SARMERGE_THREADS", "0")) or None,
                         progress=sys.stderr.isatty())
    return {"method": method, "merged": str(out), "seconds": manifest["timings_s"]["total"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", required=True, type=Path)
    p.add_argument("--method", required=True)
    args = p.parse_args(argv)
    return step_main("tasks.merge", lambda: merge(Workspace.open(args.workspace), args.method))


if __name__ == "__main__":
    sys.exit(main())
