"""Replay speed: ``python -m bench.replay`` (part of ``make bench``).

Replays one day of real BTCUSDT trades (``../shared/data/.../BTCUSDT-trades-2019-04-01.csv``
beside the checkout, 183,355 trades; ``--data`` takes another file) through the live path
(:func:`makeusrich.stream.replay.replay`: publish to the run's topic, a ``mur worker``
child builds candles and predictions) on embedded services, as fast as possible, and
reports the span's event time divided by the wall time: the replay's multiple of real time.
The same span is then replayed again from the Kafka topic (selection by ``ts_event``).

Results go to stdout and ``bench/results/replay.json``. A benchmark, not a test.
"""

import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from bench._common import SHARED_SPOT, TEST_DATA, parse_stage, run_stage, stage_parser
from makeusrich.core.embedded import start_kafka, start_redis
from makeusrich.core.settings import Settings
from makeusrich.stream.replay import ReplayResult, ReplaySpec, drop_namespace, replay

_DAY = SHARED_SPOT / "trades" / "BTCUSDT-trades-2019-04-01.csv"
_QUICK_DATA = TEST_DATA / "BTCUSDT-trades-2019-04-01-0000-0029.csv"  # its first 30 minutes


def _figures(result: ReplayResult) -> dict[str, Any]:
    span_s = (result.last_ts_event - result.first_ts_event) / 1000
    return {
        "trades": result.messages,
        "span_s": round(span_s, 1),
        "wall_s": round(result.elapsed_s, 2),
        "trades_per_s": round(result.messages / result.elapsed_s),
        "x_real_time": round(span_s / result.elapsed_s, 1),
        "candles": result.candles,
        "predictions": result.predictions,
    }


async def _measure(data: Path, tmp: Path) -> dict[str, Any]:
    with start_kafka(log_dir=tmp / "logs") as kafka, start_redis(log_dir=tmp / "logs") as rds:
        settings = Settings(kafka_bootstrap=kafka.url, redis_url=rds.url, state_dir=tmp,
                            intervals=("1m",), log_level="WARNING")
        print(f"replaying {data.name} from the file ...", flush=True)
        from_file = await replay(settings, ReplaySpec(source=str(data)), "bench-file")
        # The file replay's own trades topic is now a "live" topic to replay from.
        print("replaying the same span from Kafka ...", flush=True)
        from_kafka = await replay(from_file.settings, ReplaySpec(source="kafka"), "bench-kafka")
        drop_namespace(from_kafka.settings)
        drop_namespace(from_file.settings)
    return {"data": str(data), "from_file": _figures(from_file),
            "from_kafka": _figures(from_kafka)}


def _print_summary(result: dict[str, Any], path: Path) -> None:
    for source in ("from_file", "from_kafka"):
        f = result[source]
        print(f"replay {source.replace('_', ' ')}: {f['trades']:,} trades spanning "
              f"{f['span_s'] / 3600:.1f} h in {f['wall_s']:.1f} s = {f['x_real_time']:,.0f}x "
              f"real time ({f['trades_per_s']:,} trades/s; {f['candles']} candles, "
              f"{f['predictions']} predictions)")
    print(f"results: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("replay", __doc__, "the first 30 minutes of that day (tests/data)")
    parser.add_argument("--data", type=Path, help="a trades file (default: the day in ../shared)")
    args = parse_stage(parser, argv, "replay", data=(_QUICK_DATA, _DAY))
    if not args.data.is_file():
        print(f"bench.replay needs a day of trades: {args.data} is missing (pass --data)",
              file=sys.stderr)
        return 1
    logging.basicConfig(level="WARNING")
    return run_stage(lambda tmp: asyncio.run(_measure(args.data, tmp)), args.out,
                     _print_summary, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
