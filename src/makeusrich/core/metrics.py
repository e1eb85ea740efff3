"""Every Prometheus metric of the service, defined in one place.

Each process builds its own set: :class:`WorkerMetrics` (served by ``mur worker`` on
``Settings.worker_metrics_port``), :class:`ApiMetrics` (``GET /metrics`` of the API),
:class:`IngestMetrics` (``mur ingest``, ``Settings.ingest_metrics_port``) or
:class:`TrainerMetrics` (``mur trainer``, ``Settings.trainer_metrics_port``); the three
processes without an HTTP server of their own serve theirs with :func:`serve_metrics`. Each
set owns a fresh ``CollectorRegistry``, never the library's global default one, so several
apps in one process (tests, ``serve_in_thread``) do not collide on metric names.

Labels stay small and bounded: symbols and intervals are configured, model versions are
pruned to those still serving, HTTP routes are route templates (never raw paths) and
methods, statuses and dead-letter reasons are mapped onto fixed sets.

The worker sees every trade, so its per-trade metrics (:meth:`WorkerMetrics.trade`) are
plain integers and a bucket list updated from the event loop (the only writer) and turned
into samples at scrape time: ~0.7 µs per trade, where prometheus_client's locked Counter
and Histogram take 2-3 µs.
"""

import bisect
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar, Final, Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder, start_http_server
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from makeusrich.core.errors import ConfigError
from makeusrich.core.schemas import Candle, Prediction, Trade

if TYPE_CHECKING:  # the monitoring and trainer packages build on core, not the other way round
    from makeusrich.monitoring import Observation
    from makeusrich.trainer.schedule import RunSummary

__all__ = [
    "ACCESS_REFUSALS",
    "DEAD_LETTER_REASONS",
    "RUN_OUTCOMES",
    "ApiMetrics",
    "IngestMetrics",
    "LiveIngestCounts",
    "TrainerMetrics",
    "WorkerMetrics",
    "expose",
    "method_label",
    "serve_metrics",
    "status_class",
]

log = logging.getLogger(__name__)

#: Dead letters are counted by the class of their reason (the text before the colon).
DEAD_LETTER_REASONS: Final = ("undecodable", "invalid", "late")
#: (status, reason) of every refusal of the API's access checks (makeusrich.api.access).
ACCESS_REFUSALS: Final = (
    ("401", "missing"), ("401", "malformed"), ("401", "unknown"), ("401", "revoked"),
    ("403", "not_admin"), ("429", "rate"), ("429", "daily"), ("429", "streams"),
)
SHARED_SCOPE: Final = "shared"
#: How a scheduled training run ended: its version promoted, kept unserved, or no version.
RUN_OUTCOMES: Final = ("promoted", "kept", "failed")
_RUN_TRIGGERS: Final = ("schedule", "drift")
_NAIVE_VERSION: Final = "naive"  # NaiveForecaster's version: always a possible fallback
_OTHER: Final = "other"
_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

# Binance trades reach us in ~10-300 ms; replays stamp ts_ingest when they publish, so
# their lag is the age of the data (+Inf here): that is why the lag is labelled by source.
_INGEST_LAG_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                              10.0, 30.0, 60.0)
# Closing a candle is a Kafka send plus one Redis round trip; seconds mean a backlog.
_CLOSE_LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# The bundled LSTM answers in ~140 µs, the naive baseline in ~35 µs (one core).
_INFERENCE_BUCKETS: Final = (0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                             0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_REQUEST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                           2.5, 5.0, 10.0)


def _registry() -> CollectorRegistry:
    """A fresh registry with the process, platform and GC metrics the default one has."""
    registry = CollectorRegistry()
    # They read /proc and the interpreter at scrape time; one instance per registry is fine.
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def expose(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry's samples and their content type, in the format ``accept`` asks for
    (Prometheus text format unless OpenMetrics is asked for)."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type


class _Served(Protocol):
    port_setting: ClassVar[str]

    @property
    def registry(self) -> CollectorRegistry: ...


def serve_metrics(metrics: _Served, host: str, port: int) -> None:
    """Serve ``metrics`` at ``http://host:port/metrics`` from a daemon thread.

    Processes bind where the API does (``MUR_API_HOST``, loopback by default): one setting
    decides whether the service is reachable from other hosts, Prometheus included.
    """
    try:
        start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}; free the port or "
                          f"set {metrics.port_setting} to another one") from exc
    log.info("metrics on http://%s:%d/metrics", host, port)


def method_label(method: str) -> str:
    """The HTTP method, or ``other`` for anything non-standard a client made up."""
    return method if method in _METHODS else _OTHER


def status_class(status: int) -> str:
    """``2xx``, ``4xx``, ...; ``other`` outside 100-599."""
    return f"{status // 100}xx" if 100 <= status <= 599 else _OTHER


def _dead_letter_class(reason: str) -> str:
    kind = reason.partition(":")[0].strip()
    return kind if kind in DEAD_LETTER_REASONS else _OTHER


class _LagHistogram:
    """A histogram with one writer (the worker's event loop) and no lock: the scrape
    thread only reads, and a list copy is atomic under the GIL."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(_INGEST_LAG_BUCKETS) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(_INGEST_LAG_BUCKETS, seconds)] += 1
        self.sum += seconds

    def observe_many(self, seconds: npt.NDArray[np.float64]) -> None:
        """``observe`` each of ``seconds``, bucketed at once."""
        buckets = np.searchsorted(_INGEST_LAG_BUCKETS, seconds, side="left")
        added = np.bincount(buckets, minlength=len(self.counts)).tolist()
        self.counts = [count + more for count, more in zip(self.counts, added, strict=True)]
        self.sum += float(seconds.sum())


class _HotPathCollector(Collector):
    """Exposes the worker's lock-free per-trade counts and the pipeline's duplicate count."""

    def __init__(self, trades: dict[str, int], lags: dict[str, _LagHistogram],
                 duplicates: Callable[[], int]) -> None:
        self._trades = trades
        self._lags = lags
        self.duplicates = duplicates

    def _families(self) -> tuple[CounterMetricFamily, HistogramMetricFamily,
                                 CounterMetricFamily]:
        return (
            CounterMetricFamily("mur_trades_consumed", "Trades folded into candles, per "
                                "symbol (rate() = trades in/s)", labels=("symbol",)),
            HistogramMetricFamily("mur_ingest_lag_seconds", "Per trade: ts_ingest - ts_event, "
                                  "i.e. exchange to ingestor (replays: the data's age)",
                                  labels=("source",)),
            CounterMetricFamily("mur_duplicate_trades", "Trades dropped because their id was "
                                "already folded in (redelivery after a restart or rebalance)"),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()  # names only: lets the registry detect collisions

    def collect(self) -> Iterable[Metric]:
        trades, lag, duplicates = self._families()
        for symbol, count in list(self._trades.items()):
            trades.add_metric((symbol,), count)
        for source, histogram in list(self._lags.items()):
            counts, total = list(histogram.counts), histogram.sum
            cumulative, buckets = 0, []
            for bound, count in zip((*_INGEST_LAG_BUCKETS, float("inf")), counts, strict=True):
                cumulative += count
                buckets.append((_bucket_label(bound), cumulative))
            lag.add_metric((source,), buckets, total)
        duplicates.add_metric((), self.duplicates())
        return (trades, lag, duplicates)


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


class WorkerMetrics:
    """The worker's metrics. Build one per worker app; see :mod:`makeusrich.stream.app` for
    where each is measured."""

    port_setting: ClassVar[str] = "MUR_WORKER_METRICS_PORT"

    def __init__(self) -> None:
        self.registry = registry = _registry()
        # Per-trade series: plain numbers (see _HotPathCollector), written by trade().
        self._trades: dict[str, int] = {}
        self._lags: dict[str, _LagHistogram] = {}
        self._hot = _HotPathCollector(self._trades, self._lags, lambda: 0)
        registry.register(self._hot)

        self.dead_letters = Counter(
            "mur_dead_letters_total", "Messages sent to the dead-letter topic, by reason class",
            ("reason",), registry=registry)
        self.late_trades = Counter(
            "mur_late_trades_total", "Trades that arrived after their candle had closed",
            ("symbol",), registry=registry)
        self.candles_closed = Counter(
            "mur_candles_closed_total", "Candles closed and written",
            ("symbol", "interval"), registry=registry)
        self.predictions = Counter(
            "mur_predictions_total", "Predictions made and written (one per horizon)",
            ("symbol", "interval"), registry=registry)
        self.candle_close_latency = Histogram(
            "mur_candle_close_latency_seconds", "Wall time from the ingest of the trade that "
            "closed a candle (its ts_ingest) to the candle written to Kafka and Redis",
            ("interval",), buckets=_CLOSE_LATENCY_BUCKETS, registry=registry)
        self.inference_latency = Histogram(
            "mur_inference_latency_seconds", "Time one forecast took, per model version "
            "(naive: the persistence baseline)",
            ("model_version",), buckets=_INFERENCE_BUCKETS, registry=registry)
        self.model_info = Gauge(
            "mur_model_info", "1 for each model version being served: scope 'shared' (every "
            "symbol without its own) or the symbol it serves", ("version", "scope"),
            registry=registry)
        self.model_rejections = Counter(
            "mur_model_rejections_total", "Announced models refused (hash, parity or loading "
            "failed); the previous model kept serving", registry=registry)
        self.redis_errors = Counter(
            "mur_redis_errors_total", "Failed Redis calls, by operation",
            ("operation",), registry=registry)
        self.kafka_errors = Counter(
            "mur_kafka_errors_total", "Failed Kafka sends, by topic (logical name)",
            ("topic",), registry=registry)

        # Live quality (of the model serving the series) and drift, set by monitored() as
        # each candle closes; one series per symbol and interval (and feature).
        series = ("symbol", "interval")
        self.quality_mae = Gauge(
            "mur_quality_mae", "Rolling mean absolute error of the served model's predicted "
            "close (quote currency)", series, registry=registry)
        self.quality_hit_rate = Gauge(
            "mur_quality_hit_rate", "Rolling share of predictions with the right direction "
            "(0-1)", series, registry=registry)
        self.quality_pinball = Gauge(
            "mur_quality_pinball_bp", "Rolling mean pinball loss of the served model's "
            "10%/50%/90% quantiles, in basis points of the last close (lower is better)",
            series, registry=registry)
        self.quality_coverage_80 = Gauge(
            "mur_quality_coverage_80", "Rolling share of closes inside the 10%-90% interval "
            "(0-1; 0.8 when calibrated)", series, registry=registry)
        self.drift_psi = Gauge(
            "mur_drift_psi", "Population stability index of a model input feature, recent "
            "candles vs the model's training reference", (*series, "feature"),
            registry=registry)
        self.drift_error_ratio = Gauge(
            "mur_drift_error_ratio", "Live (model MAE / persistence MAE) over the same ratio "
            "on the validation span", series, registry=registry)
        self.drift_active = Gauge(
            "mur_drift_active", "1 while the series is considered drifting, else 0", series,
            registry=registry)

        self._serving: dict[str, str] = {}  # scope label -> version
        for reason in DEAD_LETTER_REASONS:
            self.dead_letters.labels(reason)  # exported as 0 before the first one

    # ---------------------------------------------------------------- per trade

    def trade(self, trade: Trade) -> None:
        """Count one consumed trade and observe its ingest lag (the hot path)."""
        symbol = trade.symbol
        self._trades[symbol] = self._trades.get(symbol, 0) + 1
        if trade.ts_ingest > 0:  # 0: never stamped (e.g. a file read straight to Kafka)
            lag = self._lags.get(trade.source)
            if lag is None:
                lag = self._lags[trade.source] = _LagHistogram()
            # Clocks of Binance and this host differ by a few ms: no negative lags.
            lag.observe(max(trade.ts_ingest - trade.ts_event, 0) / 1000)

    def trades(self, symbol: str, source: str, ts_ingest: int,
               ts_event: npt.NDArray[np.int64]) -> None:
        """``trade`` for a batch of one symbol's trades (one ``ts_ingest`` for all)."""
        self._trades[symbol] = self._trades.get(symbol, 0) + len(ts_event)
        if ts_ingest > 0:
            lag = self._lags.get(source)
            if lag is None:
                lag = self._lags[source] = _LagHistogram()
            lag.observe_many(np.maximum(ts_ingest - ts_event, 0) / 1000)

    def count_duplicates(self, read: Callable[[], int]) -> None:
        """Export ``read()`` (a monotonic count kept elsewhere) as the duplicates counter."""
        self._hot.duplicates = read

    # ------------------------------------------------------- per message/candle

    def dead_letter(self, reason: str) -> None:
        """Count a dead letter; ``reason`` is its text (``"invalid: ..."``)."""
        self.dead_letters.labels(_dead_letter_class(reason)).inc()

    def closed(self, candles: Sequence[Candle], predictions: Sequence[Prediction],
               inference_s: Sequence[tuple[str, float]], late: Sequence[Trade],
               closed_by_ingest_ms: int, written_s: float) -> None:
        """Count what one message produced once it is written: ``closed_by_ingest_ms`` is
        the ts_ingest of the message that closed the candles, ``written_s`` the wall time
        (epoch seconds) when the writes completed."""
        for candle in candles:
            self.candles_closed.labels(candle.symbol, candle.interval).inc()
            if closed_by_ingest_ms > 0:
                latency_s = max(written_s - closed_by_ingest_ms / 1000, 0.0)
                self.candle_close_latency.labels(candle.interval).observe(latency_s)
        for prediction in predictions:
            self.predictions.labels(prediction.symbol, prediction.interval).inc()
        for version, seconds in inference_s:
            self.inference_latency.labels(version).observe(seconds)
        for trade in late:
            self.late_trades.labels(trade.symbol).inc()

    # ------------------------------------------------------------------ models

    def monitored(self, observation: "Observation") -> None:
        """Export a series' live quality and drift after a closed candle."""
        drift = observation.drift
        labels = (drift.symbol, drift.interval)
        serving = [q for q in observation.quality if q.model_version == drift.model_version]
        if serving:
            quality = serving[0]
            self.quality_mae.labels(*labels).set(quality.mae)
            self.quality_coverage_80.labels(*labels).set(quality.coverage_80)
            if quality.hit_rate is not None:
                self.quality_hit_rate.labels(*labels).set(quality.hit_rate)
            if quality.pinball_bp is not None:
                self.quality_pinball.labels(*labels).set(quality.pinball_bp)
        for feature, value in drift.psi.items():
            self.drift_psi.labels(*labels, feature).set(value)
        if drift.error_ratio_drift is not None:
            self.drift_error_ratio.labels(*labels).set(drift.error_ratio_drift)
        self.drift_active.labels(*labels).set(1 if drift.state == "drift" else 0)

    def model_served(self, symbol: str | None, version: str | None) -> None:
        """``version`` now serves ``symbol`` (None: the shared model); ``version`` None:
        the symbol has no model of its own any more. Old label sets are removed, and the
        inference latency of versions no longer served, so hot swaps do not pile up series.
        """
        scope = SHARED_SCOPE if symbol is None else symbol
        old = self._serving.pop(scope, None)
        if old is not None:
            self.model_info.remove(old, scope)
        if version is not None:
            self._serving[scope] = version
            self.model_info.labels(version, scope).set(1)
        if old is not None and old != _NAIVE_VERSION and old not in self._serving.values():
            _remove_if_present(self.inference_latency, old)


def _remove_if_present(metric: Histogram, *labels: str) -> None:
    # Older prometheus_client versions raise KeyError for a label set never observed.
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class ApiMetrics:
    """The API's metrics. Build one per app (:func:`makeusrich.api.create_app`)."""

    #: Distinct route labels kept; any further one is counted as ``other``. Route
    #: templates are few (one per endpoint): this only guards against a bug leaking paths.
    MAX_ROUTES: Final = 100

    def __init__(self) -> None:
        self.registry = registry = _registry()
        self.request_duration = Histogram(
            "mur_http_request_duration_seconds", "Time to the response headers (for the SSE "
            "stream: to open it), by method, route template and status class",
            ("method", "route", "status_class"), buckets=_REQUEST_BUCKETS, registry=registry)
        self.sse_clients = Gauge(
            "mur_sse_clients", "SSE clients connected to /v1/stream", registry=registry)
        self.sse_events_sent = Counter(
            "mur_sse_events_sent_total", "SSE events written to clients, by event type",
            ("type",), registry=registry)
        self.sse_clients_dropped = Counter(
            "mur_sse_clients_dropped_total", "SSE clients disconnected for falling behind "
            "(their queue was full)", registry=registry)
        self.redis_errors = Counter(
            "mur_redis_errors_total", "Redis failures: request (answered 503), stream (the "
            "SSE backlog read), subscription (the live-event subscription was lost), "
            "access (the API-key and limits check: keyed requests answered 503, anonymous "
            "ones let through)", ("operation",), registry=registry)
        self.access_refused = Counter(
            "mur_access_refused_total", "Requests refused by the access checks, by status "
            "and reason: 401 missing (no key where one is required), malformed (not a mur_ "
            "key or not Bearer), unknown, revoked; 403 not_admin (/admin without an admin "
            "key); 429 rate (the route class's token bucket), daily (the daily quota), "
            "streams (too many concurrent SSE streams)", ("status", "reason"),
            registry=registry)
        for status, reason in ACCESS_REFUSALS:
            self.access_refused.labels(status, reason)  # exported as 0 before the first
        self._routes: set[str] = set()
        self._routes_lock = threading.Lock()

    def route_label(self, template: str | None) -> str:
        """The label for a route template; None (no route matched) is ``unmatched``."""
        if template is None:
            return "unmatched"
        if template in self._routes:
            return template
        with self._routes_lock:
            if len(self._routes) >= self.MAX_ROUTES:
                return _OTHER
            self._routes.add(template)
        return template

    def observe_request(self, method: str, route: str | None, status: int,
                        seconds: float) -> None:
        self.request_duration.labels(
            method_label(method), self.route_label(route), status_class(status)
        ).observe(seconds)


class LiveIngestCounts(Protocol):
    """What the live Binance ingestor counts (:class:`makeusrich.stream.ingest.BinanceIngestor`)."""

    @property
    def messages(self) -> int: ...
    @property
    def reconnects(self) -> int: ...
    @property
    def gaps(self) -> int: ...
    @property
    def backfilled(self) -> int: ...
    @property
    def bad_messages(self) -> int: ...
    @property
    def duplicates_skipped(self) -> int: ...


class IngestMetrics(Collector):
    """The ingestor's metrics (``mur ingest``). Build one per process.

    As the worker's per-trade counts, plain numbers written by the event loop and turned
    into samples at scrape time: :meth:`published` counts every trade of any source (see
    :class:`makeusrich.stream.ingest.MeteredSink`); the live source's own counts are read
    from it (:meth:`watch`), and stay 0 for replays and the simulator.
    """

    port_setting: ClassVar[str] = "MUR_INGEST_METRICS_PORT"

    def __init__(self) -> None:
        self._published: dict[str, int] = {}
        self._last_event_ms: dict[str, int] = {}
        self._live: LiveIngestCounts | None = None
        self.registry = _registry()
        self.registry.register(self)

    def published(self, symbol: str, ts_event: int, count: int = 1) -> None:
        """Count ``count`` trades of ``symbol`` handed to the publisher, the newest at
        ``ts_event`` (the hot path)."""
        self._published[symbol] = self._published.get(symbol, 0) + count
        if ts_event > self._last_event_ms.get(symbol, 0):
            self._last_event_ms[symbol] = ts_event

    def watch(self, live: LiveIngestCounts) -> None:
        """Export ``live``'s counts from now on."""
        self._live = live

    def _families(self) -> tuple[CounterMetricFamily, GaugeMetricFamily,
                                 dict[str, CounterMetricFamily]]:
        published = CounterMetricFamily(
            "mur_ingest_trades_published", "Trades handed to the Kafka producer, per symbol "
            "(any source; backfilled ones included)", labels=("symbol",))
        last_event = GaugeMetricFamily(
            "mur_ingest_last_trade_event_timestamp_seconds", "Exchange time of the newest "
            "trade published, per symbol: time() minus it is how far behind the feed is",
            labels=("symbol",))
        live = {
            "messages": CounterMetricFamily(
                "mur_ingest_messages_received", "Messages read from the Binance websocket "
                "(trades, duplicates and bad ones)"),
            "reconnects": CounterMetricFamily(
                "mur_ingest_reconnects", "Websocket connections opened after the first "
                "(drops, Binance's 24 h close)"),
            "gaps": CounterMetricFamily(
                "mur_ingest_gaps_backfilled", "Jumps in a symbol's trade ids on the "
                "websocket, filled from REST before the next trade was published"),
            "backfilled": CounterMetricFamily(
                "mur_ingest_trades_backfilled", "Trades published from REST to fill gaps"),
            "bad_messages": CounterMetricFamily(
                "mur_ingest_bad_messages", "Websocket messages sent to the dead-letter topic "
                "(undecodable, not a trade, or an unsubscribed symbol)"),
            "duplicates_skipped": CounterMetricFamily(
                "mur_ingest_duplicate_trades", "Trades the websocket sent again (after a "
                "reconnect), skipped by trade id"),
        }
        return published, last_event, live

    def describe(self) -> Iterable[Metric]:
        published, last_event, live = self._families()
        return (published, last_event, *live.values())

    def collect(self) -> Iterable[Metric]:
        published, last_event, live = self._families()
        for symbol, count in list(self._published.items()):
            published.add_metric((symbol,), count)
        for symbol, ms in list(self._last_event_ms.items()):
            last_event.add_metric((symbol,), ms / 1000)
        for name, family in live.items():
            family.add_metric((), 0 if self._live is None else getattr(self._live, name))
        return (published, last_event, *live.values())


class TrainerMetrics:
    """The scheduled trainer's metrics (``mur trainer``), recorded as each run ends."""

    port_setting: ClassVar[str] = "MUR_TRAINER_METRICS_PORT"

    def __init__(self) -> None:
        self.registry = registry = _registry()
        self.runs = Counter(
            "mur_trainer_runs_total", "Training runs finished, by outcome (promoted: the new "
            "version won the promotion rule and serves; kept: it lost and stays in the "
            "registry unserved; failed: see the log) and by what started them (schedule, "
            "drift)", ("outcome", "trigger"), registry=registry)
        self.last_run_duration = Gauge(
            "mur_trainer_last_run_duration_seconds", "How long the last run took (training, "
            "the promotion rule and the announcement)", registry=registry)
        self.last_success = Gauge(
            "mur_trainer_last_success_timestamp_seconds", "When the last run that did not "
            "fail ended (0: none yet)", registry=registry)
        self.promotions = Counter(
            "mur_trainer_promotions_total", "Versions the schedule promoted to champion",
            registry=registry)
        self.promoted_version = Gauge(
            "mur_trainer_promoted_version_info", "1 for the version the schedule promoted "
            "last", ("version",), registry=registry)
        for outcome in RUN_OUTCOMES:
            for trigger in _RUN_TRIGGERS:
                self.runs.labels(outcome, trigger)  # exported as 0 before the first run
        self._promoted: str | None = None

    def run_finished(self, summary: "RunSummary") -> None:
        """Record a finished run (its :class:`~makeusrich.trainer.schedule.RunSummary`)."""
        outcome = "failed" if not summary.ok else "promoted" if summary.promoted else "kept"
        trigger = "drift" if summary.trigger.startswith("drift") else "schedule"
        self.runs.labels(outcome, trigger).inc()
        self.last_run_duration.set(summary.duration_s)
        if summary.ok:
            self.last_success.set_to_current_time()
        if summary.promoted and summary.version is not None:
            self.promotions.inc()
            if self._promoted is not None:
                self.promoted_version.remove(self._promoted)
            self._promoted = summary.version
            self.promoted_version.labels(summary.version).set(1)
