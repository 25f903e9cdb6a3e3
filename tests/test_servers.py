"""ml.servers: the local MLflow launcher refuses a port some other server already holds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ml.servers import port_is_free, start_mlflow_server


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
