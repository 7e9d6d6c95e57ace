"""End to end with real tiny models: `sarmerge evaluate` writes well-formed per-sample records and a summary; a model
trained to answer scores as correct; batched generation equals one-by-one; sampling is seeded; bad input fails clearly
and leaves no output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sarmerge.cli import main
from sarmerge.errors import SarmergeError
from sarmerge.evaluate import evaluate
from sarmerge.evaluate.backends import HFBackend, PromptBuilder, SamplingSettings, load_model_tokenizer
from sarmerge.evaluate.benchmarks import SUITES, Item, LoadRequest, get_suite, register_suite, score_math
from sarmerge.zoo.tiny import save_checkpoint, tiny_model

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
TRAINED = [(12, 34), (5, 7), (40, 2), (9, 9)]
UNTRAINED = [(71, 18)]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> None:
    # tiny models: thread hand-offs cost more than they save, and the CI machine is small and shared
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, tok = tiny_model(seed=0)
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def arithmetic_suite() -> str:
    name = "test:arithmetic"

    @register_suite(name, kind="math", scorer=score_math, max_new_tokens=8)
    def _load(req: LoadRequest) -> list[Item]:
        return [Item(id=f"add/{a}+{b}", prompt=f"{a}+{b}", answer=str(a + b)) for a, b in TRAINED + UNTRAINED]

    yield name
    SUITES.pop(name, None)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model overfit (a second or two) to answer the TRAINED sums through its chat template."""
    torch.manual_seed(0)
    model, tok = tiny_model(seed=1)
    builder = PromptBuilder(tok)
    seqs = [(builder.render(f"{a}+{b}").ids, [*tok(str(a + b))["input_ids"], tok.eos_token_id]) for a, b in TRAINED]
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(seqs):
        ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        labels[i, len(p):len(p) + len(a)] = torch.tensor(a)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    return save_checkpoint(model, tok, tmp_path_factory.mktemp("trained") / "model")


def read_samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_cli_writes_records_and_summary_for_math_and_code(tiny_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(tiny_dir), "--suite", "gsm8k,humaneval", "--limit", "3",
               "--max-new-tokens", "12", "--batch-size", "4", "--seed", "7", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "gsm8k" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    samples = read_samples(out)
    assert [s["suite"] for s in samples] == ["gsm8k"] * 3 + ["humaneval"] * 3
    for s in samples:
        assert set(s) >= {"id", "prompt", "completion", "extracted", "verdict", "correct", "tokens"}
        assert s["verdict"] == ("correct" if s["correct"] else "incorrect")
        assert 1 <= s["tokens"] <= 12
        assert s["prompt"].endswith("=")  # the tiny tokenizer's chat template was applied
    assert [s["id"] for s in samples[3:]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all("sandbox" not in s["detail"] or s["detail"].startswith(("failed", "timeout")) for s in samples[3:])
    for name in ("gsm8k", "humaneval"):
        suite = summary["suites"][name]
        records = [s for s in samples if s["suite"] == name]
        assert suite["problems"] == 3 and suite["samples"] == 3
        assert suite["accuracy"] == sum(s["correct"] for s in records) / 3
        lo, hi = suite["ci95"]
        assert 0.0 <= lo <= suite["accuracy"] <= hi <= 1.0
        assert suite["tokens_generated"] == sum(s["tokens"] for s in records)
        assert suite["seconds"]["generate"] > 0 and "pass@1" in suite["pass_at_k"]
    assert summary["seeds"] == {"generation": 7, "data": 7, "bootstrap": 7}
    assert summary["backend"]["backend"] == "hf" and summary["backend"]["batch_size"] == 4
    assert summary["generation"]["chat_template"] is True
    assert summary["network_isolated"] == summary["sandbox"]["network_isolated"]
    assert summary["sandbox"]["limits"]["cpu_seconds"] == 10
    assert summary["overall"]["samples"] == 6
    assert not list(tmp_path.glob(".eval.partial-*"))


def test_a_model_that_knows_the_answers_is_scored_correct(trained_dir: Path, arithmetic_suite: str,
                                                          tmp_path: Path) -> None:
    summary = evaluate(trained_dir, arithmetic_suite, out=tmp_path / "eval", progress=False)
    records = {s["id"]: s for s in read_samples(tmp_path / "eval")}
    for a, b in TRAINED:
        rec = records[f"add/{a}+{b}"]
        assert rec["completion"] == str(a + b) and rec["extracted"] == str(a + b) and rec["correct"], rec
    suite = summary["suites"][arithmetic_suite]
    assert suite["correct_samples"] == sum(r["correct"] for r in records.values()) >= len(TRAINED)
    assert suite["accuracy"] == suite["correct_samples"] / len(records)


def test_sampling_n_per_prompt_is_seeded_and_reports_pass_at_k(trained_dir: Path, arithmetic_suite: str) -> None:
    kw = dict(n=4, temperature=1.5, max_new_tokens=6, progress=False)
    first = evaluate(trained_dir, arithmetic_suite, seed=3, **kw)
    again = evaluate(trained_dir, arithmetic_suite, seed=3, **kw)
    suite = first["suites"][arithmetic_suite]
    assert suite["samples"] == 5 * 4 and suite["samples_per_problem"] == 4
    assert set(suite["pass_at_k"]) == {"pass@1", "pass@4"}
    assert suite["pass_at_k"]["pass@4"]["value"] >= suite["pass_at_k"]["pass@1"]["value"]
    assert suite["pass_at_k"]["pass@1"]["ci_method"] == "bootstrap"
    strip = ("seconds", "tokens_per_second")
    assert {k: v for k, v in suite.items() if k not in strip} == \
           {k: v for k, v in again["suites"][arithmetic_suite].items() if k not in strip}


def test_batched_generation_equals_one_by_one(tiny_dir: Path) -> None:
    tok = load_model_tokenizer(tiny_dir)
    builder = PromptBuilder(tok)
    items = get_suite("gsm8k").load(LoadRequest())[:8]
    prompts = [builder.render(item.prompt[: 15 + 11 * k]) for k, item in enumerate(items)]  # ragged lengths
    settings = SamplingSettings(max_new_tokens=16)
    one = HFBackend(tiny_dir, tok, batch_size=1).generate(prompts, settings)
    batched = HFBackend(tiny_dir, tok, batch_size=8).generate(prompts, settings)
    assert [g[0].text for g in one] == [g[0].text for g in batched]
    assert [g[0].tokens for g in one] == [g[0].tokens for g in batched]


def test_greedy_with_n_repeats_one_generation(tiny_dir: Path) -> None:
    summary = evaluate(tiny_dir, "gsm8k", limit=2, n=3, max_new_tokens=5, progress=False)
    suite = summary["suites"]["gsm8k"]
    assert suite["samples"] == 6
    assert suite["tokens_generated"] <= 2 * 5  # generated once per prompt, not three times


def test_user_data_file_and_zoo_suite(tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("sarmerge.zoo.tasks")
    rc = main(["evaluate", "--model", str(tiny_dir), "--suite", "math500,zoo:math", "--data",
               f"math500={FIXTURES / 'math500_test.jsonl'}", "--limit", "2", "--max-new-tokens", "4",
               "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["suites"]["math500"]["data_file"].endswith("math500_test.jsonl")
    assert len(summary["suites"]["math500"]["data_sha256"]) == 64
    assert summary["suites"]["zoo:math"]["problems"] == 2
    assert summary["sandbox"] is None and summary["network_isolated"] is None  # no code ran


# -- bad input -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("args", "message"), [
    (["--suite", "gsm9k"], "unknown suite 'gsm9k'"),
    (["--suite", "aime"], "--data aime=PATH"),
    (["--suite", "gsm8k", "--n", "0"], "--n: Input should be greater than or equal to 1 (got 0)"),
    (["--suite", "gsm8k", "--top-p", "1.5"], "--top-p: Input should be less than or equal to 1"),
    (["--suite", "gsm8k", "--sandbox-memory", "lots"], "--sandbox-memory: Value error, invalid size 'lots'"),
    (["--suite", "gsm8k", "--backend", "tgi"], "invalid choice: 'tgi'"),
    (["--suite", "gsm8k", "--data", "humaneval=/x.jsonl"], "'humaneval' is not being evaluated"),
])
def test_bad_arguments_exit_2_without_output(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             args: list[str], message: str) -> None:
    out = tmp_path / "eval"
    try:
        rc = main(["evaluate", "--model", str(tiny_dir), "--out", str(out), "--no-progress", *args])
    except SystemExit as e:  # argparse's own refusal (a value outside the declared choices)
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".eval.*"))


def test_bad_model_dirs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--model", str(empty), "--suite", "gsm8k", "--out", str(tmp_path / "o")]) == 2
    assert "no config.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["evaluate", "--model", str(broken), "--suite", "gsm8k", "--out", str(tmp_path / "o")]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_malformed_data_file_names_the_line(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "gsm8k.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "q"}\n')
    assert main(["evaluate", "--model", str(tiny_dir), "--suite", "gsm8k", "--data", str(bad),
                 "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:2: missing field 'answer'" in capsys.readouterr().err


def test_existing_output_is_kept_unless_overwrite(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SarmergeError, match="already exists"):
        evaluate(tiny_dir, "gsm8k", out=out, limit=1, max_new_tokens=2, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    evaluate(tiny_dir, "gsm8k", out=out, limit=1, max_new_tokens=2, progress=False, overwrite=True)
    assert (out / "summary.json").exists() and not (out / "keep.txt").exists()


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_dir: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here")
    with pytest.raises(SarmergeError, match="backend 'vllm' is not installed"):
        evaluate(tiny_dir, "gsm8k", limit=1, backend="vllm", progress=False)


# -- unisolated scoring is a decision (issue 11 item 5) ----------------------------------------------------------------
def test_code_suites_refuse_unisolated_before_the_model_loads(tiny_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SARMERGE_SANDBOX_MODE", "rlimits")  # what a machine without namespaces gets
    out = tmp_path / "eval"
    args = ["evaluate", "--model", str(tiny_dir), "--suite", "humaneval", "--limit", "1", "--max-new-tokens", "4",
            "--out", str(out), "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refusing to run suites humaneval" in err and "--allow-unisolated" in err
    assert not out.exists() and not list(tmp_path.glob(".eval.*"))

    assert main([*args, "--allow-unisolated"]) == 0
    assert "UNISOLATED" in capsys.readouterr().out
    sandbox = json.loads((out / "summary.json").read_text())["sandbox"]
    assert sandbox["mode"] == "rlimits" and sandbox["isolated"] is False and sandbox["allow_unisolated"] is True
    assert sandbox["network_isolated"] is False and sandbox["pid_namespace"] is False


def test_math_suites_run_without_the_sandbox_even_when_it_cannot_isolate(tiny_dir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SARMERGE_SANDBOX_MODE", "rlimits")
    summary = evaluate(tiny_dir, "gsm8k", limit=1, max_new_tokens=2, progress=False)
    assert summary["sandbox"] is None


def test_params_allow_unisolated_reaches_the_evaluator(tiny_dir: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.evaluate import evaluate_dir
    from tasks.params import EvaluateCfg

    monkeypatch.setenv("SARMERGE_SANDBOX_MODE", "rlimits")
    cfg = EvaluateCfg(suites={"code": "humaneval"}, limit=1, max_new_tokens=4)
    assert cfg.allow_unisolated is False  # the default refuses
    with pytest.raises(SarmergeError, match="refusing to run"):
        evaluate_dir(tiny_dir, tmp_path / "refused", cfg, ["humaneval"])
    allowed = cfg.model_copy(update={"allow_unisolated": True})
    summary = evaluate_dir(tiny_dir, tmp_path / "allowed", allowed, ["humaneval"])
    assert summary["sandbox"]["mode"] == "rlimits" and summary["sandbox"]["allow_unisolated"] is True
