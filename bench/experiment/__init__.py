"""The sparsity-curse experiment (issue 8, SPEC §1, §4.6, §9): does SAR-Merging beat standard merging on real RLVR
checkpoints, and which SAR knobs work best? One command regenerates the families, the numbers and the report:

    .venv/bin/python -m bench.experiment                       # full run: EXPERIMENTS.md + docs/experiments/*.png
    .venv/bin/python -m bench.experiment --seeds 0 --test-n 50 --val-n 40 --methods task_arithmetic sar \
        --sweep quick --no-tune-baselines --report /tmp/EXP.md --plots-dir /tmp/plots   # a smoke run

Steps, per family seed s (each a tiny RLVR family from `sarmerge zoo tiny`: an SFT'd base and GRPO specialists):
1. build (or reuse) the family; Fisher of every specialist on its own domain's calibration prompts with
   `sarmerge fisher` (support of the base for SAR, dense for Fisher merging);
2. update geometry of the specialists (sparsity, overlap vs chance, cosine, sign conflicts);
3. greedy accuracy of the base and the parents on every domain's validation and test problems;
4. validation only: a sweep over SAR's knobs (greedy coordinate ascent from SPEC §4.6's reconstruction) and a small
   tuning grid for the baselines' own knobs, both selected by the same rule (see `selection_score`);
5. test: every merge method with its code defaults, SAR's sweep choice and the tuned baselines, on fusion (one
   specialist per domain) and single-task enhancement (two seeds of one domain), every merged model scored on every
   domain.
Intervals are 95 % Student-t intervals over family seeds (problem sets are drawn per seed, so they cover both the
training-seed and the problem-sampling variance); method comparisons are paired over seeds.
Merged models go through the real engine (`run_merge` with the `sarmerge.config` schema) and are deleted once scored.

Modules: `design` (methods compared = the method registry, SAR's sweep space, baseline grids, options), `families`,
`statistics` (intervals, the selection rule, the coordinate ascent, summaries), `report` (plots, EXPERIMENTS.md) and
`driver` (scoring, the run, the command line). Every name is re-exported here.
"""

from __future__ import annotations

from bench.experiment.design import *  # noqa: F403
from bench.experiment.design import __all__ as _design
from bench.experiment.driver import *  # noqa: F403
from bench.experiment.driver import __all__ as _driver
from bench.experiment.families import *  # noqa: F403
from bench.experiment.families import __all__ as _families
from bench.experiment.report import *  # noqa: F403
from bench.experiment.report import __all__ as _report
from bench.experiment.statistics import *  # noqa: F403
from bench.experiment.statistics import __all__ as _statistics

__all__ = [*_design, *_families, *_statistics, *_report, *_driver]
