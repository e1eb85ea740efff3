"""Session-wide real services: a Tansu broker and a redis-server on free ports."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

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

LOG_DIR = Path(__file__).parent.parent / ".mur" / "test-logs"
DATA_DIR = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def kafka() -> Iterator[EmbeddedService]:
    """A real Kafka-compatible broker (Tansu, memory storage) for the whole session."""
    with start_kafka(log_dir=LOG_DIR) as service:
        yield service


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
