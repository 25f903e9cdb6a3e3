"""Starting the project's stacks: `launcher` (the one Airflow/MLflow launcher), `stack` (make demo),
`production_native` (the production topology, natively) and `services` (its PostgreSQL and Redis)."""
