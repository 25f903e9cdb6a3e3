#!/usr/bin/env bash
# Creates the MLflow backend database and its own login beside the Airflow metadata database,
# MLflow's basic-auth user database (owned by the same login; docker/mlflow-basic-auth.ini), and
# the forecast ledger's database (owned by the Airflow login, which the tasks use).
# The postgres image runs this once, on the first start with an empty data volume, as the
# superuser from POSTGRES_USER. The password arrives as a psql variable, so it is quoted by psql
# and never spliced into SQL text.
set -euo pipefail

: "${MLFLOW_DB_PASSWORD:?MLFLOW_DB_PASSWORD is not set: add it to .env}"
MLFLOW_DB_USER="${MLFLOW_DB_USER:-mlflow}"
MLFLOW_DB_NAME="${MLFLOW_DB_NAME:-mlflow}"
MLFLOW_AUTH_DB_NAME="${MLFLOW_AUTH_DB_NAME:-mlflow_auth}"

psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER}" --dbname "${POSTGRES_DB}" \
    -v db_user="${MLFLOW_DB_USER}" -v db_name="${MLFLOW_DB_NAME}" \
    -v auth_db_name="${MLFLOW_AUTH_DB_NAME}" \
    -v db_password="${MLFLOW_DB_PASSWORD}" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'db_user', :'db_password')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'db_user')
\gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db_name', :'db_user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db_name')
\gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'auth_db_name', :'db_user')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'auth_db_name')
\gexec
SELECT format('CREATE DATABASE %I OWNER %I', 'ledger', current_user)
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'ledger')
\gexec
SQL
