"""Registry conventions, `sarmerge register`, pairing and the exactly-once ledger, against a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_support import REPO, VENV_BIN, env_vars, make_family, register, write_params

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return make_family(tmp_path_factory.mktemp("fam"), [("math_s0", "math", 11), ("math_s1", "math", 12),
                                                        ("code_s0", "code", 13)], base_seed=1)


@pytest.fixture
def env(mlflow_server, tmp_path):
    params = write_params(tmp_path / "params.yaml", root=tmp_path / "root", family="reg",
                          pairing={"fusion": True, "enhancement": True})
    values = {"MLFLOW_TRACKING_URI": mlflow_server.url, "SARMERGE_PARAMS": str(params),
              "SARMERGE_PIPELINE_ROOT": str(tmp_path / "root")}
    with env_vars(**values):
        yield {**os.environ, **values}


def client():
    from tasks.registry import get_client

    return get_client()


def test_register_sets_tags_and_logs_plain_safetensors(env, family):
    from tasks import registry as reg

    base = register(family["base"], "reg-base", kind="base")
    math = register(family["math_s0"], "reg-math", domain="math", base=base["uri"], calib=family["calib_math"])
    assert base["created"] and math["created"]
    mv = client().get_model_version("reg-math", math["version"])
    assert mv.tags[reg.TAG_KIND] == "rlvr" and mv.tags[reg.TAG_DOMAIN] == "math"
    assert mv.tags[reg.TAG_SHA256] == reg.content_digest(family["math_s0"])
    assert mv.tags[reg.TAG_BASE] == f"{base['uri']}#sha256={reg.content_digest(family['base'])}"
    assert mv.source == f"runs:/{mv.run_id}/checkpoint"
    files = {Path(f.path).name for f in client().list_artifacts(mv.run_id, "checkpoint")}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(f.endswith((".pkl", ".bin", ".pt")) or f == "MLmodel" for f in files)
    assert "calibration.jsonl" in {f.path for f in client().list_artifacts(mv.run_id)}


def test_same_content_twice_is_detected_not_registered(env, family):
    base = register(family["base"], "reg-base", kind="base")
    first = register(family["math_s1"], "reg-math", domain="math", base=base["uri"])
    again = register(family["math_s1"], "reg-math-copy", domain="math", base=base["uri"])
    assert first["created"] and not again["created"]
    assert (again["name"], again["version"]) == (first["name"], first["version"])
    assert client().search_model_versions("name = 'reg-math-copy'") == []


def test_bad_inputs_register_nothing(env, family, tmp_path):
    from sarmerge.errors import SarmergeError
    from tasks.register import register_checkpoint

    base = register(family["base"], "reg-base", kind="base")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    cases = [
        (dict(path=corrupt, name="reg-bad", domain="math", base=base["uri"]), "corrupt"),
        (dict(path=pickled, name="reg-bad", domain="math", base=base["uri"]), "pickle"),
        (dict(path=family["code_s0"], name="../escape", domain="code", base=base["uri"]), "model names"),
        (dict(path=family["code_s0"], name="reg-bad", domain="Code!", base=base["uri"]), "domains"),
        (dict(path=family["code_s0"], name="reg-bad", domain="code", base="models:/reg-base/99"), "no such model"),
        (dict(path=family["code_s0"], name="reg-bad", domain="code", base=None), "--base is required"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SarmergeError, match=message):
            register_checkpoint(kwargs.pop("path"), **kwargs)
    assert client().search_model_versions("name = 'reg-bad'") == []


def test_register_refuses_a_base_of_another_architecture(env, family, tmp_path):
    from sarmerge.errors import SarmergeError
    from sarmerge.zoo.tiny import save_checkpoint, tiny_model
    from tasks.register import register_checkpoint

    wide, tok = tiny_model(seed=5, hidden=32, heads=2, kv_heads=1)
    other_base = register(save_checkpoint(wide, tok, tmp_path / "wide"), "reg-wide-base", kind="base")
    with pytest.raises(SarmergeError, match="hidden_size"):
        register_checkpoint(family["code_s0"], name="reg-bad", domain="code", base=other_base["uri"])


def test_cli_exit_codes(env, family, tmp_path):
    ok = subprocess.run([str(VENV_BIN / "sarmerge"), "register", str(family["base"]), "--name", "reg-base",
                         "--kind", "base"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "models:/reg-base/" in ok.stdout
    bad = subprocess.run([str(VENV_BIN / "sarmerge"), "register", str(tmp_path / "missing"), "--name", "reg-x",
                          "--domain", "math", "--base", "models:/reg-base/1"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2
    assert "missing" in bad.stderr and "Traceback" not in bad.stderr


def _plan(env, events, dag_run):
    proc = subprocess.run([sys.executable, "-m", "tasks.plan", "--events", json.dumps(events), "--dag-run", dag_run],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SARMERGE_RESULT ")][-1]
    return json.loads(line.split(" ", 1)[1])


def test_pairing_and_exactly_once_claims(mlflow_server, tmp_path):
    """A version alone has no partner (skipped, recorded); the next domain fuses with it; concurrent plans of the same
    events claim each version once; a partner on another base is skipped with the reason."""

    family = make_family(tmp_path / "fam", [("math_s0", "math", 31), ("code_s0", "code", 32)], base_seed=2)
    params = write_params(tmp_path / "params.yaml", root=tmp_path / "root", family="pair")
    values = {"MLFLOW_TRACKING_URI": mlflow_server.url, "SARMERGE_PARAMS": str(params),
              "SARMERGE_PIPELINE_ROOT": str(tmp_path / "root")}
    with env_vars(**values):
        _pairing(family, {**os.environ, **values}, tmp_path)


def _pairing(family, env, tmp_path):
    from tasks import registry as reg

    base = register(family["base"], "pair-base", kind="base")
    math = register(family["math_s0"], "pair-math", domain="math", base=base["uri"], calib=family["calib_math"])
    first = _plan(env, [{"name": "pair-math", "version": math["version"]}], "run_a")
    assert first["jobs"] == [] and f"pair-math/{math['version']}" in first["claimed"]
    assert client().get_model_version("pair-math", math["version"]).tags[reg.TAG_STATE] == "skipped"

    code = register(family["code_s0"], "pair-code", domain="code", base=base["uri"], calib=family["calib_code"])
    events = [{"name": "pair-code", "version": code["version"]}]
    procs = [subprocess.Popen([sys.executable, "-m", "tasks.plan", "--events", json.dumps(events), "--dag-run", run],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
             for run in ("run_b", "run_c")]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads([ln for ln in out.splitlines() if ln.startswith("SARMERGE_RESULT ")][-1][16:]))
    claimed = [r for r in results if f"pair-code/{code['version']}" in r["claimed"]]
    assert len(claimed) == 1, results
    (winner,) = claimed
    assert len(winner["jobs"]) == 1 and winner["jobs"][0]["kind"] == "fusion"
    assert sorted(winner["jobs"][0]["versions"]) == sorted([f"pair-code/{code['version']}",
                                                             f"pair-math/{math['version']}"])
    loser = next(r for r in results if r is not winner)
    assert loser["jobs"] == [] and any("already claimed" in s["reason"] for s in loser["skipped"])
    ws = Path(winner["jobs"][0]["workspace"])
    assert (ws / "inputs.dvc").is_file() and (ws / "inputs" / "calib_math.jsonl").read_text().startswith('{"prompt"')
    assert len(winner["args"]["merge"]) == 2 and len(winner["args"]["fisher"]) == 2

    # a later plan for the same version (a duplicate event) does nothing
    again = _plan(env, events, "run_d")
    assert again["jobs"] == [] and again["claimed"] == []

    # another base: its same-domain run is not merged, and the reason is recorded
    other = make_family(tmp_path / "other", [("code_s9", "code", 21)], base_seed=7)
    other_base = register(other["base"], "pair-base2", kind="base")
    code2 = register(other["code_s9"], "pair-code", domain="code", base=other_base["uri"])
    res = _plan(env, [{"name": "pair-code", "version": code2["version"]}], "run_e")
    assert res["jobs"] == []
    reasons = " ".join(s["reason"] for s in res["skipped"])
    assert "different base" in reasons
    tags = client().get_model_version("pair-code", code2["version"]).tags
    assert tags[reg.TAG_STATE] == "skipped" and "different base" in tags[reg.TAG_REASON]


