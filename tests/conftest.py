"""Session-wide real services on free ports: a Tansu broker, a 3-node Apache Kafka (KRaft)
cluster (started only if a test asks for it) and a redis-server."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kit.broker import Broker
from makeusrich.core.apache_kafka import ApacheKafka, start_apache_kafka
from makeusrich.core.embedded import EmbeddedService, start_kafka, start_redis

# Tests run as a developer does (`mur up`): anonymous clients allowed unless a test says
# otherwise. Child processes (`mur worker`, `mur api`) inherit it.
os.environ.setdefault("MUR_ENVIRONMENT", "dev")
# Tests hammer the API anonymously from one IP (e.g. several backtests a second): raise the
# anonymous limits so that only tests about limits meet them (tests/integration/
# test_access.py sets its own). The limiter itself is unchanged.
for _name, _value in (("MUR_ANONYMOUS_RPM", "1000000"), ("MUR_ANONYMOUS_DAILY", "100000000"),
                      ("MUR_ANONYMOUS_SSE", "1000")):
    os.environ.setdefault(_name, _value)

ROOT = Path(__file__).parent.parent
LOG_DIR = ROOT / ".mur" / "test-logs"
KAFKA_LIBS = ROOT / ".kafka-libs"  # `make kafka-libs`
APACHE_NODES = 3
DATA_DIR = Path(__file__).parent / "data"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "kafka" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
            "both_brokers"):
        metafunc.parametrize("kafka", ["tansu", pytest.param("apache", marks=pytest.mark.apache)],
                             indirect=True, scope="module")


@pytest.fixture(scope="session")
def tansu() -> Iterator[EmbeddedService]:
    """A real Kafka-compatible broker (Tansu, memory storage) for the whole session."""
    with start_kafka(log_dir=LOG_DIR) as service:
        yield service


@pytest.fixture(scope="session")
def apache_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    """Apache Kafka's own broker, 3 KRaft nodes (each broker and controller) from
    infra/kafka/server.properties: replication factor 3, min.insync.replicas 2. Fails (never
    skips) without Java or the jars: `make test` resolves them first."""
    with start_apache_kafka(nodes=APACHE_NODES, libs_dir=KAFKA_LIBS,
                            properties=ROOT / "infra" / "kafka" / "server.properties",
                            data_dir=tmp_path_factory.mktemp("apache-kafka"),
                            log_dir=LOG_DIR,
                            # Killed test workers leave their group after a 3 s session
                            # (kit.worker); the broker's default floor is 6 s.
                            overrides={"group.min.session.timeout.ms": "1000"}) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def kafka(request: pytest.FixtureRequest) -> Broker:
    """The broker of this module's tests: Tansu unless parametrized with "apache"
    (``kit.broker.on_both_brokers``)."""
    if getattr(request, "param", "tansu") == "apache":
        cluster: ApacheKafka = request.getfixturevalue("apache_cluster")
        return Broker("apache", cluster.bootstrap, APACHE_NODES, cluster)
    tansu: EmbeddedService = request.getfixturevalue("tansu")
    return Broker("tansu", tansu.url, 1)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedService]:
    """A real redis-server for the whole session (tests isolate themselves by key prefix)."""
    with start_redis(log_dir=LOG_DIR) as service:
        yield service


@pytest.fixture
def redis_client(redis_server: EmbeddedService) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def data_dir() -> Path:
    return DATA_DIR
