"""Finite and synthetic trade sources: replay files and the seeded simulator, plus the
async drivers that pace them onto a publisher.

Replay formats (all read in file order, never re-sorted):

- Binance public-data ``trades`` CSV: ``id, price, qty, quote_qty, time, is_buyer_maker,
  is_best_match`` (futures files lack the last column).
- Binance ``aggTrades`` CSV: ``agg_trade_id, price, qty, first_trade_id, last_trade_id, time,
  is_buyer_maker, is_best_match`` (futures files lack the last column).
  Both plain, ``.gz`` or a ``.zip`` holding one CSV; header row optional; times in ms or µs.
- JSONL of websocket messages as ``mur record`` writes them (combined-stream envelopes
  ``{"stream":..,"data":{..}}`` or bare ``trade``/``aggTrade`` events), or a normalized
  capture with rows ``{"type":"trade","timestamp","price","quantity","side"}``.

Replay files are trusted input, so a malformed line stops the replay with a
:class:`SourceFormatError` naming the file and line instead of being skipped.
"""

import asyncio
import contextlib
import gzip
import heapq
import io
import json
import logging
import math
import re
import time
import zipfile
import zlib
from collections.abc import AsyncIterator, Iterable, Iterator
from os import PathLike
from pathlib import Path
from random import Random
from typing import Any, Literal, Protocol, TextIO, TypeVar

import msgspec

from makeusrich.core.errors import ConfigError, IngestError, SourceFormatError
from makeusrich.core.schemas import EndOfStream, Source, Trade, TradeBatch, now_ms, trade_decoder
from makeusrich.core.settings import Settings
from makeusrich.stream.publisher import TradeSink

__all__ = [
    "paced",
    "read_batches",
    "read_binance_csv",
    "read_jsonl",
    "read_trades",
    "replay_symbols",
    "run_replay",
    "run_sim",
    "sim_start_price",
    "simulate_trades",
]

log = logging.getLogger(__name__)

StrPath = str | PathLike[str]


# --------------------------------------------------------------------------- helpers

# Epoch values above these are not plausible milliseconds (1e14 ms is the year 5138), so
# they must be µs (Binance spot files since 2025-01-01) or ns.
_US_MIN = 100_000_000_000_000
_NS_MIN = 100_000_000_000_000_000

_BOOL = {"True": True, "False": False, "true": True, "false": False}

# SYMBOL-trades-... / SYMBOL-aggTrades-... as data.binance.vision and `mur record` name files.
_NAME_SYMBOL = re.compile(r"^([A-Za-z0-9]+)-(?:trades|aggtrades)(?:[-_.]|$)", re.IGNORECASE)

_ERR_LINE_CHARS = 200


def _to_ms(epoch: int) -> int:
    if epoch >= _NS_MIN:
        return epoch // 1_000_000
    if epoch >= _US_MIN:
        return epoch // 1_000
    return epoch


def _symbol_from_name(name: str) -> str | None:
    match = _NAME_SYMBOL.match(Path(name).name)
    return match.group(1).upper() if match else None


def _bad(path: Path, lineno: int, reason: str, line: str = "") -> SourceFormatError:
    shown = f": {line.strip()[:_ERR_LINE_CHARS]!r}" if line.strip() else ""
    return SourceFormatError(f"{path}:{lineno}: {reason}{shown}")


def _zip_member(path: Path, archive: zipfile.ZipFile) -> str:
    members = [
        info.filename
        for info in archive.infolist()
        if not info.is_dir() and not info.filename.startswith("__MACOSX/")
    ]
    csvs = [name for name in members if name.lower().endswith(".csv")]
    if len(csvs) != 1:
        raise SourceFormatError(
            f"{path}: a replay .zip must hold exactly one .csv file, found {members}"
        )
    return csvs[0]


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[tuple[TextIO, str]]:
    """Open a replay file as text; yields the stream and the inner file name (for zips)."""
    lower = path.name.lower()
    try:
        with contextlib.ExitStack() as stack:
            if lower.endswith(".zip"):
                archive = stack.enter_context(zipfile.ZipFile(path))
                member = _zip_member(path, archive)
                raw = stack.enter_context(archive.open(member))
                stream: TextIO = stack.enter_context(
                    io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
                )
                yield stream, member
            elif lower.endswith(".gz"):
                stream = stack.enter_context(
                    gzip.open(path, "rt", encoding="utf-8-sig", newline="")
                )
                yield stream, path.name[: -len(".gz")]
            else:
                yield stack.enter_context(path.open(encoding="utf-8-sig", newline="")), path.name
    except (zipfile.BadZipFile, gzip.BadGzipFile, EOFError) as exc:
        raise SourceFormatError(f"{path}: broken archive: {exc}") from exc


def _check_file(path: StrPath) -> Path:
    p = Path(path)
    if not p.is_file():
        raise IngestError(f"replay file not found: {p}")
    return p


def _finite_positive(value: float) -> bool:
    return value > 0 and value != math.inf


# --------------------------------------------------------------------------- Binance CSV

_CsvKind = Literal["trades", "aggTrades"]
# (column count, time column, is_buyer_maker column) per layout; the shorter layouts are
# the futures files, which have no is_best_match column.
_CSV_LAYOUTS: dict[_CsvKind, dict[int, tuple[int, int]]] = {
    "trades": {7: (4, 5), 6: (4, 5)},
    "aggTrades": {8: (5, 6), 7: (5, 6)},
}


def _csv_kind(name: str, header: list[str] | None, n_cols: int) -> _CsvKind:
    lower = Path(name).name.lower()
    if "aggtrades" in lower:
        return "aggTrades"
    if "-trades" in lower:
        return "trades"
    if header is not None:
        fields = [field.strip().lower() for field in header]
        return "aggTrades" if "first_trade_id" in fields or "agg_trade_id" in fields else "trades"
    # Spot layouts differ by count (7 vs 8); 6 is a futures trades file.
    return "aggTrades" if n_cols == 8 else "trades"


def read_binance_csv(path: StrPath, symbol: str | None = None) -> Iterator[Trade]:
    """Trades from a Binance public-data ``trades`` or ``aggTrades`` CSV (plain, .gz or .zip).

    The symbol comes from the file name (``BTCUSDT-trades-2019-04-01.csv``) unless given.
    Raises :class:`SourceFormatError` at once if neither names a symbol, and while iterating
    on the first malformed line.
    """
    p = _check_file(path)
    resolved = symbol.upper() if symbol else _csv_symbol(p)
    return _iter_binance_csv(p, resolved)


def _csv_symbol(path: Path) -> str:
    found = _symbol_from_name(path.name)
    if found is None and path.name.lower().endswith(".zip"):
        with _open_text(path) as (_, member):
            found = _symbol_from_name(member)
    if found is None:
        raise SourceFormatError(
            f"{path}: cannot tell the symbol from the file name; name it like "
            "BTCUSDT-trades-2019-04-01.csv or pass the symbol explicitly"
        )
    return found


def _iter_binance_csv(path: Path, symbol: str) -> Iterator[Trade]:
    lineno = 0
    count = 0
    with _open_text(path) as (stream, inner_name):
        try:
            layout: tuple[int, int, int] | None = None  # (n_cols, time col, maker col)
            header: list[str] | None = None
            for lineno, line in enumerate(stream, 1):
                parts = line.rstrip("\r\n").split(",")
                if layout is None:
                    if not line.strip():
                        continue
                    first = parts[0].strip()
                    if not first.isdigit():
                        if header is not None:
                            raise _bad(path, lineno, "expected a trade row", line)
                        header = parts
                        continue
                    if header is not None and len(header) != len(parts):
                        raise _bad(
                            path,
                            lineno,
                            f"header has {len(header)} columns but rows have {len(parts)}",
                            line,
                        )
                    kind = _csv_kind(inner_name, header, len(parts))
                    columns = _CSV_LAYOUTS[kind].get(len(parts))
                    if columns is None:
                        expected = " or ".join(str(n) for n in _CSV_LAYOUTS[kind])
                        raise _bad(
                            path,
                            lineno,
                            f"a Binance {kind} row has {expected} columns, got {len(parts)}",
                            line,
                        )
                    layout = (len(parts), *columns)
                n_cols, time_col, maker_col = layout
                if len(parts) != n_cols:
                    if not line.strip():
                        continue  # a trailing blank line is harmless
                    raise _bad(path, lineno, f"expected {n_cols} columns, got {len(parts)}", line)
                try:
                    price = float(parts[1])
                    qty = float(parts[2])
                    # trades rows carry quote_qty in column 3; aggTrades rows (time in
                    # column 5) have first_trade_id there instead.
                    quote_qty = float(parts[3]) if time_col == 4 else price * qty
                    trade = Trade(
                        symbol=symbol,
                        trade_id=int(parts[0]),
                        price=price,
                        qty=qty,
                        quote_qty=quote_qty,
                        is_buyer_maker=_BOOL[parts[maker_col]],
                        ts_event=_to_ms(int(parts[time_col])),
                        ts_ingest=0,
                        source="replay",
                    )
                except (ValueError, KeyError) as exc:
                    raise _bad(path, lineno, f"bad value ({exc})", line) from exc
                if not _finite_positive(price) or not qty >= 0:
                    raise _bad(path, lineno, "price must be > 0 and qty >= 0", line)
                count += 1
                yield trade
        except UnicodeDecodeError as exc:
            raise _bad(path, lineno + 1, f"not UTF-8 text ({exc.reason})") from exc
    if count == 0:
        raise SourceFormatError(f"{path}: no trades in file")


# --------------------------------------------------------------------------- JSONL

_json_decode = msgspec.json.Decoder().decode
_TRADE_EVENT_ID = {"trade": "t", "aggTrade": "a"}
_SIDE_IS_BUYER_MAKER = {"sell": True, "buy": False}  # "sell" = taker sold = buyer is maker


def _decode_json_line(path: Path, lineno: int, line: str) -> Any:
    try:
        return _json_decode(line)
    except msgspec.DecodeError:
        # msgspec refuses NaN/Infinity, which the normalized capture's feature rows
        # contain; the stdlib parser accepts them and those rows are skipped afterwards.
        try:
            return json.loads(line)
        except ValueError as exc:
            raise _bad(path, lineno, f"not JSON ({exc})", line) from exc


def read_jsonl(path: StrPath, symbol: str | None = None) -> Iterator[Trade]:
    """Trades from a JSONL recording (raw websocket messages, the normalized capture, or
    this project's own ``trades`` topic records: single trades and batches).

    Messages that name their symbol (raw ``trade``/``aggTrade`` events) are filtered to
    ``symbol`` when it is given. Normalized rows carry no symbol: it comes from ``symbol``
    or the file name, and they get synthetic trade ids 1, 2, 3, ... in file order.
    Non-trade rows (other stream events, subscription replies, derived features) are skipped.
    """
    p = _check_file(path)
    return _each_trade(_iter_jsonl(p, symbol.upper() if symbol else None))


def _each_trade(records: Iterable[Trade | TradeBatch]) -> Iterator[Trade]:
    for record in records:
        if isinstance(record, TradeBatch):
            yield from record.trades()
        else:
            yield record


def _iter_jsonl(path: Path, symbol: str | None) -> Iterator[Trade | TradeBatch]:
    """The file's trades; a record of this project's ``trades`` topic as it is (a batch
    stays one)."""
    name_symbol = symbol or _symbol_from_name(path.name.removesuffix(".gz"))
    synthetic_id = 0
    count = 0
    lineno = 0
    with _open_text(path) as (stream, _):
        try:
            for lineno, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                if line.startswith('{"kind":'):  # this project's records: typed, fast
                    record = _own_record(path, lineno, line)
                    if record is not None and (symbol is None or record.symbol == symbol):
                        count += len(record) if isinstance(record, TradeBatch) else 1
                        yield record
                    continue
                obj = _decode_json_line(path, lineno, line)
                if not isinstance(obj, dict):
                    raise _bad(path, lineno, "expected a JSON object", line)
                msg = obj["data"] if "stream" in obj and "data" in obj else obj
                if not isinstance(msg, dict):
                    raise _bad(path, lineno, "expected a JSON object in 'data'", line)
                event = msg.get("e")
                if event is not None:
                    id_key = _TRADE_EVENT_ID.get(event)
                    if id_key is None:
                        continue  # another stream recorded alongside trades
                    try:
                        sym = str(msg["s"]).upper()
                        if symbol is not None and sym != symbol:
                            continue
                        price = float(msg["p"])
                        qty = float(msg["q"])
                        maker = msg["m"]
                        if not isinstance(maker, bool):
                            raise ValueError(f"'m' must be true/false, got {maker!r}")
                        trade = Trade(
                            symbol=sym,
                            trade_id=int(msg[id_key]),
                            price=price,
                            qty=qty,
                            quote_qty=price * qty,
                            is_buyer_maker=maker,
                            ts_event=_to_ms(int(msg["T"])),
                            ts_ingest=0,
                            source="replay",
                        )
                    except KeyError as exc:
                        raise _bad(path, lineno, f"{event} event lacks field {exc}", line) from exc
                    except (ValueError, TypeError) as exc:
                        raise _bad(path, lineno, f"bad value ({exc})", line) from exc
                elif msg.get("type") == "trade":
                    if name_symbol is None:
                        raise _bad(
                            path,
                            lineno,
                            "normalized rows carry no symbol; name the file like "
                            "btcusdt-trades-....jsonl or pass the symbol explicitly",
                        )
                    try:
                        price = float(msg["price"])
                        qty = float(msg["quantity"])
                        maker = _SIDE_IS_BUYER_MAKER[msg["side"]]
                        ts_ms = _to_ms(int(msg["timestamp"]))
                    except KeyError as exc:
                        raise _bad(path, lineno, f"missing or bad field {exc}", line) from exc
                    except (ValueError, TypeError) as exc:
                        raise _bad(path, lineno, f"bad value ({exc})", line) from exc
                    synthetic_id += 1
                    trade = Trade(
                        symbol=name_symbol,
                        trade_id=synthetic_id,
                        price=price,
                        qty=qty,
                        quote_qty=price * qty,
                        is_buyer_maker=maker,
                        ts_event=ts_ms,
                        ts_ingest=0,
                        source="replay",
                    )
                else:
                    continue  # e.g. derived-feature rows in the normalized capture
                if not _finite_positive(trade.price) or not trade.qty >= 0:
                    raise _bad(path, lineno, "price must be > 0 and qty >= 0", line)
                count += 1
                yield trade
        except UnicodeDecodeError as exc:
            raise _bad(path, lineno + 1, f"not UTF-8 text ({exc.reason})") from exc
    if count == 0:
        wanted = f" for {symbol}" if symbol else ""
        raise SourceFormatError(f"{path}: no trades{wanted} in file")


def _own_record(path: Path, lineno: int, line: str) -> Trade | TradeBatch | None:
    """One ``trades`` topic record, marked as replayed (None: an end-of-stream marker)."""
    try:
        message = trade_decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise _bad(path, lineno, f"bad trades record ({exc})", line) from exc
    if isinstance(message, EndOfStream):
        return None
    return msgspec.structs.replace(message, source="replay")


# --------------------------------------------------------------------------- dispatch

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


def _is_jsonl(path: Path) -> bool:
    lower = path.name.lower().removesuffix(".gz")
    if lower.endswith(".zip") or lower.endswith(".csv"):
        return False
    if lower.endswith(_JSONL_SUFFIXES):
        return True
    # Unknown extension: sniff the first non-blank character.
    with _open_text(path) as (stream, _):
        try:
            for line in stream:
                if line.strip():
                    return line.lstrip().startswith("{")
        except UnicodeDecodeError as exc:
            raise SourceFormatError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    raise SourceFormatError(f"{path}: file is empty")


def read_trades(path: StrPath, symbol: str | None = None) -> Iterator[Trade]:
    """Trades from any supported replay file, chosen by extension (then by content).

    Missing files raise :class:`IngestError` at once; format problems raise
    :class:`SourceFormatError` (at once when the file cannot be recognised, else while
    iterating, with the line number). ``ts_ingest`` is 0: the driver stamps it on publish.
    """
    p = _check_file(path)
    if _is_jsonl(p):
        return read_jsonl(p, symbol)
    return read_binance_csv(p, symbol)


def read_batches(
    path: StrPath, symbol: str | None = None, batch_size: int = 1_000
) -> Iterator[TradeBatch]:
    """:func:`read_trades`'s trades as batches of one symbol's consecutive trades (at most
    ``batch_size``); a recorded ``trades`` batch passes as it is, with no trade built."""
    p = _check_file(path)
    if _is_jsonl(p):
        return _batched(_iter_jsonl(p, symbol.upper() if symbol else None), batch_size)
    return _batched(read_binance_csv(p, symbol), batch_size)


def _batched(records: Iterable[Trade | TradeBatch], batch_size: int) -> Iterator[TradeBatch]:
    run: list[Trade] = []
    for record in records:
        if isinstance(record, TradeBatch):
            if run:
                yield TradeBatch.of(run)
                run = []
            yield record
            continue
        if run and record.symbol != run[0].symbol:
            yield TradeBatch.of(run)
            run = []
        run.append(record)
        if len(run) >= batch_size:
            yield TradeBatch.of(run)
            run = []
    if run:
        yield TradeBatch.of(run)


# Raw websocket events name it "s"; this project's own trades records "symbol".
_SYMBOL_FIELD = re.compile(rb'"(?:s|symbol)"\s*:\s*"([A-Za-z0-9]+)"')
_NORMALIZED_TRADE = re.compile(rb'"type"\s*:\s*"trade"')
_SCAN_CHUNK_BYTES = 1 << 20
_SCAN_OVERLAP_BYTES = 256  # longer than any match, so none is lost at a chunk boundary


def replay_symbols(path: StrPath, symbol: str | None = None) -> tuple[str, ...]:
    """Symbols a replay file holds trades for, in order of first appearance.

    CSV files and normalized captures hold one symbol, taken from ``symbol`` or the file
    name. Raw JSONL recordings are scanned with a byte-level regex (no JSON parsing), so
    this stays cheap even for large files; ``symbol`` then filters the result.
    """
    p = _check_file(path)
    wanted = symbol.upper() if symbol else None
    if not _is_jsonl(p):
        return (wanted or _csv_symbol(p),)
    found: dict[str, None] = {}
    normalized = False
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    try:
        with opener(p, "rb") as raw:
            tail = b""
            while chunk := raw.read(_SCAN_CHUNK_BYTES):
                window = tail + chunk
                for match in _SYMBOL_FIELD.finditer(window):
                    found[match.group(1).decode().upper()] = None
                normalized = normalized or _NORMALIZED_TRADE.search(window) is not None
                tail = window[-_SCAN_OVERLAP_BYTES:]
    except (gzip.BadGzipFile, EOFError) as exc:
        raise SourceFormatError(f"{p}: broken archive: {exc}") from exc
    if found:
        return tuple(s for s in found if wanted is None or s == wanted)
    if normalized:
        name_symbol = wanted or _symbol_from_name(p.name.removesuffix(".gz"))
        if name_symbol is None:
            raise SourceFormatError(
                f"{p}: normalized rows carry no symbol; name the file like "
                "btcusdt-trades-....jsonl or pass the symbol explicitly"
            )
        return (name_symbol,)
    return ()


# --------------------------------------------------------------------------- simulator

_USD_QUOTES = ("USDT", "USDC", "FDUSD", "BUSD", "TUSD", "USD")
_USD_START_PRICES = {
    "BTC": 60_000.0,
    "ETH": 3_000.0,
    "BNB": 600.0,
    "SOL": 150.0,
    "LTC": 80.0,
    "AVAX": 30.0,
    "LINK": 15.0,
    "DOT": 6.0,
    "ADA": 0.5,
    "XRP": 0.6,
    "DOGE": 0.15,
}
_SIM_ANNUAL_VOL = 0.8  # crypto-like; gives visibly moving 1m candles
_SECONDS_PER_YEAR = 365 * 24 * 3600
_SIM_MEDIAN_NOTIONAL_USD = 300.0
_SIM_QTY_LOG_SIGMA = 1.6  # heavy right tail: most trades small, a few large
_SIM_BURSTS_PER_MIN = 0.5  # per symbol
_SIM_BURST_S = (1.0, 6.0)
_SIM_BURST_RATE_X = 8.0
_SIM_BURST_VOL_X = 3.0
_SIM_TAKER_WITH_MOVE = 0.7  # chance the taker side matches the tick direction


def sim_start_price(symbol: str) -> float:
    """The simulator's opening price: a plausible level for known USD pairs, else a
    stable per-symbol value in [1, 100) (crc32, so independent of the symbol list)."""
    upper = symbol.upper()
    for quote in _USD_QUOTES:
        if upper.endswith(quote) and upper[: -len(quote)] in _USD_START_PRICES:
            return _USD_START_PRICES[upper[: -len(quote)]]
    fraction = zlib.crc32(upper.encode()) / 2**32
    return round(10 ** (2 * fraction), 4)


class _SimSymbol:
    __slots__ = (
        "burst_dir",
        "burst_until_ms",
        "log_price",
        "price_decimals",
        "qty_decimals",
        "qty_log_median",
        "symbol",
        "t_ms",
        "trade_id",
    )

    def __init__(self, symbol: str, start_ms: int) -> None:
        price = sim_start_price(symbol)
        median_qty = _SIM_MEDIAN_NOTIONAL_USD / price
        self.symbol = symbol
        self.log_price = math.log(price)
        # ~6 significant digits of price, ~3 of a typical quantity, like Binance filters.
        self.price_decimals = max(0, 6 - math.floor(math.log10(price)))
        self.qty_decimals = max(0, 2 - math.floor(math.log10(median_qty)))
        self.qty_log_median = math.log(median_qty)
        self.t_ms = float(start_ms)
        self.trade_id = 0
        self.burst_until_ms = -math.inf
        self.burst_dir = 0.0


def simulate_trades(
    symbols: Iterable[str],
    seed: int,
    trades_per_s: float,
    start_ms: int,
    n: int | None = None,
) -> Iterator[Trade]:
    """A seeded, endless (or ``n``-long) stream of plausible trades, interleaved in time.

    Per symbol: Poisson arrivals at ``trades_per_s`` (x8 during occasional bursts of a few
    seconds, which also trend and triple volatility), a geometric Brownian motion price,
    lognormal quantities, taker side leaning with the tick direction, ids 1, 2, 3, ...
    ``ts_event`` starts after ``start_ms`` and never decreases; ``ts_ingest`` equals it.
    The same arguments always give the same trades.
    """
    names = list(dict.fromkeys(s.upper() for s in symbols))
    if not names:
        raise ConfigError("the simulator needs at least one symbol")
    if not trades_per_s > 0 or math.isinf(trades_per_s):
        raise ConfigError(f"sim trades per second must be > 0, got {trades_per_s}")
    if n is not None and n < 0:
        raise ConfigError(f"sim trade count must be >= 0, got {n}")
    return _simulate(names, Random(seed), trades_per_s, start_ms, n)


def _simulate(
    names: list[str], rng: Random, trades_per_s: float, start_ms: int, n: int | None
) -> Iterator[Trade]:
    states = [_SimSymbol(name, start_ms) for name in names]
    sigma_per_sqrt_s = _SIM_ANNUAL_VOL / math.sqrt(_SECONDS_PER_YEAR)
    burst_p_per_trade = _SIM_BURSTS_PER_MIN / 60.0 / trades_per_s
    heap: list[tuple[float, int]] = []
    for index, state in enumerate(states):
        state.t_ms += rng.expovariate(trades_per_s) * 1000.0
        heap.append((state.t_ms, index))
    heapq.heapify(heap)
    produced = 0
    prev_ms: list[float] = [float(start_ms)] * len(states)
    while n is None or produced < n:
        t_ms, index = heapq.heappop(heap)
        state = states[index]
        dt_s = (t_ms - prev_ms[index]) / 1000.0
        prev_ms[index] = t_ms

        in_burst = t_ms < state.burst_until_ms
        if not in_burst and rng.random() < burst_p_per_trade:
            state.burst_until_ms = t_ms + rng.uniform(*_SIM_BURST_S) * 1000.0
            state.burst_dir = rng.choice((-1.0, 1.0))
            in_burst = True
        sigma = sigma_per_sqrt_s * (_SIM_BURST_VOL_X if in_burst else 1.0)
        shock = rng.gauss(0.0, 1.0) + (state.burst_dir * 0.5 if in_burst else 0.0)
        log_return = -0.5 * sigma * sigma * dt_s + sigma * math.sqrt(dt_s) * shock
        state.log_price += log_return

        tick = 10.0**-state.price_decimals
        price = max(tick, round(math.exp(state.log_price), state.price_decimals))
        step = 10.0**-state.qty_decimals
        raw_qty = math.exp(rng.gauss(state.qty_log_median, _SIM_QTY_LOG_SIGMA))
        qty = max(step, round(raw_qty, state.qty_decimals))
        # A falling tick is most often a taker sell, which makes the buyer the maker.
        p_sell = _SIM_TAKER_WITH_MOVE if log_return < 0 else 1.0 - _SIM_TAKER_WITH_MOVE
        state.trade_id += 1
        ts_ms = int(t_ms)
        yield Trade(
            symbol=state.symbol,
            trade_id=state.trade_id,
            price=price,
            qty=qty,
            quote_qty=round(price * qty, 8),
            is_buyer_maker=rng.random() < p_sell,
            ts_event=ts_ms,
            ts_ingest=ts_ms,
            source="sim",
        )
        produced += 1

        rate = trades_per_s * (_SIM_BURST_RATE_X if t_ms < state.burst_until_ms else 1.0)
        heapq.heappush(heap, (t_ms + rng.expovariate(rate) * 1000.0, index))


# --------------------------------------------------------------------------- drivers

# Yield to the event loop this often when nothing else makes the loop turn, so `stop`
# and other tasks get a chance during an as-fast-as-possible replay.
_YIELD_EVERY = 2_000
_MIN_SLEEP_S = 0.002  # shorter waits are skipped; the schedule is absolute, so no drift
_SHORT_SLEEP_S = 0.05  # below this a plain sleep is cheaper than an interruptible wait
_SIM_MAX_LAG_S = 2.0  # sim behind schedule by more (e.g. laptop suspended): drop the lag


async def _sleep_unless_stopped(stop: asyncio.Event, delay_s: float) -> bool:
    """Sleep ``delay_s``; True if ``stop`` was set meanwhile."""
    if delay_s < _SHORT_SLEEP_S:
        await asyncio.sleep(delay_s)
        return stop.is_set()
    try:
        await asyncio.wait_for(stop.wait(), timeout=delay_s)
    except TimeoutError:
        return False
    return True


def _send_end_of_stream(publisher: TradeSink, last: dict[str, tuple[int, Source]]) -> None:
    for symbol, (ts_event_ms, source) in last.items():
        publisher.send(
            EndOfStream(symbol=symbol, ts_event=ts_event_ms, ts_ingest=now_ms(), source=source)
        )


class _Timed(Protocol):
    @property
    def ts_event(self) -> int: ...


_T = TypeVar("_T", bound=_Timed)


async def paced(
    records: Iterable[_T], speed: float | None, stop: asyncio.Event
) -> AsyncIterator[_T]:
    """Yield ``records`` until ``stop``: at once with ``speed=None``, else keeping the gaps
    between their ``ts_event`` values divided by ``speed`` (1.0 = real time)."""
    if speed is not None and not speed > 0:
        raise ConfigError(f"replay speed must be > 0 (or None for as fast as possible): {speed}")
    started_s = time.monotonic()
    first_event_ms: int | None = None
    for count, record in enumerate(records, 1):
        if stop.is_set():
            return
        if speed is not None:
            if first_event_ms is None:
                first_event_ms = record.ts_event
            due_s = started_s + (record.ts_event - first_event_ms) / 1000.0 / speed
            delay_s = due_s - time.monotonic()
            if delay_s > _MIN_SLEEP_S and await _sleep_unless_stopped(stop, delay_s):
                return
        yield record
        if count % _YIELD_EVERY == 0:
            await asyncio.sleep(0)


async def run_replay(
    records: Iterable[Trade | TradeBatch],
    publisher: TradeSink,
    stop: asyncio.Event,
    speed: float | None,
    symbols_done_eos: bool = True,
) -> int:
    """Publish ``records`` (trades, or batches of them) in order, :func:`paced` by
    ``speed``, stamping ``ts_ingest`` with the wall clock; return the number of trades sent.

    As fast as possible (``speed=None``) a batch is handed on whole; paced, trade by trade
    (a recorded batch can span minutes). When the records run out (not when ``stop`` ends
    the replay early) and ``symbols_done_eos`` is set, one :class:`EndOfStream` per symbol
    follows, carrying that symbol's last ``ts_event``, so the worker can close its open
    candles. The publisher is flushed in every case.
    """
    last: dict[str, tuple[int, Source]] = {}
    count = 0
    started_s = time.monotonic()
    replace = msgspec.structs.replace
    if speed is None:
        next_yield = _YIELD_EVERY
        for record in records:
            if stop.is_set():
                break
            if isinstance(record, TradeBatch):
                if not record:
                    continue
                publisher.send_batch(replace(record, ts_ingest=now_ms()))
                last[record.symbol] = (record.ts_event[-1], record.source)
                count += len(record)
            else:
                publisher.send(replace(record, ts_ingest=now_ms()))
                last[record.symbol] = (record.ts_event, record.source)
                count += 1
            if count >= next_yield:  # let the loop's other tasks run
                next_yield = count + _YIELD_EVERY
                await asyncio.sleep(0)
    else:
        send = publisher.send
        async for trade in paced(_each_trade(records), speed, stop):
            send(replace(trade, ts_ingest=now_ms()))
            last[trade.symbol] = (trade.ts_event, trade.source)
            count += 1
    exhausted = not stop.is_set()
    if exhausted and symbols_done_eos:
        _send_end_of_stream(publisher, last)
    publisher.flush()
    elapsed_s = time.monotonic() - started_s
    log.info(
        "replay %s: %d trades of %d symbols in %.1f s",
        "finished" if exhausted else "stopped",
        count,
        len(last),
        elapsed_s,
    )
    return count


async def run_sim(
    settings: Settings, publisher: TradeSink, stop: asyncio.Event, n: int | None = None
) -> int:
    """Publish simulated trades for ``settings.symbols`` in real time until ``stop`` (or
    ``n`` trades); return the number sent.

    Each trade's ``ts_event`` is the wall clock when it is published (kept non-decreasing
    per symbol), so candles close in real time. :class:`EndOfStream` per symbol is sent
    only when ``n`` is given and reached.
    """
    start_ms = now_ms()
    sim = simulate_trades(
        settings.symbols, settings.sim_seed, settings.sim_trades_per_s, start_ms, n
    )
    # Pace on the monotonic clock so wall-clock steps (NTP) cannot stall or rush the sim.
    anchor_s = time.monotonic()
    last: dict[str, tuple[int, Source]] = {}
    count = 0
    exhausted = False
    for trade in sim:
        if stop.is_set():
            break
        delay_s = anchor_s + (trade.ts_event - start_ms) / 1000.0 - time.monotonic()
        if delay_s > _MIN_SLEEP_S:
            if await _sleep_unless_stopped(stop, delay_s):
                break
        elif delay_s < -_SIM_MAX_LAG_S:
            anchor_s -= delay_s  # restart the schedule from now rather than burst to catch up
        wall_ms = now_ms()
        previous = last.get(trade.symbol)
        ts_ms = max(wall_ms, previous[0]) if previous else wall_ms
        publisher.send(msgspec.structs.replace(trade, ts_event=ts_ms, ts_ingest=wall_ms))
        last[trade.symbol] = (ts_ms, trade.source)
        count += 1
        if count % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
    else:
        exhausted = True
    if exhausted and n is not None:
        _send_end_of_stream(publisher, last)
    publisher.flush()
    log.info("sim %s after %d trades", "finished" if exhausted else "stopped", count)
    return count
