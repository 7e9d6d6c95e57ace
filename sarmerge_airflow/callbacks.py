"""The alert hook: called by Airflow when a pipeline task fails (a regression, a broken merge).

It logs the failure, appends one JSON line to `<pipeline root>/alerts.jsonl` (what the demo and tests read), and POSTs
the same JSON to `$SARMERGE_ALERT_URL` when set (a Slack/Teams/PagerDuty-compatible incoming webhook, say). The URL
is a secret: it comes from the environment and is never logged.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("sarmerge.alert")


def alert(context: Any) -> None:
    from tasks.params import load_params

    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    exc = context.get("exception")
    record = {
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "dag_id": getattr(ti, "dag_id", None),
        "task_id": getattr(ti, "task_id", None),
        "map_index": getattr(ti, "map_index", None),
        "run_id": getattr(dag_run, "run_id", None) or getattr(ti, "run_id", None),
        "try_number": getattr(ti, "try_number", None),
        "error": str(exc)[:2000] if exc else "task failed",
    }
    text = f"sarmerge alert: {record['dag_id']}.{record['task_id']} failed in {record['run_id']}: {record['error']}"
    log.error(text)
    try:
        path = load_params().root / "alerts.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except Exception as e:  # an alert must never raise
        log.error("could not record the alert: %s", e)
    url = os.environ.get("SARMERGE_ALERT_URL")
    if url:
        try:
            req = urllib.request.Request(url, data=json.dumps({**record, "text": text}).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=5).close()
        except Exception as e:
            log.error("could not POST the alert: %s", type(e).__name__)
