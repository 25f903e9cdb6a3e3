"""SQLite connection arguments for the embedded stack's Airflow metadata database.

On SQLite one writer holds the database at a time; with the scheduler, the dag-processor and the
CLI writing together, pysqlite's 5 s default wait can run out ("database is locked"). Airflow reads
these through `AIRFLOW__DATABASE__SQL_ALCHEMY_CONNECT_ARGS=airflow_sqlite.CONNECT_ARGS` (this folder
is Airflow's plugins folder, which it puts on sys.path before connecting).
"""

CONNECT_ARGS = {"timeout": 60}
