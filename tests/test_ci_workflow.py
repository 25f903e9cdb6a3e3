""".github/workflows/ci.yml, the CI for forks (issue 14): valid, and the same run as `.ci/run`.

It is checked against GitHub's workflow schema (SchemaStore's github-workflow.json, as vendored by
check-jsonschema 0.39.0; Apache-2.0, LICENSE beside it) and must: run `.ci/run` itself (which runs
`make test`) on ubuntu-latest with Python 3.11 within the project's 90-minute CI limit, and give
the tests PostgreSQL (user `postgres`, trust auth) and Redis on 127.0.0.1:5432 and :6379 as
health-checked service containers of the images docker-compose.yaml runs.
"""

from __future__ import annotations

import ast
import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parent.parent
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
SCHEMA = REPO / "tests" / "fixtures" / "github" / "github-workflow.json"
CI_RUN = REPO / ".ci" / "run"


class Yaml12Loader(yaml.SafeLoader):
    """YAML 1.2's booleans (true/false only), as GitHub reads a workflow: PyYAML's YAML 1.1 would
    read the key `on` as True."""


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


@cache
def workflow() -> dict[str, Any]:
    return yaml.load(WORKFLOW.read_text(), Loader=Yaml12Loader)  # a SafeLoader


def job() -> dict[str, Any]:
    jobs = workflow()["jobs"]
    assert list(jobs) == ["test"], f"one job expected, found {list(jobs)}"
    return jobs["test"]


def steps() -> list[dict[str, Any]]:
    return job()["steps"]


def compose_image(service: str) -> str:
    compose = yaml.safe_load((REPO / "docker-compose.yaml").read_text())
    return compose["services"][service]["image"]


def test_the_workflow_is_valid_against_githubs_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(workflow()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:400]}" for e in errors
    )


def test_it_runs_on_pushes_and_pull_requests() -> None:
    triggers = workflow()["on"]
    assert {"push", "pull_request"} <= set(triggers), triggers


def test_it_runs_ci_run_itself_last_which_runs_make_test() -> None:
    assert "\nmake test\n" in CI_RUN.read_text(), ".ci/run no longer runs `make test`"
    runs = [s.get("run", "").strip() for s in steps()]
    assert runs[-1] == "bash .ci/run", f"the last step must run .ci/run as CI does: {runs[-1]!r}"
    assert "make setup" in runs[:-1]  # so the services check below can use the venv


def test_it_runs_on_ubuntu_with_python_311_within_the_ci_limit() -> None:
    assert job()["runs-on"] == "ubuntu-latest"
    assert job()["timeout-minutes"] == 90
    setup = [s for s in steps() if s.get("uses", "").startswith("actions/setup-python@")]
    assert len(setup) == 1 and str(setup[0]["with"]["python-version"]) == "3.11", setup
    requires = re.search(r'requires-python = "([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert requires and requires.group(1) == ">=3.11,<3.12", "pyproject's Python moved: update CI"


def _health_cmd(service: dict[str, Any]) -> str:
    match = re.search(r'--health-cmd\s+"([^"]+)"', service.get("options", ""))
    assert match, f"no --health-cmd in {service.get('options')!r}"
    return match.group(1)


def test_postgres_service_as_the_tests_expect() -> None:
    postgres = job()["services"]["postgres"]
    assert postgres["image"] == compose_image("postgres"), "use docker-compose.yaml's image"
    # scripts/production_native.py and tests/test_ledger.py drop databases WITH (FORCE): 13+.
    major = int(re.fullmatch(r"postgres:(\d+)(\.\d+)?(-\w+)?", postgres["image"]).group(1))
    assert major >= 13, postgres["image"]
    assert postgres["env"]["POSTGRES_HOST_AUTH_METHOD"] == "trust"
    assert "POSTGRES_USER" not in postgres["env"]  # the tests log in as `postgres`
    assert postgres["ports"] == ["5432:5432"]
    assert "pg_isready" in _health_cmd(postgres)


def test_redis_service_as_the_tests_expect() -> None:
    redis = job()["services"]["redis"]
    assert redis["image"] == compose_image("redis"), "use docker-compose.yaml's image"
    assert redis["ports"] == ["6379:6379"]
    assert "command" not in redis and "env" not in redis  # no password: the tests send none
    assert _health_cmd(redis) == "redis-cli ping"


def test_it_fails_where_the_services_do_not_answer_instead_of_skipping() -> None:
    """The PostgreSQL/Redis tests skip where the services do not answer; the workflow checks them
    first with the same function (which must still exist)."""
    check = [s for s in steps() if "services_available" in s.get("run", "")]
    assert len(check) == 1, "no step checks PostgreSQL and Redis"
    tree = ast.parse((REPO / "scripts" / "production_native.py").read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "services_available" in functions


def test_chromium_for_the_browser_test() -> None:
    runs = "\n".join(s.get("run", "") for s in steps())
    assert "/usr/bin/chromium" in runs and "apt-get install" in runs and "chromium" in runs
