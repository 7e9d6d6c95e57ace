"""The exactly-once ledger: which DAG run owns which RLVR version and which merge job.

A claim is a file created with O_EXCL under `<pipeline root>/ledger/`, which is atomic on one filesystem: of two
DAG runs racing for a version (an event from the watcher and one from the webhook, or a coalesced run sweeping up
versions another run was triggered for), exactly one wins. The MLflow tags `sarmerge.pipeline.*` mirror the ledger
for people browsing the registry; the files are the authority.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.common import write_json_atomic
from tasks.registry import validate_name, validate_version


class Ledger:
    def __init__(self, root: Path) -> None:
        self.dir = Path(root) / "ledger"

    def _version_file(self, name: str, version: str) -> Path:
        validate_name(name, "model name")
        return self.dir / "versions" / name / f"{validate_version(version)}.json"

    def _job_file(self, job_id: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{1,64}", job_id):  # job ids are params_hash() hex digests
            raise ValueError(f"job id must be a hex digest, got {job_id!r}")
        return self.dir / "jobs" / f"{job_id}.json"

    @staticmethod
    def _claim(path: Path, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        """Create `path` exclusively; returns (won, the record now on disk)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {**record, "at": datetime.now(UTC).isoformat(timespec="seconds")}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False, Ledger._read(path)
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return True, record

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        for _ in range(50):  # a claim being written right now: its creator fills it within microseconds
            try:
                data = json.loads(path.read_text())
                if data:
                    return data
            except (json.JSONDecodeError, FileNotFoundError):
                pass
            import time

            time.sleep(0.02)
        return {"dag_run": "?", "state": "claimed"}

    def claim_version(self, name: str, version: str, dag_run: str) -> tuple[bool, dict[str, Any]]:
        """(True, record) if this DAG run owns the version now (newly, or already from an earlier try).

        A version whose earlier run failed can be taken over: the failed claim is renamed away first, which only one
        contender can do, and the winner then claims afresh."""
        f = self._version_file(name, version)
        won, record = self._claim(f, {"dag_run": dag_run, "state": "claimed"})
        if not won and record.get("state") == "failed" and record.get("dag_run") != dag_run:
            try:
                os.rename(f, f.with_name(f"{f.stem}.failed-{re.sub(r'[^A-Za-z0-9]', '_', record['dag_run'])}"))
            except (FileNotFoundError, KeyError):
                return False, record
            won, record = self._claim(f, {"dag_run": dag_run, "state": "claimed", "previous": record})
        return won or record.get("dag_run") == dag_run, record

    def version(self, name: str, version: str) -> dict[str, Any] | None:
        f = self._version_file(name, version)
        return self._read(f) if f.exists() else None

    def update_version(self, name: str, version: str, **fields: Any) -> dict[str, Any]:
        f = self._version_file(name, version)
        record = {**(self._read(f) if f.exists() else {}), **fields,
                  "updated": datetime.now(UTC).isoformat(timespec="seconds")}
        write_json_atomic(f, record)
        return record

    def claim_job(self, job_id: str, dag_run: str, parents: list[str]) -> tuple[bool, dict[str, Any]]:
        won, record = self._claim(self._job_file(job_id), {"dag_run": dag_run, "parents": parents})
        return won or record.get("dag_run") == dag_run, record

    def release_job(self, job_id: str, dag_run: str) -> bool:
        """Drop this run's claim on a job (its planning failed), so a later run can plan it; another run's is kept."""
        f = self._job_file(job_id)
        if f.exists() and self._read(f).get("dag_run") == dag_run:
            f.unlink(missing_ok=True)
            return True
        return False

    def release_version(self, name: str, version: str, dag_run: str, reason: str) -> bool:
        """Mark this run's claim on a version failed (the takeover path of claim_version lets a later run in)."""
        record = self.version(name, version)
        if record is None or record.get("dag_run") != dag_run or record.get("state") != "claimed":
            return False
        self.update_version(name, version, state="failed", reason=reason[:2000])
        return True

    def job(self, job_id: str) -> dict[str, Any] | None:
        f = self._job_file(job_id)
        return self._read(f) if f.exists() else None
