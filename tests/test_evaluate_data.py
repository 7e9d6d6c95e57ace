"""Benchmark data: the shipped suites load with their real counts, the official file formats parse, bad files fail
clearly (naming the file and line), and the registry takes new suites with one decorated function."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from sarmerge.errors import SarmergeError
from sarmerge.evaluate import benchmarks
from sarmerge.evaluate.benchmarks import (
    SUITES,
    Item,
    LoadRequest,
    Verdict,
    get_suite,
    per_item,
    register_suite,
    resolve_suites,
)
from sarmerge.evaluate.runner import load_items, parse_data_args

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


def load(name: str, data: Path | None = None, **kw: object) -> list[Item]:
    return get_suite(name).load(LoadRequest(data=data, **kw))  # type: ignore[arg-type]


# -- shipped data ------------------------------------------------------------------------------------------------------
def test_gsm8k_ships_100_real_test_problems_with_numeric_answers() -> None:
    items = load("gsm8k")
    assert len(items) == 100
    assert len({i.id for i in items}) == 100
    # the first English file is GSM8K test problem 473 (the remora question), answer 10
    first = next(i for i in items if i.id == "gsm8k/test/473")
    assert "remoras" in first.prompt and first.answer == "10"
    assert all(i.answer is not None and i.answer.lstrip("-").replace(".", "").isdigit() for i in items)
    assert all("\\boxed{}" in i.prompt for i in items)


def test_humaneval_ships_164_problems_with_tests() -> None:
    items = load("humaneval")
    assert len(items) == 164
    assert [i.id for i in items[:2]] == ["HumanEval/0", "HumanEval/1"]
    jobs = [i.private["job"]("")[0] for i in items]
    assert all("def check(" in j.trusted["test"] and "def check(" not in j.candidate for j in jobs)
    assert all(i.completion_prompt and i.completion_prompt in i.prompt for i in items)


def test_champ_ships_270_problems_with_answers() -> None:
    items = load("champ")
    assert len(items) == 270
    assert all(i.answer for i in items)
    assert {i.meta["category"] for i in items} >= {"Combinatorics", "Number-Theory", "Polynomial"}


def test_groups_expand_in_order_without_duplicates() -> None:
    assert [s.name for s in resolve_suites("math,code")] == ["gsm8k", "champ", "humaneval"]
    assert [s.name for s in resolve_suites(["gsm8k", "math"])] == ["gsm8k", "champ"]


def test_reasoning_gym_is_seeded_and_scored_by_its_own_scorer_in_the_sandbox() -> None:
    suite = get_suite("reasoning_gym:chain_sum")
    a = suite.load(LoadRequest(seed=3, limit=5))
    b = suite.load(LoadRequest(seed=3, limit=5))
    c = suite.load(LoadRequest(seed=4, limit=5))
    assert len(a) == 5
    assert [i.prompt for i in a] == [i.prompt for i in b]
    assert [i.prompt for i in a] != [i.prompt for i in c]
    from sarmerge.evaluate.sandbox import Sandbox

    box = Sandbox()
    ctx = benchmarks.ScoreContext(sandbox_factory=lambda: box, workers=2, allow_unisolated=True)
    right = suite.score(a[:3], [f"Some work.\nAnswer: {i.answer}" for i in a[:3]], ctx)
    wrong = suite.score(a[:2], [f"Answer: {int(i.answer) + 1}" for i in a[:2]], ctx)
    assert all(v.correct and v.score == 1.0 for v in right)
    assert not any(v.correct for v in wrong)


def test_unknown_reasoning_gym_task_is_a_clear_error() -> None:
    with pytest.raises(SarmergeError, match="unknown reasoning-gym task 'no_such_task'"):
        get_suite("reasoning_gym:no_such_task")


def test_unknown_suite_lists_the_known_ones() -> None:
    with pytest.raises(SarmergeError, match=r"unknown suite 'gsm9k'.*gsm8k.*humaneval"):
        resolve_suites("math,gsm9k")


def test_zoo_tasks_are_suites() -> None:
    pytest.importorskip("sarmerge.zoo.tasks")
    suite = get_suite("zoo:math")
    items = suite.load(LoadRequest(seed=0, limit=6))
    assert len(items) == 6 and all(i.answer for i in items)
    verdicts = suite.score(items, [f" {i.answer}\n" for i in items] + [], _ctx())
    assert all(v.correct for v in verdicts)
    assert not suite.score(items[:1], ["nope"], _ctx())[0].correct


# -- official file formats (fixtures) ------------------------------------------------------------------------------
def test_gsm8k_official_jsonl() -> None:
    items = load("gsm8k", FIXTURES / "gsm8k_test.jsonl")
    assert [i.answer for i in items] == ["72", "1550", "3"]  # thousands separators removed
    assert items[0].prompt.startswith("Natalia sold clips")


def test_math500_official_jsonl_and_parquet(tmp_path: Path) -> None:
    items = load("math500", FIXTURES / "math500_test.jsonl")
    assert [i.id for i in items][:2] == ["math500/test/prealgebra/1.json", "math500/test/prealgebra/2.json"]
    assert [i.answer for i in items] == ["12", "\\frac{3}{4}", "\\sqrt{2}", "(1,4]"]
    assert items[0].meta == {"subject": "Prealgebra", "level": 1}
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [json.loads(line) for line in (FIXTURES / "math500_test.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    from_parquet = load("math500", tmp_path / "test-00000-of-00001.parquet")
    assert [(i.id, i.prompt, i.answer) for i in from_parquet] == [(i.id, i.prompt, i.answer) for i in items]


def test_aime_layouts() -> None:
    y2024 = load("aime", FIXTURES / "aime_2024.jsonl")  # ID / Problem / Answer (integer)
    assert [(i.id, i.answer) for i in y2024] == [("aime/2024-I-1", "24"), ("aime/2024-I-2", "9")]
    validation = load("aime", FIXTURES / "aime_validation.json")  # a JSON list, lower-case fields
    assert [(i.id, i.answer) for i in validation] == [("aime/0", "1"), ("aime/1", "55")]


def test_mbpp_original_and_sanitized_layouts() -> None:
    original = load("mbpp", FIXTURES / "mbpp.jsonl")
    sanitized = load("mbpp", FIXTURES / "mbpp_sanitized.json")
    assert [i.id for i in original] == ["mbpp/901", "mbpp/902", "mbpp/903"]
    assert [i.id for i in sanitized] == ["mbpp/904", "mbpp/905"]
    assert "assert larger(1, 2) == 2" in original[0].prompt
    job, _ = original[2].private["job"]("```python\n" + original[2].private["canonical_solution"] + "\n```")
    assert "import math" in job.trusted["setup"] and "def gcd" in job.candidate
    assert any("assert gcd(12, 18)" in t for t in job.trusted["tests"]) and "assert" not in job.candidate


def test_humaneval_official_jsonl_plain_and_gzipped(tmp_path: Path) -> None:
    plain = load("humaneval", FIXTURES / "humaneval_mini.jsonl")
    gz = tmp_path / "mini.jsonl.gz"
    gz.write_bytes(gzip.compress((FIXTURES / "humaneval_mini.jsonl").read_bytes()))
    zipped = load("humaneval", gz)
    assert [i.id for i in plain] == [i.id for i in zipped] == ["Mini/0"]


@pytest.mark.parametrize("suite", ["math500", "aime", "mbpp"])
def test_suites_without_shipped_data_ask_for_it(suite: str) -> None:
    with pytest.raises(SarmergeError, match=f"--data {suite}=PATH"):
        load(suite)


# -- malformed files -----------------------------------------------------------------------------------------------
def test_invalid_json_line_is_named(tmp_path: Path) -> None:
    f = tmp_path / "gsm8k.jsonl"
    f.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q2", "answer": \n')
    with pytest.raises(SarmergeError, match=rf"{f}:2: invalid JSON"):
        load("gsm8k", f)


def test_missing_field_names_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "math500.jsonl"
    f.write_text('{"problem": "1+1", "answer": "2"}\n\n{"problem": "2+2"}\n')
    with pytest.raises(SarmergeError, match=rf"{f}:3: missing field 'answer'"):
        load("math500", f)


def test_gsm8k_answer_without_hashes_is_rejected(tmp_path: Path) -> None:
    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "q", "answer": "the answer is 4"}\n')
    with pytest.raises(SarmergeError, match=r"g.jsonl:1: field 'answer' has no '#### <answer>' line"):
        load("gsm8k", f)


def test_wrong_field_type_and_empty_and_missing_files(tmp_path: Path) -> None:
    f = tmp_path / "mbpp.jsonl"
    f.write_text('{"task_id": 1, "text": "t", "test_list": "assert True"}\n')
    with pytest.raises(SarmergeError, match=r"mbpp.jsonl:1: field 'test_list' should be list, got str"):
        load("mbpp", f)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SarmergeError, match="no problems"):
        load("aime", empty)
    with pytest.raises(SarmergeError, match="data file not found"):
        load("aime", tmp_path / "absent.jsonl")
    bad_gz = tmp_path / "h.jsonl.gz"
    bad_gz.write_bytes(b"not gzip at all")
    with pytest.raises(SarmergeError, match="unreadable data file"):
        load("humaneval", bad_gz)


def test_data_args_map_to_suites() -> None:
    suites = resolve_suites("gsm8k,math500")
    assert parse_data_args(["math500=/x.jsonl"], suites) == {"math500": Path("/x.jsonl")}
    with pytest.raises(SarmergeError, match="name the suite"):
        parse_data_args(["/x.jsonl"], suites)
    with pytest.raises(SarmergeError, match="'aime' is not being evaluated"):
        parse_data_args(["aime=/x.jsonl"], suites)
    assert parse_data_args(["/x.jsonl"], resolve_suites("aime")) == {"aime": Path("/x.jsonl")}


def test_limit_takes_the_first_problems_in_file_order() -> None:
    items = load_items(get_suite("humaneval"), data=None, seed=0, limit=3)
    assert [i.id for i in items] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


# -- registry ------------------------------------------------------------------------------------------------------
def test_a_new_suite_is_one_decorated_loader() -> None:
    name = "test:double"
    try:
        @register_suite(name, kind="math", scorer=per_item(lambda item, text: text.strip() == item.answer))
        def _load(req: LoadRequest) -> list[Item]:
            return [Item(id=f"d/{i}", prompt=f"2*{i}", answer=str(2 * i)) for i in range(req.limit or 4)]

        suite = get_suite(name)
        items = suite.load(LoadRequest(limit=3))
        verdicts = suite.score(items, ["0", " 2 ", "5"], _ctx())
        assert [v.correct for v in verdicts] == [True, True, False]
        assert isinstance(verdicts[0], Verdict) and verdicts[1].extracted == "2"
        with pytest.raises(ValueError, match="already registered"):
            register_suite(name, kind="math", scorer=suite.score)(_load)
    finally:
        SUITES.pop(name, None)


def _ctx() -> benchmarks.ScoreContext:
    def no_sandbox() -> None:
        raise AssertionError("a math suite must not start the code sandbox")

    return benchmarks.ScoreContext(sandbox_factory=no_sandbox)
