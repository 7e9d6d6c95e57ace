"""SQLite connection arguments for the embedded Airflow (`[database] sql_alchemy_connect_args`).

Airflow standalone keeps its metadata in SQLite. Under load (a burst of DAG runs on two cores) a writer can wait more
than sqlite3's default 5 s for the lock, and the scheduler then dies on "database is locked"; a longer busy timeout
makes writers queue instead. Production deployments use PostgreSQL and never read this module.
"""

CONNECT_ARGS = {"timeout": 120}
ASYNC_CONNECT_ARGS = {"timeout": 120}
