"""ml.servers: the local MLflow launcher refuses a port some other server already holds, and
starts MLflow's basic-auth app the way docker-compose.yaml does."""

from __future__ import annotations

import configparser
import os
import socket
import stat
from pathlib import Path

import pytest
import requests

from ml.servers import DEFAULT_AUTH_SETTINGS, BasicAuth, port_is_free, start_mlflow_server

REPO = Path(__file__).resolve().parents[1]


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert not port_is_free("127.0.0.1", port)
        with pytest.raises(RuntimeError, match="already in use"):
            start_mlflow_server(
                f"sqlite:///{tmp_path / 'mlflow.db'}",
                tmp_path / "artifacts",
                tmp_path / "log",
                port=port,
            )
    assert not (tmp_path / "artifacts").exists()
    assert port_is_free("127.0.0.1", port)


def test_the_default_auth_settings_are_those_of_the_compose_stack() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "docker" / "mlflow-basic-auth.ini")
    for key, value in DEFAULT_AUTH_SETTINGS.items():
        assert config["mlflow"][key] == value, key


def test_a_basic_auth_server_refuses_requests_without_the_login(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    auth = BasicAuth("admin", "an-admin-password", f"sqlite:///{tmp_path / 'auth.db'}")
    server = start_mlflow_server(
        f"sqlite:///{tmp_path / 'mlflow.db'}",
        tmp_path / "artifacts",
        tmp_path / "server.log",
        workers=1,
        auth=auth,
    )
    try:
        url = f"{server.uri}/api/2.0/mlflow/registered-models/search"
        assert requests.get(url, timeout=30).status_code == 401
        assert requests.get(url, auth=("admin", "wrong-password"), timeout=30).status_code == 401
        assert requests.get(url, auth=(auth.username, auth.password), timeout=30).status_code == 200
        client = MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)
        with pytest.raises(MlflowException) as refused:
            client.search_registered_models()
        assert refused.value.get_http_status_code() == 401
        for name, value in auth.client_env().items():  # what the workers get
            monkeypatch.setenv(name, value)
        client.create_registered_model("m")
        assert [m.name for m in client.search_registered_models()] == ["m"]
    finally:
        server.stop()
    ini = tmp_path / "basic_auth.ini"
    assert stat.S_IMODE(os.stat(ini).st_mode) == 0o600
    assert auth.password not in ini.read_text(), "the admin password goes by the environment"
