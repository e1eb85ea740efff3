"""Prometheus samples as the tests read them: parsed from the text exposition, looked up
by name and labels."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Samples", "parse", "sample", "scrape", "series", "total"]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Text exposition -> {(sample name, labels): value}."""
    return {
        (item.name, frozenset(item.labels.items())): item.value
        for family in text_string_to_metric_families(text)
        for item in family.samples
    }


def scrape(url: str) -> Samples:
    """GET ``url`` (a ``/metrics`` endpoint), as Prometheus does."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    """The label sets of every sample named ``name``."""
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


def total(base_url: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` whose labels include ``labels``, at
    ``base_url``/metrics (0 when there are none)."""
    wanted = set(labels.items())
    samples = scrape(f"{base_url}/metrics")
    return sum(value for (sample_name, sample_labels), value in samples.items()
               if sample_name == name and wanted <= sample_labels)
