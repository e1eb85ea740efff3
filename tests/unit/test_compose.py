"""docker-compose.yml and infra/Dockerfile stay consistent with the CLI and the Settings.

No Docker engine runs on the dev machines or in CI, so the containers are never started
here. These checks catch the drift that would break them silently: a renamed subcommand or
setting, a dependency on a service without a healthcheck, torch creeping into the serving
image.
"""

import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from makeusrich.cli import _parser
from makeusrich.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE_PATH = ROOT / "infra" / "Dockerfile"
PYPROJECT_PATH = ROOT / "pyproject.toml"
DOCKERIGNORE_PATH = ROOT / ".dockerignore"

MUR_VAR = re.compile(r"\bMUR_[A-Z0-9_]+\b")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ...
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+?])([^}]*))?\}")
# What each `mur` subcommand connects to, so its service must wait for.
NEEDS = {"ingest": {"kafka"}, "worker": {"kafka", "redis"}, "api": {"redis"}}
PIPELINE_COMMANDS = set(NEEDS)

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_PATH.read_text())  # resolves anchors, <<
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def _builds_our_image(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if build is None:
        return False
    if isinstance(build, str):
        build = {"context": build}
    context = ROOT / build.get("context", ".")
    return (context / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE_PATH


OUR_IMAGES = {s["image"] for s in SERVICES.values() if _builds_our_image(s) and "image" in s}
OURS = sorted(
    name for name, s in SERVICES.items() if _builds_our_image(s) or s.get("image") in OUR_IMAGES
)


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _resolve(value: str) -> str:
    """Compose interpolation as with an empty shell environment: the defaults."""

    def default(match: re.Match[str]) -> str:
        name, operator, word = match.groups()
        assert operator in ("-", ":-"), (
            f"${{{name}}} has no default ({match.group(0)}); `docker compose up` needs "
            "the stack to work without any variable set"
        )
        return word

    return INTERPOLATION.sub(default, value)


def _settings(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings that `mur` builds inside the container of ``service``."""
    for name in [n for n in os.environ if n.startswith("MUR_")]:
        monkeypatch.delenv(name)
    for name, value in _environment(service).items():
        monkeypatch.setenv(name, _resolve(value))
    return Settings(_env_file=None)


# ---- docker-compose.yml ----------------------------------------------------------------


def test_compose_runs_the_pipeline_on_kafka_and_redis() -> None:
    assert {"kafka", "redis"} <= SERVICES.keys()
    assert "kafka" in SERVICES["kafka"]["image"]
    assert SERVICES["redis"]["image"].startswith("redis:")
    commands = {_command(SERVICES[name])[0] for name in OURS if _command(SERVICES[name])}
    assert commands == PIPELINE_COMMANDS, f"services built from infra/Dockerfile: {OURS}"


@pytest.mark.parametrize("name", OURS)
def test_service_command_is_a_mur_subcommand(name: str) -> None:
    service = SERVICES[name]
    assert service.get("entrypoint") in (None, ["mur"]), "the image's entrypoint is `mur`"
    command = _command(service)
    try:
        args = _parser().parse_args(command)
    except SystemExit as exc:
        pytest.fail(f"service {name}: `mur {shlex.join(command)}` is rejected by the CLI ({exc})")
    assert args.command in PIPELINE_COMMANDS, (
        f"service {name} runs `mur {args.command}`; containers run one part each, "
        "against the compose Kafka and Redis"
    )


def test_every_mur_variable_is_a_settings_field() -> None:
    fields = {f"MUR_{name.upper()}" for name in Settings.model_fields}
    for path in (COMPOSE_PATH, DOCKERFILE_PATH):
        used = set(MUR_VAR.findall(path.read_text()))
        assert used, f"{path.name} sets no MUR_* variable"
        unknown = used - fields
        assert not unknown, f"{path.name} uses {sorted(unknown)}, not fields of Settings"


@pytest.mark.parametrize("name", OURS)
def test_service_environment_makes_valid_settings(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(SERVICES[name], monkeypatch)
    assert settings.source_kind  # raises ConfigError for an unknown MUR_SOURCE
    assert settings.kafka_bootstrap and settings.redis_url, "containers use external services"
    kafka_host = settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[0]
    redis_host = urlsplit(settings.redis_url).hostname
    assert kafka_host in SERVICES, f"MUR_KAFKA_BOOTSTRAP names no compose service: {kafka_host}"
    assert redis_host in SERVICES, f"MUR_REDIS_URL names no compose service: {redis_host}"
    assert f"PLAINTEXT://{settings.kafka_bootstrap}" in _environment(SERVICES["kafka"]).get(
        "KAFKA_ADVERTISED_LISTENERS", ""
    ), "the broker must advertise the address the services bootstrap from"
    waits_for = set(SERVICES[name].get("depends_on", {}))
    hosts = {"kafka": kafka_host, "redis": redis_host}
    needs = {hosts[kind] for kind in NEEDS.get(_command(SERVICES[name])[0], ())}
    assert needs <= waits_for, f"{name} must depend_on {sorted(needs - waits_for)}"


def test_all_pipeline_services_follow_the_same_markets(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}
    for name in OURS:
        s = _settings(SERVICES[name], monkeypatch)
        seen[name] = (s.symbols, s.intervals, s.redis_prefix, s.topic_prefix)
    assert len(set(seen.values())) == 1, seen


def test_api_listens_outside_the_container_and_is_health_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from makeusrich.api.app import create_app

    api = SERVICES["api"]
    settings = _settings(api, monkeypatch)
    assert settings.api_host == "0.0.0.0"
    published = [str(p) for p in api.get("ports", [])]
    assert any(p.rsplit(":", 1)[-1] == str(settings.api_port) for p in published), published
    probe = " ".join(str(part) for part in api["healthcheck"]["test"])
    assert f":{settings.api_port}/healthz" in probe
    assert "/healthz" in create_app(settings).openapi()["paths"]


def test_dependencies_exist_and_have_healthchecks() -> None:
    for name, service in SERVICES.items():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            depends_on = {dep: {"condition": "service_started"} for dep in depends_on}
        for dep, spec in depends_on.items():
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
            if spec.get("condition") == "service_healthy":
                assert "healthcheck" in SERVICES[dep], f"{name} waits for {dep}'s healthcheck"
    for name in ("kafka", "redis", "api"):
        assert SERVICES[name]["healthcheck"]["test"], f"{name} has an empty healthcheck"


def test_kafka_is_a_single_kraft_node() -> None:
    env = _environment(SERVICES["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert voters == [f"{node_id}@kafka:9093"]
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env["KAFKA_LISTENERS"]
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert "kafka-broker-api-versions" in " ".join(SERVICES["kafka"]["healthcheck"]["test"])


# ---- infra/Dockerfile ------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        keyword, _, rest = (buf + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    return out


INSTRUCTIONS = _instructions(DOCKERFILE_PATH.read_text())
PYPROJECT = tomllib.loads(PYPROJECT_PATH.read_text())


def _final_stage() -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(INSTRUCTIONS) if keyword == "FROM")
    return INSTRUCTIONS[last_from:]


def test_serving_image_does_not_install_torch() -> None:
    train = PYPROJECT["project"]["optional-dependencies"]["train"]
    assert any(dep.startswith("torch") for dep in train), "torch is expected in the train extra"
    assert not any(dep.startswith("torch") for dep in PYPROJECT["project"]["dependencies"])
    installs = [
        segment
        for keyword, args in INSTRUCTIONS
        if keyword == "RUN"
        for segment in re.split(r"&&|\|\||;", args)
        if re.search(r"\bpip\b.*\binstall\b", segment)
    ]
    assert any(re.search(r"\binstall\s+\.(\s|$)", s) for s in installs), installs
    for segment in installs:
        assert "torch" not in segment, segment
        assert not re.search(r"\[[^\]]*\btrain\b", segment), segment


def test_image_is_slim_non_root_and_runs_mur() -> None:
    assert PYPROJECT["project"]["scripts"]["mur"] == "makeusrich.cli:main"
    args = dict(
        arg.split("=", 1) for keyword, arg in INSTRUCTIONS if keyword == "ARG" and "=" in arg
    )
    bases = {
        re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], arg.split()[0])
        for keyword, arg in INSTRUCTIONS
        if keyword == "FROM" and not arg.startswith("--")
    }
    assert bases == {"python:3.11-slim"}, bases
    final = _final_stage()
    entrypoints = [json.loads(arg) for keyword, arg in final if keyword == "ENTRYPOINT"]
    assert entrypoints[-1:] == [["mur"]]
    users = [arg for keyword, arg in final if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root user"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    ignored = {
        line.strip().lstrip("/")
        for line in DOCKERIGNORE_PATH.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for keyword, args in INSTRUCTIONS:
        if keyword != "COPY" or args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        for source in sources:
            assert source not in ignored and source.split("/")[0] not in ignored, source
            if not any(ch in source for ch in "*?["):
                assert (ROOT / source).exists(), f"COPY {source}: missing from the repository"
