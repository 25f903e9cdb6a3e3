"""Starting and waiting for local servers: the MLflow tracking server used by the demo and tests."""

from __future__ import annotations

import configparser
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

# Basic-auth settings without a template: docker/mlflow-basic-auth.ini's, bar its database_uri.
DEFAULT_AUTH_SETTINGS = {
    "default_permission": "NO_PERMISSIONS",
    "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on `port`: bound with SO_REUSEADDR, as servers bind, so the
    TIME_WAIT connections of a server just stopped do not count; a listening socket does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_http(
    url: str, timeout: float = 120.0, process: subprocess.Popen | None = None
) -> None:
    """Poll `url` until it answers 200; fail early if `process` exits."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"server exited with code {process.returncode} before {url} answered"
            )
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s ({last_error})")


@dataclass(frozen=True)
class BasicAuth:
    """`mlflow server --app-name basic-auth`: users in `database_uri`, every request needs a login.

    The server creates the admin user `username`/`password` on its first start against an empty
    auth database (and ignores both once that user exists). Clients log in through
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (`client_env`), which the MLflow client
    reads at every request. `template` is an ini whose other settings are kept (database_uri is
    replaced); without one, DEFAULT_AUTH_SETTINGS."""

    username: str
    password: str
    database_uri: str
    template: Path | None = None
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)

    def client_env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_USERNAME": self.username,
            "MLFLOW_TRACKING_PASSWORD": self.password,
        }

    def server_env(self, config_path: Path) -> dict[str, str]:
        """Writes the ini to `config_path`; returns the variables the server reads."""
        config = configparser.ConfigParser()
        if self.template is not None:
            if not config.read(self.template):
                raise FileNotFoundError(self.template)
        else:
            config["mlflow"] = DEFAULT_AUTH_SETTINGS
        config["mlflow"]["database_uri"] = self.database_uri
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        with open(os.open(config_path, flags, 0o600), "w") as handle:  # the URI may hold a password
            config.write(handle)
        return {
            "MLFLOW_AUTH_CONFIG_PATH": str(config_path),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": self.password,
            # Signs the auth app's CSRF tokens: one key for all the server's workers.
            "MLFLOW_FLASK_SERVER_SECRET_KEY": self.secret_key,
        }


@dataclass
class MlflowServer:
    process: subprocess.Popen
    uri: str
    log_path: Path

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_mlflow_server(
    backend_store_uri: str,
    artifacts_dir: Path,
    log_path: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 2,
    timeout: float = 120.0,
    auth: BasicAuth | None = None,
    env: dict[str, str] | None = None,
) -> MlflowServer:
    """Start `mlflow server` (artifacts served through it) and wait until /health answers.
    With `auth`, the basic-auth app (its ini is written beside the log). `env` is added to the
    server's environment (which is this process's otherwise)."""
    port = port or free_port(host)
    if not port_is_free(host, port):
        # Otherwise /health could be answered by whatever server already holds the port.
        raise RuntimeError(
            f"{host}:{port} is already in use (another MLflow server?); stop it or pick another port"
        )
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [
        str(mlflow_bin),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    # The server's background job runner (GenAI evaluation jobs) is not used here: it would start
    # eight more processes per server.
    env = {**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if auth is not None:
        cmd += ["--app-name", "basic-auth"]
        env.update(auth.server_env(log_path.with_name("basic_auth.ini")))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    uri = f"http://{host}:{port}"
    try:
        wait_for_http(f"{uri}/health", timeout, process)
    except Exception:
        MlflowServer(process, uri, log_path).stop()
        raise RuntimeError(f"MLflow server did not start; see {log_path}") from None
    return MlflowServer(process, uri, log_path)


@contextmanager
def sqlite_mlflow_server(root: Path, **kwargs) -> Iterator[MlflowServer]:
    """An MLflow server on a SQLite store in `root` (artifacts and log beside it), stopped on exit."""
    server = start_mlflow_server(
        f"sqlite:///{root / 'mlflow.db'}", root / "artifacts", root / "server.log", **kwargs
    )
    try:
        yield server
    finally:
        server.stop()
