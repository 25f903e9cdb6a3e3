# One image for every service of the production stack (docker-compose.yaml): the Airflow 3
# components and the MLflow tracking server. DAGs, plugins and the `ml` package are baked in, so
# a worker on another host runs exactly the code the scheduler parsed.
#
# The tag must match apache-airflow in requirements.txt and the Python of pyproject.toml
# (tests/test_compose.py checks both).
FROM apache/airflow:3.3.2-python3.11

# Folders that named volumes mount over. A fresh named volume copies the owner and mode of the
# folder it mounts on, so creating them here (owned by airflow, group 0, group-writable, as the
# official image does for AIRFLOW_HOME) lets every service run as any AIRFLOW_UID with GID 0.
USER root
RUN mkdir -p /opt/airflow/data /opt/airflow/auth /opt/airflow/logs /opt/airflow/project \
        /opt/airflow/scripts /opt/mlflow/artifacts \
    && chown airflow:0 /opt/airflow/data /opt/airflow/auth /opt/airflow/logs \
        /opt/airflow/project /opt/airflow/scripts /opt/mlflow /opt/mlflow/artifacts \
    && chmod 2775 /opt/airflow/data /opt/airflow/logs /opt/mlflow/artifacts \
    && chmod 2770 /opt/airflow/auth
USER airflow

# The pinned lock, installed as the airflow user with Airflow itself held at the image's version
# (https://airflow.apache.org/docs/docker-stack/build.html). Its own layer: code changes below do
# not reinstall TensorFlow.
COPY --chown=airflow:0 requirements.txt /opt/airflow/project/requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" \
        -r /opt/airflow/project/requirements.txt

# The project: the `ml` package (dependencies already in the lock) and the ticker universe.
COPY --chown=airflow:0 pyproject.toml universe.csv /opt/airflow/project/
COPY --chown=airflow:0 ml/ /opt/airflow/project/ml/
RUN pip install --no-cache-dir --no-deps /opt/airflow/project \
    && rm -rf /opt/airflow/project/build /opt/airflow/project/*.egg-info

COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 docker/airflow-init.sh /opt/airflow/scripts/airflow-init.sh
# MLflow's basic-auth settings (no secret in it), read through MLFLOW_AUTH_CONFIG_PATH.
COPY --chown=airflow:0 docker/mlflow-basic-auth.ini /opt/mlflow/basic_auth.ini

# Defaults for running the image on its own; docker-compose.yaml sets the same values.
ENV DATA_DIR=/opt/airflow/data \
    UNIVERSE_FILE=/opt/airflow/project/universe.csv
