"""The one configuration object. Built once in the entry point and passed down."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from makeusrich.core.errors import ConfigError
from makeusrich.core.intervals import parse_intervals
from makeusrich.core.keys import RedisKeys, Topics
from makeusrich.core.schemas import LARGE_TRADE_QUOTE

SourceSpec = str  # "auto" | "binance" | "sim" | "replay:PATH"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class Settings(BaseSettings):
    """Every option, read from ``MUR_*`` environment variables (or ``.env``) and CLI flags."""

    model_config = SettingsConfigDict(
        env_prefix="MUR_", env_file=".env", frozen=True, extra="ignore"
    )

    # Where the services are. None = `mur up` starts embedded ones on free ports.
    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    kafka_port: int | None = Field(default=None, description="embedded broker port")
    kafka_engine: Literal["tansu", "apache"] = Field(
        default="tansu",
        description="the broker: tansu (embedded default: no idempotent producer, no "
                    "transactions, so at-least-once) or apache (Apache Kafka: idempotent "
                    "ingest, exactly-once processing); `mur up` starts the one named here "
                    "when kafka_bootstrap is unset",
    )
    processing_guarantee: Literal["at_least_once", "exactly_once"] = Field(
        default="at_least_once",
        description="the worker's: exactly_once (Apache Kafka only: Faust's transactions; "
                    "read_committed consumers of candles/predictions see each record once "
                    "across worker kills); not yet dependable under broker faults and untested "
                    "with workers joining (README, Running on Apache Kafka)")
    kafka_replication_factor: int = Field(
        default=1, ge=1, description="replicas of each topic this app creates")
    kafka_libs_dir: Path = Field(
        default=Path(".kafka-libs"),
        description="Apache Kafka's jars (`make kafka-libs`), for `mur up` with kafka_engine "
                    "apache")
    kafka_properties: Path = Field(
        default=Path("infra/kafka/server.properties"),
        description="the broker settings `mur up` starts Apache Kafka from (the file the "
                    "compose stack mounts)")
    redis_port: int | None = Field(default=None, description="embedded redis-server port")

    # What to follow.
    symbols: Annotated[tuple[str, ...], NoDecode] = ("BTCUSDT", "ETHUSDT")
    intervals: Annotated[tuple[str, ...], NoDecode] = ("1m",)
    source: SourceSpec = "auto"
    replay_speed: float | None = Field(
        default=1.0,
        description="replay speed as a multiple of real time; 'max' (None) = as fast as possible",
    )
    sim_trades_per_s: float = 20.0
    sim_seed: int = 7

    # Binance endpoints (overridden by tests to a local fake Binance).
    binance_ws_url: str = "wss://stream.binance.com:9443"
    binance_rest_url: str = "https://api.binance.com/api"
    binance_connect_timeout_s: float = 5.0
    reconnect_max_backoff_s: float = 30.0

    # Candles.
    grace_ms: int = 2_000
    large_trade_quote: float = Field(
        default=LARGE_TRADE_QUOTE, gt=0, description="a trade of at least this notional "
        "(quote units) counts as large in a candle's large_trade_quote_volume")

    # Models.
    model_dir: Path | None = Field(
        default=None, description="model version directory or registry; None = bundled model"
    )
    conformal_step: float = Field(
        default=0.005, ge=0, le=0.5, description="adaptive conformal step of the served "
        "80% band: after each scored forecast, each side's log width multiplier moves by "
        "step x 0.9 on a miss and -step x 0.1 otherwise, so each side misses 10% in the long "
        "run (0: serve the model's band as it is); inference.conformal.DEFAULT_STEP")

    # Storage.
    redis_prefix: str = "mur"
    topic_prefix: str = Field(
        default="", pattern=r"^[A-Za-z0-9._-]*$",
        description="prepended to every topic name; Kafka allows ASCII letters, digits, "
                    "'.', '_' and '-' only")
    trades_partitions: int = 4
    history_maxlen: int = 200_000
    events_maxlen: int = 100_000
    state_dir: Path = Path(".mur")
    archive_dir: Path = Field(
        default=Path(".mur/archive"),
        description="Parquet candle archive (symbol=/interval=/date= partitions), written by "
        "the archiver and `mur backfill`, read by `mur train`; default: STATE_DIR/archive",
    )

    # Worker (Faust). Tansu's group join takes ~30 s with Faust's default timeouts.
    worker_id: str = "makeusrich"
    worker_instance: str = Field(
        default="", description="this worker's name in its group (MUR_WORKER_INSTANCE), for its "
        "counters' Redis hash and its logs: empty for a lone worker; 'auto' = the host name, "
        "as each replica of a scaled compose service has its own")
    broker_rebalance_timeout_s: float = 5.0
    broker_session_timeout_s: float = 6.0

    # Publishing trades: batches of one symbol's trades (see stream.publisher).
    trades_batch_max: int = Field(default=1_000, gt=0, description="trades per batch message "
                                  "at most; a replay at full speed sends batches this size")
    trades_linger_ms: int = Field(default=20, ge=0, le=1_000, description="how long a batch "
                                  "waits for more trades at most (0: every trade alone)")

    # API.
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_workers: int = Field(
        default=1, ge=1, le=64, description="API processes sharing the port (SO_REUSEPORT, "
        "Linux); each holds its own Redis subscription and SSE clients")
    sse_heartbeat_s: float = 15.0
    sse_client_queue_max: int = 2_000
    api_send_timeout_s: float = Field(
        default=30.0, gt=0, description="a client connection that accepts no data for this "
        "long (it stopped reading, or vanished) is dropped and everything it holds released")
    max_limit: int = 5_000
    forwarded_allow_ips: Annotated[tuple[str, ...], NoDecode] = Field(
        default=("127.0.0.1", "::1"), description="addresses or networks (CIDR) of the "
        "reverse proxies whose X-Forwarded-For the API trusts for the client address ('*': "
        "any, only when nothing else can reach the API)")

    # Monitoring. The worker serves Prometheus metrics on this port (None: not at all;
    # `mur up` picks a free one).
    worker_metrics_port: int | None = None
    # `mur ingest` and `mur trainer` serve theirs here (None: not at all); bound like the
    # worker's, on MUR_API_HOST.
    ingest_metrics_port: int | None = None
    trainer_metrics_port: int | None = None
    quality_window: int = Field(default=240, ge=10, description="predictions in the rolling "
                                "live-quality scores, per symbol, interval and model version")
    drift_window: int = Field(default=240, ge=30, description="recent candles whose features "
                              "are compared with the model's training reference")
    drift_psi_threshold: float = Field(
        default=0.5, gt=0, description="floor of every feature's PSI limit; the limit is the "
        "larger of this and the 99th percentile of the training data's own windows")
    drift_error_ratio_threshold: float = Field(
        default=1.5, gt=1, description="live (model MAE / persistence MAE) over the same "
        "ratio on the validation span, above which the model is drifting")
    drift_retrain: bool = Field(default=False, description="`mur trainer` starts a run as "
                                "soon as a drift event is raised")

    # Access. "dev" (what `mur up` runs) lets anonymous clients in by default; "prod" does
    # not. Limits of API keys come from their plan (see makeusrich.access).
    environment: Literal["dev", "prod"] = "prod"
    anonymous_access: bool | None = Field(
        default=None, description="allow requests without an API key (None: only in dev)")
    anonymous_rpm: int = Field(default=60, ge=1, description="per client IP")
    anonymous_daily: int = Field(default=5_000, ge=1, description="per client IP")
    anonymous_sse: int = Field(default=2, ge=0, description="concurrent SSE per client IP")
    admin_api: bool = Field(default=False, description="serve /admin routes (to admin keys)")
    cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    max_body_bytes: int = Field(default=65_536, ge=1_024)

    # Backtests run by the API (each is a `mur backtest` child process).
    backtest_max_concurrent: int = Field(default=2, ge=1)
    backtest_max_queued: int = Field(default=8, ge=0)

    log_level: str = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _archive_in_state_dir(cls, data: object) -> object:
        if isinstance(data, dict) and not data.get("archive_dir"):
            return {**data, "archive_dir": Path(data.get("state_dir") or ".mur") / "archive"}
        return data

    @model_validator(mode="after")
    def _transactions_need_apache(self) -> "Settings":
        if self.processing_guarantee == "exactly_once" and self.kafka_engine != "apache":
            raise ValueError("processing_guarantee exactly_once needs kafka_engine apache "
                             "(Tansu has no transactions)")
        return self

    @field_validator("symbols", mode="before")
    @classmethod
    def _symbols(cls, value: object) -> object:
        value = _split_csv(value)
        if isinstance(value, tuple | list):
            return tuple(str(item).upper() for item in value)
        return value

    @field_validator("cors_origins", "forwarded_allow_ips", mode="before")
    @classmethod
    def _origins(cls, value: object) -> object:
        return _split_csv(value)

    @property
    def anonymous_allowed(self) -> bool:
        if self.anonymous_access is not None:
            return self.anonymous_access
        return self.environment == "dev"

    @field_validator("replay_speed", mode="before")
    @classmethod
    def _replay_speed(cls, value: object) -> object:
        return None if value in ("max", "MAX") else value

    @field_validator("intervals", mode="before")
    @classmethod
    def _intervals(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_intervals(value)
        if isinstance(value, tuple | list):
            return parse_intervals(",".join(str(item) for item in value))
        return value

    def as_env(self) -> dict[str, str]:
        """These settings as ``MUR_*`` variables, so a child process builds the same ones."""
        env = {}
        for name, value in self.model_dump().items():
            if value is None:
                if name == "replay_speed":
                    env["MUR_REPLAY_SPEED"] = "max"
                continue
            if isinstance(value, tuple | list):
                value = ",".join(str(v) for v in value)
            env[f"MUR_{name.upper()}"] = str(value)
        return env

    @property
    def redis_keys(self) -> RedisKeys:
        return RedisKeys(self.redis_prefix)

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def source_kind(self) -> Literal["auto", "binance", "sim", "replay"]:
        kind = self.source.split(":", 1)[0]
        if kind not in ("auto", "binance", "sim", "replay"):
            raise ConfigError(
                f"unknown source {self.source!r}; use auto, binance, sim or replay:PATH"
            )
        return kind  # type: ignore[return-value]
