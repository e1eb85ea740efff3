"""What a replay reads from a trades file: streamed as it is consumed, never the whole span
in memory (no broker)."""

import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from kit.builders import T0_MS
from makeusrich.core.errors import SourceFormatError
from makeusrich.core.settings import Settings
from makeusrich.stream.replay import ReplaySpec, span_batches
from makeusrich.stream.sources import read_trades

SETTINGS = Settings(_env_file=None)  # a file source reads no setting


def _rows(count: int) -> list[str]:
    """Binance spot ``trades`` rows, one every 100 ms from T0_MS."""
    return [f"{i},4100.{i % 100:02d},0.01,41.0,{T0_MS + 100 * i},{i % 2 == 0},True"
            for i in range(count)]


def _write(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(path.with_suffix(".csv").name, text)
    else:
        path.write_text(text)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".zip"])
def test_a_file_span_is_read_only_as_far_as_it_is_consumed(tmp_path: Path, suffix: str) -> None:
    # A malformed line after the first 2000 trades: only a reader that reads ahead meets it.
    path = _write(tmp_path / f"BTCUSDT-trades-2019-04-01{suffix}", [*_rows(2_000), "junk"])
    spec = ReplaySpec(source=str(path), start_ms=T0_MS + 1_000)
    head = next(span_batches(SETTINGS, spec))
    assert head.trade_id == list(range(10, 1_000))  # a batch of 1000, selected by start_ms
    with pytest.raises(SourceFormatError, match=":2001: "):
        list(span_batches(SETTINGS, spec))


@pytest.mark.slow
def test_a_file_span_streams_in_memory_that_does_not_grow_with_it(tmp_path: Path) -> None:
    count = 200_000  # ~5.5 hours at 10 trades/s
    path = _write(tmp_path / "BTCUSDT-trades-2019-04-01.zip", _rows(count))
    spec = ReplaySpec(source=str(path), end_ms=T0_MS + 100 * count)
    tracemalloc.start()
    try:
        seen, last_id = 0, -1
        for batch in span_batches(SETTINGS, spec):
            seen, last_id = seen + len(batch), batch.trade_id[-1]
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count and last_id == count - 1
    # Less than a list of the trades would take: their structs alone, without list or floats.
    listed_bytes = count * sys.getsizeof(next(read_trades(path)))
    assert listed_bytes > 15_000_000
    assert peak_bytes < listed_bytes / 20, (peak_bytes, listed_bytes)
