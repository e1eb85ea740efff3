"""`mur backfill`: Binance's REST klines of the last days into the candle archive.

Klines come from ``/api/v3/klines`` (python-binance, base URL ``settings.binance_rest_url``)
in pages of 1,000, and land in the archive layout of :mod:`makeusrich.trainer.archive`
as :class:`Candle` rows with ``source="live"``: they are the exchange's own candles, which
the live pipeline rebuilds identically from trades. Only klines closed before the end of
the window are kept. Candles the archive already holds are skipped, so runs may overlap
each other and the archiver's output, and a failed run is resumed by running it again.
"""

import asyncio
import bisect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec
from binance import AsyncClient
from binance.exceptions import BinanceAPIException

from makeusrich.core.errors import ConfigError, IngestError
from makeusrich.core.intervals import interval_ms
from makeusrich.core.schemas import Candle, now_ms
from makeusrich.core.settings import Settings

# The ingestor's REST client setup, retry backoff and retryable errors are the same here.
from makeusrich.stream.ingest import REST_ERRORS, backoff_s, rest_client
from makeusrich.trainer.archive import write_candles

__all__ = ["backfill"]

log = logging.getLogger(__name__)

_PAGE_MAX = 1000  # Binance's largest klines page
_ATTEMPTS = 5  # per page, on rate limits, 5xx and network errors
_INVALID_SYMBOL = -1121
_DAY_MS = 86_400_000


class _Kline(msgspec.Struct, array_like=True, frozen=True):
    """One REST kline row; its trailing unused field is ignored."""

    open_time: int
    open: float
    high: float
    low: float
    close: float
    volume: float
    close_time: int
    quote_volume: float
    trades: int
    taker_buy_volume: float
    taker_buy_quote_volume: float


def _candle(symbol: str, interval: str, k: _Kline) -> Candle:
    return Candle(
        symbol=symbol, interval=interval, open_time=k.open_time, close_time=k.close_time,
        open=k.open, high=k.high, low=k.low, close=k.close, volume=k.volume,
        quote_volume=k.quote_volume, trades=k.trades, taker_buy_volume=k.taker_buy_volume,
        taker_buy_quote_volume=k.taker_buy_quote_volume, source="live",
        ts_event=k.close_time, ts_ingest=now_ms(),
    )


async def _page(
    rest: AsyncClient, settings: Settings, symbol: str, interval: str, start: int, end: int
) -> list[_Kline]:
    """Klines opening in [start, end], retried with backoff on rate limits, 5xx and
    network errors."""
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            rows: Any = await rest.get_klines(
                symbol=symbol, interval=interval, startTime=start, endTime=end, limit=_PAGE_MAX
            )
            return msgspec.convert(rows, list[_Kline], strict=False)
        except msgspec.ValidationError as exc:
            raise IngestError(f"unexpected klines response for {symbol}: {exc}") from exc
        except BinanceAPIException as exc:
            if exc.code == _INVALID_SYMBOL:
                raise IngestError(f"Binance does not know symbol {symbol!r}") from exc
            if exc.status_code not in (418, 429) and exc.status_code < 500:
                raise IngestError(f"Binance refused klines for {symbol}: {exc}") from exc
            reason: object = exc
        except REST_ERRORS as exc:
            reason = exc
        if attempt < _ATTEMPTS:
            delay_s = backoff_s(attempt, settings.reconnect_max_backoff_s)
            log.warning("klines %s from %d failed (%r); retry in %.1f s", symbol, start, reason,
                        delay_s)
            await asyncio.sleep(delay_s)
    raise IngestError(
        f"Binance klines for {symbol} from {start} failed {_ATTEMPTS} times (last: {reason!r}) "
        f"at {settings.binance_rest_url}; run again to resume"
    )


async def _backfill_symbol(
    rest: AsyncClient, settings: Settings, symbol: str, interval: str, start: int, end: int,
    root: Path,
) -> list[Path]:
    step = interval_ms(interval)
    parts: list[Path] = []
    pending: list[Candle] = []  # ascending open_time, not yet written
    fetched = 0
    cursor = start
    while cursor < end:
        page = await _page(rest, settings, symbol, interval, cursor, end - 1)
        pending.extend(_candle(symbol, interval, k) for k in page if k.close_time < end)
        fetched += len(page)
        if len(page) < _PAGE_MAX:
            break
        cursor = page[-1].open_time + step
        if pending:
            # Write days as they complete: one part per day, and progress survives a
            # failure later on.
            today = pending[-1].open_time - pending[-1].open_time % _DAY_MS
            done = bisect.bisect_left(pending, today, key=lambda c: c.open_time)
            parts += await asyncio.to_thread(
                write_candles, root, pending[:done], skip_archived=True
            )
            del pending[:done]
    parts += await asyncio.to_thread(write_candles, root, pending, skip_archived=True)
    log.info("%s %s: %d klines fetched, %d new parts", symbol, interval, fetched, len(parts))
    return parts


async def backfill(
    settings: Settings, symbols: Sequence[str], interval: str, days: float,
    out_dir: Path | None = None, *, until_ms: int | None = None,
) -> list[Path]:
    """Archive the closed klines of ``symbols`` opening in the ``days`` before ``until_ms``
    (epoch ms, default now) into ``out_dir`` (default ``settings.archive_dir``).

    Returns the Parquet parts written (none when the archive already had everything).
    ConfigError for a bad interval or ``days``; IngestError for an unknown symbol or when
    Binance REST keeps failing (parts already written are kept).
    """
    step = interval_ms(interval)
    if days <= 0:
        raise ConfigError(f"--days must be positive, not {days}")
    end = now_ms() if until_ms is None else until_ms
    start = (end - int(days * _DAY_MS)) // step * step
    root = settings.archive_dir if out_dir is None else out_dir
    rest = rest_client(settings)
    try:
        parts: list[Path] = []
        for symbol in symbols:
            parts += await _backfill_symbol(rest, settings, symbol, interval, start, end, root)
        return parts
    finally:
        await rest.close_connection()
