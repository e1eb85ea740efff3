"""docker-compose.yml and infra/ stay consistent with the CLI and the Settings.

No Docker engine runs on the dev machines or in CI, so the containers are never started
here. These checks catch the drift that would break them silently: a renamed subcommand or
setting, a dependency on a service without a healthcheck, torch (or anything unlocked)
creeping into the images, a replica Prometheus does not scrape, a proxy that buffers the live feed.
(tests/integration/test_proxy.py runs the proxy's rules with a real nginx.)
"""

import ipaddress
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

from kit.locks import read_lock
from makeusrich.cli import _parser
from makeusrich.core.settings import Settings
from makeusrich.trainer.schedule import parse_duration

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "docker-compose.yml"
DOCKERFILE_PATH = ROOT / "infra" / "Dockerfile"
PYPROJECT_PATH = ROOT / "pyproject.toml"
DOCKERIGNORE_PATH = ROOT / ".dockerignore"
PROMETHEUS_PATH = ROOT / "infra" / "prometheus.yml"
NGINX_CONF_PATH = ROOT / "infra" / "nginx" / "nginx.conf"
API_PROXY_PATH = ROOT / "infra" / "nginx" / "api-proxy.conf"

MUR_VAR = re.compile(r"\bMUR_[A-Z0-9_]+\b")
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ...
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-+?])([^}]*))?\}")
# What each `mur` subcommand connects to, so its service must wait for.
NEEDS = {"ingest": {"kafka"}, "worker": {"kafka", "redis"}, "api": {"redis"},
         "archive": {"kafka"}, "trainer": {"kafka", "redis"}}
PIPELINE_COMMANDS = set(NEEDS)
# The Settings field of the port each command serves Prometheus metrics on.
METRICS_PORT = {"api": "api_port", "worker": "worker_metrics_port",
                "ingest": "ingest_metrics_port", "trainer": "trainer_metrics_port"}
# What a command reads from the model registry (MUR_MODEL_DIR); the trainer also writes it.
REGISTRY_READERS = {"worker", "api"}

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
    for path in (COMPOSE_PATH, DOCKERFILE_PATH, PROMETHEUS_PATH, NGINX_CONF_PATH,
                 API_PROXY_PATH):
        used = set(MUR_VAR.findall(path.read_text()))
        assert used or path not in (COMPOSE_PATH, DOCKERFILE_PATH), f"{path.name}: no MUR_*"
        unknown = used - fields
        assert not unknown, f"{path.name} names {sorted(unknown)}, not fields of Settings"


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
    assert "ports" not in api, "replicas cannot share a host port: the proxy publishes it"
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


def _kafka_config() -> dict[str, str]:
    """The compose broker's settings as the apache/kafka image merges them: the mounted
    properties file (its file input), then the KAFKA_* variables (a.b_c -> KAFKA_A_B__C)."""
    mounts = _mounts(SERVICES["kafka"])
    source, read_only = mounts["/mnt/shared/config/server.properties"]
    assert read_only
    config = {}
    for line in (ROOT / source).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            config[key.strip()] = value.strip()
    for name, value in _environment(SERVICES["kafka"]).items():
        if name.startswith("KAFKA_"):
            config[name[6:].lower().replace("__", "-").replace("_", ".")] = value
    return config


def test_kafka_is_a_single_kraft_node_from_the_shared_properties() -> None:
    config = _kafka_config()
    assert _mounts(SERVICES["kafka"])["/mnt/shared/config/server.properties"][0] == \
        "./infra/kafka/server.properties"  # the file the Apache Kafka test tier runs with
    assert set(config["process.roles"].split(",")) == {"broker", "controller"}
    assert config["controller.quorum.voters"] == f"{config['node.id']}@kafka:9093"
    assert config["controller.listener.names"] in config["listeners"]
    for key in ("default.replication.factor", "min.insync.replicas",
                "offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "transaction.state.log.min.isr"):
        assert config[key] == "1", key  # one node
    assert "kafka-broker-api-versions" in " ".join(SERVICES["kafka"]["healthcheck"]["test"])


def _replicas(service: dict[str, Any]) -> int:
    return int(service.get("deploy", {}).get("replicas", 1))


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Container path -> (volume name or host path, read-only) of the short-syntax volumes."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target, *mode = str(spec).split(":")
        mounts[target] = (source, mode == ["ro"])
    return mounts


def _volume_at(service: dict[str, Any], path: object) -> tuple[str, bool]:
    """The named volume (declared at the top level) mounted at ``path``, and read-only."""
    mounts = _mounts(service)
    assert str(path) in mounts, f"nothing is mounted at {path}"
    volume, read_only = mounts[str(path)]
    assert volume in (COMPOSE.get("volumes") or {}), f"{volume} is not a named volume"
    return volume, read_only


def test_workers_are_replicas_of_one_consumer_group(monkeypatch: pytest.MonkeyPatch) -> None:
    workers = [name for name in OURS if _command(SERVICES[name])[0] == "worker"]
    assert workers == ["worker"], "one worker service, scaled: all replicas in one Faust group"
    worker = SERVICES["worker"]
    replicas = _replicas(worker)
    assert replicas >= 2
    assert not {"container_name", "hostname"} & worker.keys(), "each replica names itself"
    settings = _settings(worker, monkeypatch)
    assert settings.worker_id, "the consumer group the replicas share"
    assert settings.worker_instance == "auto", "each replica's counters under its host name"
    # Whichever service creates the trades topic first, each replica gets a partition.
    for name in OURS:
        assert _settings(SERVICES[name], monkeypatch).trades_partitions >= replicas, name
    assert int(_kafka_config()["num.partitions"]) >= replicas


# nginx configuration: (directive, arguments, block or None)
Directive = tuple[str, list[str], list[Any] | None]


def _nginx(text: str) -> list[Directive]:
    tokens = re.findall(r'"[^"]*"|[{};]|[^\s{};]+', re.sub(r"#[^\n]*", "", text))

    def block(pos: int) -> tuple[list[Directive], int]:
        directives: list[Directive] = []
        words: list[str] = []
        while pos < len(tokens):
            token, pos = tokens[pos], pos + 1
            if token == "}":
                return directives, pos
            if token in ";{":
                children = None
                if token == "{":
                    children, pos = block(pos)
                directives.append((words[0], words[1:], children))
                words = []
            else:
                words.append(token.strip('"'))
        return directives, pos

    return block(0)[0]


def _args(directives: list[Directive], name: str) -> list[list[str]]:
    return [args for directive, args, _ in directives if directive == name]


def _child(directives: list[Directive], name: str, *args: str) -> list[Directive]:
    (children,) = [c for d, a, c in directives if d == name and tuple(a) == args and c is not None]
    return children


def _location(rules: list[Directive], path: str) -> list[Directive]:
    """The location nginx picks for ``path``: exact match, else the first matching regex,
    else the longest prefix (as long as no prefix location uses ``^~``)."""
    locations = [(args, children or []) for d, args, children in rules if d == "location"]
    assert not [args for args, _ in locations if args[0] == "^~"]
    for args, children in locations:
        if args[0] == "=" and args[1] == path:
            return children
    for args, children in locations:
        if args[0] in ("~", "~*") and re.search(args[1], path, re.I if args[0] == "~*" else 0):
            return children
    prefixes = [(args[0], children) for args, children in locations
                if len(args) == 1 and path.startswith(args[0])]
    return max(prefixes, key=lambda prefix: len(prefix[0]))[1]


def test_api_replicas_are_behind_the_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    api, proxy = SERVICES["api"], SERVICES["proxy"]
    assert _replicas(api) >= 2
    settings = _settings(api, monkeypatch)
    http = _child(_nginx(NGINX_CONF_PATH.read_text()), "http")
    # Every replica: Docker's DNS answers the service name with each of them, re-resolved.
    (server,) = _args(_child(http, "upstream", "mur_api"), "server")
    assert server[0] == f"api:{settings.api_port}" and "resolve" in server
    assert _args(http, "resolver")[0][0] == "127.0.0.11"
    # The compose files are where nginx reads them, and the proxy rules are included.
    mounts = {target: (ROOT / source).resolve() for target, (source, _) in _mounts(proxy).items()}
    assert mounts["/etc/nginx/nginx.conf"] == NGINX_CONF_PATH
    site = _child(http, "server")
    assert [mounts[path] for (path,) in _args(site, "include")] == [API_PROXY_PATH]
    (listen,) = _args(site, "listen")
    assert [str(p).rsplit(":", 1)[-1] for p in proxy["ports"]] == listen
    assert "/healthz" in " ".join(proxy["healthcheck"]["test"])
    assert proxy["depends_on"]["api"]["condition"] == "service_healthy"
    # The API takes the client address from X-Forwarded-For on the proxy's connections only.
    address = proxy["networks"]["default"]["ipv4_address"]
    assert settings.forwarded_allow_ips == (address,)
    (network,) = COMPOSE["networks"]["default"]["ipam"]["config"]
    assert ipaddress.ip_address(address) in ipaddress.ip_network(network["subnet"])
    assert ipaddress.ip_address(address) not in ipaddress.ip_network(network["ip_range"]), (
        "a fixed address inside ip_range may already be taken by another container")


def test_proxy_streams_sse_unbuffered_and_forwards_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from makeusrich.api.app import create_app

    settings = _settings(SERVICES["api"], monkeypatch)
    rules = _nginx(API_PROXY_PATH.read_text())
    assert _args(rules, "proxy_http_version") == [["1.1"]]
    headers = {name.lower(): value for name, value in _args(rules, "proxy_set_header")}
    assert headers["connection"] == "", "keep-alive to the replicas"
    assert headers["x-forwarded-for"] == "$remote_addr", "replaced, not appended to"
    paths = create_app(settings).openapi()["paths"]
    streams = [path for path, ops in paths.items()
               if "text/event-stream" in ops.get("get", {}).get("responses", {})
               .get("200", {}).get("content", {})]
    assert "/v1/stream" in streams
    for path in streams:
        location = _location(rules, re.sub(r"\{[^}]+\}", "x", path))
        assert _args(location, "proxy_pass") == [["http://mur_api"]], path
        for directive in ("proxy_buffering", "proxy_cache", "gzip"):
            assert _args(location, directive) == [["off"]], (path, directive)
        (timeout,) = _args(location, "proxy_read_timeout")
        assert parse_duration(timeout[0]) > 2 * settings.sse_heartbeat_s
        assert ["X-Accel-Buffering", "no", "always"] in _args(location, "add_header")
    for path in ("/v1/candles/BTCUSDT", "/healthz", "/"):
        location = _location(rules, path)
        assert _args(location, "proxy_pass") == [["http://mur_api"]], path
        assert not _args(location, "proxy_buffering"), "REST answers are buffered as usual"
    assert _args(_location(rules, "/metrics"), "return") == [["404"]]


def test_prometheus_scrapes_every_replica_of_every_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = yaml.safe_load(PROMETHEUS_PATH.read_text())
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            assert sd["type"] == "A", "an A query returns every replica's address"
            scraped.update((name, int(sd["port"])) for name in sd["names"])
    expected: dict[str, int] = {}
    for name in OURS:
        field = METRICS_PORT.get(_command(SERVICES[name])[0])
        if field is None:
            continue
        settings = _settings(SERVICES[name], monkeypatch)
        port = getattr(settings, field)
        assert port is not None, f"{name} serves no metrics: set MUR_{field.upper()}"
        assert settings.api_host == "0.0.0.0", f"{name}'s metrics bind on MUR_API_HOST"
        expected[name] = port
    assert scraped == expected
    prometheus = SERVICES["prometheus"]
    flags = dict(flag.split("=", 1) for flag in prometheus["command"])
    mounts = _mounts(prometheus)
    assert (ROOT / mounts[flags["--config.file"]][0]).resolve() == PROMETHEUS_PATH
    _volume_at(prometheus, flags["--storage.tsdb.path"])


def test_data_and_models_live_in_shared_volumes(monkeypatch: pytest.MonkeyPatch) -> None:
    _volume_at(SERVICES["kafka"], _environment(SERVICES["kafka"])["KAFKA_LOG_DIRS"])
    _volume_at(SERVICES["redis"], "/data")
    assert "--appendonly" in SERVICES["redis"]["command"]
    registries, archives = set(), set()
    for name in OURS:
        command, settings = _command(SERVICES[name])[0], _settings(SERVICES[name], monkeypatch)
        if command in REGISTRY_READERS | {"trainer"}:
            volume, read_only = _volume_at(SERVICES[name], settings.model_dir)
            assert read_only == (command != "trainer"), f"{name}: only the trainer writes"
            registries.add(volume)
        if command in ("archive", "trainer"):
            volume, read_only = _volume_at(SERVICES[name], settings.archive_dir)
            assert read_only == (command == "trainer"), f"{name}: only the archiver writes"
            archives.add(volume)
    # What the trainer promotes reaches the workers and the API; it learns from the archive.
    assert len(registries) == len(archives) == 1 and registries != archives
    # A new registry volume starts as the image's copy of the bundled model.
    model_dirs = {str(_settings(SERVICES[name], monkeypatch).model_dir) for name in OURS}
    for target in ("runtime", "trainer"):
        seeds = [args.split()[-1] for keyword, args in _image(target)
                 if keyword == "COPY" and "makeusrich/models" in args]
        assert seeds and set(seeds) == model_dirs, (target, seeds, model_dirs)


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
Instructions = list[tuple[str, str]]


def _stages() -> dict[str, tuple[str, Instructions]]:
    """Stage name -> (the image or stage it is FROM, its own instructions), in file order."""
    args = dict(
        arg.split("=", 1) for keyword, arg in INSTRUCTIONS if keyword == "ARG" and "=" in arg
    )
    stages: dict[str, tuple[str, Instructions]] = {}
    for keyword, arg in INSTRUCTIONS:
        if keyword == "FROM":
            words = arg.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages[name] = (base, [])
        elif stages:
            stages[next(reversed(stages))][1].append((keyword, arg))
    return stages


STAGES = _stages()


def _image(target: str) -> Instructions:
    """The instructions of the image ``target`` builds, down its FROM chain, oldest first."""
    base, own = STAGES[target]
    return (_image(base) if base in STAGES else []) + own


def _ancestry(target: str) -> set[str]:
    """Every stage ``target`` is built from (FROM or COPY --from), itself included."""
    base, own = STAGES[target]
    parents = {base} | {
        match.group(1) for keyword, arg in own if keyword == "COPY"
        for match in [re.match(r"--from=(\S+)", arg)] if match
    }
    found = {target}
    for parent in parents & STAGES.keys():
        found |= _ancestry(parent)
    return found


def _pip_installs(stages: set[str]) -> list[str]:
    return [
        segment
        for stage in sorted(stages)
        for keyword, args in STAGES[stage][1]
        if keyword == "RUN"
        for segment in re.split(r"&&|\|\||;", args)
        if re.search(r"\bpip\b.*\binstall\b", segment)
    ]


def test_compose_builds_the_serving_image_except_for_the_trainer() -> None:
    assert next(reversed(STAGES)) == "runtime", "a plain `docker build` makes the serving image"
    for name in OURS:
        target = SERVICES[name]["build"]["target"]
        assert target == ("trainer" if _command(SERVICES[name])[0] == "trainer" else "runtime")


def _lock_installs(installs: list[str]) -> set[str]:
    """The locks in requirements/ that these pip commands install, hash-checked."""
    return {
        match.group(1) for segment in installs
        for match in [re.search(r"--require-hashes\s+-r\s+requirements/(\w+)\.txt", segment)]
        if match
    }


def test_serving_image_installs_the_serving_lock_without_torch() -> None:
    train = PYPROJECT["project"]["optional-dependencies"]["train"]
    assert any(dep.startswith("torch") for dep in train), "torch is expected in the train extra"
    assert not any(dep.startswith("torch") for dep in PYPROJECT["project"]["dependencies"])
    installs = _pip_installs(_ancestry("runtime"))
    assert _lock_installs(installs) == {"run"}, installs
    assert "torch" not in read_lock("run")
    # Then the package itself, and nothing unlocked with it.
    assert any(re.search(r"install\s+--no-deps\s+--no-build-isolation\s+\.(\s|$)", s)
               for s in installs), installs
    for segment in installs:
        assert "torch" not in segment, segment
        assert not re.search(r"\[[^\]]*\btrain\b", segment), segment


def test_trainer_image_adds_the_train_lock() -> None:
    installs = _pip_installs(_ancestry("trainer") - _ancestry("runtime"))
    assert _lock_installs(installs) == {"train"}, installs
    assert len(installs) == 1, f"the trainer stages install more than the lock: {installs}"
    assert "torch" in read_lock("train")


@pytest.mark.parametrize("target", ["runtime", "trainer"])
def test_image_is_slim_non_root_and_runs_mur(target: str) -> None:
    assert PYPROJECT["project"]["scripts"]["mur"] == "makeusrich.cli:main"
    bases = {STAGES[stage][0] for stage in _ancestry(target)} - STAGES.keys()
    assert bases == {"python:3.11-slim"}, bases
    image = _image(target)
    entrypoints = [json.loads(arg) for keyword, arg in image if keyword == "ENTRYPOINT"]
    assert entrypoints[-1:] == [["mur"]]
    users = [arg for keyword, arg in image if keyword == "USER"]
    assert users, f"the {target} image must switch to a non-root user"
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
