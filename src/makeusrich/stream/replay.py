"""Replays: a recorded span through the live pipeline's own code, into a namespace of its own.

Sources (:class:`ReplaySpec`):

- a trades file, in any format :func:`~makeusrich.stream.sources.read_batches` reads;
- ``kafka``: the live ``trades`` topic, selected by each message's ``ts_event`` (never by
  broker timestamps: Tansu stamps append time and answers ``offsets_for_times`` wrongly);
- ``archive``: the Parquet candle archive. It holds closed candles, so there is no candle
  stage to run: each candle goes straight into ``TradePipeline.add_candle``, the inference
  code the worker runs, in this process.

Trades take the live path: they are published to the run's own ``trades`` topic and a
``mur worker`` child process, the same program as in production, builds candles and
predictions from them. They are read from the source as they are sent (a 2025 day is
millions of trades), so a replay's memory does not grow with its span. Each run has its own
topic prefix, Redis prefix, Faust app id and state directory (:func:`replay_settings`), so a
replay never mixes with live data, and the models it serves are pinned: promotions
announced to live workers do not reach it.
"""

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final, TypeVar

import msgspec
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import KafkaError
from redis.exceptions import RedisError

from makeusrich.core.embedded import kill_with_parent, terminate
from makeusrich.core.errors import ConfigError, StreamError
from makeusrich.core.schemas import (
    Candle,
    EndOfStream,
    TradeBatch,
    encode,
    now_ms,
    trade_decoder,
)
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore
from makeusrich.monitoring import MonitorConfig, store_observations
from makeusrich.stream.control import load_serving_models
from makeusrich.stream.pipeline import TradePipeline
from makeusrich.stream.publisher import TradePublisher, ensure_topics
from makeusrich.stream.sources import paced, read_batches, replay_symbols, run_replay

__all__ = [
    "Progress",
    "ReplayResult",
    "ReplaySpec",
    "drop_namespace",
    "replay",
    "replay_settings",
    "span_batches",
    "span_candles",
]

log = logging.getLogger(__name__)

#: Called with the share of the span done (0..1) and a short description.
Progress = Callable[[float, str], None]

_V = TypeVar("_V")
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_POLL_S: Final = 0.25
_KAFKA_POLL_MS: Final = 2_000  # an empty poll this long past the end offset ends a partition
_WORKER_START_TIMEOUT_S: Final = 60.0
_WORKER_STOP_TIMEOUT_S: Final = 15.0
_STALL_TIMEOUT_S: Final = 120.0  # the worker wrote nothing new for this long: give up


@dataclass(frozen=True)
class ReplaySpec:
    """What to replay: ``source`` is ``kafka``, ``archive`` or a trades file; ``symbols``
    empty means every symbol in the file (for kafka and the archive: ``Settings.symbols``,
    the ones the live worker folds in);
    ``start_ms`` .. ``end_ms`` is a half-open span of ``ts_event`` (candles: ``open_time``)
    in UTC epoch ms; ``speed`` a multiple of real time, None as fast as possible."""

    source: str
    symbols: tuple[str, ...] = ()
    start_ms: int | None = None
    end_ms: int | None = None
    speed: float | None = None

    def __post_init__(self) -> None:
        if self.start_ms is not None and self.end_ms is not None and self.start_ms >= self.end_ms:
            raise ConfigError(
                f"empty span: start {self.start_ms} must be before end {self.end_ms}"
            )
        if self.speed is not None and not self.speed > 0:
            raise ConfigError(f"replay speed must be positive or max, not {self.speed}")

    def describe(self) -> str:
        span = f"{_utc(self.start_ms)} .. {_utc(self.end_ms)}"
        symbols = ",".join(self.symbols) or "all symbols"
        return f"{self.source} ({symbols}, {span})"

    def selects(self, symbol: str, ts_ms: int) -> bool:
        return (
            (not self.symbols or symbol in self.symbols)
            and (self.start_ms is None or ts_ms >= self.start_ms)
            and (self.end_ms is None or ts_ms < self.end_ms)
        )


@dataclass(frozen=True)
class ReplayResult:
    """A finished replay; ``settings`` address its namespace (topics and Redis keys)."""

    run_id: str
    settings: Settings
    messages: int  # trades, or candles from the archive
    symbols: tuple[str, ...]
    first_ts_event: int
    last_ts_event: int
    candles: int
    predictions: int
    elapsed_s: float


def _utc(ms: int | None) -> str:
    if ms is None:
        return "open"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def replay_settings(settings: Settings, run_id: str, model_dir: Path | None = None) -> Settings:
    """``settings`` moved into the namespace of replay ``run_id``; ``model_dir`` pins the
    model it serves (default: the live setting)."""
    if not _RUN_ID.match(run_id):
        raise ConfigError(f"replay run id {run_id!r}: use 1-64 letters, digits, '-' or '_'")
    return settings.model_copy(update={
        "topic_prefix": f"{settings.topic_prefix}replay.{run_id}.",
        "redis_prefix": f"{settings.redis_prefix}:replay:{run_id}",
        "worker_id": f"{settings.worker_id}-replay-{run_id}",
        "state_dir": settings.state_dir / "replays" / run_id,
        "model_dir": settings.model_dir if model_dir is None else model_dir,
    })


# ---- what to replay ----------------------------------------------------------------------


def span_batches(settings: Settings, spec: ReplaySpec) -> Generator[TradeBatch, None, None]:
    """The trades ``spec`` selects as batches of one symbol's, each symbol's in source
    order (the order live saw), read from the source as they are consumed; closing the
    generator releases the source. Source errors (a missing topic, a malformed line)
    surface while iterating."""
    if spec.source == "archive":
        raise ConfigError("the archive holds candles, not trades: use span_candles")
    if spec.source == "kafka":
        if not settings.kafka_bootstrap:
            raise ConfigError("replaying from kafka needs MUR_KAFKA_BOOTSTRAP (the live broker)")
        # The live worker dead-letters symbols it is not configured for.
        selected = replace(spec, symbols=spec.symbols or settings.symbols)
        return _kafka_batches(settings.kafka_bootstrap, settings.topics.trades, selected)
    path = Path(spec.source)
    if not path.is_file():
        raise ConfigError(f"--from {spec.source!r}: not kafka, archive or a trades file")
    return _selected(read_batches(path), spec)


def _selected(
    batches: Iterable[TradeBatch], spec: ReplaySpec
) -> Generator[TradeBatch, None, None]:
    """The trades of ``batches`` that ``spec`` selects (a batch wholly inside passes as is)."""
    for batch in batches:
        if not batch or (spec.symbols and batch.symbol not in spec.symbols):
            continue
        ts = batch.ts_event
        if (spec.start_ms is None or min(ts) >= spec.start_ms) and (
                spec.end_ms is None or max(ts) < spec.end_ms):
            yield batch
            continue
        rows = [i for i, ts_ms in enumerate(ts) if spec.selects(batch.symbol, ts_ms)]
        if rows:
            yield _rows(batch, rows)


def _rows(batch: TradeBatch, rows: Sequence[int]) -> TradeBatch:
    def pick(column: list[_V]) -> list[_V]:
        return [column[i] for i in rows]

    return TradeBatch(batch.symbol, batch.ts_ingest, pick(batch.trade_id), pick(batch.price),
                      pick(batch.qty), pick(batch.quote_qty), pick(batch.is_buyer_maker),
                      pick(batch.ts_event), batch.source)


def _kafka_batches(
    bootstrap: str, topic: str, spec: ReplaySpec
) -> Generator[TradeBatch, None, None]:
    """Each partition read by a consumer of its own and merged as the merge asks for
    records, so memory holds a fetch per partition, not the span."""
    started_ms = now_ms()
    try:
        with contextlib.ExitStack() as consumers:
            first = consumers.enter_context(_consumer(bootstrap))
            partitions = sorted(first.partitions_for_topic(topic) or ())
            if not partitions:
                raise ConfigError(f"no topic {topic!r} on {bootstrap}: no trades to replay "
                                  "from kafka")
            streams = [
                _partition_batches(
                    first if index == 0 else consumers.enter_context(_consumer(bootstrap)),
                    TopicPartition(topic, partition), spec, started_ms,
                )
                for index, partition in enumerate(partitions)
            ]
            # Each symbol lives in one partition, so a stable merge keeps its order; across
            # symbols the order only matters for pacing (a paced replay goes trade by trade
            # but batch by batch here: close enough at a batch's span).
            yield from heapq.merge(*streams, key=lambda batch: batch.ts_event[0])
    except KafkaError as exc:
        raise StreamError(f"cannot read {topic} on {bootstrap}: {exc}") from exc


def _consumer(bootstrap: str) -> KafkaConsumer:
    return KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                         client_id="mur-replay")


def _partition_batches(
    consumer: KafkaConsumer, tp: TopicPartition, spec: ReplaySpec, started_ms: int
) -> Iterator[TradeBatch]:
    """The selected trades of one partition, up to what it held when the replay started.

    The end offset is only a hint: Tansu reports the base offset of the last batch. So
    reading goes on past it until a poll comes back empty or brings a trade newer than
    the replay (live ingest keeps appending)."""
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    while True:
        records = consumer.poll(timeout_ms=_KAFKA_POLL_MS).get(tp, [])
        if not records:
            if consumer.position(tp) >= end:
                return
            continue
        for record in records:
            batch = _message_batch(record.value)
            if batch is None:
                continue
            if record.offset >= end:
                newer = next((i for i, ts in enumerate(batch.ts_event) if ts >= started_ms),
                             None)
                if newer is not None:
                    yield from _selected((_rows(batch, range(newer)),), spec)
                    return
            yield from _selected((batch,), spec)


def _message_batch(value: bytes) -> TradeBatch | None:
    """The trades of one ``trades`` message as a batch: None for one the live worker
    dead-lettered or an end-of-stream marker (a replay sends its own at its end)."""
    try:
        message = trade_decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if isinstance(message, EndOfStream):
        return None
    return message if isinstance(message, TradeBatch) else TradeBatch.of([message])


def span_candles(settings: Settings, spec: ReplaySpec) -> list[Candle]:
    """The archived candles ``spec`` selects, of ``settings.intervals``, in close order."""
    from makeusrich.trainer.archive import read_candles  # pyarrow, only for this source

    series = [
        read_candles(settings.archive_dir, symbol, interval, spec.start_ms, spec.end_ms)
        for symbol in (spec.symbols or settings.symbols)
        for interval in settings.intervals
    ]
    return list(heapq.merge(*series, key=lambda candle: candle.close_time))


# ---- running a replay --------------------------------------------------------------------


async def replay(
    settings: Settings,
    spec: ReplaySpec,
    run_id: str,
    *,
    model_dir: Path | None = None,
    progress: Progress | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayResult:
    """Replay ``spec`` into the namespace of ``run_id`` and return once every candle and
    prediction of the span is in its Redis keys and topics. ``settings`` must address
    running services; ``stop`` ends the replay early (StreamError)."""
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise ConfigError("a replay needs Kafka and Redis: set MUR_KAFKA_BOOTSTRAP and "
                          "MUR_REDIS_URL (mur replay/backtest start embedded ones otherwise)")
    run = replay_settings(settings, run_id, model_dir)
    report = progress or (lambda share, text: None)
    stop = stop or asyncio.Event()
    started_s, started_ms = time.monotonic(), now_ms()
    if spec.source == "archive":
        candles = await asyncio.to_thread(span_candles, settings, spec)
        if not candles:
            raise ConfigError(f"no archived candles in {spec.describe()} under "
                              f"{settings.archive_dir}")
        made = await _replay_candles(run, candles, spec.speed, stop, report)
        first, last = candles[0].open_time, candles[-1].open_time
        messages, symbols = len(candles), sorted({c.symbol for c in candles})
    else:
        report(0.0, f"reading {spec.describe()}")
        batches = span_batches(settings, spec)
        try:
            # In a thread: reaching the span can mean reading a topic from its start. It
            # also finds an empty span or a broken source before a worker starts.
            head = await asyncio.to_thread(next, batches, None)
            if head is None:
                raise ConfigError(f"no trades in {spec.describe()}")
            accepted = await asyncio.to_thread(_span_symbols, settings, spec)
            sent = _Sent(head, batches)
            made = await _replay_trades(run, sent, accepted, _known_end_ms(spec, started_ms),
                                        spec.speed, stop, report)
        finally:
            with contextlib.suppress(ValueError):  # a cancelled read's thread still runs it
                batches.close()
        first, last = sent.first_ts_event, sent.last_ts_event
        messages, symbols = sent.count, sorted(sent.symbols)
    result = ReplayResult(
        run_id=run_id, settings=run, messages=messages, symbols=tuple(symbols),
        first_ts_event=first, last_ts_event=last, candles=made[0], predictions=made[1],
        elapsed_s=time.monotonic() - started_s,
    )
    report(1.0, f"replayed {messages} {'candles' if spec.source == 'archive' else 'trades'} "
                f"in {result.elapsed_s:.1f} s")
    return result


class _Sent:
    """The trades of a replay as it sends them (``head`` first, then ``rest``), noting what
    a streamed span tells only once sent: how many, of which symbols, until when."""

    def __init__(self, head: TradeBatch, rest: Iterator[TradeBatch]) -> None:
        self._batches = itertools.chain((head,), rest)
        self.count = 0
        self.symbols: set[str] = set()
        self.first_ts_event = self.last_ts_event = head.ts_event[0]

    def __iter__(self) -> Iterator[TradeBatch]:
        for batch in self._batches:
            self.count += len(batch)
            self.symbols.add(batch.symbol)
            self.last_ts_event = batch.ts_event[-1]
            yield batch


def _span_symbols(settings: Settings, spec: ReplaySpec) -> tuple[str, ...]:
    """Every symbol the trades of ``spec`` can have, before they are read (the file's
    symbols are a scan of it, not a parse)."""
    if spec.symbols:
        return spec.symbols
    if spec.source == "kafka":
        return settings.symbols  # as span_batches selects them
    return replay_symbols(spec.source)


def _known_end_ms(spec: ReplaySpec, started_ms: int) -> int | None:
    """Where the span ends, as far as known before it is read: kafka is read up to the
    replay's start (see _partition_trades); a file without ``end_ms`` only once read."""
    if spec.source == "kafka":
        return started_ms if spec.end_ms is None else min(spec.end_ms, started_ms)
    return spec.end_ms


async def _replay_trades(
    run: Settings, sent: _Sent, accepted: tuple[str, ...], end_ms: int | None,
    speed: float | None, stop: asyncio.Event, report: Progress,
) -> tuple[int, int]:
    """Publish the ``sent`` trades to the run's topic, let a worker child that accepts the
    ``accepted`` symbols fold them in; returns the (candles, predictions) it made. Progress
    is the event time its candles closed, of the span up to ``end_ms`` (None: unknown until
    all is sent; until then only the message moves)."""
    await asyncio.to_thread(ensure_topics, run)
    # The worker dead-letters symbols it is not configured for: configure the replayed ones.
    worker = _start_worker(run.model_copy(update={"symbols": accepted}))
    publisher = TradePublisher(run)
    store = RedisStore.from_settings(run)
    try:
        sending = asyncio.create_task(run_replay(sent, publisher, stop, speed))
        last_change_s, seen, reported = time.monotonic(), -1, 0.0
        while True:
            slept_from_s = time.monotonic()
            await asyncio.sleep(_POLL_S)
            # Sending reads the source on this loop: reading on past the span's end can hold
            # it for long, and that time is not the worker's stall.
            last_change_s += max(0.0, time.monotonic() - slept_from_s - _POLL_S)
            if stop.is_set():
                raise StreamError("replay stopped before its end")
            if worker.poll() is not None:
                raise StreamError(f"the replay's worker exited with code {worker.returncode}; "
                                  f"see {_worker_log(run)}:\n{_tail(_worker_log(run))}")
            stats = await store.worker_stats(run.worker_id)
            if sending.done():
                sending.result()  # surfaces a reading or publishing error
                # The worker writes a symbol's last candles before it counts the symbol's
                # end-of-stream marker, so this count says when the span is complete.
                if stats.get("end_of_streams", 0) >= len(sent.symbols):
                    return stats.get("candles", 0), stats.get("predictions", 0)
            folded = stats.get("trades", 0)
            if folded == seen:
                if time.monotonic() - last_change_s > _STALL_TIMEOUT_S:
                    raise StreamError(f"the replay's worker made no progress for "
                                      f"{_STALL_TIMEOUT_S:.0f} s; see {_worker_log(run)}")
                continue
            last_change_s, seen = time.monotonic(), folded
            span_end_ms = sent.last_ts_event if sending.done() else end_ms
            if span_end_ms is not None and span_end_ms > sent.first_ts_event:
                # A snapshot of the symbols: sending adds to them meanwhile.
                done_ms = await _closed_until(store, sorted(sent.symbols), run.intervals)
                share = (done_ms - sent.first_ts_event) / (span_end_ms - sent.first_ts_event)
                reported = max(reported, min(share, 0.99))
            report(reported, f"{folded} trades folded in, {sent.count} sent")
    finally:
        if not sending.done():
            stop.set()
            with contextlib.suppress(Exception):
                await sending
        publisher.close()
        await store.aclose()
        terminate(worker, _WORKER_STOP_TIMEOUT_S)


async def _closed_until(store: RedisStore, symbols: Sequence[str],
                        intervals: Sequence[str]) -> int:
    """Event time up to which every series has closed candles (0 when one has none)."""
    ends = []
    for symbol in symbols:
        for interval in intervals:
            candle = await store.latest_candle(symbol, interval)
            ends.append(0 if candle is None else candle.close_time)
    return min(ends, default=0)


async def _replay_candles(
    run: Settings, candles: Sequence[Candle], speed: float | None, stop: asyncio.Event,
    report: Progress,
) -> tuple[int, int]:
    """Archived candles through the worker's inference code, written like the worker
    writes (Redis and the run's candles/predictions topics)."""
    await asyncio.to_thread(ensure_topics, run)
    shared, own = load_serving_models(run)
    pipeline = TradePipeline(run.intervals, run.grace_ms, shared,
                             MonitorConfig.from_settings(run), run.conformal_step,
                             large_trade_quote=run.large_trade_quote)
    for symbol, model in own.items():
        pipeline.set_forecaster(model, symbol)
    store = RedisStore.from_settings(run)
    producer = KafkaProducer(bootstrap_servers=run.kafka_bootstrap, acks="all", linger_ms=20)
    made = [0, 0]
    try:
        async for count, candle in _counted(paced(candles, speed, stop)):
            pipeline.add_candle(candle)
            out = pipeline.drain()
            for record in out.candles:
                producer.send(run.topics.candles, encode(record), key=record.symbol.encode())
            for prediction in out.predictions:
                producer.send(run.topics.predictions, encode(prediction),
                              key=prediction.symbol.encode())
            await store.write_many([*out.candles, *out.predictions])
            await store_observations(store, out.monitoring)
            made[0] += len(out.candles)
            made[1] += len(out.predictions)
            if count % 500 == 0:
                report(count / len(candles), f"{count} of {len(candles)} candles")
        if stop.is_set():
            raise StreamError("replay stopped before its end")
        producer.flush()
    finally:
        producer.close()
        await store.aclose()
    return made[0], made[1]


async def _counted(records: AsyncIterable[Candle]) -> AsyncIterator[tuple[int, Candle]]:
    count = 0
    async for record in records:
        count += 1
        yield count, record


def _worker_log(run: Settings) -> Path:
    return run.state_dir / "worker.log"


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def _start_worker(run: Settings) -> "subprocess.Popen[bytes]":
    run.state_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **run.as_env(), "MUR_LOG_LEVEL": "WARNING"}
    with _worker_log(run).open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "makeusrich", "worker"], env=env,
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            preexec_fn=kill_with_parent,
        )


def drop_namespace(run: Settings) -> None:
    """Delete what a replay wrote, as far as it got: its Redis keys, its topics (where the
    broker supports deleting them) and its state directory. Failures are logged: cleanup
    must not hide the error that ended a replay."""
    if run.redis_url:
        client = redis.Redis.from_url(run.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{run.redis_prefix}:*", count=1_000))
            for chunk in range(0, len(keys), 1_000):
                client.delete(*keys[chunk : chunk + 1_000])
        except RedisError as exc:
            log.warning("could not delete the replay's keys %s:*: %s", run.redis_prefix, exc)
        finally:
            client.close()
    if run.kafka_bootstrap:
        _delete_topics(run)
    shutil.rmtree(run.state_dir, ignore_errors=True)


def _delete_topics(run: Settings) -> None:
    topics = run.topics
    names = [topics.trades, topics.candles, topics.predictions, topics.dead_letter,
             topics.model_control,
             # Faust's own: the table's changelog and its leader-election topic.
             f"{run.worker_id}-candle-state-changelog", f"{run.worker_id}-__assignor-__leader"]
    try:
        admin = KafkaAdminClient(bootstrap_servers=run.kafka_bootstrap, client_id="mur-replay")
    except KafkaError as exc:
        log.warning("could not delete the replay's topics %s: %s", names, exc)
        return
    try:
        existing = set(admin.list_topics())
        doomed = [name for name in names if name in existing]
        if doomed:
            admin.delete_topics(doomed)
    except KafkaError as exc:
        log.warning("could not delete the replay's topics %s: %s", names, exc)
    finally:
        admin.close()
