#!/usr/bin/env bash
# One-shot setup run by the airflow-init service before the other Airflow services start:
# migrate the metadata database, set the admin password, create the pools the DAG uses.
#
# `docker compose up` runs it on every start, so every step is idempotent and .env stays the
# source of truth: the admin password and the pool sizes are reset to its values each time.
set -euo pipefail

: "${AIRFLOW_ADMIN_USERNAME:?AIRFLOW_ADMIN_USERNAME is not set}"
: "${AIRFLOW_ADMIN_PASSWORD:?AIRFLOW_ADMIN_PASSWORD is not set: add it to .env}"
: "${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:?the passwords file is not configured}"
: "${DATA_DIR:?DATA_DIR is not set}"
PRICE_SOURCE_POOL_SLOTS="${PRICE_SOURCE_POOL_SLOTS:-4}"
TRAINING_POOL_SLOTS="${TRAINING_POOL_SLOTS:-2}"

echo "Airflow $(airflow version)"

echo "Migrating the metadata database"
airflow db migrate

# SimpleAuthManager reads {username: password} from this JSON file at every login; a user missing
# from it would get a random password printed to the api-server log instead.
echo "Setting the password of the Airflow admin user '${AIRFLOW_ADMIN_USERNAME}'"
python - <<'PY'
import json
import os
import tempfile
from pathlib import Path

path = Path(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
username = os.environ["AIRFLOW_ADMIN_USERNAME"]
if not username or any(c in username for c in ":, "):
    raise SystemExit(f"AIRFLOW_ADMIN_USERNAME={username!r}: use letters, digits, '-', '_' or '.'")
path.parent.mkdir(parents=True, exist_ok=True)
fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".passwords-")  # mode 0600
with os.fdopen(fd, "w") as handle:
    json.dump({username: os.environ["AIRFLOW_ADMIN_PASSWORD"]}, handle)
    handle.write("\n")
os.replace(tmp, path)
PY

echo "Creating pools"
airflow pools set price_source "${PRICE_SOURCE_POOL_SLOTS}" \
    "Concurrent requests to the price source (Yahoo rate limits) across all workers (PRICE_SOURCE_POOL_SLOTS)"
airflow pools set training "${TRAINING_POOL_SLOTS}" \
    "Concurrent model trainings across all workers: 2 per worker host (TRAINING_POOL_SLOTS)"

if [[ ! -w "${DATA_DIR}" ]]; then
    echo "DATA_DIR=${DATA_DIR} is not writable by uid $(id -u) gid $(id -g)" >&2
    exit 1
fi
echo "Init done"
