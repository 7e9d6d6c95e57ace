"""Benchmark evaluation (SPEC §6): math and code suites, answer verifiers, a code sandbox, HF and vLLM backends.

    from sarmerge.evaluate import evaluate
    summary = evaluate("ckpt/", "gsm8k,humaneval", out="eval/", limit=50)
    summary["suites"]["gsm8k"]["accuracy"]
"""

from sarmerge.evaluate.benchmarks import (
    GROUPS,
    Item,
    LoadRequest,
    ScoreContext,
    Suite,
    Verdict,
    get_suite,
    per_item,
    register_family,
    register_suite,
    resolve_suites,
    score_code,
    score_math,
)
from sarmerge.evaluate.runner import evaluate
from sarmerge.evaluate.sandbox import Sandbox, SandboxLimits

__all__ = [
    "GROUPS",
    "Item",
    "LoadRequest",
    "Sandbox",
    "SandboxLimits",
    "ScoreContext",
    "Suite",
    "Verdict",
    "evaluate",
    "get_suite",
    "per_item",
    "register_family",
    "register_suite",
    "resolve_suites",
    "score_code",
    "score_math",
]
