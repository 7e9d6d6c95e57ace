"""What the experiment compares and searches: the methods, SAR's sweep space and start, the baselines' tuning grids,
the selection margin, and the run options."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "BASELINE_GRIDS",
    "DENOMINATOR_FLOOR",
    "MOVE_MARGIN",
    "ROOT",
    "SAR_DENSITIES",
    "SAR_GROUPS_FULL",
    "SAR_GROUPS_QUICK",
    "SAR_RESCALES",
    "SAR_START",
    "T975",
    "KnobGroup",
    "Options",
    "compared_methods",
]


ROOT = Path(__file__).resolve().parent.parent.parent

log = logging.getLogger("experiment")

def compared_methods() -> list[str]:
    """The merge methods compared, each with its code defaults (slerp interpolates between the two parents): every
    method of the registry, so a newly registered method joins the experiment without an edit here."""
    from sarmerge.methods import all_methods

    return list(all_methods())


# The sweep starts from SPEC §4.6's reconstruction, not from the code's current defaults, so that re-running the
# experiment after the defaults were updated reproduces the same sweep.
SAR_START: dict[str, Any] = {"epsilon": 1e-5, "sensitivity": "fisher_delta2", "arbitration": "hard", "density": 1.0,
                             "rescale": "norm", "r": 2.0, "lambda": 1.0}


@dataclass(frozen=True)
class KnobGroup:
    """Knobs the coordinate ascent varies together; `applies(incumbent)` skips a group that cannot matter."""

    name: str
    options: list[dict[str, Any]]
    applies: Callable[[dict[str, Any]], bool] = lambda cfg: True


SAR_DENSITIES = [1.0, 0.9, 0.7, 0.5, 0.3]
SAR_RESCALES = ["norm", "dare", "ram_plus", "none"]
SAR_GROUPS_FULL: list[KnobGroup] = [
    KnobGroup("epsilon", [{"epsilon": e} for e in (0.0, 1e-5, 1e-4, 1e-3)]),
    KnobGroup("sensitivity", [{"sensitivity": s} for s in ("fisher_delta2", "fisher", "delta2")]),
    KnobGroup("arbitration", [{"arbitration": a} for a in ("hard", "fisher_avg", "hybrid")]),
    # at density 1 the norm/dare/none rescales are all the identity: keep one of them
    KnobGroup("density × rescale", [{"density": 1.0, "rescale": "norm"}, {"density": 1.0, "rescale": "ram_plus"}]
              + [{"density": d, "rescale": r} for d in SAR_DENSITIES[1:] for r in SAR_RESCALES]),
    KnobGroup("r", [{"r": r} for r in (1.5, 2.0, 3.0)], applies=lambda cfg: cfg["rescale"] == "ram_plus"),
    KnobGroup("lambda", [{"lambda": v} for v in (0.7, 1.0, 1.3, 1.6, 2.0)]),
]
SAR_GROUPS_QUICK: list[KnobGroup] = [
    KnobGroup("arbitration", [{"arbitration": a} for a in ("hard", "fisher_avg")]),
    KnobGroup("lambda", [{"lambda": v} for v in (1.0, 1.5)]),
]
# Baselines get their own main knobs tuned on validation too (same rule), so the comparison is not tuned-vs-default.
BASELINE_GRIDS: dict[str, list[dict[str, Any]]] = {
    "task_arithmetic": [{"lambda": v} for v in (0.5, 0.8, 1.0, 1.3)],
    "ties": [{"density": d, "lambda": v} for d in (0.2, 0.5) for v in (1.0, 1.5)],
    "dare_linear": [{"density": d, "lambda": v} for d in (0.5, 0.8) for v in (0.8, 1.0)],
    "dare_ties": [{"density": d, "lambda": v} for d in (0.5, 0.8) for v in (1.0, 1.5)],
    "ram": [{"lambda": v} for v in (0.8, 1.0, 1.3)],
    "ram_plus": [{"r": r} for r in (1.5, 2.0, 3.0)],
}
# The ascent leaves the incumbent only for a validation gain above this (2 % of the specialists' RL gain, about a
# third of an accuracy point here); options within it of the group's best count as tied and the one changing the
# fewest knobs wins, so noise does not drag the defaults around.
MOVE_MARGIN = 0.02
DENOMINATOR_FLOOR = 0.01  # retained-gain denominators below this (no measurable RL gain) are floored
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


@dataclass
class Options:
    out: Path
    seeds: list[int]
    test_n: int
    val_n: int
    methods: list[str]
    sweep: str
    tune_baselines: bool
    fisher_examples: int
    family: dict[str, Any]
    rebuild: bool
    progress: bool
    report: Path | None
    plots_dir: Path | None
    threads: int
    report_only: bool = False
