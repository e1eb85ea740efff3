"""The candle archive: closed candles kept as Parquet, for training on more than Redis holds.

Layout (hive-style, one directory per symbol, interval and UTC day of ``open_time``)::

    archive_dir/symbol=BTCUSDT/interval=1m/date=2025-11-20/part-<first_open>-<last_open>.parquet

Each part holds every :class:`Candle` field (parts written before ``large_trade_quote_volume``
existed lack it: :func:`read_part` gives it as null), rows sorted by ``open_time`` and unique
within the part. Parts are written to a hidden temporary file, fsync'd and renamed into place,
so a reader never sees a half-written part. Parts may overlap (a candle re-delivered after a
crash lands in a second part): readers de-duplicate by (symbol, interval, open_time).

:func:`run_archiver` fills the archive from the ``candles`` topic; :func:`backfill` in
:mod:`makeusrich.trainer.backfill` from Binance's REST klines; :func:`load_series` reads it.
"""

import asyncio
import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from numpy.typing import NDArray

from makeusrich.core.errors import StreamError
from makeusrich.core.schemas import Candle, candle_decoder
from makeusrich.core.settings import Settings

__all__ = [
    "CANDLE_SCHEMA",
    "last_of_each",
    "read_candles",
    "read_part",
    "run_archiver",
    "write_candles",
]

log = logging.getLogger(__name__)

_ARROW_TYPES = {int: pa.int64(), float: pa.float64(), float | None: pa.float64()}
#: Arrow schema of an archive part: the fields of :class:`Candle`, in order (every column
#: nullable; ``large_trade_quote_volume`` is null where unknown).
CANDLE_SCHEMA = pa.schema(
    (f.name, _ARROW_TYPES.get(f.type, pa.string())) for f in msgspec.structs.fields(Candle)
)
# Fields added to Candle later, with a default: parts written before lack their column.
_ADDED = {f.name: f.default for f in msgspec.structs.fields(Candle) if not f.required}
_POLL_MAX_MS = 500  # bounds how long a stop request waits for the poll to return


def last_of_each(keys: NDArray[np.int64]) -> NDArray[np.intp]:
    """Indices of the rows that survive de-duplication by key, in ascending key order:
    the last row of each key, so later rows supersede earlier ones."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    last: NDArray[np.intp] = order[np.append(ordered[1:] != ordered[:-1], True)]
    return last


def read_part(path: Path) -> pa.Table:
    """One Parquet part as a table with :data:`CANDLE_SCHEMA`; ``ValueError`` (including
    pyarrow's ``ArrowInvalid``) if it is not one. A part written before a field was added
    to :class:`Candle` gets that column with the field's default (None: null)."""
    table = pq.ParquetFile(path).read()
    missing = set(CANDLE_SCHEMA.names) - set(table.column_names)
    if missing - set(_ADDED):
        raise ValueError(f"{path} is not a candle archive part: no {sorted(missing)} columns")
    for name in sorted(missing):
        column = pa.array([_ADDED[name]] * table.num_rows, CANDLE_SCHEMA.field(name).type)
        table = table.append_column(name, column)
    return table.select(CANDLE_SCHEMA.names).cast(CANDLE_SCHEMA)


def read_candles(
    root: Path, symbol: str, interval: str, start_ms: int | None = None,
    end_ms: int | None = None,
) -> list[Candle]:
    """The archived candles of one series whose ``open_time`` lies in [start_ms, end_ms),
    de-duplicated (later parts win) and in time order."""
    directory = root / f"symbol={symbol}" / f"interval={interval}"
    parts = [read_part(part) for part in sorted(directory.glob("date=*/part-*.parquet"))]
    if not parts:
        return []
    table = pa.concat_tables(parts)
    table = table.take(last_of_each(table.column("open_time").to_numpy()))
    open_time = table.column("open_time").to_numpy()
    keep = np.ones(len(open_time), dtype=bool)
    if start_ms is not None:
        keep &= open_time >= start_ms
    if end_ms is not None:
        keep &= open_time < end_ms
    rows: list[dict[str, object]] = table.filter(pa.array(keep)).to_pylist()
    return msgspec.convert(rows, list[Candle])


def _partition(root: Path, candle: Candle) -> Path:
    day = datetime.fromtimestamp(candle.open_time / 1000, UTC).date().isoformat()
    return root / f"symbol={candle.symbol}" / f"interval={candle.interval}" / f"date={day}"


def _table(candles: Sequence[Candle]) -> pa.Table:
    columns = {name: [getattr(c, name) for c in candles] for name in CANDLE_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=CANDLE_SCHEMA)


def _unique(table: pa.Table) -> pa.Table:
    # One partition holds one (symbol, interval), so open_time alone is the key.
    return table.take(last_of_each(table.column("open_time").to_numpy()))


def _archived_open_times(directory: Path) -> NDArray[np.int64]:
    times = [
        pq.ParquetFile(part).read(columns=["open_time"]).column("open_time").to_numpy()
        for part in directory.glob("part-*.parquet")
    ]
    return np.concatenate(times) if times else np.empty(0, dtype=np.int64)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and its missing parents, making each new entry durable."""
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    with contextlib.suppress(FileExistsError):  # another writer was first
        directory.mkdir()
    _fsync(directory.parent)


def _write_part(directory: Path, table: pa.Table) -> Path:
    open_time = table.column("open_time")
    path = directory / f"part-{open_time[0].as_py()}-{open_time[-1].as_py()}.parquet"
    _make_dirs(directory)
    if path.exists():
        # Same span written before (e.g. re-delivered after a crash): merge, never lose rows.
        table = _unique(pa.concat_tables([read_part(path), table]))
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    try:
        pq.write_table(table, tmp)
        _fsync(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(directory)
    return path


def write_candles(
    root: Path, candles: Iterable[Candle], *, skip_archived: bool = False
) -> list[Path]:
    """Write ``candles`` into the archive at ``root``, one new part per partition touched,
    de-duplicated by (symbol, interval, open_time) with later candles winning. With
    ``skip_archived``, candles whose open time a partition already holds are dropped
    instead (reads every part of the partitions touched). Returns the parts written;
    they are durable when this returns."""
    by_partition: dict[Path, list[Candle]] = defaultdict(list)
    for candle in candles:
        by_partition[_partition(root, candle)].append(candle)
    written = []
    for directory, rows in sorted(by_partition.items()):
        table = _unique(_table(rows))
        if skip_archived:
            archived = _archived_open_times(directory)
            new = ~np.isin(table.column("open_time").to_numpy(), archived)
            table = table.filter(pa.array(new))
        if table.num_rows:
            written.append(_write_part(directory, table))
    return written


class _Archiver(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    """Buffers decoded candles with the next offset of each partition; a flush writes the
    buffer and only then commits those offsets."""

    def __init__(self, root: Path, consumer: AIOKafkaConsumer) -> None:
        self._root = root
        self._consumer = consumer
        self._candles: list[Candle] = []
        self._offsets: dict[TopicPartition, int] = {}
        # A rebalance flushes from the consumer's coordinator task, concurrently with the loop.
        self._lock = asyncio.Lock()

    def add(self, tp: TopicPartition, offset: int, raw: bytes) -> None:
        try:
            self._candles.append(candle_decoder.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("skipping an undecodable candle at %s:%d: %s", tp.topic, offset, exc)
        self._offsets[tp] = offset + 1

    async def flush(self) -> None:
        async with self._lock:
            if not self._offsets:
                return
            candles, offsets = self._candles, self._offsets
            self._candles, self._offsets = [], {}
            parts = await asyncio.to_thread(write_candles, self._root, candles)
            try:
                await self._consumer.commit(offsets)
            except CommitFailedError as exc:
                # The partitions moved on: their next owner re-reads these candles too.
                log.warning("archiver lost its partitions before committing: %s", exc)
            log.debug("archived %d candles into %d parts", len(candles), len(parts))

    async def on_partitions_revoked(self, revoked: object) -> None:
        # The next owner resumes from the committed offsets: hand over what is buffered.
        await self.flush()

    async def on_partitions_assigned(self, assigned: object) -> None:
        pass


async def run_archiver(
    settings: Settings, stop: asyncio.Event, *, flush_every_s: float = 5.0
) -> None:
    """Archive the ``candles`` topic into ``settings.archive_dir`` until ``stop`` is set.

    Consumer group ``{worker_id}-archiver``, from the earliest offset on first start.
    Every ``flush_every_s`` (and when stopping or losing partitions) the candles read are
    written as Parquet parts, then their offsets committed: a crash in between re-delivers
    candles the archive may already hold, which readers de-duplicate. StreamError if the
    broker cannot be reached.
    """
    assert settings.kafka_bootstrap, "kafka_bootstrap must be resolved first"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=f"{settings.worker_id}-archiver",
        client_id=f"{settings.worker_id}-archiver",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=int(settings.broker_session_timeout_s * 1000),
        rebalance_timeout_ms=int(settings.broker_rebalance_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.broker_session_timeout_s * 1000 / 3),
    )
    archiver = _Archiver(settings.archive_dir, consumer)
    consumer.subscribe([settings.topics.candles], listener=archiver)
    try:
        await consumer.start()
        next_flush = time.monotonic() + flush_every_s
        while not stop.is_set():
            wait_ms = max(0, min(_POLL_MAX_MS, int((next_flush - time.monotonic()) * 1000)))
            for tp, records in (await consumer.getmany(timeout_ms=wait_ms)).items():
                for record in records:
                    archiver.add(tp, record.offset, record.value)
            if time.monotonic() >= next_flush:
                await archiver.flush()
                next_flush = time.monotonic() + flush_every_s
        await archiver.flush()
    except KafkaError as exc:
        raise StreamError(f"archiver: broker {settings.kafka_bootstrap} failed: {exc}") from exc
    finally:
        await consumer.stop()
