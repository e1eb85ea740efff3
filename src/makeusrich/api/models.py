"""Request and response bodies of the HTTP API (they are what /docs shows)."""

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from makeusrich.core.errors import ConfigError
from makeusrich.core.intervals import interval_ms
from makeusrich.core.schemas import Candle, Prediction

__all__ = [
    "BacktestAcceptedOut",
    "BacktestIn",
    "BacktestLinksOut",
    "BacktestOut",
    "BacktestStatus",
    "CandleOut",
    "CheckOut",
    "ErrorOut",
    "HealthOut",
    "ModelDetailsOut",
    "ModelOut",
    "PredictionOut",
    "ReadyOut",
    "ValidationErrorOut",
    "ValidationIssueOut",
]

SourceOut = Literal["live", "replay", "sim"]


class _Out(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


class CandleOut(_Out):
    """A closed OHLCV candle (Binance kline semantics; times are UTC epoch milliseconds)."""

    open_time: int = Field(description="candle start, epoch ms")
    close_time: int = Field(description="candle end (open_time + interval - 1), epoch ms")
    open: float
    high: float
    low: float
    close: float
    volume: float = Field(description="base asset volume")
    quote_volume: float = Field(description="quote asset volume")
    trades: int = Field(description="number of trades")
    taker_buy_volume: float
    taker_buy_quote_volume: float
    large_trade_quote_volume: float | None = Field(
        default=None,
        description="quote volume of trades of at least MUR_LARGE_TRADE_QUOTE each; null for "
        "candles made from klines, which do not say")
    symbol: str
    interval: str
    source: SourceOut = Field(description="where the trades came from")

    @classmethod
    def from_record(cls, candle: Candle) -> "CandleOut":
        return cls.model_validate(candle, from_attributes=True)

    @classmethod
    def from_records(cls, candles: Sequence[Candle]) -> list["CandleOut"]:
        # Plain dicts validate about twice as fast as attribute access (matters at 5000).
        return _candles_adapter.validate_python(msgspec.to_builtins(candles))


class PredictionOut(_Out):
    """A forecast of the close of the candle that opens at ``target_open_time``, ``horizon``
    candles after the one at ``candle_open_time``."""

    symbol: str
    interval: str
    candle_open_time: int = Field(description="open time of the candle the forecast was made at")
    target_open_time: int = Field(description="open time of the forecast candle")
    last_close: float = Field(description="close of the candle at candle_open_time")
    predicted_close: float
    lower: float = Field(description="lower bound of the prediction interval")
    upper: float = Field(description="upper bound of the prediction interval")
    model_version: str
    made_at: int = Field(description="when the forecast was made, epoch ms")
    source: SourceOut
    horizon: int = Field(description="candles ahead: target_open_time = candle_open_time + "
                         "horizon * interval (1: the next candle)")

    @classmethod
    def from_record(cls, prediction: Prediction) -> "PredictionOut":
        return cls.model_validate(prediction, from_attributes=True)

    @classmethod
    def from_records(cls, predictions: Sequence[Prediction]) -> list["PredictionOut"]:
        return _predictions_adapter.validate_python(msgspec.to_builtins(predictions))


_candles_adapter = TypeAdapter(list[CandleOut])
_predictions_adapter = TypeAdapter(list[PredictionOut])


class ErrorOut(BaseModel):
    detail: str


class ValidationIssueOut(BaseModel):
    """One problem with a request, as FastAPI reports it."""

    loc: list[str | int] = Field(description="where: e.g. [\"query\", \"limit\"]")
    msg: str
    type: str
    input: Any = None
    ctx: dict[str, Any] | None = None


class ValidationErrorOut(BaseModel):
    """A request that does not validate (FastAPI's 422): one entry per problem."""

    detail: list[ValidationIssueOut]


class HealthOut(BaseModel):
    status: Literal["ok"] = "ok"


class CheckOut(BaseModel):
    ok: bool
    degraded: bool = Field(default=False, description="works, with less redundancy than "
                           "configured (e.g. a Kafka broker down): detail says what")
    detail: str


class ReadyOut(BaseModel):
    status: Literal["ok", "degraded", "unavailable"] = Field(
        description="unavailable (503) when a check failed; degraded (200) when one "
                    "works with less redundancy")
    failed: list[str] = Field(description="names of the checks that failed")
    degraded: list[str] = Field(default_factory=list,
                                description="names of the checks that are degraded")
    checks: dict[str, CheckOut]
    model_version: str | None = None


class ModelOut(_Out):
    """A model version in the registry (``MUR_MODEL_DIR``, else the bundled models)."""

    version: str
    kind: str | None = Field(description="architecture, e.g. lstm; null if unreadable")
    created_at: str | None = Field(description="when it was trained, ISO 8601 UTC")
    window: int | None = Field(description="candles of input per forecast")
    symbols: list[str] = Field(description="symbols it was trained on")
    interval: str | None = Field(description="candle interval it was trained on")
    metrics: dict[str, float] = Field(description="headline validation metrics")
    sha256_ok: bool = Field(description="model.onnx matches the manifest's sha256 (rechecked)")
    is_champion: bool = Field(description="promoted in champion.json")
    baseline: bool = Field(
        default=False,
        description="a baseline packaged as a version (kind garch), not a trained network: "
        "when it is the champion, no network beat the baselines by the serving rule")
    champion_for: list[str] = Field(
        default_factory=list, description="symbols this version serves as their own champion"
    )
    serving: bool = Field(description="the version the worker reports it serves")
    problem: str | None = Field(description="why it cannot be served; null when usable")


class ModelDetailsOut(ModelOut):
    """A model version with its whole manifest."""

    manifest: dict[str, Any] | None = Field(description="manifest.json; null if unreadable")


# ------------------------------------------------------------------------------ backtests

BacktestStatus = Literal["queued", "running", "done", "failed"]

# What the registry accepts as a version name: one safe path component, so a name from an
# HTTP body can never walk out of the registry (the registry itself is checked too).
_MODEL_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_SYMBOL: Final = re.compile(r"[A-Z0-9]{2,20}")
_MAX_BP: Final = 1_000.0  # 10 %: anything above is a typo, not a fee


def _time_ms(value: object) -> object:
    """ISO-8601 (UTC unless it says otherwise) or epoch ms -> epoch ms; the CLI takes both,
    the API stores one form so that ``start < end`` and the echoed request are unambiguous."""
    if isinstance(value, bool):
        return value  # strict int validation refuses it with the usual message
    if isinstance(value, int):
        if value < 0:
            raise ValueError("epoch milliseconds must be >= 0")
        return value
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"invalid time {value!r}: use ISO-8601 UTC (2019-04-01T00:30, 2019-04-01) "
            "or epoch milliseconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ms = int(moment.timestamp() * 1000)
    if ms < 0:
        raise ValueError(f"time {value!r} is before 1970")
    return ms


TimeMs = Annotated[
    int,
    BeforeValidator(_time_ms),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}],
            "description": "ISO-8601 UTC (2019-04-01T00:30) or epoch ms; answered as epoch ms",
        }
    ),
]


class BacktestIn(BaseModel):
    """A backtest to run: replay trades, rebuild candles, score the models, write a report."""

    # Strict: no "10" for 10, no unknown fields (a typo must not silently use a default).
    model_config = ConfigDict(
        strict=True, extra="forbid", frozen=True,
        json_schema_extra={"examples": [{
            "models": ["champion"], "source": "archive", "symbols": ["BTCUSDT"],
            "interval": "1m", "start": "2019-04-01T00:00", "end": "2019-04-01T01:00",
        }]},
    )

    models: list[str] = Field(
        min_length=1, max_length=4,
        description="model versions from /v1/models, or 'champion' (1 to 4); the naive "
        "baselines are always scored next to them",
    )
    source: Literal["kafka", "archive"] = Field(
        description="replay the live trades topic, or the Parquet candle archive"
    )
    symbols: list[str] | None = Field(
        default=None, min_length=1, max_length=20,
        description="symbols, e.g. BTCUSDT (case-insensitive); default: every one in the source",
    )
    interval: str | None = Field(
        default=None, description="candle interval, e.g. 1m; default: the command's (1m)"
    )
    start: TimeMs | None = Field(default=None, description="start of the span (inclusive)")
    end: TimeMs | None = Field(default=None, description="end of the span (exclusive)")
    fee_bp: float = Field(
        default=10.0, ge=0, le=_MAX_BP, allow_inf_nan=False,
        description="fee per unit of position change, basis points",
    )
    slippage_bp: float = Field(
        default=2.0, ge=0, le=_MAX_BP, allow_inf_nan=False,
        description="slippage per unit of position change, basis points",
    )

    @field_validator("models")
    @classmethod
    def _models(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"invalid model name {name!r}: use a version from /v1/models or "
                    "'champion' (letters, digits, '.', '_', '+', '-'; no path separators)"
                )
        return list(dict.fromkeys(value))

    @field_validator("symbols", mode="before")
    @classmethod
    def _symbols(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        symbols = []
        for item in value:
            if not isinstance(item, str):
                return value  # strict str validation names the bad item
            symbol = item.strip().upper()
            if not _SYMBOL.fullmatch(symbol):
                raise ValueError(
                    f"invalid symbol {item!r}: expected 2 to 20 letters or digits, e.g. BTCUSDT"
                )
            symbols.append(symbol)
        return list(dict.fromkeys(symbols))

    @field_validator("interval")
    @classmethod
    def _interval(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            interval_ms(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _span(self) -> "BacktestIn":
        if self.start is not None and self.end is not None and self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be before end ({self.end}), epoch ms")
        return self


class BacktestLinksOut(BaseModel):
    self: str = Field(description="this job: GET for its status")
    events: str = Field(description="SSE of its progress: progress, done, failed")
    report: str = Field(description="report.html, once done")


class BacktestAcceptedOut(BaseModel):
    """A backtest was queued; follow ``links``."""

    id: str
    status: BacktestStatus
    links: BacktestLinksOut


class BacktestOut(BaseModel):
    """A backtest job as any API replica sees it (state lives in Redis)."""

    id: str
    status: BacktestStatus
    stage: str = Field(
        description="queued, starting, then the command's (replay, score, report), done or "
        "failed"
    )
    progress: float = Field(ge=0, le=1, description="overall, 0..1")
    message: str
    created_ms: int = Field(description="when it was submitted, epoch ms")
    updated_ms: int = Field(description="last progress or heartbeat, epoch ms")
    request: BacktestIn
    metrics: dict[str, Any] | None = Field(description="the report's metrics; null until done")
    files: dict[str, str] = Field(description="report file name -> URL; empty until done")
    links: BacktestLinksOut


class DayQualityOut(BaseModel):
    """One UTC day's scored targets (``day``: YYYY-MM-DD): how many, the share of closes
    inside the 80% interval (0.8 when calibrated) and the mean pinball loss in basis points
    (null when unknown)."""

    day: str
    scored: int
    coverage_80: float
    pinball_bp: float | None


class QualityOut(BaseModel):
    """Rolling scores of one model version's live forecasts, as their target candles
    closed (the last ``window`` of ``scored``). ``pinball_bp``, the main score: mean pinball
    loss of the 10%/50%/90% quantiles in basis points of the last close (lower is better;
    null until one is scored). ``skill`` = 1 - mae / mae_persistence; ``error_ratio`` =
    mae / mae_persistence; ``updated_at``: close time of the last scored candle (epoch ms).
    ``days``: coverage and pinball per UTC day of the targets, newest first, the last 8 days."""

    model_version: str
    window: int
    scored: int
    mae: float
    mae_persistence: float
    skill: float | None
    hit_rate: float | None
    coverage_80: float
    error_ratio: float | None
    updated_at: int
    pinball_bp: float | None = None
    days: list[DayQualityOut] = []


class DriftOut(BaseModel):
    """Live features against the model's training reference. ``state`` is ``warming_up``
    until ``drift_window`` candles were seen, then ``ok`` or ``drift`` (entered when the
    largest PSI or the error-ratio drift crosses its threshold, left when both are back
    under 80% of it); ``since``: when the state began (event time, epoch ms)."""

    model_version: str
    state: Literal["warming_up", "ok", "drift"]
    psi: dict[str, float]
    psi_max: float | None
    error_ratio_drift: float | None
    psi_threshold: float
    error_ratio_threshold: float
    since: int
    updated_at: int
    reason: str


class MonitoringOut(BaseModel):
    """Live quality and drift of one series; ``model_version`` is the model whose drift is
    reported (the one serving the series), ``quality`` lists every version scored, most
    recently updated first."""

    symbol: str
    interval: str
    model_version: str | None
    quality: list[QualityOut]
    drift: DriftOut | None
