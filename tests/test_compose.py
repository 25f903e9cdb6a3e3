"""The production stack (docker-compose.yaml, Dockerfile, .env.example), checked without Docker.

The compose file is validated against the Compose Specification schema, then held to the contracts
of the production stack: every Airflow service runs one image with one environment that carries the
pipeline's settings, workers scale, only the two UIs publish ports, secrets come from `.env`,
MLflow requires a login that only the workers hold, and the flags and config keys passed to MLflow
and Airflow exist in the installed versions.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
MULTI_HOST_FILE = REPO / "docker" / "compose.multi-host.yaml"
REMOTE_WORKER_FILE = REPO / "docker" / "compose.remote-worker.yaml"
COMPOSE_FILES = (COMPOSE_FILE, MULTI_HOST_FILE, REMOTE_WORKER_FILE)
ENV_EXAMPLE = REPO / ".env.example"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
AIRFLOW_INIT_SCRIPT = REPO / "docker" / "airflow-init.sh"
POSTGRES_INIT_SCRIPT = REPO / "docker" / "postgres-init.sh"
MLFLOW_AUTH_INI = REPO / "docker" / "mlflow-basic-auth.ini"
# The Compose Specification's JSON schema (compose-spec/compose-spec, Apache-2.0: LICENSE beside it).
COMPOSE_SCHEMA = REPO / "tests" / "fixtures" / "compose" / "compose-spec.json"

AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
)
EXPECTED_SERVICES = {"postgres", "redis", "mlflow", *AIRFLOW_SERVICES}
# What the tasks and the Airflow components read; each must be set on every Airflow service.
REQUIRED_AIRFLOW_ENV = (
    "PRICE_SOURCE",
    "DATA_DIR",
    "MLFLOW_TRACKING_URI",
    "UNIVERSE_FILE",
    "AIRFLOW__CORE__EXECUTOR",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
    "AIRFLOW__CELERY__BROKER_URL",
    "AIRFLOW__CELERY__RESULT_BACKEND",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
    "AIRFLOW__CORE__FERNET_KEY",
    "AIRFLOW__API_AUTH__JWT_SECRET",
    "AIRFLOW__API__SECRET_KEY",
)
# Variables a service may add to the shared environment (never change).
EXTRA_ENV_ALLOWED = {
    # The MLflow login: only the workers run tasks, so only they hold it.
    "airflow-worker": {"DUMB_INIT_SETSID", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
    "airflow-init": {
        "AIRFLOW_ADMIN_USERNAME",
        "AIRFLOW_ADMIN_PASSWORD",
        "PRICE_SOURCE_POOL_SLOTS",
        "TRAINING_POOL_SLOTS",
    },
}
PUBLISHED_PORTS = {"airflow-apiserver": {8080}, "mlflow": {5000}}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|FERNET|JWT|TOKEN|_KEY$")


# --- Reading the files ---------------------------------------------------------------------------

_INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Resolve compose's `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$` like compose does.

    A required variable that `env` leaves empty (a secret in .env.example) resolves to a
    placeholder, `example_<name>`, so URLs built from it stay parseable.
    """

    def resolve(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["name"] or match["bare"], match["op"], match["arg"] or ""
        value = env.get(name)
        is_set = value is not None if op and not op.startswith(":") else bool(value)
        if op in (":-", "-"):
            return value if is_set and value is not None else arg
        if op in (":+", "+"):
            return arg if is_set else ""
        if op in (":?", "?") and not is_set:
            return f"example_{name.lower()}"
        return value or ""

    return _INTERPOLATION.sub(resolve, text)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """`interpolate` applied to every string value of a loaded YAML document (not to keys)."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(item, env) for item in node]
    return node


def variables_used(text: str) -> dict[str, bool]:
    """{name: required} for every `${VAR...}` in `text`; required means no default to fall back on."""
    used: dict[str, bool] = {}
    for match in _INTERPOLATION.finditer(text):
        name = match["name"] or match["bare"]
        if name:
            required = match["op"] is None or "?" in match["op"]
            used[name] = used.get(name, False) or required
    return used


def read_env_file(path: Path) -> tuple[dict[str, str], set[str]]:
    """(values set, names only mentioned in `# NAME=...` comments) of a .env-style file."""
    values: dict[str, str] = {}
    mentioned: set[str] = set()
    for line in path.read_text().splitlines():
        if match := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line.strip()):
            values[match[1]] = match[2].strip()
        elif match := re.match(r"^#\s*([A-Z_][A-Z0-9_]*)=", line.strip()):
            mentioned.add(match[1])
    return values, mentioned


def walk_strings(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(path, string) for every string value in a loaded YAML document."""
    if isinstance(node, str):
        yield path, node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from walk_strings(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from walk_strings(item, f"{path}[{index}]")


def as_env(environment: Any) -> dict[str, str]:
    """A service's `environment`, in map or `KEY=VALUE` list form, as a dict."""
    if isinstance(environment, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in environment)
    return {key: "" if value is None else str(value) for key, value in (environment or {}).items()}


def as_argv(command: Any) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(arg) for arg in command or []]


def option_value(argv: list[str], flag: str) -> str:
    """The value after `flag` (or in `flag=value`) in an argument list."""
    for index, arg in enumerate(argv):
        if arg == flag:
            return argv[index + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{flag} is not in {argv}")


def published_ports(service: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(host ip, host port, container port) of each port a service publishes on the host."""
    result = []
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            if entry.get("published") is not None:
                result.append(
                    (entry.get("host_ip", ""), int(entry["published"]), int(entry["target"]))
                )
            continue
        spec = str(entry).split("/")[0]
        parts = spec.rsplit(":", 2)
        if len(parts) == 1:  # container port only: a random host port
            result.append(("", 0, int(parts[0])))
        else:
            host_ip = parts[0] if len(parts) == 3 else ""
            result.append((host_ip.strip("[]"), int(parts[-2]), int(parts[-1])))
    return result


def volume_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """{target: source} of a service's volumes, in short or long syntax."""
    mounts = {}
    for entry in service.get("volumes", []):
        if isinstance(entry, dict):
            mounts[entry["target"]] = entry.get("source", "")
        else:
            source, target = str(entry).split(":")[:2]
            mounts[target] = source
    return mounts


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~", "$"))


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    """{target: condition} of a service's depends_on, in list or map form."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def healthcheck_text(service: Mapping[str, Any]) -> str:
    test = (service.get("healthcheck") or {}).get("test", [])
    return test if isinstance(test, str) else " ".join(test)


# --- Fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    return read_env_file(ENV_EXAMPLE)[0]


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """docker-compose.yaml as loaded (YAML anchors and merge keys resolved, `${...}` kept)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], env_example: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yaml with `${...}` resolved from .env.example's values."""
    return interpolate_tree(raw, env_example)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


@pytest.fixture(scope="module")
def common_env(compose: dict[str, Any]) -> dict[str, str]:
    return as_env(compose["x-airflow-common"]["environment"])


@pytest.fixture(scope="module")
def mlflow_argv(services: dict[str, Any]) -> list[str]:
    return as_argv(services["mlflow"]["command"])


# --- Schema and services ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_compose_files_match_the_compose_specification_schema(path: Path) -> None:
    if not COMPOSE_SCHEMA.is_file():
        pytest.skip(f"the Compose Specification schema is not at {COMPOSE_SCHEMA}")
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    document = yaml.safe_load(path.read_text())
    errors = sorted(
        validator_class(schema).iter_errors(document), key=lambda e: list(e.absolute_path)
    )
    assert not errors, "\n".join(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


def test_every_service_of_the_stack_is_defined(services: dict[str, Any]) -> None:
    missing = EXPECTED_SERVICES - set(services)
    assert not missing, f"services missing from docker-compose.yaml: {sorted(missing)}"


def test_airflow_services_and_mlflow_run_the_one_project_image(
    compose: dict[str, Any], services: dict[str, Any]
) -> None:
    common = compose["x-airflow-common"]
    assert common.get("build"), "x-airflow-common must build the project image from ./Dockerfile"
    assert common["build"]["context"] == "."
    assert common["build"].get("dockerfile", "Dockerfile") == DOCKERFILE.name
    for name in (*AIRFLOW_SERVICES, "mlflow"):
        service = services[name]
        assert service.get("image") == common["image"], f"{name} runs another image"
        assert service.get("build") == common["build"], f"{name} builds another image"
    for name in (*AIRFLOW_SERVICES, "mlflow"):
        assert services[name].get("user") == common["user"], f"{name} runs as another user"


def test_airflow_services_share_the_common_environment(
    services: dict[str, Any], common_env: dict[str, str]
) -> None:
    for name in AIRFLOW_SERVICES:
        env = as_env(services[name].get("environment"))
        changed = {k for k in common_env if env.get(k) != common_env[k]}
        assert not changed, f"{name} drops or changes shared variables: {sorted(changed)}"
        extra = set(env) - set(common_env) - EXTRA_ENV_ALLOWED.get(name, set())
        assert not extra, f"{name} adds variables outside x-airflow-common: {sorted(extra)}"


def test_settings_the_code_reads_are_set_on_every_airflow_service(
    services: dict[str, Any],
) -> None:
    for name in AIRFLOW_SERVICES:
        env = as_env(services[name].get("environment"))
        unset = [key for key in REQUIRED_AIRFLOW_ENV if not env.get(key)]
        assert not unset, f"{name} lacks {unset}"
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
        assert env["PRICE_SOURCE"] in ("yahoo", "synthetic")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql://")
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://")


def test_every_variable_ml_config_reads_is_passed_to_airflow_services(
    common_env: dict[str, str],
) -> None:
    from tests.conftest import names_read_by_settings

    missing = sorted(names_read_by_settings() - set(common_env))
    assert not missing, (
        f"ml/config.py reads {missing}, which docker-compose.yaml never passes to the Airflow "
        "services: add `NAME: ${NAME:-}` to x-airflow-common's environment and document it in "
        ".env.example"
    )


def test_services_that_depend_on_urls_point_at_services_that_exist(
    services: dict[str, Any], common_env: dict[str, str]
) -> None:
    for key in (
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN",
        "AIRFLOW__CELERY__RESULT_BACKEND",
        "AIRFLOW__CELERY__BROKER_URL",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL",
        "MLFLOW_TRACKING_URI",
    ):
        host = urlsplit(common_env[key]).hostname
        assert host in services, f"{key} points at {host!r}, which is not a service"
    execution_api = urlsplit(common_env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert execution_api.hostname == "airflow-apiserver"
    assert execution_api.port == 8080
    assert execution_api.path == "/execution/"


# --- Ports, volumes, dependencies, healthchecks ------------------------------------------------


def test_the_worker_scales(services: dict[str, Any]) -> None:
    worker = services["airflow-worker"]
    assert as_argv(worker["command"]) == ["celery", "worker"]
    for key in ("container_name", "ports", "hostname"):
        assert key not in worker, f"airflow-worker sets {key}: `--scale airflow-worker=N` breaks"


def test_only_the_two_uis_publish_host_ports(services: dict[str, Any]) -> None:
    for name in ("postgres", "redis"):
        assert not services[name].get("ports"), f"{name} must not publish ports to the host"
    for name, service in services.items():
        assert service.get("network_mode") != "host", f"{name} uses the host network"
        ports = published_ports(service)
        host_ports = {host_port for _, host_port, _ in ports}
        assert host_ports == PUBLISHED_PORTS.get(name, set()), f"{name} publishes {ports}"
        for _, host_port, _ in ports:
            assert host_port >= 1024, f"{name} publishes privileged port {host_port}"


def test_named_volumes_are_declared_and_used(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = {
        source
        for service in compose["services"].values()
        for source in volume_mounts(service).values()
        if is_named_volume(source)
    }
    assert not used - declared, f"volumes used but not declared: {sorted(used - declared)}"
    assert not declared - used, f"volumes declared but unused: {sorted(declared - used)}"


def test_bind_mounted_files_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for source in volume_mounts(service).values():
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts {source}, which does not exist"


def test_dependencies_exist_and_can_be_waited_for(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, condition in depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            if condition == "service_healthy":
                assert healthcheck_text(services[target]), (
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
                )
                assert not services[target]["healthcheck"].get("disable")
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") in ("no", "on-failure"), (
                    f"{name} waits for {target} to complete, but {target} restarts forever"
                )
            else:
                assert condition == "service_started", f"{name}: unknown condition {condition}"


def test_dependencies_have_no_cycle(services: dict[str, Any]) -> None:
    done: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"depends_on cycle: {' -> '.join((*stack, name))}"
        if name not in done:
            for target in depends_on(services.get(name, {})):
                visit(target, (*stack, name))
            done.add(name)

    for name in services:
        visit(name, ())


def test_airflow_services_wait_for_the_databases_and_the_init_job(
    services: dict[str, Any],
) -> None:
    for name in AIRFLOW_SERVICES:
        deps = depends_on(services[name])
        assert deps.get("postgres") == "service_healthy", name
        assert deps.get("redis") == "service_healthy", name
        if name != "airflow-init":
            assert deps.get("airflow-init") == "service_completed_successfully", name
    worker_deps = depends_on(services["airflow-worker"])
    assert worker_deps.get("mlflow") == "service_healthy"
    assert worker_deps.get("airflow-apiserver") == "service_healthy"
    assert depends_on(services["mlflow"]).get("postgres") == "service_healthy"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("postgres", "pg_isready"),
        ("redis", "redis-cli ping"),
        ("airflow-apiserver", "curl --fail http://localhost:8080/api/v2/version"),
        ("airflow-scheduler", "curl --fail http://localhost:8974/health"),
        ("airflow-dag-processor", "airflow jobs check --job-type DagProcessorJob"),
        ("airflow-triggerer", "airflow jobs check --job-type TriggererJob"),
        ("airflow-worker", "celery_executor.app inspect ping"),
        ("mlflow", "curl --fail http://localhost:5000/health"),
    ],
)
def test_long_running_services_have_healthchecks(
    services: dict[str, Any], name: str, expected: str
) -> None:
    assert expected in healthcheck_text(services[name])


def test_the_scheduler_health_endpoint_is_enabled(common_env: dict[str, str]) -> None:
    assert common_env.get("AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK", "").lower() == "true"


# --- Secrets and .env.example ----------------------------------------------------------------------

_ONLY_REQUIRED_VARIABLE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]*\}$")


def test_secrets_come_from_env_not_from_the_compose_file(raw: dict[str, Any]) -> None:
    """Secret-looking values and URL passwords must be a required `${VAR:?...}`: no literal, no default."""
    for name, service in raw["services"].items():
        for key, value in as_env(service.get("environment")).items():
            if SECRET_NAME.search(key) and not key.endswith("_FILE"):
                assert _ONLY_REQUIRED_VARIABLE.match(value), f"{name}: {key}={value!r}"
        argv = as_argv(service.get("command"))
        for flag in ("--requirepass", "--password"):
            if flag in argv:
                assert _ONLY_REQUIRED_VARIABLE.match(option_value(argv, flag)), f"{name} {flag}"
    urls_with_credentials = 0
    for path, value in walk_strings(raw):
        for match in re.finditer(r"://[^:/@\s]*:(?P<password>\$\{[^}]*\}|[^/@\s]*)@", value):
            urls_with_credentials += 1
            assert _ONLY_REQUIRED_VARIABLE.match(match["password"]), f"{path}: literal password"
    assert urls_with_credentials >= 4, "the database and broker URLs were not found"


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_env_example_lists_every_variable_the_compose_files_use(path: Path) -> None:
    values, mentioned = read_env_file(ENV_EXAMPLE)
    used = variables_used(path.read_text())
    required_missing = sorted(
        name for name, required in used.items() if required and name not in values
    )
    undocumented = sorted(set(used) - set(values) - mentioned)
    if path == COMPOSE_FILE:
        assert not required_missing, f".env.example lacks required {required_missing}"
    assert not undocumented, f".env.example does not mention {undocumented}"


def test_env_example_holds_no_secret_and_nothing_stale() -> None:
    values, mentioned = read_env_file(ENV_EXAMPLE)
    secrets = {k: v for k, v in values.items() if SECRET_NAME.search(k)}
    assert secrets and not any(secrets.values()), f"secrets with values in .env.example: {secrets}"
    used: set[str] = set()
    for path in COMPOSE_FILES:
        used |= set(variables_used(path.read_text()))
    stale = sorted((set(values) | mentioned) - used)
    assert not stale, f".env.example lists variables no compose file uses: {stale}"


def test_env_and_local_state_stay_out_of_git_and_the_image() -> None:
    assert ".env" in (REPO / ".gitignore").read_text().split()
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore must start by excluding everything (an allow-list)"
    reincluded = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert not reincluded & {".env", ".venv", ".git", ".state"}


# --- Dockerfile ------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [
        (parts[0].upper(), parts[1] if len(parts) > 1 else "")
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
        for parts in [line.strip().split(None, 1)]
    ]


def dockerfile_copies() -> dict[str, str]:
    """{source: destination} of the Dockerfile's COPY instructions."""
    copies = {}
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            for source in words[:-1]:
                destination = words[-1]
                if destination.endswith("/") and not source.endswith("/"):
                    destination += source
                copies[source.rstrip("/")] = destination.rstrip("/")
    return copies


def test_the_image_tag_matches_the_pinned_airflow_and_python() -> None:
    froms = [args for instruction, args in dockerfile_instructions() if instruction == "FROM"]
    match = re.fullmatch(r"apache/airflow:(?P<airflow>[\w.]+)-python(?P<python>\d+\.\d+)", froms[0])
    assert match, f"the Dockerfile must extend apache/airflow:<version>-python<x.y>, not {froms[0]}"
    pinned = re.search(r"^apache-airflow==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert pinned, "requirements.txt does not pin apache-airflow"
    assert match["airflow"] == pinned[1]
    requires_python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "requires-python"
    ]
    assert f">={match['python']}" in requires_python.replace(" ", "")


def test_the_image_installs_the_lock_with_airflow_held_and_the_project() -> None:
    runs = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    assert re.search(r'pip install --no-cache-dir "apache-airflow==\$\{AIRFLOW_VERSION\}"', runs)
    assert re.search(r"-r \S*requirements\.txt", runs)
    copies = dockerfile_copies()
    for source in ("requirements.txt", "pyproject.toml", "universe.csv", "ml", "dags", "plugins"):
        assert source in copies, f"the Dockerfile does not copy {source}"
    project_dir = Path(copies["pyproject.toml"]).parent
    assert re.search(rf"pip install [^&]*--no-deps {project_dir}(\s|$)", runs)
    assert copies["dags"] == "/opt/airflow/dags"
    assert copies["plugins"] == "/opt/airflow/plugins"
    lines = DOCKERIGNORE.read_text().split()
    for source in copies:
        assert f"!{source}" in lines or f"!{source}/" in lines, f".dockerignore drops {source}"


def test_paths_in_the_environment_exist_in_the_image(
    services: dict[str, Any], common_env: dict[str, str]
) -> None:
    copies = dockerfile_copies()
    assert common_env["UNIVERSE_FILE"] == copies["universe.csv"]
    init_argv = as_argv(services["airflow-init"]["command"])
    assert init_argv[-1] == copies[str(AIRFLOW_INIT_SCRIPT.relative_to(REPO))]
    for name in AIRFLOW_SERVICES:
        mounts = volume_mounts(services[name])
        assert is_named_volume(mounts.get(common_env["DATA_DIR"], "")), (
            f"{name} does not mount a named volume at DATA_DIR={common_env['DATA_DIR']}"
        )
    data_volumes = {volume_mounts(services[n])[common_env["DATA_DIR"]] for n in AIRFLOW_SERVICES}
    assert len(data_volumes) == 1, (
        f"Airflow services mount different DATA_DIR volumes: {data_volumes}"
    )


# --- PostgreSQL, pools -----------------------------------------------------------------------------


def test_postgres_init_script_creates_the_mlflow_database(services: dict[str, Any]) -> None:
    postgres = services["postgres"]
    mounts = volume_mounts(postgres)
    init_targets = [t for t, s in mounts.items() if t.startswith("/docker-entrypoint-initdb.d/")]
    assert len(init_targets) == 1
    assert mounts[init_targets[0]] == f"./{POSTGRES_INIT_SCRIPT.relative_to(REPO)}"
    assert os.access(POSTGRES_INIT_SCRIPT, os.X_OK)
    script = POSTGRES_INIT_SCRIPT.read_text()
    user = re.search(r'MLFLOW_DB_USER="\$\{MLFLOW_DB_USER:-(\w+)\}"', script)
    database = re.search(r'MLFLOW_DB_NAME="\$\{MLFLOW_DB_NAME:-(\w+)\}"', script)
    assert user and database
    backend = urlsplit(as_env(services["mlflow"]["environment"])["MLFLOW_BACKEND_STORE_URI"])
    assert backend.hostname == "postgres"
    assert backend.username == user[1]
    assert backend.path == f"/{database[1]}" == "/mlflow"
    assert "MLFLOW_DB_PASSWORD" in as_env(postgres["environment"])


def test_the_init_job_creates_both_pools(services: dict[str, Any]) -> None:
    script = AIRFLOW_INIT_SCRIPT.read_text()
    env = as_env(services["airflow-init"]["environment"])
    pools = (("price_source", "PRICE_SOURCE_POOL_SLOTS", 4), ("training", "TRAINING_POOL_SLOTS", 2))
    for pool, variable, default in pools:
        assert re.search(rf'airflow pools set {pool} "\$\{{{variable}\}}"', script), pool
        assert int(env[variable]) == default, f"{variable} should default to {default}"


def pools_created_by_init_job(services: Mapping[str, Any]) -> dict[str, int]:
    """{pool: default slots} of the `airflow pools set NAME "${VARIABLE}"` lines of the init script."""
    env = as_env(services["airflow-init"]["environment"])
    script = AIRFLOW_INIT_SCRIPT.read_text()
    return {
        name: int(env[variable])
        for name, variable in re.findall(r'^\s*airflow pools set (\w+) "\$\{(\w+)\}"', script, re.M)
    }


def pools_used_by_dags() -> set[str]:
    """Pool names passed as `pool=` (a literal or a module-level string constant) in dags/*.py."""
    used = set()
    for path in sorted((REPO / "dags").glob("*.py")):
        tree = ast.parse(path.read_text())
        constants = {
            target.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for target in node.targets
            if isinstance(target, ast.Name) and isinstance(node.value.value, str)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "pool":
                if isinstance(node.value, ast.Constant):
                    used.add(node.value.value)
                elif isinstance(node.value, ast.Name) and node.value.id in constants:
                    used.add(constants[node.value.id])
    return used


def test_the_init_job_creates_every_pool_the_dags_use(services: dict[str, Any]) -> None:
    used = pools_used_by_dags()
    if not used:
        pytest.skip("no DAG in dags/ names a pool yet")
    missing = sorted(used - set(pools_created_by_init_job(services)))
    assert not missing, (
        f"DAG tasks use pools {missing} that docker/airflow-init.sh never creates: "
        "the scheduler would never run them"
    )


def test_the_compose_stack_and_the_launcher_create_the_same_pools(
    services: dict[str, Any],
) -> None:
    """scripts/launcher.py's POOLS are what make demo, the native topology, the benchmarks and the
    scheduler tests create; compose's init job must create the same, with the same slots."""
    launcher = REPO / "scripts" / "launcher.py"
    pools = {}
    for node in ast.parse(launcher.read_text()).body:
        if isinstance(node, ast.AnnAssign | ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "POOLS"
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        ):
            pools = {name: value[0] for name, value in ast.literal_eval(node.value).items()}
    assert pools, "scripts/launcher.py defines no POOLS"
    assert pools_created_by_init_job(services) == pools


# --- MLflow ----------------------------------------------------------------------------------------


def test_the_tracking_uri_points_at_the_mlflow_server(
    services: dict[str, Any], common_env: dict[str, str], mlflow_argv: list[str]
) -> None:
    uri = urlsplit(common_env["MLFLOW_TRACKING_URI"])
    port = int(option_value(mlflow_argv, "--port"))
    assert (uri.scheme, uri.hostname, uri.port) == ("http", "mlflow", port)
    assert option_value(mlflow_argv, "--host") == "0.0.0.0"
    assert {target for _, _, target in published_ports(services["mlflow"])} == {port}


def test_mlflow_serves_artifacts_from_a_named_volume(
    services: dict[str, Any], mlflow_argv: list[str]
) -> None:
    assert mlflow_argv[:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in mlflow_argv
    destination = option_value(mlflow_argv, "--artifacts-destination")
    assert is_named_volume(volume_mounts(services["mlflow"]).get(destination, ""))
    backend = as_env(services["mlflow"]["environment"])["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql")


def test_mlflow_server_flags_and_variables_exist_in_the_installed_mlflow(
    services: dict[str, Any], mlflow_argv: list[str]
) -> None:
    import mlflow.environment_variables
    from mlflow.cli import server

    options = {opt for param in server.params for opt in (*param.opts, *param.secondary_opts)}
    flags = [arg.split("=")[0] for arg in mlflow_argv[2:] if arg.startswith("-")]
    assert not set(flags) - options, f"unknown mlflow server flags: {sorted(set(flags) - options)}"
    envvars = {param.envvar for param in server.params if isinstance(param.envvar, str)}
    # Or read by the basic-auth app: its variables are declared in mlflow.environment_variables.
    envvars |= {
        getattr(value, "name", None) for value in vars(mlflow.environment_variables).values()
    }
    mlflow_env = {k for k in as_env(services["mlflow"]["environment"]) if k.startswith("MLFLOW_")}
    assert not mlflow_env - envvars, f"mlflow server reads none of {sorted(mlflow_env - envvars)}"


def test_mlflow_requires_a_login_and_keeps_its_users_in_postgres(
    services: dict[str, Any], mlflow_argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--app-name basic-auth`, with the ini baked into the image: users in the `mlflow_auth`
    database that docker/postgres-init.sh creates, nothing granted to anyone but the admin, and
    the admin, the database password and the Flask key from the environment (.env)."""
    import flask_wtf  # noqa: F401  the basic-auth app's dependency (mlflow[auth])
    from mlflow.server.auth.config import DEFAULT_AUTHORIZATION_FUNCTION, read_auth_config

    assert option_value(mlflow_argv, "--app-name") == "basic-auth"
    for package in ("flask-wtf", "wtforms"):
        assert re.search(rf"^{package}==", (REPO / "requirements.txt").read_text(), re.M), package
    env = as_env(services["mlflow"]["environment"])
    ini = str(MLFLOW_AUTH_INI.relative_to(REPO))
    assert dockerfile_copies().get(ini) == env["MLFLOW_AUTH_CONFIG_PATH"], (
        f"MLFLOW_AUTH_CONFIG_PATH is not where the Dockerfile copies {ini}"
    )
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(MLFLOW_AUTH_INI))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    config = read_auth_config()
    assert config.default_permission == "NO_PERMISSIONS"
    assert config.authorization_function == DEFAULT_AUTHORIZATION_FUNCTION
    assert config.admin_password is None, "the admin password must come from the environment"
    assert not config.grant_default_workspace_access
    database = urlsplit(config.database_uri)
    script = POSTGRES_INIT_SCRIPT.read_text()
    user = re.search(r'MLFLOW_DB_USER="\$\{MLFLOW_DB_USER:-(\w+)\}"', script)
    name = re.search(r'MLFLOW_AUTH_DB_NAME="\$\{MLFLOW_AUTH_DB_NAME:-(\w+)\}"', script)
    assert user and name and ":'auth_db_name'" in script
    assert database.scheme == "postgresql+psycopg2"
    assert (database.hostname, database.username) == ("postgres", user[1])
    assert database.path == f"/{name[1]}" == "/mlflow_auth"
    assert database.password is None, "no password in the ini: libpq reads PGPASSWORD"
    assert env["PGPASSWORD"] == urlsplit(env["MLFLOW_BACKEND_STORE_URI"]).password
    for key in (
        "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD",
        "MLFLOW_FLASK_SERVER_SECRET_KEY",
    ):
        assert env.get(key), f"the mlflow service lacks {key}"


def test_only_the_workers_hold_the_mlflow_login(
    raw: dict[str, Any], env_example: dict[str, str]
) -> None:
    """Tasks run on the Celery workers (local and remote), whose MLflow client logs in as the admin
    the mlflow service creates; no other service gets the login."""
    from mlflow.environment_variables import MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_USERNAME

    values = {**env_example, "MLFLOW_ADMIN_USERNAME": "pipeline", "MLFLOW_ADMIN_PASSWORD": "pw"}
    services = interpolate_tree(raw, values)["services"]
    mlflow_env = as_env(services["mlflow"]["environment"])
    login = {
        MLFLOW_TRACKING_USERNAME.name: mlflow_env["MLFLOW_AUTH_ADMIN_USERNAME"],
        MLFLOW_TRACKING_PASSWORD.name: mlflow_env["MLFLOW_AUTH_ADMIN_PASSWORD"],
    }
    assert login == {"MLFLOW_TRACKING_USERNAME": "pipeline", "MLFLOW_TRACKING_PASSWORD": "pw"}
    override = yaml.safe_load(REMOTE_WORKER_FILE.read_text())["services"]["airflow-worker"]
    remote = {
        **as_env(services["airflow-worker"]["environment"]),
        **as_env(interpolate_tree(override, values).get("environment")),
    }
    for name, env in [*((n, as_env(services[n].get("environment"))) for n in AIRFLOW_SERVICES),
                      ("remote airflow-worker", remote)]:  # fmt: skip
        held = {key: env[key] for key in login if key in env}
        if name.endswith("airflow-worker"):
            assert held == login, f"{name} does not log in to MLflow as its admin: {held}"
        else:
            assert not held, f"{name} holds the MLflow login but runs no task"


def test_mlflow_accepts_the_host_names_its_clients_use(
    common_env: dict[str, str], mlflow_argv: list[str]
) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    allowed = [host.strip() for host in option_value(mlflow_argv, "--allowed-hosts").split(",")]
    assert "*" not in allowed, "--allowed-hosts '*' turns off MLflow's DNS-rebinding guard"
    clients = [
        urlsplit(common_env["MLFLOW_TRACKING_URI"]).netloc,
        "localhost:5000",
        "10.0.0.10:5000",
    ]
    for host in clients:
        assert is_allowed_host_header(allowed, host), f"MLflow would answer {host} with 403"
    assert not is_allowed_host_header(allowed, "attacker.example.com")


# --- Airflow ---------------------------------------------------------------------------------------

_AIRFLOW_PROBE = r"""
import contextlib, importlib, io, json, sys
from airflow.configuration import conf
conf.load_providers_configuration()
from airflow.cli.cli_parser import get_parser

request = json.loads(sys.argv[1])
described = conf.configuration_description
options = {s: sorted(d.get("options", {})) for s, d in described.items()}
deprecated = sorted({f"{old[0]}.{old[1]}" for old in conf.deprecated_options.values()})
errors = {}
parser = get_parser()
for argv in request["cli"]:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            parser.parse_args(argv)
    except SystemExit:
        errors[" ".join(argv)] = out.getvalue().strip().splitlines()[-1:]
imports = {}
for path in request["imports"]:
    module, _, attr = path.rpartition(".")
    try:
        getattr(importlib.import_module(module), attr)
    except Exception as exc:
        imports[path] = repr(exc)
print("PROBE " + json.dumps({"options": options, "deprecated": deprecated,
                             "cli_errors": errors, "import_errors": imports}))
"""


def airflow_cli_calls(services: Mapping[str, Any]) -> list[list[str]]:
    """Every Airflow CLI invocation of the stack: service commands, healthchecks, the init script."""
    calls = [
        as_argv(services[name]["command"]) for name in AIRFLOW_SERVICES if name != "airflow-init"
    ]
    for name in AIRFLOW_SERVICES:
        for command in re.findall(r"\bairflow ([^|&;']+)", healthcheck_text(services[name])):
            calls.append(shlex.split(re.sub(r"\$\{?HOSTNAME\}?", "host", command)))
    script = AIRFLOW_INIT_SCRIPT.read_text().replace("\\\n", " ")
    for line in script.splitlines():
        if line.strip().startswith("airflow "):
            calls.append(shlex.split(re.sub(r"\$\{?\w+\}?", "1", line.strip()))[1:])
    return calls


@pytest.fixture(scope="module")
def airflow_probe(services: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """What the installed Airflow knows, asked in a child process with a throwaway AIRFLOW_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(
        AIRFLOW_HOME=str(tmp_path_factory.mktemp("airflow_home")),
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor",
        AIRFLOW__CORE__LOAD_EXAMPLES="false",
    )
    common = as_env(services["airflow-apiserver"]["environment"])
    request = {
        "cli": airflow_cli_calls(services),
        "imports": [
            common["AIRFLOW__CORE__AUTH_MANAGER"],
            "airflow.providers.celery.executors.celery_executor.app",
        ],
    }
    result = subprocess.run(
        [sys.executable, "-c", _AIRFLOW_PROBE, json.dumps(request)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("PROBE "))


def airflow_config_keys(text: str) -> set[tuple[str, str]]:
    """(section, key) of every AIRFLOW__SECTION__KEY variable set in a compose file."""
    keys = set()
    for match in re.finditer(r"^\s*AIRFLOW__([A-Z0-9_]+?)__([A-Z0-9_]+):", text, re.M):
        keys.add((match[1].lower(), match[2].lower()))
    return keys


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.name)
def test_airflow_config_keys_exist_in_the_installed_airflow(
    path: Path, airflow_probe: dict
) -> None:
    keys = airflow_config_keys(path.read_text())
    unknown = sorted(
        f"{section}.{key}"
        for section, key in keys
        if key not in airflow_probe["options"].get(section, [])
    )
    assert not unknown, f"no such Airflow config option: {unknown}"
    deprecated = sorted({f"{s}.{k}" for s, k in keys} & set(airflow_probe["deprecated"]))
    assert not deprecated, f"deprecated Airflow config names: {deprecated}"


def test_airflow_commands_and_classes_of_the_stack_exist(airflow_probe: dict) -> None:
    assert not airflow_probe["cli_errors"], airflow_probe["cli_errors"]
    assert not airflow_probe["import_errors"], airflow_probe["import_errors"]


# --- Workers on other hosts ------------------------------------------------------------------------


def test_remote_workers_reach_the_main_host_not_local_services(
    raw: dict[str, Any], env_example: dict[str, str]
) -> None:
    override = yaml.safe_load(REMOTE_WORKER_FILE.read_text())
    assert set(override["services"]) == {"airflow-worker"}
    merged = {
        **as_env(raw["services"]["airflow-worker"]["environment"]),
        **as_env(override["services"]["airflow-worker"]["environment"]),
    }
    resolved = {
        k: interpolate(v, {**env_example, "MAIN_HOST": "10.0.0.10"}) for k, v in merged.items()
    }
    for key, value in resolved.items():
        if "://" in value:
            host = urlsplit(value).hostname
            assert host not in raw["services"], (
                f"a remote worker's {key} points at {host!r}, which runs on the main host only"
            )


def test_multi_host_files_share_data_and_logs_and_publish_backends_privately() -> None:
    main = yaml.safe_load(MULTI_HOST_FILE.read_text())
    remote = yaml.safe_load(REMOTE_WORKER_FILE.read_text())
    for volume in ("price-data", "airflow-logs"):
        assert main["volumes"][volume] == remote["volumes"][volume], volume
        assert main["volumes"][volume]["driver_opts"]["type"] == "nfs"
    for name in ("postgres", "redis"):
        ports = main["services"][name]["ports"]
        assert ports and all(p.startswith("${BACKEND_ADDRESS:?") for p in ports), (
            f"{name} must be published only on an explicit private address"
        )
