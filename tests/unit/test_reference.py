"""Training feature references: the same rows as the live side, deciles, the file, the
bundled model's reference."""

from pathlib import Path

import msgspec
import numpy as np
import pytest

from kit.builders import kline_candles
from kit.registry import bundled_version_dir
from makeusrich.core.errors import ModelError
from makeusrich.inference import (
    FEATURES,
    MANIFEST_FILE,
    RELATIVE_FEATURES,
    compute_features,
    read_manifest,
)
from makeusrich.monitoring.reference import (
    BINS,
    REFERENCE_FILE,
    FeatureReference,
    bin_indices,
    build_reference,
    feature_row,
    feature_rows,
    manifest_error_ratio,
    read_reference,
    reference_for_version,
    write_reference,
)
from makeusrich.trainer.data import CandleSeries, load_series

DAY = Path(__file__).parent.parent / "data" / "BTCUSDT-1m-2025-11-20.csv"
WINDOW = 30
MINUTE = 60_000
BUNDLED = bundled_version_dir()
# What klines have: every feature but large_trade_share (both relative ones among them).
KLINE_FEATURES = tuple(f for f in FEATURES if f != "large_trade_share")


@pytest.fixture(scope="module")
def day() -> CandleSeries:
    (series,) = load_series(DAY)
    return series


def test_vectorised_rows_equal_the_live_row_of_every_window(day: CandleSeries) -> None:
    candles = kline_candles(DAY)
    rows = feature_rows(day.ohlcv, WINDOW, KLINE_FEATURES)
    assert rows.shape == (len(candles) - WINDOW, len(KLINE_FEATURES))
    for t in range(WINDOW, len(candles)):
        # The live side only ever has the history up to the candle that just closed.
        live = feature_row(candles[: t + 1], WINDOW, KLINE_FEATURES)
        assert live is not None
        np.testing.assert_array_equal(rows[t - WINDOW], live)
    # A feature the candles lack gives no live row (and NaN in the vectorised ones), and no
    # reference.
    assert feature_row(candles, WINDOW, FEATURES) is None
    assert np.isnan(feature_rows(day.ohlcv, WINDOW, FEATURES)[:, -1]).all()
    with pytest.raises(ModelError, match=r"lack \['large_trade_share'\]"):
        build_reference([day], WINDOW, "v", None, features=FEATURES)


def test_feature_row_is_the_last_model_row_with_volume_relative_to_its_window() -> None:
    candles = kline_candles(DAY)[:100]
    row = feature_row(candles, WINDOW, KLINE_FEATURES)
    features = compute_features(candles[-(WINDOW + 1) :], KLINE_FEATURES)
    assert row is not None
    relative = [KLINE_FEATURES.index(name) for name in RELATIVE_FEATURES]
    others = [i for i in range(len(KLINE_FEATURES)) if i not in relative]
    np.testing.assert_array_equal(row[others], features[-1, others])
    for i in relative:  # volume and trade count
        assert row[i] == pytest.approx(features[-1, i] - features[:, i].mean())
    # Only the last window + 1 candles count; fewer give no row.
    assert np.array_equal(feature_row(candles[-(WINDOW + 1) :], WINDOW, KLINE_FEATURES), row)
    assert feature_row(candles[:WINDOW], WINDOW, KLINE_FEATURES) is None


def test_deciles_split_the_training_rows_into_tenths(day: CandleSeries) -> None:
    reference = build_reference([day], WINDOW, "test-v1", 0.97)
    rows = feature_rows(day.ohlcv, WINDOW, KLINE_FEATURES)
    assert reference.samples == len(rows) == len(day) - WINDOW
    assert reference.features == KLINE_FEATURES  # by default, what every candle has
    assert (reference.first_open_time, reference.last_open_time) == (
        int(day.open_time[0]),
        int(day.open_time[-1]),
    )
    edges = reference.edges_array()
    assert edges.shape == (len(KLINE_FEATURES), BINS - 1)
    assert np.all(np.diff(edges, axis=1) > 0)
    counts = np.stack([np.bincount(b, minlength=BINS) for b in bin_indices(edges, rows).T])
    np.testing.assert_allclose(reference.proportions_array(), counts / len(rows))
    # 1,410 continuous values: every bin holds a tenth, to a row or two.
    np.testing.assert_allclose(reference.proportions_array(), 0.1, atol=2 / len(rows))


def test_bins_count_edges_at_or_below_a_value() -> None:
    edges = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]])
    values = np.array([[-5.0], [1.0], [1.5], [9.0], [100.0]])
    assert bin_indices(edges, values)[:, 0].tolist() == [0, 1, 1, 9, 9]


def test_a_reference_round_trips_through_its_file(tmp_path: Path, day: CandleSeries) -> None:
    reference = build_reference([day], WINDOW, "test-v1", 0.97)
    path = write_reference(tmp_path, reference)
    assert path == tmp_path / REFERENCE_FILE
    assert read_reference(tmp_path) == reference
    assert [p.name for p in tmp_path.iterdir()] == [REFERENCE_FILE]  # no temporary left


def test_a_missing_reference_is_none_and_a_corrupt_one_an_error(
    tmp_path: Path, day: CandleSeries
) -> None:
    assert read_reference(tmp_path) is None
    (tmp_path / REFERENCE_FILE).write_text("{not json")
    with pytest.raises(ModelError, match="not a valid feature reference"):
        read_reference(tmp_path)
    reference = build_reference([day], WINDOW, "test-v1", None)
    bad_bins = msgspec.structs.replace(
        reference,
        bins={
            **reference.bins,
            "log_range": msgspec.structs.replace(
                reference.bins["log_range"], edges=reference.bins["log_range"].edges[:-1]
            ),
        },
    )
    write_reference(tmp_path, bad_bins)
    with pytest.raises(ModelError, match="log_range: need 9 edges"):
        read_reference(tmp_path)
    write_reference(tmp_path, msgspec.structs.replace(reference, features=("log_return",)))
    with pytest.raises(ModelError, match="features"):
        read_reference(tmp_path)
    renamed = {**reference.bins, "rsi": reference.bins["log_range"]}
    del renamed["log_range"]
    unknown = ("log_return", "rsi", *reference.features[2:])
    write_reference(tmp_path, msgspec.structs.replace(reference, features=unknown, bins=renamed))
    with pytest.raises(ModelError, match=r"unknown features \['rsi'\]"):
        read_reference(tmp_path)


def test_the_bundled_reference_belongs_to_the_bundled_model() -> None:
    manifest = read_manifest(BUNDLED)
    reference = read_reference(BUNDLED)
    assert isinstance(reference, FeatureReference)
    assert reference.version == manifest.version
    assert reference.window == manifest.window
    assert reference.features == manifest.features
    data = manifest.training_data
    assert reference.symbols == data.symbols
    assert reference.interval == data.interval
    # The training span: from the first candle up to the validation span's first target.
    assert reference.first_open_time == data.first_open_time
    assert reference.last_open_time == data.validation_first_target_open_time - MINUTE
    candles = (data.validation_first_target_open_time - data.first_open_time) // MINUTE
    assert reference.samples == candles - manifest.window
    assert reference.error_ratio == pytest.approx(
        manifest.metrics["mae"] / manifest.metrics["mae_persistence"]
    )
    # Ties at a log return of exactly 0 (unchanged closes) may crowd one bin; none is empty.
    assert reference.proportions_array().min() > 0.05


def _version_dir(tmp_path: Path, day: CandleSeries, **changes: object) -> Path:
    """The bundled manifest, re-pointed at a span of the test day."""
    manifest = read_manifest(BUNDLED)
    data = msgspec.structs.replace(
        manifest.training_data,
        first_open_time=int(day.open_time[100]),
        validation_first_target_open_time=int(day.open_time[1000]),
    )
    manifest = msgspec.structs.replace(manifest, training_data=data, **changes)
    version_dir = tmp_path / manifest.version
    version_dir.mkdir()
    (version_dir / MANIFEST_FILE).write_bytes(msgspec.json.encode(manifest))
    return version_dir


def test_reference_for_version_uses_only_the_training_span(
    tmp_path: Path, day: CandleSeries
) -> None:
    version_dir = _version_dir(tmp_path, day)
    reference = reference_for_version(version_dir, [DAY])
    span = CandleSeries(
        day.symbol, day.interval, day.open_time[100:1000], day.ohlcv[100:1000], filled=0
    )
    manifest = read_manifest(version_dir)
    assert reference == build_reference(
        [span],
        manifest.window,
        manifest.version,
        manifest_error_ratio(manifest),
        features=manifest.features,
    )
    assert reference.features == manifest.features  # the model's, not all the data has
    assert reference.samples == 900 - WINDOW


def test_reference_for_version_refuses_data_outside_the_training_span(
    tmp_path: Path, day: CandleSeries
) -> None:
    # The test day lies in the bundled model's validation span, after its training data.
    version_dir = tmp_path / "v"
    version_dir.mkdir()
    (version_dir / MANIFEST_FILE).write_bytes((BUNDLED / MANIFEST_FILE).read_bytes())
    with pytest.raises(ModelError, match="training span"):
        reference_for_version(version_dir, [DAY])


def test_the_error_ratio_comes_from_the_evaluation_first(tmp_path: Path, day: CandleSeries) -> None:
    evaluation = {"overall": {"metrics": {"model": {"mae": 3.0}, "persistence": {"mae": 2.0}}}}
    manifest = read_manifest(_version_dir(tmp_path, day, evaluation=evaluation))
    assert manifest_error_ratio(manifest) == 1.5
    bare = msgspec.structs.replace(manifest, evaluation=None, metrics={})
    assert manifest_error_ratio(bare) is None
    exact = msgspec.structs.replace(bare, metrics={"mae": 1.0, "mae_persistence": 0.0})
    assert manifest_error_ratio(exact) is None


@pytest.mark.train
@pytest.mark.slow
def test_a_trained_version_carries_its_reference(tmp_path: Path) -> None:
    import torch  # noqa: F401  (the [train] extra must be installed)

    from makeusrich.trainer import train

    version_dir = train(DAY, tmp_path / "models", epochs=1, hidden=8, progress=False)
    reference = read_reference(version_dir)
    manifest = read_manifest(version_dir)
    assert reference is not None and reference.version == manifest.version
    # Written from the candles in memory, it equals one rebuilt from the files.
    assert reference == reference_for_version(version_dir, [DAY])
    assert reference.error_ratio == pytest.approx(
        manifest.metrics["mae"] / manifest.metrics["mae_persistence"]
    )
    assert reference.last_open_time < manifest.training_data.validation_first_target_open_time


def test_psi_limits_are_the_99th_percentile_of_the_training_windows(day: CandleSeries) -> None:
    from makeusrich.monitoring.drift import DriftMonitor, psi

    window = 120
    reference = build_reference([day], WINDOW, "v", None, psi_window=window)
    assert reference.psi_window == window
    rows = feature_rows(day.ohlcv, WINDOW, reference.features)
    bins = bin_indices(reference.edges_array(), rows)  # (n, features)
    # Brute force: PSI of every window of the training rows, per feature.
    window_psi = np.array([
        psi(np.stack([np.bincount(bins[i:i + window, f], minlength=BINS) / window
                      for f in range(bins.shape[1])]), reference.proportions_array())
        for i in range(len(rows) - window + 1)
    ])
    for f, name in enumerate(reference.features):
        limit = reference.psi_limit(name, window)
        assert limit == pytest.approx(np.quantile(window_psi[:, f], 0.99))
        assert reference.psi_limit(name, window + 1) is None  # calibrated for one window only
    # A monitor takes the larger of its threshold and the calibrated limit.
    monitor = DriftMonitor(reference, window, psi_threshold=0.25, error_ratio_threshold=1.5)
    assert monitor.psi_limits == {name: max(0.25, reference.bins[name].psi_limit or 0.0)
                                  for name in reference.features}


def test_the_bundled_reference_is_calibrated_for_the_default_drift_window() -> None:
    from makeusrich.core.settings import Settings

    reference = read_reference(BUNDLED)
    assert reference is not None
    window = Settings().drift_window
    limits = [reference.psi_limit(name, window) for name in reference.features]
    assert all(limit is not None and limit > 0 for limit in limits)
