"""`sarmerge fisher`: the estimator against exact and hand-computed Fisher, resume, support layout, bad data, merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

from sarmerge import fisher as F
from sarmerge.checkpoint import Checkpoint, sha256_file
from sarmerge.cli import main
from sarmerge.errors import SarmergeError
from sarmerge.fisher_store import FisherStore
from sarmerge.zoo.tiny import char_tokenizer, load_tokenizer, save_checkpoint, tiny_config, tiny_model

ROOT = Path(__file__).resolve().parent.parent
ROWS = [
    {"prompt": "12+7", "response": "19"},
    {"prompt": "what is 3*4?", "response": "3*4 = 12\n#### 12"},
    {"prompt": "def f(x):", "response": "    return x"},
    {"prompt": "hello", "response": "hi there, friend"},
    {"prompt": "Sum 1 2 3", "response": "6"},
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> Path:
    """A tiny bf16 RLVR-like family: base and two children with sparse (~20 %) updates, overlapping by chance."""
    root = tmp_path_factory.mktemp("fisher-fam")
    base, tok = tiny_model(0)
    save_checkpoint(base, tok, root / "base", dtype=torch.bfloat16)
    for i in range(2):
        m, _ = tiny_model(0)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_((torch.rand(p.shape, generator=g) < 0.2) * torch.randn(p.shape, generator=g) * 0.05)
        save_checkpoint(m, tok, root / f"child{i}", dtype=torch.bfloat16)
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("fisher-data") / "calib.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return f


def load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hand_per_example(model: torch.nn.Module, tok, rows: list[dict]) -> tuple[dict, dict]:
    """Per-example autograd, one example at a time: (Σ g_b², (Σ g_b)²), by parameter name."""
    params = dict(model.named_parameters())
    squares = {n: torch.zeros_like(p) for n, p in params.items()}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        response = tok(r["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        loglik = logp[torch.arange(ids.shape[1] - 1), ids[0, 1:]][len(prompt) - 1 :].sum()
        grads = torch.autograd.grad(loglik, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                squares[name] += g**2
                total[name] += g
    return squares, {n: t**2 for n, t in total.items()}


def rel_err(a: dict, b: dict) -> float:
    """Worst per-tensor relative error ‖a − b‖∞ / ‖b‖∞."""
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)


def flat(d: dict) -> torch.Tensor:
    return torch.cat([d[n].flatten() for n in sorted(d)])


# ------------------------------------------------------------------------------------- the estimator is right ---


def test_sampled_fisher_converges_to_the_exact_expected_fisher():
    """Vocabulary of 6 tokens, single-token responses: E_y[g_y²] is a finite sum over y, computed exactly here.

    Tolerance: relative L2 error over all parameters < 0.08 with 6000 samples (seeded; the seeds we tried give
    0.01–0.05 at this N, decaying like 1/√N). A fixed reference response (empirical Fisher) is off by > 0.5.
    """
    tok = char_tokenizer("ab=")
    assert len(tok) == 6
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_config(len(tok), hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32,
                                         max_positions=32)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # a peaked, far-from-uniform next-token distribution
    prompts = ["ab", "ba", "aab"]
    params = F._params(model)
    exact = {n: torch.zeros_like(p) for n, p in params.items()}
    for prompt in prompts:
        ids = torch.tensor([F.encode_prompt(tok, prompt)])
        logp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        for y in range(len(tok)):
            grads = torch.autograd.grad(logp[y], list(params.values()), retain_graph=True, allow_unused=True)
            for (name, _), g in zip(params.items(), grads, strict=True):
                if g is not None:
                    exact[name] += logp[y].exp().detach() * g**2 / len(prompts)
    records = [F.CalibrationRecord(i + 1, p, "a") for i, p in enumerate(prompts)]
    examples = F.build_examples(records, tok, mode="sampled", n_examples=6000, context=32, max_new_tokens=1,
                                eos_id=tok.eos_token_id, source="prompts")
    sampled = F.estimate_fisher(model, examples, mode="sampled", seed=1, batch_size=200, max_new_tokens=1,
                                eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id)
    err = float((flat(sampled.fisher()) - flat(exact)).norm() / flat(exact).norm())
    assert err < 0.08, err
    fixed = F.build_examples(records, tok, mode="empirical", n_examples=3, context=32, max_new_tokens=1,
                             eos_id=None, source="prompts")
    empirical = F.estimate_fisher(model, fixed, mode="empirical", batch_size=8)
    wrong = float((flat(empirical.fisher()) - flat(exact)).norm() / flat(exact).norm())
    assert wrong > 0.5 and wrong > 5 * err, (wrong, err)


@pytest.mark.parametrize("per_example", ["hooks", "vmap", "loop"])
def test_empirical_fisher_equals_a_hand_loop_of_per_example_autograd(per_example, fam, data, tmp_path):
    out = tmp_path / "fisher"
    assert main(["fisher", "--model", str(fam / "child0"), "--data", str(data), "--out", str(out), "--mode",
                 "empirical", "--batch-size", "3", "--per-example", per_example, "--no-progress"]) == 0
    model, tok = load(fam / "child0"), load_tokenizer(fam / "child0")
    squares, _ = hand_per_example(model, tok, ROWS)
    store = FisherStore(out)
    assert store.layout == "dense" and set(store.ckpt.names) == set(squares)
    got = {n: store.dense(n) for n in squares}
    assert rel_err(got, {n: s / len(ROWS) for n, s in squares.items()}) < 1e-4
    assert store.metadata["sarmerge.fisher.per_example"] == per_example


def test_per_example_squares_differ_from_the_square_of_a_batch_gradient(fam):
    """(Σ_b g_b)² is not Σ_b g_b²: the two differ by far more than rounding; the estimator matches the latter."""
    model, tok = load(fam / "child1"), load_tokenizer(fam / "child1")
    squares, batch_squared = hand_per_example(model, tok, ROWS)
    assert rel_err(batch_squared, squares) > 0.5
    records = [F.CalibrationRecord(i + 1, r["prompt"], r["response"]) for i, r in enumerate(ROWS)]
    examples = F.build_examples(records, tok, mode="empirical", n_examples=None, context=256, max_new_tokens=1,
                                eos_id=tok.eos_token_id, source="rows")
    result = F.estimate_fisher(model, examples, mode="empirical", batch_size=len(ROWS))
    assert result.backend == "hooks"
    assert rel_err(result.sums, squares) < 1e-4
    assert rel_err(result.sums, batch_squared) > 0.5


@pytest.mark.parametrize("tied", [False, True])
def test_backends_agree_on_tied_embeddings_and_bf16_weights_keep_fp32_sums(tied):
    model, tok = tiny_model(3)
    if tied:  # the LM head and the embedding are one tensor: per-example gradients must add before squaring
        cfg = tiny_config(len(tok))
        cfg.tie_word_embeddings = True
        torch.manual_seed(3)
        model = Qwen2ForCausalLM(cfg)
        assert model.lm_head.weight is model.model.embed_tokens.weight
    model.eval()
    rows = [{"prompt": r["prompt"], "response": r["response"]} for r in ROWS[:4]]
    squares, _ = hand_per_example(model, tok, rows)
    batch = F.make_batch(*zip(*[
        (F.encode_prompt(tok, r["prompt"]) + tok(r["response"], add_special_tokens=False)["input_ids"] + [2],
         len(F.encode_prompt(tok, r["prompt"]))) for r in rows
    ]), "cpu", pad_id=0)
    for name, backend in F.BACKENDS.items():
        sums = F.new_sums(model)
        backend(model, sums).accumulate(batch)
        assert rel_err(sums, squares) < 1e-4, name
    model16 = model.to(torch.bfloat16)
    sums16 = F.new_sums(model16)
    assert all(s.dtype == torch.float32 for s in sums16.values())
    F.HookBackend(model16, sums16).accumulate(batch)
    assert rel_err(sums16, squares) < 0.1  # bf16 forward/backward; the sums themselves stay fp32
    assert F.hooks_match_loop(model16, batch) is None


class TokensGatheredAcrossTheBatch(torch.nn.Module):
    """A causal toy LM whose middle Linear sees (batch × positions, features) rows, as MoE experts do."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.mix, self.head = torch.nn.Embedding(12, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 12)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, logits_to_keep: int = 0):
        h = self.embed(input_ids)
        b, t, d = h.shape
        h = torch.tanh(self.mix(h.reshape(b * t, d))).reshape(b, t, d).cumsum(1)  # cumsum keeps it causal
        logits = self.head(h)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def test_auto_falls_back_to_the_loop_when_hooks_cannot_see_examples():
    model = TokensGatheredAcrossTheBatch().eval()
    examples = [F.Example(i, i + 1, [1, 2, 3][: 1 + i % 3], [4 + i, 5, 6][: 1 + i % 2]) for i in range(5)]
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for e in examples:
        ll = F.response_logprob(model, F.examples_batch([e], "cpu", 0)).sum()
        for (name, _), g in zip(model.named_parameters(), torch.autograd.grad(ll, list(model.parameters())),
                                strict=True):
            want[name] += g**2
    result = F.estimate_fisher(model, examples, mode="empirical", batch_size=5)
    assert result.backend == "loop" and rel_err(result.sums, want) < 1e-5
    with pytest.raises(SarmergeError, match="hides which example"):
        F.estimate_fisher(model, examples, mode="empirical", per_example="hooks")


def test_gradient_checkpointing_gives_the_same_fisher_and_sampling_still_uses_the_cache(fam):
    """The CUDA memory-saving path, run on CPU: checkpointed per-example loop = plain per-example loop."""
    tok = load_tokenizer(fam / "child0")
    records = [F.CalibrationRecord(i + 1, r["prompt"], None) for i, r in enumerate(ROWS)]
    examples = F.build_examples(records, tok, mode="sampled", n_examples=4, context=256, max_new_tokens=12,
                                eos_id=tok.eos_token_id, source="rows")
    kw = dict(mode="sampled", seed=5, batch_size=2, max_new_tokens=12, eos_ids={tok.eos_token_id}, pad_id=0)
    plain = F.estimate_fisher(load(fam / "child0"), examples, per_example="loop", **kw)
    ckpt_model = load(fam / "child0")
    checkpointed = F.estimate_fisher(ckpt_model, examples, gradient_checkpointing=True, **kw)
    assert checkpointed.backend == "loop" and ckpt_model.model.layers[0].gradient_checkpointing
    assert checkpointed.response_tokens == plain.response_tokens
    assert rel_err(checkpointed.sums, plain.sums) < 1e-5
    with pytest.raises(SarmergeError, match="needs --per-example loop"):
        F.estimate_fisher(load(fam / "child0"), examples, per_example="hooks", gradient_checkpointing=True, **kw)


def test_sampling_is_seeded_per_example_and_independent_of_batching(fam):
    """Left padding + KV cache in a batch give the same draws as each prompt alone; the seed changes them."""
    model, tok = load(fam / "child0"), load_tokenizer(fam / "child0")
    records = [F.CalibrationRecord(i + 1, r["prompt"], None) for i, r in enumerate(ROWS)]
    examples = F.build_examples(records, tok, mode="sampled", n_examples=5, context=256, max_new_tokens=20,
                                eos_id=tok.eos_token_id, source="rows")
    kw = dict(max_new_tokens=20, eos_ids={tok.eos_token_id}, pad_id=0, device=torch.device("cpu"))
    together = F.sample_responses(model, examples, seed=0, **kw)
    alone = [F.sample_responses(model, [e], seed=0, **kw)[0] for e in examples]
    assert together == alone
    assert all(1 <= len(r) <= 20 for r in together)
    assert all(tok.eos_token_id not in r[:-1] for r in together)  # stops at the first EOS
    assert F.sample_responses(model, examples, seed=1, **kw) != together


# --------------------------------------------------------------------------------------- CLI, resume, layout ---


def test_output_metadata_names_mode_data_model_seed_dtype_and_version(fam, data, tmp_path, caplog):
    out = tmp_path / "f"
    caplog.set_level("INFO")
    assert main(["fisher", "--model", str(fam / "child0"), "--data", str(data), "--out", str(out),
                 "--examples", "7", "--batch-size", "4", "--max-new-tokens", "8", "--seed", "3",
                 "--no-progress"]) == 0
    assert "memory estimate" in caplog.text
    meta = FisherStore(out).metadata
    want = {"mode": "sampled", "examples": "7", "seed": "3", "dtype": "float32", "sarmerge_version": "0.1.0",
            "data_sha256": sha256_file(data), "model_sha256": sha256_file(fam / "child0" / "model.safetensors")}
    for key, value in want.items():
        assert meta[f"sarmerge.fisher.{key}"] == value, key
    manifest = json.loads((out / "fisher_manifest.json").read_text())
    assert int(meta["sarmerge.fisher.tokens"]) == manifest["tokens"] > 0
    assert not (tmp_path / "f.fisher-state").exists()
    # The same seed again gives the same bits.
    again = tmp_path / "g"
    assert main(["fisher", "--model", str(fam / "child0"), "--data", str(data), "--out", str(again),
                 "--examples", "7", "--batch-size", "4", "--max-new-tokens", "8", "--seed", "3",
                 "--no-progress"]) == 0
    a, b = Checkpoint(out / "model.safetensors"), Checkpoint(again / "model.safetensors")
    assert all(torch.equal(a.read(n), b.read(n)) for n in a.names)


def test_resume_after_an_interrupt_gives_bitwise_the_uninterrupted_result(fam, data, tmp_path):
    kw = dict(mode="sampled", examples=10, batch_size=2, max_new_tokens=10, seed=4, checkpoint_every=4,
              progress=False)
    F.run_fisher(fam / "child0", data, tmp_path / "whole", **kw)

    def interrupt_after_six(state: F.FisherSums) -> None:
        if state.examples >= 6:
            raise KeyboardInterrupt

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        F.run_fisher(fam / "child0", data, out, on_batch=interrupt_after_six, **kw)
    state = json.loads((tmp_path / "resumed.fisher-state" / "state.json").read_text())
    assert state["examples"] == 4 and not out.exists()
    with pytest.raises(SarmergeError, match="seed was 4, now 5"):
        F.run_fisher(fam / "child0", data, out, **{**kw, "seed": 5}, resume=True)
    manifest = F.run_fisher(fam / "child0", data, out, resume=True, **kw)
    assert manifest["resumed_from"] == 4 and manifest["examples"] == 10
    assert not (tmp_path / "resumed.fisher-state").exists()
    whole, resumed = Checkpoint(tmp_path / "whole"), Checkpoint(out)
    assert whole.metadata["sarmerge.fisher.tokens"] == resumed.metadata["sarmerge.fisher.tokens"]
    assert all(torch.equal(whole.read(n), resumed.read(n)) for n in whole.names)  # bitwise, not approximately


def test_support_of_base_stores_only_moved_entries_and_the_merge_engine_reads_them(fam, data, tmp_path):
    dense, sparse = tmp_path / "dense", tmp_path / "sparse"
    args = ["fisher", "--model", str(fam / "child0"), "--data", str(data), "--mode", "empirical", "--no-progress"]
    assert main([*args, "--out", str(dense)]) == 0
    assert main([*args, "--out", str(sparse), "--support-of", str(fam / "base")]) == 0
    d, s = FisherStore(dense), FisherStore(sparse)
    assert s.layout == "support"
    child, base = Checkpoint(fam / "child0"), Checkpoint(fam / "base")
    moved = total = 0
    for name in child.names:
        tau = child.read(name).float() - base.read(name).float()
        mask = tau.abs() > s.epsilon
        moved, total = moved + int(mask.sum()), total + mask.numel()
        assert torch.equal(s.dense(name, tau), torch.where(mask, d.dense(name), torch.zeros(())))
    manifest = json.loads((sparse / "fisher_manifest.json").read_text())
    assert manifest["stored_bytes"] == moved * 4 and manifest["dense_bytes"] == total * 4
    assert (sparse / "model.safetensors").stat().st_size < 0.35 * (dense / "model.safetensors").stat().st_size


BAD_DATA = {
    "empty": ("", None, "no examples"),
    "bad_json": ('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", \n', 3, "invalid JSON"),
    "not_object": ('{"prompt": "a", "response": "b"}\n["x"]\n', 2, "expected a JSON object"),
    "no_prompt": ('{"prompt": "a", "response": "b"}\n{"question": "c", "response": "d"}\n', 2, "'prompt'"),
    "no_response": ('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', 2, "'response' is missing"),
    "too_long": ('{"prompt": "a", "response": "b"}\n' + json.dumps({"prompt": "x" * 300, "response": "y"}) + "\n",
                 2, "longer than the model's context of 256"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_calibration_data_is_a_clear_error_naming_file_and_line_and_writes_nothing(case, fam, tmp_path, capsys):
    text, line, message = BAD_DATA[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(text)
    out = tmp_path / "out"
    code = main(["fisher", "--model", str(fam / "child0"), "--data", str(bad), "--out", str(out), "--mode",
                 "empirical", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert (f"{bad}:{line}:" if line else f"{bad}:") in err and message in err, err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_cli_refuses_an_existing_output_and_unknown_shipped_data(fam, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert main(["fisher", "--model", str(fam / "child0"), "--data", "math", "--out", str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["fisher", "--model", str(fam / "child0"), "--data", "physics", "--out", str(tmp_path / "o2")]) == 2
    assert "physics: calibration file not found" in capsys.readouterr().err


def test_fisher_then_sar_and_fisher_merges_end_to_end(fam, data, tmp_path):
    """Fisher for two children → `sarmerge merge` with sar (support layout) and fisher (dense); SAR's hard
    arbitration on the overlap keeps, entry by entry, the child with the larger F·τ²."""
    stores = {}
    for child in ("child0", "child1"):
        for layout in ("support", "dense"):
            out = tmp_path / f"{child}-{layout}"
            extra = ["--support-of", str(fam / "base")] if layout == "support" else []
            assert main(["fisher", "--model", str(fam / child), "--data", str(data), "--out", str(out),
                         "--examples", "6", "--batch-size", "3", "--max-new-tokens", "8", "--no-progress",
                         *extra]) == 0
            stores[child, layout] = out
    sar_cfg = {"method": "sar", "base_model": str(fam / "base"), "parameters": {"rescale": "none"},
               "models": [{"model": str(fam / c), "fisher": str(stores[c, "support"])} for c in ("child0", "child1")]}
    fisher_cfg = {"method": "fisher",
                  "models": [{"model": str(fam / c), "fisher": str(stores[c, "dense"])} for c in ("child0", "child1")]}
    for name, cfg in (("sar", sar_cfg), ("fisher", fisher_cfg)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["merge", str(tmp_path / f"{name}.yaml"), str(tmp_path / f"merged-{name}"), "--no-progress"]) == 0
    merged, base = Checkpoint(tmp_path / "merged-sar"), Checkpoint(fam / "base")
    children = [Checkpoint(fam / c) for c in ("child0", "child1")]
    fishers = [FisherStore(stores[c, "support"]) for c in ("child0", "child1")]
    decided = 0
    for name in base.names:
        b = base.read(name).float()
        taus = [c.read(name).float() - b for c in children]
        sens = [f.dense(name, t) * t**2 for f, t in zip(fishers, taus, strict=True)]
        overlap = (taus[0].abs() > 1e-5) & (taus[1].abs() > 1e-5) & (sens[0] != sens[1])
        want = torch.where(sens[0] > sens[1], b + taus[0], b + taus[1]).to(torch.bfloat16)
        assert torch.equal(merged.read(name)[overlap], want[overlap]), name
        decided += int(overlap.sum())
    assert decided > 100
    manifest = json.loads((tmp_path / "merged-sar" / "merge_manifest.json").read_text())
    assert [f["layout"] for f in manifest["fisher"]] == ["support", "support"]


# ---------------------------------------------------------------------------------------- shipped data ---


def test_shipped_calibration_sets_parse_and_regenerate_byte_for_byte(tmp_path):
    math_set = F.read_calibration(F.resolve_data("math"), "empirical")
    code_set = F.read_calibration(F.resolve_data("code"), "empirical")
    assert len(math_set) == 100 and len(code_set) == 164
    assert all("####" in r.response for r in math_set) and all("<<" not in r.response for r in math_set)
    assert all("def " in r.prompt for r in code_set)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_calibration.py"), "--out-dir", str(tmp_path)],
                   check=True, capture_output=True)
    for name in ("calib_math.jsonl", "calib_code.jsonl"):
        assert (tmp_path / name).read_bytes() == (ROOT / "sarmerge" / "data" / name).read_bytes()


def test_fisher_evaluation_and_token_analysis_end_a_response_at_the_same_tokens(tmp_path):
    """A chat model's end-of-turn id lives in generation_config.json, apart from the tokenizer's EOS: Fisher, the
    evaluation backend and token analysis must all stop there (issue #16: they used to read three different rules)."""
    from sarmerge.analysis.tokens import analyze_tokens
    from sarmerge.evaluate.backends import HFBackend, PromptBuilder, SamplingSettings

    model, tok = tiny_model(3)
    ckpt_dir = save_checkpoint(model, tok, tmp_path / "chat")
    prompt = "12+7"
    ids = F.encode_prompt(tok, prompt)
    with torch.no_grad():  # the greedy first two tokens; the second becomes the end-of-turn token
        first = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        end_of_turn = int(model(input_ids=torch.tensor([[*ids, first]])).logits[0, -1].argmax())
    assert len({first, end_of_turn, tok.eos_token_id}) == 3
    (ckpt_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_turn, tok.eos_token_id]}))
    tok = load_tokenizer(ckpt_dir)
    want = [end_of_turn, tok.eos_token_id]

    # Fisher: the stop set of sampled responses, and the id that ends empirical references
    assert F.stop_tokens(Checkpoint(ckpt_dir), tok) == want
    (example,) = F.build_examples([F.CalibrationRecord(1, prompt, "19")], tok, mode="empirical", n_examples=None,
                                  context=None, max_new_tokens=4, eos_id=want[0], source="calib")
    assert example.response_ids[-1] == end_of_turn

    # evaluation: greedy generation ends at the end-of-turn token, after two tokens
    backend = HFBackend(ckpt_dir, tok, device="cpu", dtype="float32", batch_size=1)
    assert backend.eos_ids == set(want)
    (gens,) = backend.generate([PromptBuilder(tok).render(prompt)], SamplingSettings(max_new_tokens=5))
    assert (gens[0].finish, gens[0].tokens) == ("eos", 2)

    # token analysis (which forces one token before any stop): the same two tokens, finished
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompt + "\n")
    summary, records = analyze_tokens(ckpt_dir, ckpt_dir, prompts, max_new_tokens=5, progress=False)
    assert summary["settings"]["stop_token_ids"] == want
    assert records[0]["token_ids"] == [first, end_of_turn] and records[0]["finished"]
