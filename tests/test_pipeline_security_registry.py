"""One bad registration must not block merges (issue 11 item 7, SPEC §11): full-match validation of registered
strings, `sarmerge register` refusing a domain without a suite, and `plan` validating before it claims and releasing
its claims when it fails. Against a real MLflow server; `plan` runs as the DAG runs it (`python -m tasks.plan`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_support import REPO, env_vars, make_family, register, write_params

pytestmark = pytest.mark.pipeline


@pytest.mark.parametrize(("check", "value"), [
    ("validate_name", "sec-math\n"), ("validate_name", "sec\nmath"), ("validate_domain", "code\n"),
    ("validate_domain", "math\n+code"), ("validate_version", "3\n"), ("validate_version", "²"),
    ("validate_version", "٣"), ("validate_version", "-1"), ("parse_model_uri", "models:/tiny-base/1\n"),
    ("parse_model_uri", "models:/tiny-base/²"), ("parse_base_tag", f"models:/b/1#sha256={'a' * 64}\n"),
])
def test_registered_strings_must_match_in_full(check: str, value: str) -> None:
    from sarmerge.errors import SarmergeError
    from tasks import registry as reg

    with pytest.raises(SarmergeError):
        getattr(reg, check)(value)


def test_ledger_paths_refuse_lax_versions(tmp_path: Path) -> None:
    from sarmerge.errors import SarmergeError
    from tasks.ledger import Ledger

    ledger = Ledger(tmp_path)
    for bad in ("3\n", "²", "../3"):
        with pytest.raises(SarmergeError):
            ledger.claim_version("sec-math", bad, "run")
    with pytest.raises(ValueError):
        ledger.claim_job("abc\n", "run", [])
    assert not (tmp_path / "ledger").exists() or not any((tmp_path / "ledger").rglob("*.json"))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    # seeds no other test module uses: the session's MLflow server would otherwise already hold this content
    # (registration dedupes by sha256), and the test would see another module's versions
    return make_family(tmp_path_factory.mktemp("secfam"), [("math_s0", "math", 141), ("code_s0", "code", 142),
                                                           ("chem_s0", "code", 143), ("nl_s0", "code", 144),
                                                           ("code_s1", "code", 145), ("math_s1", "math", 146)],
                       base_seed=11)


def _params(tmp_path: Path, prefix: str, **sections) -> Path:
    return write_params(tmp_path / "params.yaml", root=tmp_path / "root", family=prefix,
                        families=[{"name": prefix, "models": f"{prefix}-(math|code|chem)",
                                   "merged_model": f"{prefix}-merged"}], **sections)


def _plan(env: dict, events: list[dict], dag_run: str) -> tuple[int, dict | None, str]:
    proc = subprocess.run([sys.executable, "-m", "tasks.plan", "--events", json.dumps(events), "--dag-run", dag_run],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SARMERGE_RESULT ")]
    return proc.returncode, json.loads(lines[-1].split(" ", 1)[1]) if lines else None, proc.stderr


def _ledger_files(root: Path, kind: str) -> list[Path]:
    folder = root / "ledger" / kind
    return sorted(folder.rglob("*.json")) if folder.is_dir() else []


def test_register_refuses_newline_names_and_domains_without_a_suite(mlflow_server, tmp_path, family) -> None:
    from sarmerge.errors import SarmergeError
    from tasks.params import load_params
    from tasks.register import register_checkpoint
    from tasks.registry import get_client

    params = _params(tmp_path, "secr")
    with env_vars(MLFLOW_TRACKING_URI=mlflow_server.url, SARMERGE_PARAMS=str(params)):
        base = register(family["base"], "secr-base", kind="base")
        for kwargs, message in [({"name": "secr-math\n", "domain": "math"}, "model names"),
                                ({"name": "secr-code", "domain": "code\n"}, "domains"),
                                ({"name": "secr-chem", "domain": "chemistry"}, r"evaluate\.suites has no suite")]:
            with pytest.raises(SarmergeError, match=message):
                register_checkpoint(family["chem_s0"], base=base["uri"], **kwargs)
        # the params given explicitly win over $SARMERGE_PARAMS
        with pytest.raises(SarmergeError, match="chemistry"):
            register_checkpoint(family["chem_s0"], name="secr-chem", domain="chemistry", base=base["uri"],
                                params=load_params(params))
        names = {m.name for m in get_client().search_registered_models()}
    assert not {"secr-math\n", "secr-code", "secr-chem"} & names


def test_bad_registrations_are_skipped_before_any_claim_and_block_nothing(mlflow_server, tmp_path, family) -> None:
    """A version whose domain has no suite (params changed since it was registered, or a registration that went
    around `sarmerge register`) and one whose domain tag carries a newline: plan skips both with the reason, writes
    no claim for them, and the legitimate upload after them is planned."""
    from tasks import registry as reg
    from tasks.params import load_params
    from tasks.register import register_checkpoint

    root = tmp_path / "root"
    params = _params(tmp_path, "secb")
    with_chem = load_params(params).model_copy(deep=True)
    with_chem.evaluate.suites["chemistry"] = "zoo:code"
    values = {"MLFLOW_TRACKING_URI": mlflow_server.url, "SARMERGE_PARAMS": str(params),
              "SARMERGE_PIPELINE_ROOT": str(root)}
    with env_vars(**values):
        env = {**os.environ, **values}
        base = register(family["base"], "secb-base", kind="base")
        math = register(family["math_s0"], "secb-math", domain="math", base=base["uri"], calib=family["calib_math"])
        chem, _ = register_checkpoint(family["chem_s0"], name="secb-chem", domain="chemistry", base=base["uri"],
                                      params=with_chem)
        newline = register(family["nl_s0"], "secb-code", domain="code", base=base["uri"])
        reg.get_client().set_model_version_tag("secb-code", newline["version"], reg.TAG_DOMAIN, "code\n")

        rc, result, err = _plan(env, [{"name": "secb-chem", "version": chem.version},
                                      {"name": "secb-code", "version": newline["version"]}], "run_bad")
        assert rc == 0, err[-3000:]
        reasons = {s["version"]: s["reason"] for s in result["skipped"]}
        assert "evaluate.suites" in reasons[chem.key] and "chemistry" in reasons[chem.key]
        assert "domains" in reasons[f"secb-code/{newline['version']}"]
        assert result["jobs"] == [] and chem.key not in result["claimed"]
        assert _ledger_files(root, "jobs") == []
        assert not (root / "ledger" / "versions" / "secb-chem").exists()

        code = register(family["code_s0"], "secb-code", domain="code", base=base["uri"], calib=family["calib_code"])
        rc, result, err = _plan(env, [{"name": "secb-code", "version": code["version"]}], "run_good")
        assert rc == 0, err[-3000:]
        assert len(result["jobs"]) == 1, result
        assert sorted(result["jobs"][0]["versions"]) == sorted([f"secb-code/{code['version']}",
                                                                 f"secb-math/{math['version']}"])


def test_a_plan_that_fails_releases_its_claims(mlflow_server, tmp_path, family) -> None:
    """plan fails while preparing the workspace (no calibration data for a domain): exit 2 with the reason, the job
    claim is gone and the version claim is marked failed, so the next run (with params fixed) plans the job."""
    from tasks import registry as reg

    root = tmp_path / "root"
    broken = _params(tmp_path / "broken", "secf", fisher={"data": {"math": "math"}},
                     pipeline={"root": str(root)})
    fixed = _params(tmp_path / "fixed", "secf", pipeline={"root": str(root)})
    values = {"MLFLOW_TRACKING_URI": mlflow_server.url, "SARMERGE_PIPELINE_ROOT": str(root)}
    with env_vars(**values, SARMERGE_PARAMS=str(broken)):
        base = register(family["base"], "secf-base", kind="base")
        register(family["math_s1"], "secf-math", domain="math", base=base["uri"], calib=family["calib_math"])
        code = register(family["code_s1"], "secf-code", domain="code", base=base["uri"])  # no --calib
        events = [{"name": "secf-code", "version": code["version"]}]
        env = {**os.environ, **values, "SARMERGE_PARAMS": str(broken)}
        rc, result, err = _plan(env, events, "run_fail")
        assert rc == 2 and "fisher.data" in err and "Traceback" not in err, err[-3000:]
        assert _ledger_files(root, "jobs") == []
        record = json.loads((root / "ledger" / "versions" / "secf-code" / f"{code['version']}.json").read_text())
        assert record["state"] == "failed" and "fisher.data" in record["reason"]
        assert reg.get_client().get_model_version("secf-code", code["version"]).tags[reg.TAG_STATE] == "failed"

        rc, result, err = _plan({**env, "SARMERGE_PARAMS": str(fixed)}, events, "run_retry")
        assert rc == 0, err[-3000:]
        assert len(result["jobs"]) == 1 and f"secf-code/{code['version']}" in result["claimed"], result
        job_claims = _ledger_files(root, "jobs")
        assert [json.loads(f.read_text())["dag_run"] for f in job_claims] == ["run_retry"]


def test_mlflow_processes_run_without_telemetry(mlflow_server) -> None:
    """MLflow 3.17 fetches a telemetry config from outside unless MLFLOW_DISABLE_TELEMETRY is set (issue 11 item 8):
    the test server, and this process's clients (and what they start), have it."""
    environ = Path(f"/proc/{mlflow_server.proc.pid}/environ").read_bytes().split(b"\0")
    assert b"MLFLOW_DISABLE_TELEMETRY=true" in environ
    assert os.environ.get("MLFLOW_DISABLE_TELEMETRY") == "true"


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("domain", "code\n", "domains"), ("domain", "chemistry", "evaluate.suites"), ("name", "secu-code\n", "model names"),
    ("version", "²", "version number"), ("base", f"models:/b/1#sha256={'a' * 64}\n", "sarmerge.base"),
    ("sha256", "'; drop", "sha256 hex digest"),
])
def test_each_untrusted_registry_string_makes_a_version_ineligible(tmp_path: Path, field: str, value: str,
                                                                    reason: str) -> None:
    """The checks plan runs before it claims anything, one registry string at a time (no server needed)."""
    from dataclasses import replace

    from tasks.params import load_params
    from tasks.plan import Planner
    from tasks.registry import ModelRef

    planner = Planner(load_params(_params(tmp_path, "secu")), client=None, dag_run="run")
    good = ModelRef(name="secu-code", version="3", kind="rlvr", domain="code", base=f"models:/b/1#sha256={'a' * 64}",
                    sha256="b" * 64, run_id="r", source="runs:/r/checkpoint", tags={})
    assert planner.ineligible(good) is None
    got = planner.ineligible(replace(good, **{field: value}))
    assert got is not None and reason in got
