"""SQLite connection arguments for the embedded Airflow (`[database] sql_alchemy_connect_args`).

Airflow standalone keeps its metadata in SQLite. Under load (a burst of DAG runs on two cores) a writer can wait more
than sqlite3's default 5 s for the lock, and the scheduler then dies on "database is locked"; a longer busy timeout
makes writers queue instead.

The API server is the exception. Its action-logging dependency (`api_fastapi/logging/decorators.py`, Airflow 3.3)
commits a sync session on the event loop; when another request's handler holds the write lock and needs the loop to
reach its own commit, the loop waits the full busy timeout and every request, health checks included, stalls with it
(observed: 120 s freezes during a burst of asset-event POSTs). A short timeout there turns that deadlock into one
failed request that its client retries. Production deployments use PostgreSQL and never read this module.
"""

import sys

_API_SERVER = sys.argv[1:2] == ["api-server"]
CONNECT_ARGS = {"timeout": 8 if _API_SERVER else 120}
ASYNC_CONNECT_ARGS = dict(CONNECT_ARGS)
