"""One options model per command: the CLI flags, the Python API and params.yaml's section derive from it, and every
one of the three refuses a bad value naming it. `merge.methods` is checked against each method's schema when the
params load (plan, stack up), before any Fisher runs."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
from pipeline_support import write_params

from sarmerge.errors import SarmergeError
from sarmerge.options import EvaluateOptions, FisherOptions, Options
from tasks.params import EvaluateCfg, FisherCfg, load_params

COMMANDS = [("fisher", "sarmerge.fisher.cli", FisherOptions, FisherCfg),
            ("evaluate", "sarmerge.evaluate.cli", EvaluateOptions, EvaluateCfg)]


def _parser(module: str) -> argparse.ArgumentParser:
    import importlib

    root = argparse.ArgumentParser()
    sub = root.add_subparsers(dest="command")
    importlib.import_module(module).add_command(sub)
    return root


@pytest.mark.parametrize(("command", "module", "options", "section"), COMMANDS)
def test_every_option_is_a_flag_and_a_params_key_with_one_default(command: str, module: str, options: type[Options],
                                                                 section: type) -> None:
    parser = _parser(module)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    flags = {a.dest: a.option_strings for a in sub._actions}
    for name in options.model_fields:
        assert options.flag(name) in flags.get(name, []), f"{name} has no {options.flag(name)} flag"
        assert name in section.model_fields, f"params.yaml section lacks {name}"
        assert section.model_fields[name].annotation == options.model_fields[name].annotation
    # flags not given stay out of the namespace: the defaults are the model's, and equal the Python API's
    required = {"fisher": ["--model", "m", "--data", "d", "--out", "o"], "evaluate": []}[command]
    args = parser.parse_args([command, *required])
    assert options.from_args(args) == options()
    # a flag given reaches the options with the flag's value
    flag, value = ("--batch-size", "3")
    assert options.from_args(parser.parse_args([command, *required, flag, value])).batch_size == 3


def test_a_default_on_switch_is_turned_off_by_its_flag() -> None:
    parser = _parser("sarmerge.evaluate.cli")
    assert EvaluateOptions.from_args(parser.parse_args(["evaluate"])).use_chat_template is True
    assert EvaluateOptions.from_args(parser.parse_args(["evaluate", "--no-chat-template"])).use_chat_template is False


def test_bad_values_name_the_flag_the_keyword_or_the_params_field(tmp_path: Path) -> None:
    parser = _parser("sarmerge.fisher.cli")
    args = parser.parse_args(["fisher", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0",
                              "--shard-size", "big"])
    with pytest.raises(SarmergeError, match=r"--batch-size: Input should be greater than or equal to 1.*"
                                            r"--shard-size: Value error, invalid size 'big'"):
        FisherOptions.from_args(args)
    with pytest.raises(SarmergeError, match=r"^run_fisher: field 'max_new_tokens': Input should be greater"):
        from sarmerge.fisher import run_fisher

        run_fisher(tmp_path / "nope", "math", tmp_path / "out", max_new_tokens=0)
    with pytest.raises(SarmergeError, match=r"^evaluate: field 'temprature': unknown field"):
        from sarmerge.evaluate import evaluate

        evaluate(tmp_path / "nope", "zoo:math", temprature=0.5)
    assert not (tmp_path / "out").exists()
    bad = write_params(tmp_path / "p.yaml", root=tmp_path, family="x", fisher={"per_example": "fast"},
                       evaluate={"top_p": 0})
    with pytest.raises(SarmergeError, match=r"field 'fisher\.per_example': Input should be 'auto', 'hooks', 'vmap' "
                                            r"or 'loop'.*field 'evaluate\.top_p': Input should be greater than 0"):
        load_params(bad)


def test_keywords_override_an_options_object() -> None:
    base = EvaluateOptions(limit=5, n=2)
    assert EvaluateOptions.resolve(base, {}, where="t") is base
    merged = EvaluateOptions.resolve(base, {"n": 4}, where="t")
    assert (merged.limit, merged.n) == (5, 4)


def test_params_sections_hand_the_steps_exactly_the_command_options() -> None:
    params = load_params()
    fisher = params.fisher.options()
    assert type(fisher) is FisherOptions and fisher.examples == params.fisher.examples
    assert set(FisherCfg.model_fields) - set(FisherOptions.model_fields) == {"support_only", "data"}
    assert set(EvaluateCfg.model_fields) - set(EvaluateOptions.model_fields) == {"suites"}


def test_merge_methods_are_checked_when_the_params_load_not_in_the_merge_step(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]
                                                                            ) -> None:
    from tasks import plan
    from tasks.merge import check_methods

    check_methods(load_params())  # the shipped file is valid
    root = tmp_path / "root"
    cases = [({"sar": {}, "ties": {"density": 2.0}}, r"merge\.methods\.ties: field 'density'"),
             ({"sar": {}, "tie": {}}, r"merge\.methods\.tie: unknown merge method 'tie'"),
             ({"sar": {"lambda": 1.0, "bogus": 1}}, r"merge\.methods\.sar: field 'bogus': unknown field")]
    for i, (methods, message) in enumerate(cases):
        bad = write_params(tmp_path / f"p{i}.yaml", root=root, family="x", methods=methods,
                           merge={"primary": "sar"})
        with pytest.raises(SarmergeError, match=message):
            check_methods(load_params(bad))
        # plan, the first step of every DAG run, refuses before it reaches the registry or claims anything
        old = {k: os.environ.get(k) for k in ("SARMERGE_PARAMS", "MLFLOW_TRACKING_URI")}
        os.environ.update(SARMERGE_PARAMS=str(bad), MLFLOW_TRACKING_URI="http://127.0.0.1:9")
        try:
            assert plan.main(["--dag-run", "r1"]) == 2
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        err = capsys.readouterr().err
        assert "tasks.plan: error:" in err and re.search(message, err)
        assert not root.exists(), "plan created pipeline state before refusing"
