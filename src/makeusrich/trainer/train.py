"""Train a quantile forecaster on candles and write a model version directory.

``train(data_paths, out_dir)`` reads candles (see :func:`load_series`), builds windows with
the serving feature code, splits them in time (the last ``validation_fraction`` is
validation, the ``calibration_fraction`` before it calibration, normalisation is fitted on
the training part only), trains with Adam on the pinball loss, exports ONNX, checks
onnxruntime against torch, fits split-conformal scales of the band on the calibration
windows (:func:`makeusrich.inference.conformal.fit_calibration`), evaluates the exported model
and the baselines on the validation candles (:func:`makeusrich.trainer.evaluate.evaluate`)
and writes ``<out_dir>/<version>/{model.onnx,manifest.json}``. The manifest carries that
evaluation and a parity sample (a few validation inputs and their ONNX outputs) so a server
can check that its onnxruntime computes what the trainer exported.
"""

import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import NDArray

from makeusrich.core.errors import TrainingError
from makeusrich.core.intervals import interval_ms
from makeusrich.inference.conformal import fit_calibration
from makeusrich.inference.features import (
    FEATURES,
    OHLCV_COLUMNS,
    FloatArray,
    Normalisation,
    available_features,
    common_features,
    compute_features,
    log_returns,
    prepare_windows,
)
from makeusrich.inference.model import (
    BASELINE_KINDS,
    MANIFEST_FILE,
    MODEL_FILE,
    QUANTILES,
    Architecture,
    Manifest,
    NormalisationStats,
    OnnxForecaster,
    OnnxIO,
    Parity,
    TrainingData,
    horizon_problems,
    naive_log_quantiles,
    sha256_of,
)
from makeusrich.monitoring.reference import reference_from_manifest, write_reference
from makeusrich.trainer.data import CandleSeries, load_series
from makeusrich.trainer.evaluate import MODEL, Report, evaluate

if TYPE_CHECKING:

    from makeusrich.trainer.garch import GarchModel
    from makeusrich.trainer.model import QuantileModel

__all__ = ["ARCHITECTURES", "BASELINE_ARCHITECTURES", "EXPORT_TOLERANCE", "train"]

log = logging.getLogger(__name__)

#: Model architectures :func:`train` can build; the first is the default.
ARCHITECTURES = ("lstm", "gru", "tcn", "transformer", "tft")
#: Baselines :func:`train` can package as a model version, to serve when no network beats
#: them (see :mod:`makeusrich.trainer.garch`).
BASELINE_ARCHITECTURES = BASELINE_KINDS
#: Largest accepted |onnxruntime - torch| on validation outputs (log-return units).
EXPORT_TOLERANCE = 1e-4
_CHUNK = 4096  # windows per inference call; bounds memory on long validation sets


@dataclass
class _Part:
    """Windows of one side of the split, as raw (un-normalised) features."""

    windows: FloatArray
    target: FloatArray  # (windows, horizons): log return from the last close to each ahead
    first_target_open_time: int  # of the first window's next candle
    returns: FloatArray  # (windows, window): the log returns of each window's candles


@dataclass
class _Index:
    series: CandleSeries
    features: FloatArray
    returns: FloatArray  # log return of each feature row's candle, a feature or not
    end: NDArray[np.int64]  # feature row of each window's last candle


def _window_index(
    all_series: Sequence[CandleSeries], window: int, names: Sequence[str], reach: int
) -> list[_Index]:
    # Feature row j describes candle j + 1; a window ending at row j targets rows j + 1 ..
    # j + reach (its largest horizon), which must all exist.
    indexes = []
    for series in all_series:
        features = compute_features(series.ohlcv, names)
        returns = compute_features(series.ohlcv, ("log_return",))[:, 0]
        count = len(features) - window - (reach - 1)
        if count > 0:
            ends = np.arange(window - 1, window - 1 + count)
            indexes.append(_Index(series, features, returns, ends))
    if not indexes:
        raise TrainingError(
            f"too few candles: need more than {window + reach + 1} consecutive ones")
    return indexes


def _gather(
    indexes: Sequence[_Index], picks: Sequence[NDArray[np.int64]], window: int,
    horizons: Sequence[int],
) -> _Part:
    windows, target, first, returns = [], [], [], []
    for index, ends in zip(indexes, picks, strict=True):
        if not len(ends):
            continue
        view = sliding_window_view(index.features, window, axis=0)  # (rows, features, window)
        windows.append(view[ends - (window - 1)].transpose(0, 2, 1))
        # The log return h candles ahead is the sum of the next h one-candle ones.
        cumulative = np.concatenate([[0.0], np.cumsum(index.returns)])
        target.append(np.stack(
            [cumulative[ends + 1 + h] - cumulative[ends + 1] for h in horizons], axis=1))
        first.append(int(index.series.open_time[ends[0] + 2]))
        returns.append(sliding_window_view(index.returns, window)[ends - (window - 1)])
    if not windows:
        raise TrainingError("a split side has no windows; pass more candles")
    return _Part(
        windows=np.concatenate(windows),
        target=np.concatenate(target),
        first_target_open_time=min(first),
        returns=np.concatenate(returns),
    )


def _split(
    indexes: Sequence[_Index], window: int, horizons: Sequence[int],
    validation_fraction: float, calibration_fraction: float, stride: int,
) -> tuple[_Part, _Part | None, _Part]:
    # Cut-off times shared by all series, in time order: training targets (of every
    # horizon) lie before the first, calibration windows between the two, validation
    # windows after the second.
    end_times = np.concatenate([ix.series.open_time[ix.end + 1] for ix in indexes])
    cutoff = int(np.quantile(end_times, 1.0 - validation_fraction))
    calibration_cutoff = int(
        np.quantile(end_times, 1.0 - validation_fraction - calibration_fraction))
    train_picks, calibration_picks, validation_picks = [], [], []
    for ix in indexes:
        last_time = ix.series.open_time[ix.end + 1]
        target_time = ix.series.open_time[ix.end + 1 + horizons[-1]]
        train_picks.append(ix.end[target_time < calibration_cutoff][::stride])
        calibration_picks.append(
            ix.end[(last_time >= calibration_cutoff) & (target_time < cutoff)])
        validation_picks.append(ix.end[last_time >= cutoff])
    calibration = (_gather(indexes, calibration_picks, window, horizons)
                   if calibration_fraction > 0 else None)
    return (_gather(indexes, train_picks, window, horizons), calibration,
            _gather(indexes, validation_picks, window, horizons))


def _pinball(quantiles: FloatArray, target: FloatArray) -> float:
    error = target[:, None] - quantiles
    levels = np.asarray(QUANTILES)
    return float(np.mean(np.maximum(levels * error, (levels - 1) * error)))


def _metrics(validation: _Part, quantiles: FloatArray, report: Report) -> dict[str, float]:
    """Headline validation metrics, of the next close (horizon 1). From ``report`` (so they
    agree with the manifest's evaluation): MAE in quote currency against persistence
    (``skill`` = 1 - mae / mae_persistence), 80% interval coverage and mean width in basis
    points. Of the log return, from the validation windows: the pinball loss of the served
    (sorted, calibrated) quantiles ``(windows, horizons, 3)``, before adaptive conformal.
    ``*_naive`` are the same for the naive (persistence) forecaster."""
    scores = report.overall.metrics
    model, naive = scores[MODEL], scores["persistence"]
    return {
        "mae": model.mae,
        "mae_persistence": naive.mae,
        "skill": 0.0 if model.skill is None else model.skill,
        "coverage_80": model.coverage_80,
        "coverage_80_naive": naive.coverage_80,
        "interval_width_bp": model.interval_width_bp,
        "interval_width_bp_naive": naive.interval_width_bp,
        "pinball": _pinball(quantiles[:, 0], validation.target[:, 0]),
        "pinball_naive": _pinball(
            naive_log_quantiles(validation.returns), validation.target[:, 0]),
    }


def _fit(
    train_part: _Part,
    inputs: NDArray[np.float32],
    *,
    arch: str,
    window: int,
    hidden: int,
    layers: int | None,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    progress: bool,
) -> tuple["QuantileModel", float]:
    import torch
    from tqdm import tqdm

    from makeusrich.trainer.model import build_model, pinball_loss

    torch.manual_seed(seed)
    target = train_part.target.astype(np.float32)
    scales = [float(s) or 1.0 for s in np.std(target, axis=0)]
    model = build_model(
        arch,
        n_features=inputs.shape[-1],
        window=window,
        hidden=hidden,
        layers=layers,
        target_scales=scales,
        initial_quantiles=np.quantile(target, QUANTILES, axis=0).T.ravel().tolist(),
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    x, y = torch.from_numpy(inputs), torch.from_numpy(target)
    loss_scales = torch.tensor(scales)
    order = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    # On stderr; disable=None turns the bar off when stderr is not a terminal (logs, tests).
    with tqdm(
        total=epochs * math.ceil(len(x) / batch_size),
        desc=f"training {arch}",
        unit="batch",
        disable=None if progress else True,
    ) as bar:
        for epoch in range(epochs):
            model.train()
            total, batches = 0.0, 0
            for batch in torch.split(torch.randperm(len(x), generator=order), batch_size):
                loss = pinball_loss(model(x[batch]), y[batch], loss_scales)
                optimiser.zero_grad()
                torch.autograd.backward(loss)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimiser.step()
                total += loss.item()
                batches += 1
                bar.update()
            loss_value = total / batches
            bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{loss_value:.4f}")
            log.info("epoch %d/%d: pinball loss %.5f target stds", epoch + 1, epochs, loss_value)
    model.eval()
    return model, loss_value


def _fit_garch(
    all_series: Sequence[CandleSeries], before: int, train_part: _Part,
    inputs: NDArray[np.float32], window: int, horizons: Sequence[int],
    normalisation: Normalisation,
) -> tuple["GarchModel", float]:
    """GARCH(1,1) fitted on every one-candle log return whose candle opens before
    ``before`` (the training span, whatever the stride), and its pinball loss on the
    training windows in target stds, as :func:`_fit` reports it."""
    import torch

    from makeusrich.trainer.garch import fit_garch
    from makeusrich.trainer.model import pinball_loss

    close = OHLCV_COLUMNS.index("close")
    returns = np.concatenate([log_returns(s.ohlcv[s.open_time < before, close])
                              for s in all_series])
    model = fit_garch(returns, window, horizons, normalisation,
                      normalisation.features.index("log_return"))
    target = torch.from_numpy(train_part.target.astype(np.float32))
    scales = target.std(dim=0)
    with torch.no_grad():
        loss = pinball_loss(model(torch.from_numpy(inputs)), target, scales).item()
    return model, loss


def _in_chunks(
    run: Callable[[NDArray[np.float32]], FloatArray], inputs: NDArray[np.float32]
) -> FloatArray:
    return np.concatenate([run(inputs[i : i + _CHUNK]) for i in range(0, len(inputs), _CHUNK)])


def _check_export(
    model: "QuantileModel | GarchModel", forecaster: OnnxForecaster,
    inputs: NDArray[np.float32],
) -> float:
    import torch

    def torch_run(batch: NDArray[np.float32]) -> FloatArray:
        with torch.no_grad():
            return np.asarray(model(torch.from_numpy(batch)).numpy(), dtype=np.float64)

    # A batch of one as well as full chunks: the exported batch axis must really be dynamic.
    diff = max(
        float(np.max(np.abs(_in_chunks(torch_run, part) - _in_chunks(forecaster.run, part))))
        for part in (inputs[:1], inputs)
    )
    if not diff < EXPORT_TOLERANCE:
        raise TrainingError(
            f"onnxruntime and torch disagree by {diff:.3g} (limit {EXPORT_TOLERANCE}); "
            "the ONNX export is wrong, do not ship it"
        )
    return diff


def _training_data(
    all_series: Sequence[CandleSeries], train_part: _Part, validation: _Part
) -> TrainingData:
    return TrainingData(
        symbols=tuple(sorted({s.symbol for s in all_series})),
        interval=all_series[0].interval,
        first_open_time=min(int(s.open_time[0]) for s in all_series),
        last_open_time=max(int(s.open_time[-1]) for s in all_series),
        candles=sum(len(s) for s in all_series),
        filled_candles=sum(s.filled for s in all_series),
        train_windows=len(train_part.target),
        validation_windows=len(validation.target),
        validation_first_target_open_time=validation.first_target_open_time,
    )


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST_FILE).write_bytes(
        msgspec.json.format(msgspec.json.encode(manifest)) + b"\n"
    )


def _select(all_series: list[CandleSeries], symbols: Sequence[str] | None) -> list[CandleSeries]:
    if symbols is None:
        return all_series
    wanted = {symbols.upper()} if isinstance(symbols, str) else {s.upper() for s in symbols}
    if not wanted:
        raise TrainingError("symbols is empty; pass None to train on every symbol")
    available = {s.symbol for s in all_series}
    if wanted - available:
        raise TrainingError(
            f"no candles of {sorted(wanted - available)} in the data; it has {sorted(available)}"
        )
    return [s for s in all_series if s.symbol in wanted]


def _features(
    all_series: Sequence[CandleSeries], features: Sequence[str] | None
) -> tuple[str, ...]:
    """The features to train on, in the supported order: ``features``, or (None) every
    supported one that all of ``all_series`` have."""
    available = common_features(s.ohlcv for s in all_series)
    if features is None:
        return available
    wanted = [features] if isinstance(features, str) else list(features)
    unknown = [name for name in wanted if name not in FEATURES]
    if unknown:
        raise TrainingError(f"unknown features {unknown}; supported: {list(FEATURES)}")
    if not wanted:
        raise TrainingError("features is empty; pass None for every available one")
    have = [(f"{s.symbol} {s.interval}", available_features(s.ohlcv)) for s in all_series]
    for name in wanted:
        lacking = sorted({series for series, names in have if name not in names})
        if lacking:
            raise TrainingError(
                f"feature {name} is not available: candles of {lacking} lack its data "
                "(candles made from klines have no large_trade_quote_volume); available: "
                f"{list(available)}"
            )
    return tuple(f for f in FEATURES if f in wanted)


def train(
    data_paths: Path | str | Sequence[Path | str],
    out_dir: Path | str,
    *,
    arch: str = ARCHITECTURES[0],
    symbols: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
    window: int = 30,
    horizons: Sequence[int] = (1,),
    epochs: int = 10,
    hidden: int = 32,
    layers: int | None = None,
    stride: int = 1,
    batch_size: int = 256,
    learning_rate: float = 2e-3,
    validation_fraction: float = 0.15,
    calibration_fraction: float = 0.1,
    seed: int = 7,
    threads: int = 1,
    progress: bool = True,
) -> Path:
    """Train on candle files and return the new version directory inside ``out_dir``.

    ``data_paths``: files, directories or glob patterns (see :func:`load_series`).
    ``arch``: one of :data:`ARCHITECTURES`; it also prefixes the version name.
    ``symbols``: train only on these symbols' series (None: all in the data); either way
    one model is shared by every symbol trained on. ``layers`` None is the architecture's
    default (see :func:`makeusrich.trainer.model.build_model`). ``features``: the model's
    input features, any of :data:`FEATURES` (taken in that order); None: every one that all
    the training candles have (``large_trade_share`` only when none lacks its
    ``large_trade_quote_volume``, i.e. never with klines). The manifest records them.
    ``horizons``: the candles ahead the model forecasts (ascending, starting at 1), one
    quantile head each, trained together with each horizon's loss in units of its spread.
    ``calibration_fraction`` of the windows, just before validation, are held out of
    training to fit split-conformal scales of the band (0: none; see
    :mod:`makeusrich.inference.conformal`).
    ``stride`` keeps every n-th training window (validation keeps all) to trade data for
    time. ``progress``: a progress bar over the training batches on stderr, when it is a
    terminal. Deterministic for a given seed and thread count. Raises :class:`TrainingError`
    when torch is missing, an option or symbol is unknown, the data is too short, or the
    ONNX export does not match torch.
    """
    try:
        import torch
    except ImportError as exc:
        raise TrainingError(
            "training needs torch: pip install 'makeusrich[train]' (torch==2.13.0)"
        ) from exc
    from makeusrich.trainer.model import INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx

    if arch not in ARCHITECTURES + BASELINE_ARCHITECTURES:
        raise TrainingError(f"unknown architecture {arch!r}; choose one of "
                            f"{list(ARCHITECTURES + BASELINE_ARCHITECTURES)}")
    garch = arch in BASELINE_ARCHITECTURES
    if garch and features is None:
        features = ("log_return",)
    if window < 2 or epochs < 1 or stride < 1 or not 0 < validation_fraction < 1:
        raise TrainingError("need window >= 2, epochs >= 1, stride >= 1, 0 < validation < 1")
    if not 0 <= calibration_fraction < 1 - validation_fraction:
        raise TrainingError("need 0 <= calibration < 1 - validation")
    horizons = tuple(horizons)
    bad_horizons = horizon_problems(horizons)
    if bad_horizons:
        raise TrainingError("; ".join(bad_horizons))
    if layers is not None and layers < 1:
        raise TrainingError("need layers >= 1 (or None for the architecture's default)")
    started = time.perf_counter()
    all_series = _select(load_series(data_paths), symbols)
    intervals = sorted({s.interval for s in all_series})
    if len(intervals) != 1:
        raise TrainingError(f"candles of several intervals {intervals}: train one at a time")
    names = _features(all_series, features)
    if garch and "log_return" not in names:
        raise TrainingError("garch forecasts from log_return: include it in features")
    log.info("features: %s", ", ".join(names))
    train_part, calibration_part, validation = _split(
        _window_index(all_series, window, names, horizons[-1]),
        window,
        horizons,
        validation_fraction,
        calibration_fraction,
        stride,
    )
    normalisation = Normalisation.fit(train_part.windows, names)
    train_inputs = prepare_windows(train_part.windows, normalisation)
    validation_inputs = prepare_windows(validation.windows, normalisation)
    log.info(
        "%d training windows, %d validation windows", len(train_inputs), len(validation_inputs)
    )

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fit_started = time.perf_counter()
        model: QuantileModel | GarchModel
        if garch:
            before = (validation if calibration_part is None
                      else calibration_part).first_target_open_time
            model, train_loss = _fit_garch(all_series, before, train_part, train_inputs,
                                           window, horizons, normalisation)
            hidden, epochs = 0, 1  # fitted once by maximum likelihood
        else:
            model, train_loss = _fit(
                train_part,
                train_inputs,
                arch=arch,
                window=window,
                hidden=hidden,
                layers=layers,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=learning_rate,
                seed=seed,
                progress=progress,
            )
        seconds_per_epoch = (time.perf_counter() - fit_started) / epochs
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # Build in a hidden directory, then rename: a watcher never sees half a version.
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a service user
        try:
            export_onnx(model, staging / MODEL_FILE, window, len(names))
            sha256 = sha256_of(staging / MODEL_FILE)
            created = datetime.now(UTC)
            manifest = Manifest(
                version=f"{arch}-{created:%Y%m%d-%H%M%S}-{sha256[:8]}",
                architecture=Architecture(
                    kind=arch,
                    hidden=hidden,
                    layers=model.layers,
                    parameters=sum(p.numel() for p in model.parameters()),
                ),
                window=window,
                features=names,
                normalisation=NormalisationStats(mean=normalisation.mean, std=normalisation.std),
                quantiles=QUANTILES,
                target="next_log_return" if horizons == (1,) else "log_return_ahead",
                horizons=horizons,
                training_data=_training_data(all_series, train_part, validation),
                metrics={},
                training={
                    "epochs": epochs,
                    "batch_size": batch_size,
                    "learning_rate": learning_rate,
                    "stride": stride,
                    "seed": seed,
                    "threads": threads,
                    "final_train_loss": train_loss,
                    "seconds_per_epoch": round(seconds_per_epoch, 3),
                    "torch": str(torch.__version__),
                },
                sha256=sha256,
                created_at=created.isoformat(timespec="seconds"),
                onnx=OnnxIO(input=INPUT_NAME, output=OUTPUT_NAME, opset=OPSET),
            )
            _write_manifest(staging, manifest)
            # Metrics come from the exported model through the serving code path.
            forecaster = OnnxForecaster(staging)
            diff = _check_export(model, forecaster, validation_inputs)
            if calibration_part is not None:
                # Split conformal on windows neither trained on nor validated on; the
                # served forecaster applies it from here on, so validation scores it.
                bands = _in_chunks(forecaster.log_quantiles,
                                   prepare_windows(calibration_part.windows, normalisation))
                manifest = msgspec.structs.replace(manifest, calibration=tuple(
                    fit_calibration(bands[:, k], calibration_part.target[:, k], horizon)
                    for k, horizon in enumerate(horizons)
                ))
                _write_manifest(staging, manifest)
                forecaster = OnnxForecaster(staging)
            # Forecasts made at the candle before the first validation target on: the
            # targets are the validation candles only, none the model trained on.
            report = evaluate(
                forecaster,
                all_series,
                start_open_time=validation.first_target_open_time - interval_ms(intervals[0]),
            )
            metrics = _metrics(
                validation, _in_chunks(forecaster.log_quantiles, validation_inputs), report)
            metrics["onnx_torch_max_abs_diff"] = diff
            sample = validation_inputs[[0, -1]]  # the first and the last validation window
            manifest = msgspec.structs.replace(
                manifest,
                metrics=metrics,
                evaluation=report.to_dict(),
                parity=Parity(input=sample.tolist(), output=forecaster.run(sample).tolist()),
                training={
                    **manifest.training,
                    "wall_time_s": round(time.perf_counter() - started, 1),
                },
            )
            _write_manifest(staging, manifest)
            # Drift monitoring: the training feature distribution, from the candles in
            # memory, written before the rename so a version never appears without it.
            write_reference(staging, reference_from_manifest(manifest, all_series))
            target = out / manifest.version
            if target.exists():
                raise TrainingError(f"{target} already exists")
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    finally:
        torch.set_num_threads(previous_threads)
    log.info("wrote %s: %s", target, metrics)
    return target
