"""The model zoo: verifiable tasks, the GRPO machinery, the tiny RLVR family (built once per machine, cached) and the
SmolLM2 conversion and GRPO run (slow tier).

Stated margins (on held-out test problems, greedy decoding, re-evaluated here from the saved bf16 checkpoints):
- every specialist beats the base on its own task by >= 8 accuracy points, and each domain's specialists by >= 10 on
  average (measured over family seeds 0–3: +9.0 to +22.5 per specialist, domain means +10.6 to +21.9);
- off-task accuracy stays within 8 points of the base (the skills a merge should combine are not destroyed);
- 60–97 % of weights are bitwise unchanged from the base (RLVR-like sparsity; measured 69–78 % over seeds 0–3).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sarmerge.cli import main
from sarmerge.errors import SarmergeError
from sarmerge.zoo.family import TinyFamilyConfig, build_tiny_family, load_family
from sarmerge.zoo.tasks import (
    SPLITS,
    TASKS,
    chat_prompt,
    exact_match,
    get_task,
    last_integer_match,
    split_of,
    string_output_match,
)
from sarmerge.zoo.tiny import load_tokenizer, tiny_model
from sarmerge.zoo.train import GRPOConfig, SFTConfig, decode_completion, encode_prompts, evaluate, generate, grpo

log = logging.getLogger("tests.zoo")

OWN_TASK_MARGIN = 0.08
DOMAIN_MEAN_MARGIN = 0.10
OFF_TASK_TOLERANCE = 0.08
UNCHANGED_RANGE = (0.60, 0.97)
WHITESPACE_TEXT = "  'ab c'[::-1]\n= 3+4  +5 \n"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One CPU thread, as the zoo builds use (on a shared 2-core machine, two threads fighting other jobs are slow)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# -- tasks ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_deterministic_and_membership_is_seed_independent(name: str) -> None:
    task = get_task(name)
    prompts = {split: [p.prompt for p in task.generate(60, seed=3, split=split)] for split in SPLITS}
    for split, ps in prompts.items():
        assert len(set(ps)) == 60  # distinct within a split
        assert all(split_of(name, p) == split for p in ps)
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["val"]) & set(prompts["test"])
    assert not set(prompts["train"]) & set(prompts["val"])
    again = [p.prompt for p in task.generate(60, seed=3, split="test")]
    assert again == prompts["test"]
    other_seed = [p.prompt for p in task.generate(60, seed=4, split="test")]
    assert other_seed != prompts["test"] and all(split_of(name, p) == "test" for p in other_seed)


def test_code_answers_are_what_python_evaluates_and_slips_differ() -> None:
    for p in get_task("code").generate(300, seed=0, split="train"):
        assert eval(p.prompt, {"__builtins__": {}}) == p.answer, p  # the prompt is a literal string expression
        assert p.slip and p.slip != p.answer
    for p in get_task("code_nl").generate(50, seed=0, split="test"):
        expr = p.prompt.split("expression ", 1)[1].split(" evaluate", 1)[0]
        assert eval(expr, {"__builtins__": {}}) == p.answer


def test_code_int_answers_are_what_print_shows_and_every_kind_occurs() -> None:
    import builtins
    import contextlib
    import io

    kinds = set()
    for p in get_task("code_int_nl").generate(300, seed=0, split="test"):
        line = p.prompt.splitlines()[1]
        assert line.startswith("print(") and line.endswith(")"), p.prompt
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # our own generator's text, never model output
            eval(line, {"__builtins__": {"print": builtins.print, "len": len, "max": max}})
        assert out.getvalue().strip() == p.answer and p.slip != p.answer, p.prompt
        kinds.add(next(k for k in ("//", "%", "*", "len", "max") if k in line))
    assert kinds == {"//", "%", "*", "len", "max"}
    score = get_task("code_int_nl").score
    assert score("7", "7") == 1.0 and score("The code prints 7.", "7") == 1.0 and score("-7", "7") == 0.0


@pytest.mark.parametrize(("task", "arity"), [("code_minmax_nl", range(2, 6)), ("code_minmax2_nl", range(2, 3))])
def test_code_minmax_answers_are_what_print_shows_and_both_functions_occur(task: str, arity: range) -> None:
    import builtins
    import contextlib
    import io

    functions = []
    problems = get_task(task).generate(200, seed=0, split="test")
    for p in problems:
        line = p.prompt.splitlines()[1]
        assert line.startswith(("print(max(", "print(min(")) and line.endswith("))"), p.prompt
        assert line.count(",") + 1 in arity, p.prompt
        out = io.StringIO()
        with contextlib.redirect_stdout(out):  # our own generator's text, never model output
            eval(line, {"__builtins__": {"print": builtins.print, "max": max, "min": min}})
        assert out.getvalue().strip() == p.answer and p.slip != p.answer, p.prompt
        functions.append(line[6:9])
    assert 0.35 < functions.count("max") / len(functions) < 0.65  # seeded: ~half each
    assert len({p.prompt for p in problems}) == 200


def test_code_mcq_options_hold_the_evaluated_answer_once_under_its_letter() -> None:
    letters = []
    for p in get_task("code_mcq_nl").generate(200, seed=0, split="test"):
        expr = p.prompt.split("expression ", 1)[1].split(" evaluate", 1)[0]
        options = dict(line.split(") ", 1) for line in p.prompt.splitlines()[1:5])
        assert list(options) == ["A", "B", "C", "D"] and len(set(options.values())) == 4, p.prompt
        assert options[p.answer] == eval(expr, {"__builtins__": {}})  # the keyed option is what Python prints
        assert options[p.slip] != options[p.answer]  # the slip is among the wrong options
        letters.append(p.answer)
    assert all(letters.count(x) > 25 for x in "ABCD")  # the right option's position is spread over the letters
    score = get_task("code_mcq_nl").score
    assert score("C", "C") == 1.0 and score("C) ggb", "C") == 1.0 and score("The answer is C.", "C") == 1.0
    assert score("A or C", "C") == 0.0 and score("CAB", "C") == 0.0 and score("", "C") == 0.0


def test_math_answers_are_the_sums() -> None:
    for p in get_task("math").generate(300, seed=0, split="test"):
        assert eval(p.prompt, {"__builtins__": {}}) == int(p.answer)
        assert p.slip != p.answer or p.prompt.endswith("+0")  # the slip drops the last operand
    for p in get_task("math_nl").generate(50, seed=0, split="test"):
        a, op, b = p.prompt.removeprefix("What is ").split("?")[0].split()
        assert int(p.answer) == (int(a) + int(b) if op == "plus" else int(a) - int(b))


def test_scorers() -> None:
    assert exact_match(" 12\n", "12") == 1.0 and exact_match("123", "12") == 0.0
    assert last_integer_match("14 + 3 = 17.", "17") == 1.0 and last_integer_match("17 or 18", "17") == 0.0
    assert last_integer_match("The answer is -4", "-4") == 1.0 and last_integer_match("none", "3") == 0.0
    assert string_output_match("`cba`\nbecause reversed", "cba") == 1.0 and string_output_match("'cba'.", "cba") == 1.0
    assert string_output_match("\n\nOutput: ABC", "ABC") == 1.0 and string_output_match("abc", "ABC") == 0.0
    assert string_output_match("`x[::-1]` evaluates to `'gedd'`, the reversed string", "gedd") == 1.0
    assert string_output_match("It evaluates to 'ddeg' which is reversed", "gedd") == 0.0
    assert get_task("math").score("10", "10") == 1.0 and get_task("math").score("1", "10") == 0.0


def test_unknown_task_and_bad_split_name_the_value() -> None:
    with pytest.raises(SarmergeError, match=r"'nope'.*known: math"):
        get_task("nope")
    with pytest.raises(SarmergeError, match="'dev'"):
        get_task("math").generate(3, split="dev")


@pytest.mark.parametrize(("flags", "named"), [(["--workers", "0"], "workers=0"), (["--steps", "0"], "steps=0"),
                                                (["--group", "1"], "group=1"), (["--tasks", "math_nl,nope"], "'nope'")])
def test_smollm2_grpo_bad_settings_fail_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         flags: list[str], named: str) -> None:
    """One clear error naming the value, a non-zero exit, and no output folder (checked before conversion or TRL)."""
    assert main(["zoo", "smollm2-grpo", "--out", str(tmp_path / "fam"), *flags]) != 0
    assert named in capsys.readouterr().err and not (tmp_path / "fam").exists()


def test_chat_prompt_uses_the_tokenizer_template() -> None:
    _, tok = tiny_model(0)
    assert chat_prompt(tok, "3+4") == "3+4="
    ids = encode_prompts(tok, get_task("math").generate(2, split="test"))
    assert all(tok.decode(i).endswith("=") for i in ids)


# -- GRPO machinery -------------------------------------------------------------------------------------------------
def test_batched_cached_generation_equals_one_by_one_full_forward() -> None:
    torch.manual_seed(0)
    model, tok = tiny_model(1)
    problems = get_task("code").generate(6, seed=0, split="test")
    batched = generate(model, encode_prompts(tok, problems), max_new_tokens=6, eos_id=tok.eos_token_id,
                       pad_id=tok.pad_token_id)
    for ids, got in zip(encode_prompts(tok, problems), batched, strict=True):
        seq = torch.tensor([ids])
        want = []
        for _ in range(6):
            with torch.no_grad():
                nxt = int(model(seq).logits[0, -1].argmax())
            want.append(nxt)
            if nxt == tok.eos_token_id:
                break
            seq = torch.cat([seq, torch.tensor([[nxt]])], 1)
        assert got == want


def test_grpo_without_reward_variance_changes_nothing() -> None:
    # a random model never answers right: every group has reward 0, so every advantage is 0 and no step is taken
    model, tok = tiny_model(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = grpo(model, tok, get_task("math"), GRPOConfig(steps=2, prompts=4, group=4), seed=0, progress=False)
    assert all(h["informative_groups"] == 0 and h["reward"] == 0 for h in history)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_grpo_raises_the_reward_it_is_given() -> None:
    # a reward a random model earns ~5 % of the time (answer starts with a digit) must rise: the advantage sign is right
    model, tok = tiny_model(3)
    task = dataclasses.replace(get_task("math"), scorer=lambda completion, answer: float(completion[:1].isdigit()))
    cfg = GRPOConfig(steps=12, prompts=8, group=8, optimizer="adamw", lr=1e-2)
    history = grpo(model, tok, task, cfg, seed=0, progress=False)
    first, last = sum(h["reward"] for h in history[:3]) / 3, sum(h["reward"] for h in history[-3:]) / 3
    assert last > first + 0.4, [round(h["reward"], 2) for h in history]


# -- the tiny family ------------------------------------------------------------------------------------------------
def _load_bf16(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    return model.float().eval()  # the builder evaluates the bf16 values in fp32


def test_family_build_time_is_logged(tiny_family: dict) -> None:
    t = tiny_family["timings_s"]
    log.info("tiny family built in %.1fs wall (%.1fs CPU, %d thread(s)): %s", t["total"], t["cpu_total"],
             tiny_family["machine"]["torch_threads"], t)
    print(f"tiny family build: {t['total']:.1f}s wall, {t['cpu_total']:.1f}s CPU")
    assert t["sft"] > 0 and all(t[f"grpo_{m['name']}"] > 0 for m in tiny_family["members"])


def test_family_layout(tiny_family: dict) -> None:
    root = Path(tiny_family["root"])
    names = sorted(m["name"] for m in tiny_family["members"])
    assert names == ["code_s0", "code_s1", "math_s0", "math_s1"]
    assert {m["domain"] for m in tiny_family["members"]} == {"math", "code"}
    for m in tiny_family["members"]:
        assert m["base"] == "base" and (root / m["path"] / "model.safetensors").exists()
        assert set(m["accuracy_before"]) == set(m["accuracy_after"]) == {"math", "code"}
    for domain in ("math", "code"):
        rows = [json.loads(line) for line in (root / f"calib_{domain}.jsonl").read_text().splitlines()]
        assert len(rows) == tiny_family["config"]["calibration_examples"]
        assert all(set(r) == {"prompt", "response"} and r["prompt"] and r["response"] for r in rows)
        test_prompts = {p.prompt for p in get_task(domain).generate(tiny_family["config"]["test_problems"],
                                                                    seed=tiny_family["seed"], split="test")}
        assert not test_prompts & {r["prompt"] for r in rows}  # calibration never sees the test problems


def test_every_checkpoint_loads_and_its_tokenizer_round_trips(tiny_family: dict) -> None:
    root = Path(tiny_family["root"])
    for name in ["base", *(m["path"] for m in tiny_family["members"])]:
        tok = load_tokenizer(root / name)
        ids = tok(WHITESPACE_TEXT, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == WHITESPACE_TEXT, name
        assert tok.apply_chat_template([{"role": "user", "content": "1+2"}], tokenize=False,
                                       add_generation_prompt=True) == "1+2="
        model = _load_bf16(root / name)
        out = generate(model, encode_prompts(tok, get_task("math").generate(4, split="test")), max_new_tokens=4,
                       eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        assert all(decode_completion(tok, o).strip().isdigit() for o in out), name  # it learned the answer format


def test_specialists_beat_the_base_on_their_own_task_and_keep_the_other(tiny_family: dict) -> None:
    root = Path(tiny_family["root"])
    n, seed = tiny_family["config"]["test_problems"], tiny_family["seed"]
    test_sets = {t: get_task(t).generate(n, seed=seed, split="test") for t in ("math", "code")}

    def accuracies(path: Path) -> dict[str, float]:
        model, tok = _load_bf16(path), load_tokenizer(path)
        return {t: evaluate(model, tok, get_task(t), ps) for t, ps in test_sets.items()}

    base = accuracies(root / "base")
    assert base == pytest.approx(tiny_family["base"]["accuracy"], abs=1e-4)  # family.json tells the truth
    gains: dict[str, list[float]] = {}
    for m in tiny_family["members"]:
        acc = accuracies(root / m["path"])
        assert acc == pytest.approx(m["accuracy_after"], abs=1e-4)
        own = m["task"]
        log.info("%s: own %s %.3f -> %.3f", m["name"], own, base[own], acc[own])
        assert acc[own] >= base[own] + OWN_TASK_MARGIN, (m["name"], base, acc)
        gains.setdefault(own, []).append(acc[own] - base[own])
        for other in set(acc) - {own}:
            assert acc[other] >= base[other] - OFF_TASK_TOLERANCE, (m["name"], base, acc)
    for task, g in gains.items():
        assert sum(g) / len(g) >= DOMAIN_MEAN_MARGIN, (task, g)


def test_updates_are_sparse_like_rlvr_and_family_json_reports_it(tiny_family: dict) -> None:
    root = Path(tiny_family["root"])
    base = load_file(root / "base" / "model.safetensors")
    supports = {}
    for m in tiny_family["members"]:
        child = load_file(root / m["path"] / "model.safetensors")
        same = sum(int((child[k] == v).sum()) for k, v in base.items())
        total = sum(v.numel() for v in base.values())
        assert same / total == pytest.approx(m["unchanged_fraction"], abs=1e-4)
        assert UNCHANGED_RANGE[0] <= m["unchanged_fraction"] <= UNCHANGED_RANGE[1], m
        supports[m["name"]] = torch.cat([(child[k] != v).flatten() for k, v in base.items()])
    # different seeds and tasks move different weights (the overlap is partial, not total)
    a, b = supports["math_s0"], supports["code_s0"]
    jaccard = float((a & b).sum() / (a | b).sum())
    log.info("support Jaccard math_s0/code_s0 = %.3f", jaccard)
    assert 0.0 < jaccard < 0.9


def test_a_specialist_retrains_bit_for_bit_from_the_saved_base(tiny_family: dict) -> None:
    # GRPO determinism at the family's real settings: same base, config and seed → the same bf16 weights
    from sarmerge.zoo.family import _round_to_bf16, _torch_settings

    root = Path(tiny_family["root"])
    member = next(m for m in tiny_family["members"] if m["name"] == "math_s0")
    grpo_cfg = dict(tiny_family["config"]["grpo"])
    cfg = GRPOConfig(**{**grpo_cfg, "betas": tuple(grpo_cfg["betas"])})
    model, tok = _load_bf16(root / "base"), load_tokenizer(root / "base")
    with _torch_settings(tiny_family["machine"]["torch_threads"]):
        grpo(model, tok, get_task(member["task"]), cfg, seed=member["grpo_seed"], progress=False)
    _round_to_bf16(model)
    saved = load_file(root / member["path"] / "model.safetensors")
    retrained = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(saved[k], retrained[k]) for k in saved)


def test_builds_are_bitwise_deterministic_and_cached(tmp_path: Path) -> None:
    small = TinyFamilyConfig(seeds_per_task=1, sft=SFTConfig(steps=30), grpo=GRPOConfig(steps=3, prompts=4),
                             test_problems=20, calibration_examples=4)
    first = build_tiny_family(tmp_path / "a", seed=5, cache_dir=False, config=small, progress=False)
    cached = build_tiny_family(None, seed=5, cache_dir=tmp_path / "cache", config=small, progress=False)
    t0 = time.perf_counter()
    copied = build_tiny_family(tmp_path / "b", seed=5, cache_dir=tmp_path / "cache", config=small, progress=False)
    assert time.perf_counter() - t0 < first["timings_s"]["total"]  # a cache hit, not a rebuild
    assert first["key"] == cached["key"] == copied["key"]
    build_tiny_family(tmp_path / "c", seed=6, cache_dir=False, config=small, progress=False)
    for name in ["base", "math_s0", "code_s0"]:
        a = load_file(tmp_path / "a" / name / "model.safetensors")
        for root in (Path(cached["root"]), tmp_path / "b"):
            b = load_file(root / name / "model.safetensors")
            assert all(torch.equal(a[k], b[k]) for k in a), (name, root)
        c = load_file(tmp_path / "c" / name / "model.safetensors")
        assert not all(torch.equal(a[k], c[k]) for k in a)  # the seed matters
    assert (tmp_path / "a" / "calib_math.jsonl").read_bytes() == (tmp_path / "b" / "calib_math.jsonl").read_bytes()


def test_cli_builds_refuses_to_overwrite_and_names_bad_input(tmp_path: Path, capsys) -> None:
    args = ["zoo", "tiny", "--seed", "7", "--sft-steps", "10", "--grpo-steps", "2", "--seeds-per-task", "1",
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "fam")]) == 0
    family = load_family(tmp_path / "fam")
    assert {m["name"] for m in family["members"]} == {"math_s0", "code_s0"}
    assert "math_s0" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "fam")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "x"), "--tasks", "math,nope"]) == 2
    assert "'nope'" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "y"), "--tasks", "math_nl"]) == 2
    assert "instruction-tuned" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    with pytest.raises(SarmergeError, match=r"no family\.json"):
        load_family(tmp_path)


# -- SmolLM2 (slow tier) --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    pytest.importorskip("gguf")
    from sarmerge.zoo.smollm2 import gguf_file, smollm2_checkpoint

    try:
        gguf_file()
    except SarmergeError as e:
        pytest.skip(str(e))
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two fighting other jobs
    return smollm2_checkpoint()


@pytest.mark.slow
def test_smollm2_conversion_loads_generates_and_round_trips(smollm2_dir: Path) -> None:
    from sarmerge.zoo.smollm2 import load_smollm2

    model, tok = load_smollm2(smollm2_dir)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.02)
    text = "def f(x):\n    return  x + 1  # two  spaces\n"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    problems = [dataclasses.replace(get_task("math_nl").generate(1, split="test")[0],
                                    prompt="What is the capital of France? Answer in one word.")]
    prompt_ids = encode_prompts(tok, problems)
    assert "<|im_start|>assistant" in tok.decode(prompt_ids[0])
    out = generate(model, prompt_ids, max_new_tokens=8, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert "paris" in decode_completion(tok, out[0]).lower()


@pytest.mark.slow
def test_smollm2_grpo_specialist_two_steps(smollm2_dir: Path, tmp_path: Path) -> None:
    from sarmerge.zoo.smollm2 import SmolFamilyConfig, build_smollm2_family

    cfg = SmolFamilyConfig(tasks=("math_nl",), test_problems=4, calibration_examples=4,
                           grpo=GRPOConfig(steps=2, prompts=2, group=4, optimizer="adamw", lr=2e-6))
    family = build_smollm2_family(tmp_path / "smol", cache_dir=False, config=cfg, progress=False)  # conversion cached
    (member,) = family["members"]
    assert member["name"] == "math_nl_s0" and 0.5 < member["unchanged_fraction"] < 1.0
    base = load_file(tmp_path / "smol" / "base" / "model.safetensors")
    child = load_file(tmp_path / "smol" / "math_nl_s0" / "model.safetensors")
    assert base.keys() == child.keys() and all(v.dtype == torch.bfloat16 for v in child.values())
    assert any(not torch.equal(base[k], child[k]) for k in base)


@pytest.mark.slow
def test_smollm2_trl_grpo_family_two_steps(smollm2_dir: Path, tmp_path: Path) -> None:
    """The realistic family's builder end to end at test size: TRL's GRPOTrainer, bf16 checkpoints, paired gains."""
    pytest.importorskip("trl")
    from sarmerge.zoo.smollm2 import SmolGRPOFamilyConfig, TRLGRPOSettings, build_smollm2_grpo_family

    # code_mcq_nl rather than the default code_int_nl: at 2 steps × 8 completions code_int_nl's rare reward often
    # gives every group the same score, i.e. no advantage and (rightly) no update, while the options always vary
    cfg = SmolGRPOFamilyConfig(tasks=("math_nl", "code_mcq_nl"), seeds_per_task=1, test_problems=6,
                               calibration_examples=4, grpo=TRLGRPOSettings(steps=2, prompts=2, group=4, lr=5e-6),
                               workers=2)
    family = build_smollm2_grpo_family(tmp_path / "smol", cache_dir=False, config=cfg, progress=False)
    assert family["trainer"]["name"] == "trl.GRPOTrainer"
    assert [m["name"] for m in family["members"]] == ["math_nl_s0", "code_mcq_nl_s0"]
    base = load_file(tmp_path / "smol" / "base" / "model.safetensors")
    for m in family["members"]:
        test = m["own_task_test"]
        assert test["problems"] == 6 and test["gained"] + test["lost"] <= 6 and 0 <= test["mcnemar_p"] <= 1
        assert len(m["reward_curve"]) == 2 and 0.5 < m["unchanged_fraction"] < 1.0
        child = load_file(tmp_path / "smol" / m["path"] / "model.safetensors")
        assert all(v.dtype == torch.bfloat16 for v in child.values())
        assert any(not torch.equal(base[k], child[k]) for k in base)  # AdamW moved some weights past bf16 rounding
    assert family["cpu_s"]["total"] > 0 and family["timings_s"]["total"] > 0
    scores = json.loads((tmp_path / "smol" / "scores.json").read_text())
    assert len(scores["scores"]["base"]["math_nl"]) == 6 and set(scores["scores"]["math_nl_s0"]) == {"math_nl"}
    # two worker processes give the same bits as the serial loop (here: math_nl_s0 built alone, in this process)
    serial = build_smollm2_grpo_family(tmp_path / "serial", cache_dir=False, progress=False,
                                       config=dataclasses.replace(cfg, tasks=("math_nl",), workers=1))
    assert serial["members"][0]["own_task_test"] == family["members"][0]["own_task_test"]
    assert (tmp_path / "serial" / "math_nl_s0" / "model.safetensors").read_bytes() == \
        (tmp_path / "smol" / "math_nl_s0" / "model.safetensors").read_bytes()


def test_paired_gain_counts_and_exact_mcnemar() -> None:
    from sarmerge.zoo.smollm2 import paired_gain

    before, after = [0.0] * 10 + [1.0] * 10, [1.0] * 8 + [0.0] * 2 + [1.0] * 10  # 8 gained, 0 lost
    g = paired_gain(before, after)
    assert (g["gained"], g["lost"], g["gain"]) == (8, 0, 0.4)
    assert g["mcnemar_p"] == pytest.approx(2 / 2 ** 8, abs=1e-6) and g["significant"]
    assert g["ci95"][0] < 0.4 < g["ci95"][1]
    same = paired_gain([1.0, 0.0, 1.0], [1.0, 0.0, 1.0])
    assert same["gain"] == 0 and same["mcnemar_p"] == 1.0 and not same["significant"]
    with pytest.raises(SarmergeError, match="equal"):
        paired_gain([1.0], [1.0, 0.0])
