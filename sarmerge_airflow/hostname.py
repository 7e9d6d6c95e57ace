"""`[core] hostname_callable` for Celery workers that share one machine (the production profile on loopback): the
name each worker records in its task instances, so the API tells which worker ran a task.

    AIRFLOW__CORE__HOSTNAME_CALLABLE=sarmerge_airflow.hostname.worker_hostname  SARMERGE_WORKER_HOSTNAME=worker-gpu

Without SARMERGE_WORKER_HOSTNAME it is Airflow's default (the FQDN). On real hosts leave the setting alone.
"""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    return os.environ.get("SARMERGE_WORKER_HOSTNAME") or socket.getfqdn()
