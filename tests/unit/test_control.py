"""Checks an announced model must pass before a worker serves it (no broker needed)."""

import json
from pathlib import Path

import pytest

from kit.registry import add_version, corrupt_model
from makeusrich.core.errors import ModelError, ModelIntegrityError
from makeusrich.core.schemas import ModelAnnouncement, announcement_decoder, encode
from makeusrich.core.settings import Settings
from makeusrich.inference import MANIFEST_FILE, Registry, read_manifest
from makeusrich.stream.control import ModelWatcher, load_announced

NAME = "lstm-20250101-000000-aaaaaaaa"


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    add_version(tmp_path, NAME)
    return tmp_path


def _announce(registry: Path, version: str = NAME, sha256: str | None = None) -> ModelAnnouncement:
    if sha256 is None:
        sha256 = read_manifest(registry / version).sha256
    return ModelAnnouncement(version=version, sha256=sha256, ts_event=1, ts_ingest=1)


def test_a_good_version_loads(registry: Path) -> None:
    assert load_announced(registry, _announce(registry)).version == NAME


def test_a_single_version_directory_serves_only_itself(registry: Path) -> None:
    assert load_announced(registry / NAME, _announce(registry)).version == NAME


@pytest.mark.parametrize("version", ["lstm-missing", "../etc", f"{NAME}/..", ""])
def test_versions_outside_the_registry_are_rejected(registry: Path, version: str) -> None:
    with pytest.raises(ModelError, match="not in the model registry"):
        load_announced(registry, _announce(registry, version=version, sha256="0" * 64))


def test_an_announced_hash_that_differs_is_rejected(registry: Path) -> None:
    with pytest.raises(ModelIntegrityError, match="the announcement says"):
        load_announced(registry, _announce(registry, sha256="0" * 64))


def test_a_corrupt_model_file_is_rejected(registry: Path) -> None:
    announcement = _announce(registry)
    corrupt_model(registry / NAME)
    with pytest.raises(ModelIntegrityError, match="sha256"):
        load_announced(registry, announcement)


def test_a_parity_failure_is_rejected(registry: Path) -> None:
    path = registry / NAME / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    manifest["parity"]["output"][0][0] += 0.01
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="differs from the exported outputs"):
        load_announced(registry, _announce(registry))


def test_the_watcher_reports_the_champion(registry: Path) -> None:
    watcher = ModelWatcher(Settings(_env_file=None, kafka_bootstrap="unused:9092",
                                    model_dir=registry))
    assert watcher.champion() is None
    Registry(registry).promote(NAME, "test")
    champion = watcher.champion()
    assert champion is not None
    assert (champion.version, champion.sha256) == (NAME, read_manifest(registry / NAME).sha256)


def test_the_watcher_reports_symbol_champions(registry: Path) -> None:
    watcher = ModelWatcher(Settings(_env_file=None, kafka_bootstrap="unused:9092",
                                    model_dir=registry))
    assert watcher.symbol_champions() == []
    Registry(registry).promote(NAME, "test", symbol="ETHUSDT")
    assert watcher.champion() is None  # no shared champion
    (own,) = watcher.symbol_champions()
    assert (own.version, own.symbol, own.sha256) == (
        NAME, "ETHUSDT", read_manifest(registry / NAME).sha256,
    )
    # The symbol travels with the announcement; one without it (older senders) is shared.
    assert announcement_decoder.decode(encode(own)).symbol == "ETHUSDT"
    assert announcement_decoder.decode(encode(_announce(registry))).symbol is None
