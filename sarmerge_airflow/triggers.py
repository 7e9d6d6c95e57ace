"""`MlflowRegistryTrigger`: an Airflow 3 event trigger (for an `AssetWatcher`) that watches the MLflow Model Registry
and fires one event per new RLVR model version of a family.

It polls the registry's REST API asynchronously (no MLflow import in the triggerer's event loop) for versions tagged
`sarmerge.kind=rlvr` whose model name matches the family regex, and emits each version not yet claimed by the pipeline
ledger (`sarmerge.pipeline.state` unset) once per trigger lifetime. After a triggerer restart unprocessed versions
are emitted again: at worst an extra DAG run that finds them claimed, never a lost upload. Exactly-once processing is
the ledger's job (tasks/ledger.py), not the trigger's.

Credentials come from the triggerer's environment (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME/PASSWORD),
never from the trigger's kwargs, which Airflow stores in its database.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseEventTrigger, TriggerEvent

KIND_TAG = "sarmerge.kind"
STATE_TAG = "sarmerge.pipeline.state"
# After the first full scan, later polls page newest-first and stop this far behind the newest version seen
# (clock skew between registry writers).
RESCAN_SLACK_MS = 120_000


def _auth_headers() -> dict[str, str]:
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        import base64

        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


class MlflowRegistryTrigger(BaseEventTrigger):
    def __init__(self, tracking_uri: str, models: str, poll_interval: float = 5.0, kind: str = "rlvr",
                 family: str = "") -> None:
        super().__init__()
        self.tracking_uri = tracking_uri.rstrip("/")
        self.models = models
        self.poll_interval = float(poll_interval)
        self.kind = kind
        self.family = family

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}",
                {"tracking_uri": self.tracking_uri, "models": self.models, "poll_interval": self.poll_interval,
                 "kind": self.kind, "family": self.family})

    async def _search(self, client: Any, newest_seen: int | None) -> list[dict[str, Any]]:
        """RLVR versions of the family, newest first; a full scan the first time, then only the recent ones."""
        pattern = re.compile(self.models)
        out: list[dict[str, Any]] = []
        token = None
        while True:
            query: dict[str, Any] = {"filter": f"tags.`{KIND_TAG}` = '{self.kind}'", "max_results": 200,
                                     "order_by": ["creation_timestamp DESC"]}
            if token:
                query["page_token"] = token
            resp = await client.get(f"{self.tracking_uri}/api/2.0/mlflow/model-versions/search", params=query)
            resp.raise_for_status()
            body = resp.json()
            page = body.get("model_versions", [])
            stop = False
            for mv in page:
                created = int(mv.get("creation_timestamp") or 0)
                if newest_seen is not None and created < newest_seen - RESCAN_SLACK_MS:
                    stop = True
                    break
                if pattern.fullmatch(mv.get("name", "")):
                    out.append(mv)
            token = body.get("next_page_token")
            if stop or not token:
                return out

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import httpx

        emitted: set[tuple[str, str]] = set()
        newest: int | None = None
        async with httpx.AsyncClient(timeout=30.0, headers=_auth_headers()) as client:
            while True:
                poll_started_ms = int(time.time() * 1000)
                try:
                    found = await self._search(client, newest)
                except Exception as e:  # registry down or slow: keep watching
                    self.log.warning("registry poll of %s failed: %s", self.tracking_uri, e)
                    await asyncio.sleep(self.poll_interval)
                    continue
                for mv in sorted(found, key=lambda m: int(m.get("creation_timestamp") or 0)):
                    key = (mv["name"], str(mv["version"]))
                    created = int(mv.get("creation_timestamp") or 0)
                    newest = created if newest is None else max(newest, created)
                    tags = {t["key"]: t.get("value") for t in mv.get("tags", [])}
                    if key in emitted or tags.get(STATE_TAG):
                        continue
                    emitted.add(key)
                    self.log.info("new %s version %s/%s", self.kind, *key)
                    yield TriggerEvent({"name": key[0], "version": key[1], "source": "watcher",
                                        "family": self.family, "created_ms": created, "detected_at": time.time()})
                # scanned up to now: later polls stay incremental (newest-first, stopping RESCAN_SLACK_MS back)
                newest = max(newest or 0, poll_started_ms)
                await asyncio.sleep(self.poll_interval)
