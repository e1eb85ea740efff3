"""The model registry: listing, promotion, rollback, the atomic champion pointer, imports,
and load_forecaster following the champion. Versions are copies of the bundled model
(sha256 covers model.onnx only, so editing a manifest's version keeps it valid)."""

import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path

import msgspec
import pytest

from kit.registry import add_version, bundled_version_dir, corrupt_model
from makeusrich.core.errors import ModelError, ModelIntegrityError, RegistryError
from makeusrich.inference import (
    CHAMPION_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    NaiveForecaster,
    OnnxForecaster,
    Registry,
    load_forecaster,
    read_manifest,
)
from makeusrich.inference.registry import HEADLINE_METRICS

OLD = "lstm-20250101-000000-aaaaaaaa"
NEW = "lstm-20250301-000000-bbbbbbbb"


def edit_manifest(version_dir: Path, **changes: object) -> None:
    manifest_path = version_dir / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest.update(changes)
    manifest_path.write_text(json.dumps(manifest, indent=2))


def read_pointer(root: Path) -> dict[str, object]:
    result: dict[str, object] = json.loads((root / CHAMPION_FILE).read_text())
    return result


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "registry"
    root.mkdir()
    add_version(root, OLD)
    add_version(root, NEW)
    (root / ".staging-x").mkdir()  # an unfinished write
    (root / "lstm-20250201-000000-cccccccc").mkdir()  # no model files: not a version
    return root


@pytest.fixture
def registry(root: Path) -> Registry:
    return Registry(root)


# --- reading -----------------------------------------------------------------------------


def test_list_describes_every_version_oldest_first(registry: Registry, root: Path) -> None:
    infos = registry.list()

    assert [info.version for info in infos] == [OLD, NEW]
    info = infos[0]
    assert info.path == root / OLD
    source = read_manifest(bundled_version_dir())
    assert (info.kind, info.window, info.symbols, info.interval, info.created_at) == (
        source.architecture.kind, source.window, source.training_data.symbols,
        source.training_data.interval, source.created_at,
    )
    assert info.metrics == {k: source.metrics[k] for k in HEADLINE_METRICS if k in source.metrics}
    assert "skill" in info.metrics
    assert info.sha256_ok and info.ok and info.problem is None
    assert not any(i.is_champion for i in infos)
    assert registry.champion() is None
    assert registry.selected() == NEW  # no champion: the newest, as load_forecaster does


def test_show_returns_the_manifest(registry: Registry) -> None:
    details = registry.show(OLD)
    assert details.manifest is not None
    assert details.manifest.version == OLD
    assert details.manifest.training_data.symbols == ("BTCUSDT",)
    assert details.info.version == OLD and details.info.sha256_ok


@pytest.mark.parametrize("name", ["nope", "../registry", ".staging-x", "", CHAMPION_FILE])
def test_show_unknown_version_names_it(registry: Registry, name: str) -> None:
    match = f"unknown model version {re.escape(repr(name))}.*known: {OLD}, {NEW}$"
    with pytest.raises(RegistryError, match=match):
        registry.show(name)


def test_corrupted_model_is_flagged(registry: Registry, root: Path) -> None:
    corrupt_model(root / NEW)

    new = registry.list()[1]
    assert not new.sha256_ok and not new.ok
    assert new.problem is not None and "sha256" in new.problem
    assert not registry.show(NEW).info.sha256_ok


def test_unreadable_manifest_is_listed_with_its_problem(registry: Registry, root: Path) -> None:
    (root / OLD / MANIFEST_FILE).write_text("{not json")

    old = registry.list()[0]
    assert old.version == OLD and not old.sha256_ok
    assert old.kind is None and old.symbols == () and old.metrics == {}
    assert old.problem is not None and "not a valid model manifest" in old.problem
    assert registry.show(OLD).manifest is None


def test_missing_registry_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="does not exist"):
        Registry(tmp_path / "nope").list()


def test_single_version_directory_is_a_read_only_registry(root: Path) -> None:
    registry = Registry(root / OLD)
    assert [info.version for info in registry.list()] == [OLD]
    assert registry.champion() is None
    with pytest.raises(RegistryError, match="single version directory"):
        registry.promote(OLD, "no")


# --- promotion and rollback --------------------------------------------------------------


def test_promote_and_rollback(registry: Registry, root: Path) -> None:
    registry.promote(OLD, "first model")
    registry.promote(NEW, "beats OLD on the hold-out")

    assert registry.champion() == NEW
    assert [i.version for i in registry.list() if i.is_champion] == [NEW]
    pointer = read_pointer(root)
    assert pointer["version"] == NEW
    history = pointer["history"]
    assert isinstance(history, list)
    assert [(h["version"], h["reason"], h["action"]) for h in history] == [
        (OLD, "first model", "promote"),
        (NEW, "beats OLD on the hold-out", "promote"),
    ]
    assert pointer["promoted_at"] == history[-1]["promoted_at"]
    assert isinstance(pointer["promoted_at"], int) and pointer["promoted_at"] > 1.7e12

    assert registry.rollback("worse live") == OLD
    assert registry.champion() == OLD
    last = read_pointer(root)["history"][-1]  # type: ignore[index]
    assert (last["version"], last["action"]) == (OLD, "rollback")
    assert last["reason"] == f"rollback from {NEW}: worse live"

    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    assert registry.champion() == OLD


def test_rollbacks_walk_back_through_promotions(registry: Registry, root: Path) -> None:
    third = "lstm-20250401-000000-dddddddd"
    add_version(root, third)
    registry.promote(OLD, "a")
    registry.promote(NEW, "b")
    registry.promote(third, "c")

    assert registry.rollback() == NEW
    assert registry.rollback() == OLD
    registry.promote(third, "again")
    assert registry.rollback() == OLD


def test_rollback_without_a_champion(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback()


def test_promoting_the_champion_again_changes_nothing(registry: Registry, root: Path) -> None:
    registry.promote(OLD, "first")
    before = (root / CHAMPION_FILE).read_bytes()
    registry.promote(OLD, "again")
    assert (root / CHAMPION_FILE).read_bytes() == before


def test_force_is_recorded(registry: Registry, root: Path) -> None:
    registry.promote(NEW, "operator override", force=True)
    history = read_pointer(root)["history"]
    assert history == [  # the whole entry, as written
        {
            "version": NEW,
            "promoted_at": read_pointer(root)["promoted_at"],
            "reason": "operator override",
            "action": "promote",
            "forced": True,
        }
    ]


def test_promote_refuses_unknown_versions(registry: Registry, root: Path) -> None:
    with pytest.raises(RegistryError, match="unknown model version 'nope'"):
        registry.promote("nope", "typo")
    assert not (root / CHAMPION_FILE).exists()


def test_promote_refuses_a_corrupted_model(registry: Registry, root: Path) -> None:
    registry.promote(OLD, "first")
    corrupt_model(root / NEW)
    before = (root / CHAMPION_FILE).read_bytes()

    with pytest.raises(RegistryError, match=f"refusing version {NEW}: .*sha256"):
        registry.promote(NEW, "better", force=True)  # force never bypasses integrity
    assert (root / CHAMPION_FILE).read_bytes() == before


def test_promote_refuses_an_unloadable_model(registry: Registry, root: Path) -> None:
    garbage = b"not an onnx model"
    (root / NEW / MODEL_FILE).write_bytes(garbage)
    edit_manifest(root / NEW, sha256=hashlib.sha256(garbage).hexdigest())
    assert registry.list()[1].sha256_ok
    with pytest.raises(RegistryError, match="onnxruntime cannot load"):
        registry.promote(NEW, "x")


def test_promote_refuses_a_manifest_naming_another_version(
    registry: Registry, root: Path
) -> None:
    edit_manifest(root / NEW, version=OLD)
    assert registry.list()[1].problem == f"manifest version '{OLD}' differs from directory '{NEW}'"
    with pytest.raises(RegistryError, match="differs from directory"):
        registry.promote(NEW, "x")


def test_rollback_refuses_a_corrupted_previous_champion(registry: Registry, root: Path) -> None:
    registry.promote(OLD, "a")
    registry.promote(NEW, "b")
    corrupt_model(root / OLD)
    with pytest.raises(RegistryError, match=f"refusing version {OLD}"):
        registry.rollback()
    assert registry.champion() == NEW


def test_hand_written_pointer_is_kept_in_history(registry: Registry, root: Path) -> None:
    (root / CHAMPION_FILE).write_text(json.dumps({"version": OLD}))
    assert registry.champion() == OLD
    registry.promote(NEW, "b")
    assert registry.rollback() == OLD


def test_pointer_write_is_atomic(
    registry: Registry, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.promote(OLD, "first")
    before = (root / CHAMPION_FILE).read_bytes()
    assert stat.S_IMODE((root / CHAMPION_FILE).stat().st_mode) == 0o644

    def fail(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(RegistryError, match="disk full"):
        registry.promote(NEW, "second")
    monkeypatch.undo()

    assert (root / CHAMPION_FILE).read_bytes() == before
    assert registry.champion() == OLD
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".champion-")]
    assert leftovers == []


def test_corrupt_pointer_is_an_error(registry: Registry, root: Path) -> None:
    (root / CHAMPION_FILE).write_text("{")
    with pytest.raises(RegistryError, match=r"champion\.json is unreadable"):
        registry.champion()
    with pytest.raises(RegistryError, match=r"champion\.json is unreadable"):
        registry.list()


# --- importing ---------------------------------------------------------------------------


def test_add_copies_a_version_in_under_its_manifest_name(tmp_path: Path) -> None:
    source = add_version(tmp_path, "exported")
    edit_manifest(source, version="lstm-20250501-000000-eeeeeeee")
    registry = Registry(tmp_path / "fresh")  # created on first add

    assert registry.add(source) == "lstm-20250501-000000-eeeeeeee"

    (info,) = registry.list()
    assert info.version == "lstm-20250501-000000-eeeeeeee" and info.ok
    assert stat.S_IMODE(info.path.stat().st_mode) == 0o755
    assert registry.champion() is None  # importing does not promote
    with pytest.raises(RegistryError, match="already in"):
        registry.add(source)


def test_add_refuses_a_corrupted_version(tmp_path: Path, registry: Registry, root: Path) -> None:
    source = add_version(tmp_path, "lstm-20250501-000000-eeeeeeee")
    corrupt_model(source)
    before = sorted(p.name for p in root.iterdir())

    with pytest.raises(RegistryError, match=r"cannot add .*sha256"):
        registry.add(source)
    assert sorted(p.name for p in root.iterdir()) == before  # no staging left behind


@pytest.mark.parametrize("bad", ["../escape", ".hidden", "a/b"])
def test_add_refuses_unsafe_version_names(tmp_path: Path, registry: Registry, bad: str) -> None:
    source = add_version(tmp_path, "exported")
    edit_manifest(source, version=bad)
    with pytest.raises(RegistryError, match="not a valid name"):
        registry.add(source)


def test_add_refuses_a_directory_without_a_manifest(tmp_path: Path, registry: Registry) -> None:
    with pytest.raises(RegistryError, match="cannot add"):
        registry.add(tmp_path)


# --- load_forecaster ---------------------------------------------------------------------


def test_load_forecaster_follows_the_champion(registry: Registry, root: Path) -> None:
    forecaster = load_forecaster(root)
    assert isinstance(forecaster, OnnxForecaster) and forecaster.version == NEW

    registry.promote(OLD, "prefer the older one")
    forecaster = load_forecaster(root)
    assert isinstance(forecaster, OnnxForecaster)
    assert (forecaster.version, forecaster.path) == (OLD, root / OLD)

    registry.promote(NEW, "b")
    registry.rollback()
    assert load_forecaster(root).version == OLD


def test_load_forecaster_verifies_the_champion(registry: Registry, root: Path) -> None:
    registry.promote(OLD, "a")
    corrupt_model(root / OLD)  # newer NEW is fine, but the champion is what must serve
    with pytest.raises(ModelIntegrityError):
        load_forecaster(root)


def test_load_forecaster_with_a_missing_champion(registry: Registry, root: Path) -> None:
    registry.promote(OLD, "a")
    shutil.rmtree(root / OLD)
    with pytest.raises(ModelError, match=f"champion '{OLD}' named in .* is not in the registry"):
        load_forecaster(root)


def test_load_forecaster_with_a_corrupt_pointer(root: Path) -> None:
    (root / CHAMPION_FILE).write_bytes(msgspec.json.encode({"version": 3}))
    with pytest.raises(ModelError, match="unreadable"):
        load_forecaster(root)


def test_empty_registry_serves_the_naive_baseline(tmp_path: Path) -> None:
    assert Registry(tmp_path).list() == []
    assert isinstance(load_forecaster(tmp_path), NaiveForecaster)


# --- per-symbol champions ----------------------------------------------------------------


def test_a_symbol_champion_overrides_the_shared_one_for_that_symbol_only(
    registry: Registry, root: Path
) -> None:
    registry.promote(OLD, "shared")
    registry.promote(NEW, "better on ETH", symbol="ETHUSDT")

    assert registry.champion() == OLD
    assert registry.champion("BTCUSDT") == OLD  # no champion of its own: the shared one
    assert registry.champion("ETHUSDT") == NEW
    assert registry.symbol_champions() == {"ETHUSDT": NEW}
    assert registry.selected() == OLD  # what load_forecaster serves stays the shared one
    flags = {i.version: (i.is_champion, i.champion_for) for i in registry.list()}
    assert flags == {OLD: (True, ()), NEW: (False, ("ETHUSDT",))}
    assert registry.show(NEW).info.champion_for == ("ETHUSDT",)
    pointer = read_pointer(root)
    assert pointer["version"] == OLD
    assert [h["version"] for h in pointer["history"]] == [OLD]  # type: ignore[attr-defined]
    eth = pointer["symbols"]["ETHUSDT"]  # type: ignore[index]
    assert eth["version"] == NEW
    assert [(h["version"], h["reason"]) for h in eth["history"]] == [(NEW, "better on ETH")]


def test_a_symbol_champion_without_a_shared_one(registry: Registry) -> None:
    registry.promote(OLD, "only ETH", symbol="ETHUSDT")
    assert registry.champion() is None
    assert registry.champion("ETHUSDT") == OLD
    assert registry.selected() == NEW  # no shared champion: the newest, as before
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback()


def test_promoting_for_a_symbol_the_model_was_not_trained_on_warns(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    trained_on = read_manifest(registry.root / OLD).training_data.symbols
    assert trained_on and "DOGEUSDT" not in trained_on
    registry.promote(OLD, "try it", symbol="DOGEUSDT")
    assert registry.champion("DOGEUSDT") == OLD
    assert "trained on" in caplog.text and "DOGEUSDT" in caplog.text
    caplog.clear()
    registry.promote(NEW, "its own symbol", symbol=trained_on[0])
    assert "trained on" not in caplog.text


def test_symbol_rollback_walks_back_then_returns_to_the_shared_champion(
    registry: Registry, root: Path
) -> None:
    registry.promote(OLD, "shared")
    registry.promote(OLD, "eth a", symbol="ETHUSDT")
    registry.promote(NEW, "eth b", symbol="ETHUSDT")

    assert registry.rollback("worse", symbol="ETHUSDT") == OLD
    assert registry.symbol_champions() == {"ETHUSDT": OLD}
    # The first own champion rolls back to the shared one, which it then follows.
    assert registry.rollback(symbol="ETHUSDT") == OLD
    assert registry.symbol_champions() == {}
    registry.promote(NEW, "shared b")
    assert registry.champion("ETHUSDT") == NEW
    eth = read_pointer(root)["symbols"]["ETHUSDT"]  # type: ignore[index]
    assert eth["version"] is None
    assert [(h["version"], h["action"]) for h in eth["history"]] == [
        (OLD, "promote"), (NEW, "promote"), (OLD, "rollback"), ("", "rollback"),
    ]
    with pytest.raises(RegistryError, match="no champion for ETHUSDT"):
        registry.rollback(symbol="ETHUSDT")
    with pytest.raises(RegistryError, match="no champion for BTCUSDT"):
        registry.rollback(symbol="BTCUSDT")
    # The shared history is untouched by the symbol's.
    assert registry.rollback() == OLD
    registry.promote(NEW, "eth again", symbol="ETHUSDT")
    assert registry.champion("ETHUSDT") == NEW


def test_symbol_promotion_checks_integrity(registry: Registry, root: Path) -> None:
    corrupt_model(root / NEW)
    with pytest.raises(RegistryError, match="sha256"):
        registry.promote(NEW, "x", symbol="ETHUSDT")
    assert registry.symbol_champions() == {}


def test_old_format_pointer_has_no_symbol_champions(registry: Registry, root: Path) -> None:
    (root / CHAMPION_FILE).write_text(json.dumps({
        "version": OLD, "promoted_at": 1,
        "history": [{"version": OLD, "promoted_at": 1, "reason": "old", "action": "promote",
                     "forced": False}],
    }))
    assert registry.champion("ETHUSDT") == OLD
    assert registry.symbol_champions() == {}
    registry.promote(NEW, "eth", symbol="ETHUSDT")
    pointer = read_pointer(root)
    assert (pointer["version"], pointer["promoted_at"]) == (OLD, 1)
    assert registry.champion("ETHUSDT") == NEW
    assert registry.rollback(symbol="ETHUSDT") == OLD
