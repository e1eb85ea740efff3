"""A backtest end to end: replay the span once per model, read back what the pipeline made,
score it and write the report.

Each model gets its own replay (its own namespace, the model pinned), so every prediction in
the report was made by the code and the model a live worker would have used. The replays'
namespaces are deleted afterwards unless ``keep`` is set.
"""

import asyncio
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from makeusrich.backtest.report import write_report
from makeusrich.backtest.score import BacktestResult, Costs, score_backtest
from makeusrich.core.errors import ConfigError, RegistryError
from makeusrich.core.schemas import Candle, Prediction
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore
from makeusrich.inference import Registry
from makeusrich.stream.control import registry_root
from makeusrich.stream.replay import (
    Progress,
    ReplayResult,
    ReplaySpec,
    drop_namespace,
    replay,
    replay_settings,
)

__all__ = ["BacktestOutcome", "resolve_model_dir", "run_backtest"]

_REPLAY_SHARE = 0.9  # of the progress bar; scoring and the report take the rest
_ALL = 10**12  # "every record" as a read limit


@dataclass(frozen=True)
class BacktestOutcome:
    result: BacktestResult
    report_dir: Path
    files: dict[str, Path]  # by file name
    replays: list[ReplayResult]


def resolve_model_dir(model: str, registry_dir: Path) -> Path:
    """The version directory ``model`` names: ``champion`` (what a worker would serve from
    ``registry_dir``), a version in it, or a version directory's path."""
    if model == "naive":
        raise ConfigError(
            "naive is not a model to replay: every backtest scores the naive "
            "baselines (persistence, drift, EMA) next to the models"
        )
    registry = Registry(registry_dir)
    if model == "champion":
        version = registry.selected()
        if version is None:
            raise RegistryError(f"no model in {registry_dir} to serve as champion")
        return registry.root / version
    if model in registry.versions():
        return registry.root / model
    path = Path(model)
    if path.is_dir() and Registry(path).versions() == [path.name]:
        return path
    known = ", ".join(registry.versions()) or "none"
    raise RegistryError(
        f"unknown model {model!r}: not champion, a version in "
        f"{registry.root} (known: {known}) or a version directory"
    )


async def run_backtest(
    settings: Settings,
    spec: ReplaySpec,
    models: Sequence[str],
    out_dir: Path,
    costs: Costs,
    *,
    long_only: bool = False,
    progress: Progress | None = None,
    keep: bool = False,
) -> BacktestOutcome:
    """Backtest each of ``models`` (see :func:`resolve_model_dir`) on ``spec`` and write
    the report into ``out_dir``. ``settings`` must address running Kafka and Redis."""
    if not models:
        raise ConfigError("name at least one model to backtest")
    if len(set(models)) != len(models):
        raise ConfigError(f"a model is named twice: {list(models)}")
    report = progress or (lambda share, text: None)
    model_dirs = [resolve_model_dir(model, registry_root(settings)) for model in models]
    token = secrets.token_hex(4)
    replays: list[ReplayResult] = []
    candles: list[Candle] = []
    predictions: dict[str, list[Prediction]] = {}
    share = _REPLAY_SHARE / len(models)
    for index, (model, model_dir) in enumerate(zip(models, model_dirs, strict=True)):

        def step(done: float, text: str, index: int = index, model: str = model) -> None:
            report(share * (index + done), f"{model}: {text}")

        run_id = f"bt-{token}-{index}"
        try:
            result = await replay(settings, spec, run_id, model_dir=model_dir, progress=step)
            replays.append(result)
            run_candles, predictions[model] = await _read_back(result)
        finally:
            if not keep:
                await asyncio.to_thread(drop_namespace,
                                        replay_settings(settings, run_id, model_dir))
        # Every replay builds the same candles from the same span; the first is kept.
        candles = candles or run_candles
    report(_REPLAY_SHARE, "scoring")
    scored = score_backtest(candles, predictions, costs, long_only=long_only,
                            adaptive_step=settings.conformal_step)
    report(_REPLAY_SHARE + (1 - _REPLAY_SHARE) / 2, "writing the report")
    written = await asyncio.to_thread(write_report, out_dir, scored, candles, predictions)
    files = {path.name: path for path in written.values()}
    return BacktestOutcome(result=scored, report_dir=out_dir, files=files, replays=replays)


async def _read_back(result: ReplayResult) -> tuple[list[Candle], list[Prediction]]:
    run = result.settings
    store = RedisStore.from_settings(run)
    candles: list[Candle] = []
    predictions: list[Prediction] = []
    try:
        for symbol in result.symbols:
            for interval in run.intervals:
                candles += await store.candles(symbol, interval, start_ms=0, limit=_ALL)
                predictions += await store.predictions(symbol, interval, start_ms=0, limit=_ALL)
    finally:
        await store.aclose()
    return candles, predictions
