"""`SarmergeRegisterCallback`: a real TRL `GRPOTrainer` run on the tiny zoo model registers its checkpoints in a real
MLflow server, and `tasks.plan` turns the new versions into merge jobs with no manual upload."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from pipeline_support import env_vars, register, write_params

pytestmark = pytest.mark.pipeline
pytest.importorskip("trl")


def _grpo(base: Path, out: Path, task_name: str, callback, *, save_every_step: bool, steps: int = 2):
    """A real 2-step TRL GRPO run on the tiny model (the same helper the SmolLM2 family builder uses)."""
    from transformers import AutoModelForCausalLM

    from sarmerge.zoo.smollm2 import TRLGRPOSettings, run_trl_grpo
    from sarmerge.zoo.tasks import get_task
    from sarmerge.zoo.tiny import load_tokenizer

    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)  # fp32 master weights, as trainers keep
    # a large rate so two steps move the tiny model's weights (the registry refuses a checkpoint equal to its base)
    settings = TRLGRPOSettings(steps=steps, prompts=2, group=4, lr=1e-3)
    return run_trl_grpo(model, tok, get_task(task_name), settings, seed=3, output_dir=out, callbacks=[callback],
                        save_steps=1 if save_every_step else None, progress=False)


@pytest.fixture
def env(mlflow_server, tmp_path):
    params = write_params(tmp_path / "params.yaml", root=tmp_path / "root", family="trl",
                          pairing={"fusion": True, "enhancement": True})
    values = {"MLFLOW_TRACKING_URI": mlflow_server.url, "SARMERGE_PARAMS": str(params),
              "SARMERGE_PIPELINE_ROOT": str(tmp_path / "root")}
    with env_vars(**values):
        yield {**os.environ, **values}


def test_grpo_trainer_registers_its_checkpoints_and_plan_merges_them(env, tiny_family, tmp_path):
    from tasks import registry as reg
    from tasks.params import load_params
    from tasks.plan import Planner
    from tasks.trainer_callback import SarmergeRegisterCallback

    root = Path(tiny_family["root"])
    base = register(root / "base", "trl-base", kind="base")
    every = SarmergeRegisterCallback(name="trl-math", domain="math", base=base["uri"],
                                     calib=root / "calib_math.jsonl", checkpoints="every")
    history = _grpo(root / "base", tmp_path / "run-math", "math", every, save_every_step=True)
    final = SarmergeRegisterCallback(name="trl-code", domain="code", base=base["uri"])  # checkpoints="final"
    _grpo(root / "base", tmp_path / "run-code", "code", final, save_every_step=False)

    assert len(history) == 2 and all("reward" in h for h in history)
    assert [(r["step"], r["created"]) for r in every.registered] == [(1, True), (2, True)]
    assert [(r["step"], r["created"]) for r in final.registered] == [(2, True)]
    assert Path(final.registered[0]["path"]).name == "sarmerge-final"  # no save during training: saved at the end

    client = reg.get_client()
    base_sha = reg.content_digest(root / "base")
    for r, domain in [(every.registered[0], "math"), (every.registered[1], "math"), (final.registered[0], "code")]:
        mv = client.get_model_version(r["uri"].split("/")[1], r["version"])
        assert mv.tags[reg.TAG_KIND] == "rlvr" and mv.tags[reg.TAG_DOMAIN] == domain
        assert mv.tags[reg.TAG_BASE] == f"{base['uri']}#sha256={base_sha}"
        assert mv.tags[reg.TAG_SHA256] == reg.content_digest(Path(r["path"])) != base_sha
        files = {Path(f.path).name for f in client.list_artifacts(mv.run_id, "checkpoint")}
        assert "model.safetensors" in files and "tokenizer.json" in files
        assert not any(f.endswith((".pt", ".pth", ".bin")) for f in files)  # optimizer/rng state stays local
    math_run = client.get_model_version("trl-math", every.registered[1]["version"]).run_id
    assert "calibration.jsonl" in {f.path for f in client.list_artifacts(math_run)}

    # the pipeline's planner picks the new versions up: fusion (math x code) and enhancement (math x math)
    events = [("trl-math", every.registered[0]["version"]), ("trl-math", every.registered[1]["version"]),
              ("trl-code", final.registered[0]["version"])]
    plan = Planner(load_params(), client, "trl-test-run").plan(events)
    keys = {f"{n}/{v}" for n, v in events}
    assert set(plan["claimed"]) == keys
    planned = [set(j["versions"]) for j in plan["jobs"]]
    math1, math2, code1 = (f"{n}/{v}" for n, v in events)
    assert {math2, code1} in planned or {math1, code1} in planned, plan  # fusion with the code specialist
    assert {math1, math2} in planned, plan  # same-domain enhancement
    assert {job["kind"] for job in plan["jobs"]} == {"fusion", "enhancement"}
    for job in plan["jobs"]:  # the workspaces hold the downloaded base and parents
        assert (Path(job["workspace"]) / "inputs" / "base" / "model.safetensors").is_file()


def test_save_dtype_registers_a_bf16_copy_in_the_base_layout(env, tiny_family, tmp_path):
    """fp32 master weights make dense checkpoints; the bf16 copy keeps the sub-half-ulp updates out (RLVR-like)."""
    from safetensors.torch import load_file

    from tasks.trainer_callback import SarmergeRegisterCallback

    root = Path(tiny_family["root"])
    base = register(root / "base", "trl-base", kind="base")
    callback = SarmergeRegisterCallback(name="trl-bf16", domain="math", base=base["uri"], save_dtype="bfloat16")
    _grpo(root / "base", tmp_path / "run", "math", callback, save_every_step=True)
    (registered,) = callback.registered  # checkpoints="final": the Trainer's last save, as a bf16 copy
    assert Path(registered["path"]) == tmp_path / "run" / "checkpoint-2" / "sarmerge-bfloat16"
    base_w = load_file(root / "base" / "model.safetensors")
    copy = load_file(Path(registered["path"]) / "model.safetensors")
    fp32 = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert copy.keys() == base_w.keys() and all(v.dtype == torch.bfloat16 for v in copy.values())
    assert json.loads((Path(registered["path"]) / "config.json").read_text())["dtype"] == "bfloat16"

    def unchanged(model: dict) -> float:  # share of weights exactly equal to the base's
        same = sum(int((model[k].float() == v.float()).sum()) for k, v in base_w.items())
        return same / sum(v.numel() for v in base_w.values())

    assert unchanged(fp32) < unchanged(copy) < 1.0


def test_registration_failure_stops_the_run_with_the_manual_command(env, tiny_family, tmp_path):
    from sarmerge.errors import SarmergeError
    from tasks.trainer_callback import SarmergeRegisterCallback

    root = Path(tiny_family["root"])
    callback = SarmergeRegisterCallback(name="trl-missing-base", domain="math", base="models:/trl-no-such-base/7")
    with pytest.raises(SarmergeError, match=r"no such model version.*sarmerge register"):
        _grpo(root / "base", tmp_path / "run", "math", callback, save_every_step=False, steps=1)
    assert (tmp_path / "run" / "sarmerge-final" / "model.safetensors").is_file()  # the checkpoint is kept
    callback_log = SarmergeRegisterCallback(name="trl-missing-base", domain="math", base="models:/trl-no-such-base/7",
                                            on_error="log")
    _grpo(root / "base", tmp_path / "run-log", "math", callback_log, save_every_step=False, steps=1)
    assert callback_log.registered == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="../x", domain="math", base="models:/b/1"), "model name"),
    (dict(name="ok", domain="Math!", base="models:/b/1"), "domain"),
    (dict(name="ok", domain="math", base=""), "base is required"),
    (dict(name="ok", domain="math", base="models:/b/1", calib="/nonexistent.jsonl"), "calib"),
    (dict(name="ok", domain="math", base="models:/b/1", checkpoints="best"), "checkpoints"),
    (dict(name="ok", domain="math", base="models:/b/1", save_dtype="int8"), "save_dtype"),
])
def test_bad_settings_fail_before_training(kwargs, message):
    from sarmerge.errors import SarmergeError
    from tasks.trainer_callback import SarmergeRegisterCallback

    with pytest.raises(SarmergeError, match=message):
        SarmergeRegisterCallback(**kwargs)
