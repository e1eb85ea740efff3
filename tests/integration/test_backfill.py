"""`mur backfill` against the local fake Binance's REST klines (real 2025-11-20 klines)."""

from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest

from kit.fake_binance import BTCUSDT_KLINES_CSV, FakeBinance, Script, load_klines_csv
from makeusrich.core.errors import IngestError
from makeusrich.core.settings import Settings
from makeusrich.trainer.archive import read_part
from makeusrich.trainer.backfill import backfill
from makeusrich.trainer.data import load_series

pytestmark = pytest.mark.integration

NOV_20 = 1_763_596_800_000  # 2025-11-20 00:00 UTC, the first kline of the CSV
NOV_21 = NOV_20 + 86_400_000
HOUR = 3_600_000


def _settings(fake: FakeBinance, tmp_path: Path) -> Settings:
    return Settings(binance_rest_url=fake.rest_url, archive_dir=tmp_path / "archive",
                    state_dir=tmp_path)


def _kline_requests(fake: FakeBinance) -> list[dict[str, str]]:
    return [
        {key: values[-1] for key, values in parse_qs(urlsplit(path).query).items()}
        for path in fake.rest_requests
        if urlsplit(path).path == "/api/v3/klines"
    ]


async def test_backfill_pages_keeps_closed_klines_and_skips_archived_ones(
    tmp_path: Path,
) -> None:
    klines = load_klines_csv(BTCUSDT_KLINES_CSV)
    script = Script(failed_kline_requests=1)  # retried
    async with FakeBinance({}, script, klines={"BTCUSDT": klines}) as fake:
        settings = _settings(fake, tmp_path)
        root = settings.archive_dir
        # 00:00 .. 06:00:30: the kline opening at 06:00 has not closed by then.
        until = NOV_20 + 6 * HOUR + 30_000
        first = await backfill(settings, ["BTCUSDT"], "1m", 0.25, until_ms=until)
        assert [p.relative_to(root).as_posix() for p in first] == [
            f"symbol=BTCUSDT/interval=1m/date=2025-11-20/part-{NOV_20}-{NOV_20 + 6 * HOUR - 60_000}"
            ".parquet"
        ]
        # The whole day overlaps the first run: only the other 18 hours are written.
        second = await backfill(settings, ["BTCUSDT"], "1m", 1, until_ms=NOV_21)
        assert [p.name for p in second] == [f"part-{NOV_20 + 6 * HOUR}-{NOV_21 - 60_000}.parquet"]
        requests = _kline_requests(fake)

    # 1,440 klines need two pages; the second starts after the first page's last kline.
    day = [r for r in requests if r["endTime"] == str(NOV_21 - 1)]
    assert [r["startTime"] for r in day] == [str(NOV_20), str(NOV_20 + 1000 * 60_000)]
    assert {r["limit"] for r in requests} == {"1000"}
    assert len(requests) == 1 + 1 + 2  # the failed request, the first run, the day

    rows = [row for part in (*first, *second) for row in read_part(part).to_pylist()]
    assert [r["open_time"] for r in rows] == [k[0] for k in klines]
    for row, kline in zip(rows, klines, strict=True):
        assert row["close_time"] == kline[6]
        assert row["close"] == float(kline[4])
        assert row["quote_volume"] == float(kline[7])
        assert row["trades"] == kline[8]
        assert row["taker_buy_quote_volume"] == float(kline[10])
        assert row["source"] == "live"
        assert row["ts_event"] == kline[6]

    # The same day from the CSV and from the archive: each minute once, identical values.
    (from_csv,) = load_series(BTCUSDT_KLINES_CSV)
    (both,) = load_series([BTCUSDT_KLINES_CSV, root])
    (archived,) = load_series(root)
    assert len(both) == len(np.unique(both.open_time)) == 1440
    assert both.filled == archived.filled == 0
    for series in (both, archived):
        np.testing.assert_array_equal(series.open_time, from_csv.open_time)
        np.testing.assert_array_equal(series.ohlcv, from_csv.ohlcv)


async def test_backfill_names_an_unknown_symbol(tmp_path: Path) -> None:
    async with FakeBinance({}, klines={"BTCUSDT": []}) as fake:
        with pytest.raises(IngestError, match="does not know symbol 'NOPEUSDT'"):
            await backfill(_settings(fake, tmp_path), ["NOPEUSDT"], "1m", 1, until_ms=NOV_21)
