"""Training candles from Binance kline CSVs (plain or .zip), the pipeline's JSONL candles and
the Parquet candle archive (:mod:`makeusrich.trainer.archive`).

Each (symbol, interval) becomes one gap-free :class:`CandleSeries`: rows sorted and
de-duplicated by open time across all sources, missing intervals filled with flat zero-volume
candles at the previous close, exactly as the live pipeline emits them.
"""

import glob
import re
import zipfile
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
from numpy.typing import NDArray

from makeusrich.core.errors import ConfigError, TrainingError
from makeusrich.core.intervals import SUPPORTED_INTERVALS, interval_ms
from makeusrich.core.schemas import candle_decoder
from makeusrich.inference.features import OHLCV_COLUMNS, FloatArray, candle_values
from makeusrich.trainer.archive import last_of_each, read_part

# data.binance.vision kline columns used: open_time, open, high, low, close, volume,
# taker_buy_base_volume, quote_volume and count (trades), in OHLCV_COLUMNS order after
# open_time; klines have no large_trade_quote_volume (NaN: unknown).
_KLINE_COLUMNS = (0, 1, 2, 3, 4, 5, 9, 7, 8)
_KLINE_NAME = re.compile(r"^(?P<symbol>[A-Z0-9]+)-(?P<interval>\d+[smhd])-")
_SUFFIXES = (".csv", ".zip", ".jsonl", ".parquet")
# Epoch milliseconds stay below this until the year 5138; microseconds are far above it.
_MICROSECONDS_ABOVE = 10**14
_CLOSE = OHLCV_COLUMNS.index("close")
# What a gap-filled candle has none of: zero, as the pipeline's empty candles.
_VOLUMES = [
    OHLCV_COLUMNS.index(name)
    for name in (
        "volume",
        "taker_buy_volume",
        "quote_volume",
        "trades",
        "large_trade_quote_volume",
    )
]


@dataclass(frozen=True)
class CandleSeries:
    """Consecutive candles of one symbol and interval; ``open_time`` in epoch ms, ``ohlcv``
    their array form (:data:`OHLCV_COLUMNS`), with NaN where ``large_trade_quote_volume`` is
    unknown (candles from klines, or archived before the field existed)."""

    symbol: str
    interval: str
    open_time: NDArray[np.int64]
    ohlcv: FloatArray
    filled: int

    def __len__(self) -> int:
        return len(self.open_time)


@dataclass
class _Rows:
    open_time: list[NDArray[np.int64]]
    ohlcv: list[FloatArray]


def _expand(paths: Sequence[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if not path.exists() and glob.has_magic(str(path)):
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            if not matches:
                raise TrainingError(f"{path} matches no files")
            files.extend(_expand(matches))
        elif path.is_dir():
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _SUFFIXES)
            )
        elif path.is_file():
            if path.suffix not in _SUFFIXES:
                raise TrainingError(
                    f"{path}: unsupported file type; use .csv, .zip, .jsonl or .parquet"
                )
            files.append(path)
        else:
            raise TrainingError(f"{path} does not exist")
    if not files:
        raise TrainingError(
            f"no .csv, .zip, .jsonl or .parquet candle files in {[str(p) for p in paths]}"
        )
    return files


def _parse_kline_csv(text: str, source: str) -> NDArray[np.float64]:
    lines = text.lstrip().splitlines()
    if lines and not lines[0].split(",", 1)[0].strip().isdigit():
        lines = lines[1:]  # header row
    if not lines:
        return np.empty((0, len(_KLINE_COLUMNS)))
    try:
        table = np.loadtxt(lines, delimiter=",", usecols=_KLINE_COLUMNS, ndmin=2)
    except ValueError as exc:
        raise TrainingError(f"{source} is not a Binance kline CSV: {exc}") from exc
    return np.asarray(table, dtype=np.float64)


def _kline_texts(path: Path) -> Iterator[tuple[str, str]]:
    if path.suffix != ".zip":
        yield path.name, path.read_text()
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".csv"):
                    yield Path(member).name, archive.read(member).decode()
    except zipfile.BadZipFile as exc:
        raise TrainingError(f"{path} is not a valid zip file") from exc


def _infer_interval(open_time: NDArray[np.int64], source: str) -> str:
    steps, counts = np.unique(np.diff(np.unique(open_time)), return_counts=True)
    if len(steps):
        step = int(steps[counts.argmax()])
        for interval in SUPPORTED_INTERVALS:
            if interval_ms(interval) == step:
                return interval
    raise TrainingError(f"{source}: cannot tell the interval; name it like BTCUSDT-1m-....csv")


def _read_klines(path: Path, groups: dict[tuple[str, str], _Rows]) -> None:
    for name, text in _kline_texts(path):
        source = f"{path}:{name}" if path.suffix == ".zip" else str(path)
        table = _parse_kline_csv(text, source)
        if not len(table):
            continue
        open_time = table[:, 0].astype(np.int64)
        if open_time.max() > _MICROSECONDS_ABOVE:
            open_time //= 1000
        match = _KLINE_NAME.match(name)
        symbol = match["symbol"] if match else "UNKNOWN"
        interval = match["interval"] if match else _infer_interval(open_time, source)
        rows = groups.setdefault((symbol, interval), _Rows([], []))
        rows.open_time.append(open_time)
        rows.ohlcv.append(np.column_stack((table[:, 1:], np.full(len(table), np.nan))))


def _read_jsonl(path: Path, groups: dict[tuple[str, str], _Rows]) -> None:
    found: dict[tuple[str, str], list[tuple[int, tuple[float, ...]]]] = defaultdict(list)
    with path.open("rb") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                c = candle_decoder.decode(line)
            except msgspec.DecodeError as exc:
                raise TrainingError(f"{path}:{number} is not a candle: {exc}") from exc
            found[(c.symbol, c.interval)].append((c.open_time, candle_values(c)))
    for key, items in found.items():
        rows = groups.setdefault(key, _Rows([], []))
        rows.open_time.append(np.array([t for t, _ in items], dtype=np.int64))
        rows.ohlcv.append(np.array([v for _, v in items], dtype=np.float64))


def _read_parquet(path: Path, groups: dict[tuple[str, str], _Rows]) -> None:
    try:
        table = read_part(path)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise TrainingError(f"{path} is not a candle archive part: {exc}") from exc
    symbol = table.column("symbol").to_numpy(zero_copy_only=False)
    interval = table.column("interval").to_numpy(zero_copy_only=False)
    open_time = table.column("open_time").to_numpy()
    # Candle's field names are the OHLCV column names; a null (unknown) value becomes NaN.
    ohlcv = np.column_stack(
        [table.column(name).to_numpy().astype(np.float64) for name in OHLCV_COLUMNS]
    )
    # A part the archive wrote holds one (symbol, interval); any other file may hold more.
    for key in sorted(set(zip(symbol.tolist(), interval.tolist(), strict=True))):
        mine = (symbol == key[0]) & (interval == key[1])
        rows = groups.setdefault(key, _Rows([], []))
        rows.open_time.append(open_time[mine])
        rows.ohlcv.append(ohlcv[mine])


def _gap_free(symbol: str, interval: str, rows: _Rows, max_fill: int) -> list[CandleSeries]:
    open_time = np.concatenate(rows.open_time)
    ohlcv = np.concatenate(rows.ohlcv)
    # Keep the last copy of a duplicated open time: later files supersede earlier ones.
    keep = last_of_each(open_time)
    open_time, ohlcv = open_time[keep], ohlcv[keep]
    try:
        step = interval_ms(interval)
    except ConfigError as exc:
        raise TrainingError(f"{symbol}: {exc}") from exc
    if np.any((open_time - open_time[0]) % step):
        raise TrainingError(f"{symbol} {interval}: open times are not aligned to the interval")
    # Beyond max_fill missing candles, flat filler would dominate: start a new segment.
    breaks = np.flatnonzero(np.diff(open_time) > (max_fill + 1) * step) + 1
    return [
        _fill(symbol, interval, step, times, values)
        for times, values in zip(np.split(open_time, breaks), np.split(ohlcv, breaks), strict=True)
    ]


def _fill(
    symbol: str, interval: str, step: int, open_time: NDArray[np.int64], ohlcv: FloatArray
) -> CandleSeries:
    slot = (open_time - open_time[0]) // step
    size = int(slot[-1]) + 1
    present = np.zeros(size, dtype=bool)
    present[slot] = True
    row_of_slot = np.zeros(size, dtype=np.int64)
    row_of_slot[slot] = np.arange(len(slot))
    # Each slot's latest present row, whose close a missing candle repeats.
    latest = np.maximum.accumulate(np.where(present, np.arange(size), 0))
    full = np.empty((size, len(OHLCV_COLUMNS)), dtype=np.float64)
    full[:, :] = ohlcv[row_of_slot[latest], _CLOSE][:, None]
    full[:, _VOLUMES] = 0.0
    full[present] = ohlcv
    return CandleSeries(
        symbol=symbol,
        interval=interval,
        open_time=open_time[0] + np.arange(size, dtype=np.int64) * step,
        ohlcv=full,
        filled=size - len(slot),
    )


def load_series(
    paths: Path | str | Sequence[Path | str], *, max_fill: int = 60
) -> list[CandleSeries]:
    """Read candle files, directories (searched recursively) or glob patterns into gap-free
    series, one list entry per contiguous segment of a (symbol, interval).

    Kline CSVs may have a header and times in ms or µs; symbol and interval come from the
    data.binance.vision file name (``BTCUSDT-1m-2025-11-20.csv``). JSONL holds one
    ``Candle`` per line as the pipeline encodes it; Parquet files are candle archive parts,
    so the archive root (``Settings.archive_dir``) or any partition directory can be passed.
    A candle found in several sources (same symbol, interval and open time) is kept once,
    from the source read last (files in the order given, directories sorted). Gaps of up to
    ``max_fill`` candles are filled with flat zero-volume candles; longer gaps split the
    series.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    groups: dict[tuple[str, str], _Rows] = {}
    for path in _expand([Path(p) for p in items]):
        if path.suffix == ".jsonl":
            _read_jsonl(path, groups)
        elif path.suffix == ".parquet":
            _read_parquet(path, groups)
        else:
            _read_klines(path, groups)
    if not groups:
        raise TrainingError(f"no candles found in {[str(p) for p in items]}")
    return [
        series
        for (symbol, interval), rows in sorted(groups.items())
        for series in _gap_free(symbol, interval, rows, max_fill)
    ]
