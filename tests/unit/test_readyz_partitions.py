"""/readyz's verdict on Kafka partition metadata (kafka-python's describe_topics shape):
broker-free; tests/faults/test_broker_faults.py shows it on a real cluster."""

from typing import Any

from makeusrich.api.routes.health import _partitions_check


def _topic(name: str, *parts: tuple[int, list[int]], error: int = 0) -> dict[str, Any]:
    """A topic of 3 replicas per partition; ``parts``: (leader id, in-sync replica ids)."""
    return {"name": name, "error_code": error, "partitions": [
        {"partition_index": i, "leader_id": leader, "replica_nodes": [1, 2, 3],
         "isr_nodes": isr} for i, (leader, isr) in enumerate(parts)]}


def test_all_replicas_in_sync_is_ok() -> None:
    check = _partitions_check([1, 2, 3], [_topic("t", (1, [1, 2, 3]), (2, [2, 3, 1]))])
    assert check.ok and not check.degraded
    assert "in sync" in check.detail and "[1, 2, 3]" in check.detail


def test_a_missing_replica_is_degraded_and_named() -> None:
    check = _partitions_check([1, 3], [_topic("t", (1, [1, 3]), (3, [3, 1, 2]))])
    assert check.ok and check.degraded
    assert "t[0] (in sync: [1, 3] of [1, 2, 3])" in check.detail
    assert "t[1]" not in check.detail  # fully in sync
    assert "2 broker(s) [1, 3]" in check.detail


def test_no_leader_or_too_few_in_sync_fails() -> None:
    check = _partitions_check([1], [_topic("t", (-1, []), (1, [1]), (1, [1, 2]))])
    assert not check.ok
    assert "cannot take writes" in check.detail
    assert "t[0] (in sync: none of [1, 2, 3])" in check.detail
    assert "t[1] (in sync: [1] of [1, 2, 3])" in check.detail
    assert "t[2]" not in check.detail


def test_topics_not_created_yet_are_skipped() -> None:
    check = _partitions_check([1], [_topic("t", error=3)])
    assert check.ok and not check.degraded
