"""A real Apache Kafka (KRaft) cluster on loopback, for `mur up --kafka apache` and tests.

Tansu stays the zero-dependency default. This runs Apache Kafka's own jars (resolved by
``make kafka-libs`` into ``.kafka-libs/``) with ``java``: every node is a combined broker
and controller, started from the shared ``infra/kafka/server.properties`` (the file the
compose stack mounts) plus what differs per node (id, ports, data directory) and per
cluster size (replication factors). Nodes are child processes that die with their parent;
tests kill, restart and pause them one at a time to show what a broker fault does.
"""

import base64
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from makeusrich.core.embedded import free_port, kill_with_parent, terminate
from makeusrich.core.errors import EmbeddedServiceError

__all__ = ["ApacheKafka", "KafkaNode", "apache_kafka_available", "start_apache_kafka"]

_HEAP = "-Xmx384m"
_START_TIMEOUT_S = 90.0


def _java() -> str | None:
    return shutil.which("java")


def apache_kafka_available(libs_dir: Path) -> bool:
    """True when Java and the jars of ``make kafka-libs`` are there."""
    return _java() is not None and any(libs_dir.glob("kafka_2.13-*.jar"))


@dataclass
class KafkaNode:
    """One broker + controller process. Its data directory outlives restarts."""

    node_id: int
    port: int
    controller_port: int
    config_path: Path
    log_path: Path
    argv: list[str]
    process: "subprocess.Popen[bytes] | None" = None
    _log: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=kill_with_parent)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the broker gets no chance to hand over leadership."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the process stays, its sockets stop answering (a network pause)."""
        if self.running:
            os.kill(self.process.pid, signal.SIGSTOP)  # type: ignore[union-attr]

    def resume(self) -> None:
        if self.running:
            os.kill(self.process.pid, signal.SIGCONT)  # type: ignore[union-attr]

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM: a controlled shutdown (leadership moves first)."""
        if self.process is not None:
            terminate(self.process, timeout_s)

    def close(self) -> None:
        self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class ApacheKafka:
    """A running cluster; ``bootstrap`` is what clients connect to."""

    nodes: list[KafkaNode]
    data_dir: Path

    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(node for node in self.nodes if node.node_id == node_id)

    def wait_ready(self, timeout_s: float = _START_TIMEOUT_S) -> None:
        """Wait until every running node is a registered, unfenced broker."""
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        expected = {node.node_id for node in self.nodes if node.running}
        deadline = time.monotonic() + timeout_s
        seen: set[int] = set()
        while time.monotonic() < deadline:
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None:
                    raise EmbeddedServiceError(
                        f"Kafka node {node.node_id} exited ({node.process.returncode}); "
                        f"see {node.log_path}")
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap,
                                         request_timeout_ms=5_000)
                try:
                    brokers = admin.describe_cluster()["brokers"]
                    seen = {int(b["broker_id"]) for b in brokers if not b.get("is_fenced")}
                finally:
                    admin.close()
            except (KafkaError, OSError, ValueError):
                seen = set()
            if expected <= seen:
                return
            time.sleep(0.5)
        raise EmbeddedServiceError(
            f"Apache Kafka brokers {sorted(expected - seen)} did not register within "
            f"{timeout_s:.0f}s; see {self.nodes[0].log_path.parent}")

    def stop(self) -> None:
        # Killed, not shut down: a controlled shutdown of the last nodes waits ~30 s for a
        # quorum that is gone, and the data is thrown away.
        for node in self.nodes:
            node.close()

    def __enter__(self) -> "ApacheKafka":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _node_properties(shared: str, node_id: int, port: int, controller_port: int,
                     voters: str, data: Path, nodes: int, overrides: dict[str, str]) -> str:
    replicas = min(3, nodes)
    in_sync = min(2, replicas)
    extra = "".join(f"{key}={value}\n" for key, value in overrides.items())
    return shared + "\n# Set by makeusrich.core.apache_kafka for this node and cluster size\n" + (
        f"node.id={node_id}\n"
        f"listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}\n"
        f"advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n"
        f"controller.quorum.voters={voters}\n"
        f"log.dirs={data}\n"
        f"default.replication.factor={replicas}\n"
        f"min.insync.replicas={in_sync}\n"
        f"offsets.topic.replication.factor={replicas}\n"
        f"transaction.state.log.replication.factor={replicas}\n"
        f"transaction.state.log.min.isr={in_sync}\n") + extra


def start_apache_kafka(*, nodes: int, libs_dir: Path, properties: Path, data_dir: Path,
                       log_dir: Path, overrides: dict[str, str] | None = None,
                       wait: bool = True) -> ApacheKafka:
    """Format and start ``nodes`` combined broker/controller nodes on free loopback ports;
    ``overrides`` are added to every node's properties (last wins).

    Raises :class:`EmbeddedServiceError` if Java or the jars are missing, or a node does not
    come up."""
    java = _java()
    if java is None:
        raise EmbeddedServiceError("Apache Kafka needs `java` (17 or newer) on PATH")
    if not any(libs_dir.glob("kafka_2.13-*.jar")):
        raise EmbeddedServiceError(f"no Apache Kafka jars in {libs_dir}; run `make kafka-libs`")
    shared = properties.read_text()
    classpath = f"{libs_dir.resolve()}/*"
    log4j = properties.with_name("log4j2.properties").resolve()
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = [(free_port(), free_port()) for _ in range(nodes)]
    voters = ",".join(f"{i + 1}@127.0.0.1:{controller}"
                      for i, (_, controller) in enumerate(ports))
    jvm = [java, _HEAP, "-XX:+UseG1GC", "-Djava.awt.headless=true",
           f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
    cluster = ApacheKafka([], data_dir)
    for i, (port, controller) in enumerate(ports):
        node_id = i + 1
        node_data = data_dir / f"node-{node_id}"
        config = data_dir / f"node-{node_id}.properties"
        config.write_text(_node_properties(shared, node_id, port, controller, voters,
                                           node_data.resolve(), nodes, overrides or {}))
        formatted = subprocess.run(
            [*jvm, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config)],
            capture_output=True, text=True, check=False)
        if formatted.returncode != 0:
            raise EmbeddedServiceError(
                f"formatting Kafka node {node_id} failed: {formatted.stdout}{formatted.stderr}")
        cluster.nodes.append(KafkaNode(
            node_id, port, controller, config, log_dir / f"kafka-node-{node_id}-{port}.log",
            [*jvm, "kafka.Kafka", str(config)]))
    try:
        for node in cluster.nodes:
            node.start()
        if wait:
            cluster.wait_ready()
    except BaseException:
        cluster.stop()
        raise
    return cluster
