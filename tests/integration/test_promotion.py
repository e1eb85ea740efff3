"""The promotion rule and `mur models`, on a registry of real model versions."""

import subprocess
import sys
from pathlib import Path

import pytest

from kit.registry import add_version
from makeusrich.core.errors import TrainingError
from makeusrich.inference import Registry
from makeusrich.trainer.promotion import decide_promotion

pytestmark = [pytest.mark.integration]

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    add_version(tmp_path, "lstm-20250101-000000-aaaaaaaa")
    add_version(tmp_path, "lstm-20250102-000000-bbbbbbbb", shift_return_mean=0.01)
    return Registry(tmp_path)


def test_first_version_becomes_champion(registry: Registry) -> None:
    decision = decide_promotion(registry, "lstm-20250101-000000-aaaaaaaa", [DAY])
    assert decision.promote and decision.reason.startswith("no champion yet")


def test_a_network_that_fails_the_serving_rule_is_refused(tmp_path: Path) -> None:
    # A network kind with a shifted return mean: worse than the baselines at every horizon.
    network = "lstm-20250103-000000-cccccccc"
    add_version(tmp_path, network, kind="lstm", shift_return_mean=0.01)
    decision = decide_promotion(Registry(tmp_path), network, [DAY])
    assert not decision.promote
    assert "fails the serving rule" in decision.reason and "horizon 1:" in decision.reason


def test_a_worse_challenger_is_refused_and_a_better_one_promoted(registry: Registry) -> None:
    good, bad = "lstm-20250101-000000-aaaaaaaa", "lstm-20250102-000000-bbbbbbbb"
    registry.promote(good, "test")
    refused = decide_promotion(registry, bad, [DAY])
    assert not refused.promote
    assert refused.challenger_pinball_bp is not None
    assert refused.champion_pinball_bp is not None
    assert refused.challenger_pinball_bp > refused.champion_pinball_bp

    registry.promote(bad, "test", force=True)
    accepted = decide_promotion(registry, good, [DAY])
    assert accepted.promote and "<" in accepted.reason


def _mur(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "makeusrich", *args], capture_output=True,
                          text=True, timeout=300, check=False, env={"PATH": "/usr/bin:/bin"})


def test_mur_models_promote_refuses_then_rollback(registry: Registry) -> None:
    good, bad = "lstm-20250101-000000-aaaaaaaa", "lstm-20250102-000000-bbbbbbbb"
    root = str(registry.root)
    assert _mur("models", "--registry", root, "promote", good, "--data", str(DAY)).returncode == 0
    refused = _mur("models", "--registry", root, "promote", bad, "--data", str(DAY))
    assert refused.returncode == 1 and "not promoted" in refused.stdout
    assert registry.champion() == good
    assert _mur("models", "--registry", root, "promote", bad, "--force").returncode == 0
    assert registry.champion() == bad
    assert _mur("models", "--registry", root, "rollback").returncode == 0
    assert registry.champion() == good
    listing = _mur("models", "--registry", root, "list").stdout
    assert good in listing and bad in listing


def test_a_symbol_promotion_compares_with_that_symbols_champion(registry: Registry) -> None:
    good, bad = "lstm-20250101-000000-aaaaaaaa", "lstm-20250102-000000-bbbbbbbb"
    registry.promote(bad, "test", force=True)
    registry.promote(good, "test", symbol="BTCUSDT")
    # BTCUSDT's own champion is the one to beat, not the shared one.
    refused = decide_promotion(registry, bad, [DAY], symbol="BTCUSDT")
    assert not refused.promote and good in refused.reason
    with pytest.raises(TrainingError, match="no ETHUSDT candles"):
        decide_promotion(registry, good, [DAY], symbol="ETHUSDT")


def test_mur_models_promote_and_rollback_per_symbol(registry: Registry) -> None:
    good, bad = "lstm-20250101-000000-aaaaaaaa", "lstm-20250102-000000-bbbbbbbb"
    root = str(registry.root)
    assert _mur("models", "--registry", root, "promote", bad, "--force").returncode == 0
    promoted = _mur("models", "--registry", root, "promote", good, "--symbol", "btcusdt",
                    "--data", str(DAY))
    assert promoted.returncode == 0, promoted.stderr
    assert (registry.champion(), registry.champion("BTCUSDT")) == (bad, good)
    listing = _mur("models", "--registry", root, "list").stdout
    assert any(good in line and "champion-for:BTCUSDT" in line for line in listing.splitlines())
    rolled = _mur("models", "--registry", root, "rollback", "--symbol", "BTCUSDT")
    assert rolled.returncode == 0 and f"{bad} is champion for BTCUSDT again" in rolled.stdout
    assert registry.symbol_champions() == {}
