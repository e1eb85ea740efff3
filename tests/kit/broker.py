"""The broker a test runs on: the session's Tansu, or its 3-node Apache Kafka cluster.

Modules that must hold on both take ``on_both_brokers`` as a mark; the others get Tansu."""

import re
from dataclasses import dataclass
from typing import Any

import pytest

from makeusrich.core.apache_kafka import ApacheKafka

__all__ = ["Broker", "on_both_brokers", "topic_safe"]


@dataclass(frozen=True)
class Broker:
    engine: str  # "tansu" or "apache", as in Settings.kafka_engine
    url: str
    replication_factor: int
    cluster: ApacheKafka | None = None  # the nodes, to kill and pause (apache only)

    @property
    def settings(self) -> dict[str, Any]:
        """The Settings fields that point an app at this broker."""
        return {"kafka_bootstrap": self.url, "kafka_engine": self.engine,
                "kafka_replication_factor": self.replication_factor}


#: Runs the tests it marks that use the ``kafka`` fixture once on Tansu and once on Apache
#: Kafka (those marked ``apache``); see tests/conftest.py's ``pytest_generate_tests``.
on_both_brokers = pytest.mark.both_brokers


def topic_safe(name: str) -> str:
    """``name`` (e.g. a parametrized test's) with what Kafka refuses in topic names ('[',
    ' ', quotes...) replaced by '-'."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)
