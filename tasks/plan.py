"""Step `plan`: turn trigger events into merge jobs, exactly once per RLVR version.

    python -m tasks.plan --events '[{"name": "tiny-code", "version": "1"}]' --dag-run RUN_ID
    python -m tasks.plan finish --dag-run RUN_ID       # the DAG's last task: mark versions done / failed

Events can coalesce (several registrations → one DAG run) or repeat (watcher and webhook both fire): every version
named by an event, plus (with `pairing.sweep_unprocessed`) every unprocessed version of a watched family, is claimed
in the ledger; a version another run owns is left to it. For each claimed version the pairing policy of params.yaml
picks partners on the same base: fusion (the `partner_alias` — else latest — version of every other domain) and
enhancement (the other versions of its own domain). A partner on a different base is skipped with the reason
recorded. Each job (a set of parents) gets one workspace with its inputs downloaded from the registry.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from sarmerge.errors import SarmergeError
from tasks import registry as reg
from tasks.cache import cached
from tasks.common import fault_point, step_main
from tasks.ledger import Ledger
from tasks.merge import check_methods
from tasks.params import JobCfg, JobParent, Params, load_params
from tasks.steps import step_args
from tasks.workspace import Workspace

log = logging.getLogger(__name__)
SHIPPED_CALIB = Path(__file__).resolve().parent.parent / "sarmerge" / "data"
CALIB_ARTIFACT = "calibration.jsonl"


def parse_events(text: str) -> list[tuple[str, str]]:
    """Events are JSON: a list of {name, version} (extra keys ignored), as the trigger and the relay emit them."""
    try:
        raw = json.loads(text or "[]")
    except json.JSONDecodeError as e:
        raise SarmergeError(f"--events: invalid JSON: {e}") from e
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise SarmergeError("--events: expected a JSON list of {name, version}")
    out = []
    for i, ev in enumerate(raw):
        if not isinstance(ev, dict) or "name" not in ev or "version" not in ev:
            raise SarmergeError(f"--events[{i}]: expected {{name, version}}, got {ev!r}")
        name = reg.validate_name(ev["name"], f"--events[{i}].name")
        out.append((name, reg.validate_version(ev["version"], f"--events[{i}].version")))
    return sorted(set(out), key=lambda e: (e[0], int(e[1])))


def dir_name(ref: reg.ModelRef) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{ref.name}-v{ref.version}")


def job_id_for(base_sha: str, parents: list[reg.ModelRef]) -> str:
    return reg.params_hash({"base": base_sha, "parents": sorted(p.sha256 for p in parents)})


class Planner:
    def __init__(self, params: Params, client: Any, dag_run: str) -> None:
        self.params, self.client, self.dag_run = params, client, dag_run
        self.ledger = Ledger(params.root)
        self.skipped: list[dict[str, Any]] = []
        self._family_versions: dict[str, list[reg.ModelRef]] = {}
        self._planned: dict[str, dict[str, Any]] = {}
        # what this call claimed, released again if planning fails (a failed plan must not block later runs)
        self._claimed_versions: list[reg.ModelRef] = []
        self._claimed_jobs: list[str] = []
        self._ineligible: set[str] = set()

    def ineligible(self, ref: reg.ModelRef) -> str | None:
        """Why a registered version can be neither planned nor a partner (checked before anything is claimed), or
        None. Registered strings are untrusted: a domain or name that only passes a lax check, or a domain that
        params.yaml gives no suite, would otherwise fail the plan after its claims were written."""
        try:
            reg.validate_name(ref.name, "model name")
            reg.validate_version(ref.version)
            reg.validate_domain(ref.domain, f"{ref.uri}: tag {reg.TAG_DOMAIN}")
            if ref.base:
                reg.parse_base_tag(ref.base)
        except SarmergeError as e:
            return str(e)
        if ref.sha256 and not re.fullmatch(r"[0-9a-f]{64}", ref.sha256):  # it keys caches and registry searches
            return f"tag {reg.TAG_SHA256}={ref.sha256[:80]!r} is not a sha256 hex digest"
        if ref.domain not in self.params.evaluate.suites:
            return (f"domain {ref.domain!r} has no suite in params.yaml evaluate.suites "
                    f"(configured: {sorted(self.params.evaluate.suites)})")
        return None

    def family_versions(self, family: str) -> list[reg.ModelRef]:
        if family not in self._family_versions:
            fam = self.params.family_named(family)
            refs = reg.find_by_tags(self.client, **{reg.TAG_KIND: "rlvr"})
            usable = []
            for r in refs:
                if not fam.matches(r.name):
                    continue
                reason = self.ineligible(r)
                if reason is None:
                    usable.append(r)
                elif r.key not in self._ineligible:  # reported once, never a partner
                    self._ineligible.add(r.key)
                    self.skip(r, f"not usable: {reason}")
            self._family_versions[family] = usable
        return self._family_versions[family]

    def skip(self, ref_or_key: Any, reason: str, *, mark: bool = False) -> None:
        key = ref_or_key.key if isinstance(ref_or_key, reg.ModelRef) else str(ref_or_key)
        log.info("skip %s: %s", key, reason)
        self.skipped.append({"version": key, "reason": reason})
        if mark and isinstance(ref_or_key, reg.ModelRef):
            ref = ref_or_key
            self.ledger.update_version(ref.name, ref.version, state="skipped", reason=reason)
            reg.set_tags(self.client, ref, {reg.TAG_STATE: "skipped", reg.TAG_REASON: reason[:4000],
                                            reg.TAG_CLAIMED_BY: self.dag_run})

    # -- claiming -----------------------------------------------------------------------------------------------
    def candidates(self, events: list[tuple[str, str]]) -> list[reg.ModelRef]:
        keys = set(events)
        if self.params.pairing.sweep_unprocessed:
            for fam in self.params.families:
                for r in self.family_versions(fam.name):
                    if self.ledger.version(r.name, r.version) is None:
                        keys.add((r.name, r.version))
        refs = []
        for name, version in sorted(keys, key=lambda k: (k[0], int(k[1]))):
            try:
                refs.append(reg.get_ref(self.client, name, version))
            except SarmergeError as e:
                self.skip(f"{name}/{version}", str(e))
        return refs

    def claim(self, ref: reg.ModelRef) -> bool:
        if self.params.family_of(ref.name) is None:
            self.skip(ref, "not in any family watched by params.yaml `families`")
            return False
        if ref.kind != "rlvr":
            self.skip(ref, f"kind is {ref.kind or 'unset'!r}; only rlvr versions start merges")
            return False
        reason = self.ineligible(ref)
        if reason is not None:
            if ref.key not in self._ineligible:
                self._ineligible.add(ref.key)
                self.skip(ref, f"not usable: {reason}")
            return False
        mine, record = self.ledger.claim_version(ref.name, ref.version, self.dag_run)
        if not mine:
            self.skip(ref, f"already {record.get('state', 'claimed')} by DAG run {record.get('dag_run')}")
            return False
        self._claimed_versions.append(ref)
        if record.get("state") in ("done", "skipped"):
            self.skip(ref, f"already {record['state']} by this DAG run")
            return False
        reg.set_tags(self.client, ref, {reg.TAG_STATE: "claimed", reg.TAG_CLAIMED_BY: self.dag_run})
        fault_point("plan.after_claim")
        return True

    # -- pairing ------------------------------------------------------------------------------------------------
    def partners(self, ref: reg.ModelRef) -> tuple[list[reg.ModelRef], list[reg.ModelRef]]:
        """(fusion partners, enhancement partners) of a claimed version, all on its base."""
        fam = self.params.family_of(ref.name)
        assert fam is not None
        pairing = self.params.pairing
        others = [r for r in self.family_versions(fam.name) if r.key != ref.key and r.sha256 != ref.sha256]
        same_base, foreign = [], []
        for r in others:
            (same_base if r.base_sha256 == ref.base_sha256 else foreign).append(r)
        fusion: list[reg.ModelRef] = []
        if pairing.fusion:
            for domain in sorted({r.domain for r in others} - {ref.domain}):
                pick = self._domain_pick(fam.name, domain)
                if pick is None:
                    continue
                if pick.base_sha256 != ref.base_sha256:
                    self.skipped.append({"version": ref.key, "reason": f"fusion partner {pick.key} ({domain}) has a "
                                         f"different base ({pick.base.split('#')[0]} vs {ref.base.split('#')[0]})"})
                    continue
                fusion.append(pick)
        enhancement: list[reg.ModelRef] = []
        if pairing.enhancement:
            enhancement = sorted((r for r in same_base if r.domain == ref.domain), key=lambda r: -int(r.version))
            for r in foreign:
                if r.domain == ref.domain:
                    self.skipped.append({"version": ref.key, "reason": f"same-domain run {r.key} has a different "
                                         "base; not merged"})
        return fusion[: pairing.max_partners], enhancement[: pairing.max_partners]

    def _domain_pick(self, family: str, domain: str) -> reg.ModelRef | None:
        in_domain = [r for r in self.family_versions(family) if r.domain == domain]
        for name in sorted({r.name for r in in_domain}):
            aliased = reg.alias_ref(self.client, name, self.params.pairing.partner_alias)
            if aliased is not None and aliased.domain == domain:
                return aliased
        return max(in_domain, key=lambda r: (r.created, int(r.version)), default=None)

    # -- workspaces ---------------------------------------------------------------------------------------------
    def fetch_model(self, ref: reg.ModelRef, dest: Path) -> None:
        if not ref.sha256:
            raise SarmergeError(f"{ref.uri}: no {reg.TAG_SHA256} tag; register checkpoints with `sarmerge register`")
        cached(self.params, "models", {"sha256": ref.sha256},
               dest, lambda scratch: reg.download_checkpoint(self.client, ref, scratch))

    def fetch_calib(self, domain: str, parents: list[reg.ModelRef], dest: Path) -> str:
        """This domain's calibration data: from a parent registered with --calib, else from the newest version of the
        domain in the family that has it, else params.yaml fisher.data."""
        import mlflow

        fam = self.params.family_of(parents[0].name)
        family = self.family_versions(fam.name) if fam else []
        others = sorted((r for r in family if r.domain == domain and r.key not in {p.key for p in parents}),
                        key=lambda r: (r.created, int(r.version)), reverse=True)
        for p in [*parents, *others]:
            if p.domain != domain or not p.run_id:
                continue
            try:
                got = mlflow.artifacts.download_artifacts(run_id=p.run_id, artifact_path=CALIB_ARTIFACT,
                                                          dst_path=str(dest.parent / f".calib-{p.run_id}"))
            except Exception:  # registered without --calib
                continue
            shutil.move(got, dest)
            shutil.rmtree(dest.parent / f".calib-{p.run_id}", ignore_errors=True)
            return f"{p.uri} ({CALIB_ARTIFACT})"
        spec = self.params.fisher.data.get(domain)
        if spec is None:
            raise SarmergeError(f"params.yaml fisher.data: no calibration data for domain {domain!r}, and no parent "
                                f"of this domain was registered with --calib")
        src = SHIPPED_CALIB / f"calib_{spec}.jsonl" if re.fullmatch(r"[a-z0-9_]+", spec) else Path(spec)
        if not src.is_file():
            raise SarmergeError(f"params.yaml fisher.data.{domain}: {src} is not a file")
        shutil.copyfile(src, dest)
        return str(src)

    def make_job(self, new: reg.ModelRef, parents: list[reg.ModelRef], kind: str) -> dict[str, Any] | None:
        fam = self.params.family_of(new.name)
        assert fam is not None
        base_uri, base_sha = reg.parse_base_tag(new.base)
        parents = sorted(parents, key=lambda p: (p.name, int(p.version)))
        job_id = job_id_for(base_sha, parents)
        if job_id in self._planned:  # coalesced events: the same parents reached from two new versions
            self.skipped.append({"version": new.key, "reason": f"{kind} job {job_id} is already planned in this run"})
            return self._planned[job_id]
        done = reg.find_by_tags(self.client, **{reg.TAG_JOB: job_id})
        if done:
            self.skipped.append({"version": new.key, "reason": f"{kind} job {job_id} (same parents) was already merged "
                                 f"as {', '.join(r.uri for r in done)}"})
            return None
        # everything that can be checked is checked before the claim: a claim is only written for a job that can run
        suites_by_domain = self.params.evaluate.suites
        domains = sorted({p.domain for p in parents})
        missing = [d for d in domains if d not in suites_by_domain]
        if missing:
            raise SarmergeError(f"params.yaml evaluate.suites: no suite for domain(s) {missing}")
        # every model is scored on every domain's suite: comparable across jobs, and parents' results are reused
        base_ref = reg.resolve_uri(self.client, base_uri)
        if base_ref.sha256 != base_sha:
            raise SarmergeError(f"{new.uri}: its base {base_uri} now has sha256 {base_ref.sha256}, tag says {base_sha}")
        mine, record = self.ledger.claim_job(job_id, self.dag_run, [p.key for p in parents])
        if not mine:
            self.skipped.append({"version": new.key, "reason": f"{kind} job {job_id} (same parents) is planned by "
                                 f"DAG run {record.get('dag_run')}"})
            return None
        self._claimed_jobs.append(job_id)
        names = {p.key: dir_name(p) for p in parents}
        job = JobCfg(id=job_id, family=fam.name, inputs="inputs", out="out", base="base",
                     parents={names[p.key]: JobParent(domain=p.domain, model=p.uri) for p in parents},
                     suites=sorted(set(suites_by_domain.values())))
        meta = {"family": fam.name, "kind": kind, "dag_run": self.dag_run, "trigger": new.uri,
                "base": {"uri": base_ref.uri, "sha256": base_ref.sha256, "tag": new.base},
                "parents": {names[p.key]: {**p.to_json(), "uri": p.uri} for p in parents}}

        def populate(inputs: Path) -> None:
            inputs.mkdir(parents=True)
            self.fetch_model(base_ref, inputs / "base")
            for p in parents:
                self.fetch_model(p, inputs / names[p.key])
            meta["calibration"] = {d: self.fetch_calib(d, parents, inputs / f"calib_{d}.jsonl") for d in domains}

        ws = Workspace.create(self.params.root / "workspaces" / job_id, self.params, job, meta, populate)
        planned = {"id": job_id, "kind": kind, "workspace": str(ws.path), "parents": list(job.parents),
                   "versions": [p.key for p in parents], "trigger": new.key}
        self._planned[job_id] = planned
        return planned

    def plan(self, events: list[tuple[str, str]]) -> dict[str, Any]:
        """Claim, pair and prepare workspaces; when it fails, what this call claimed is released before it raises."""
        try:
            return self._plan(events)
        except BaseException as e:
            self.release_claims(f"plan failed: {e or type(e).__name__}")
            raise

    def release_claims(self, reason: str) -> None:
        for job_id in self._claimed_jobs:
            self.ledger.release_job(job_id, self.dag_run)
        for ref in self._claimed_versions:
            if self.ledger.release_version(ref.name, ref.version, self.dag_run, reason):
                try:  # the tags only mirror the ledger: a registry that is down must not hide the real error
                    reg.set_tags(self.client, ref, {reg.TAG_STATE: "failed", reg.TAG_REASON: reason[:4000]})
                except Exception as e:
                    log.warning("could not mirror the released claim of %s in the registry: %s", ref.key, e)
        log.info("released %d job and %d version claims: %s", len(self._claimed_jobs), len(self._claimed_versions),
                 reason)

    def _plan(self, events: list[tuple[str, str]]) -> dict[str, Any]:
        claimed, jobs = [], []
        for ref in self.candidates(events):
            if not self.claim(ref):
                continue
            claimed.append(ref)
            if not ref.base:
                self.skip(ref, f"no {reg.TAG_BASE} tag: register it with --base", mark=True)
                continue
            fusion, enhancement = self.partners(ref)
            made = []
            for kind, partners in (("fusion", fusion), ("enhancement", enhancement)):
                if partners:
                    job = self.make_job(ref, [ref, *partners], kind)
                    if job is not None:
                        made.append(job)
            if not made:
                reasons = [s["reason"] for s in self.skipped if s["version"] == ref.key]
                self.skip(ref, "; ".join(reasons) or "no partner on the same base yet (it will be one for later "
                          "uploads)", mark=True)
                continue
            ids = ",".join(j["id"] for j in made)
            self.ledger.update_version(ref.name, ref.version, state="claimed", dag_run=self.dag_run, jobs=ids)
            reg.set_tags(self.client, ref, {reg.TAG_JOBS: ids})
            jobs.extend(j for j in made if j not in jobs)
        return self.result(claimed, jobs)

    def result(self, claimed: list[reg.ModelRef], jobs: list[dict[str, Any]]) -> dict[str, Any]:
        methods = list(self.params.merge.methods)
        return {
            "claimed": [r.key for r in claimed],
            "skipped": self.skipped,
            "jobs": jobs,
            "args": step_args(jobs, methods),  # the DAG's mapped tasks: step name → argument lists
        }


def finish(params: Params, client: Any, dag_run: str) -> dict[str, Any]:
    """Mark each version this run claimed: done when every one of its jobs registered, else failed (retryable)."""
    ledger = Ledger(params.root)
    out: dict[str, Any] = {"done": [], "failed": []}
    versions_dir = ledger.dir / "versions"
    for f in sorted(versions_dir.glob("*/*.json")) if versions_dir.is_dir() else []:
        name, version = f.parent.name, f.stem
        record = ledger.version(name, version) or {}
        if record.get("dag_run") != dag_run or record.get("state") != "claimed":
            continue
        job_ids = [j for j in (record.get("jobs") or "").split(",") if j]
        merged = []
        for j in job_ids:
            merged += [r.uri for r in reg.find_by_tags(client, **{reg.TAG_JOB: j})]
        complete = bool(job_ids) and all(reg.find_by_tags(client, **{reg.TAG_JOB: j}) for j in job_ids)
        state = "done" if complete else "failed"
        ledger.update_version(name, version, state=state, merged=merged)
        tags = {reg.TAG_STATE: state}
        if complete:
            tags[reg.TAG_REASON] = f"merged into {', '.join(merged)}"[:4000]
        reg.set_tags(client, reg.get_ref(client, name, version), tags)
        out["done" if complete else "failed"].append(f"{name}/{version}")
    if out["failed"]:
        raise SarmergeError(f"DAG run {dag_run}: versions {out['failed']} did not get every merge registered "
                            "(see the failed tasks); clear the run to retry")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["finish"]:
        p = argparse.ArgumentParser(prog="python -m tasks.plan finish")
        p.add_argument("--dag-run", required=True)
        args = p.parse_args(argv[1:])
        return step_main("tasks.plan", lambda: finish(load_params(), reg.get_client(), args.dag_run))
    p = argparse.ArgumentParser(prog="python -m tasks.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", default="[]", help="JSON list of {name, version}")
    p.add_argument("--dag-run", required=True, help="owner of the claims (the Airflow run id)")
    args = p.parse_args(argv)

    def body() -> dict[str, Any]:
        params = load_params()
        check_methods(params)  # a bad merge.methods entry fails here, before anything is claimed or computed
        return Planner(params, reg.get_client(), args.dag_run).plan(parse_events(args.events))

    return step_main("tasks.plan", body)


if __name__ == "__main__":
    sys.exit(main())
