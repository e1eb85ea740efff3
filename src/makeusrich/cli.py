"""``mur``: one entry point for every process of the pipeline.

``mur up`` is the whole service on one machine: it starts an embedded Kafka-compatible
broker and a redis-server (unless MUR_KAFKA_BOOTSTRAP / MUR_REDIS_URL point elsewhere),
then the ingestor, the Faust worker and the API as child processes, and stops them all on
Ctrl-C or SIGTERM. Each part also runs alone (``mur ingest|worker|api``) against external
services, as in production.
"""

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from makeusrich.core.embedded import EmbeddedService, kill_with_parent, start_kafka, start_redis
from makeusrich.core.errors import ConfigError, MakeUsRichError
from makeusrich.core.intervals import parse_intervals
from makeusrich.core.settings import Settings
from makeusrich.trainer import ARCHITECTURES  # importing the trainer does not import torch

if TYPE_CHECKING:
    from makeusrich.inference import Registry

__all__ = ["main"]

log = logging.getLogger("makeusrich")

# One hour of real BTCUSDT trades (Binance public data), replayed when Binance is unreachable:
# long enough for the model's 30-candle window to fill at 1m.
BUNDLED_SAMPLE = Path(__file__).parent / "data" / "BTCUSDT-trades-2019-04-01-0000-0059.zip"


def _speed(text: str) -> float | None:
    if text == "max":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speed takes a number or 'max', not {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("--speed must be positive")
    return value


def _settings(args: argparse.Namespace) -> Settings:
    """Environment first, then the command-line flags that were given."""
    overrides: dict[str, Any] = {}
    for flag, field in [
        ("symbols", "symbols"), ("intervals", "intervals"), ("source", "source"),
        ("api_port", "api_port"), ("kafka_port", "kafka_port"), ("redis_port", "redis_port"),
        ("grace_ms", "grace_ms"), ("model_dir", "model_dir"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    if hasattr(args, "speed"):  # absent unless given: None means "max"
        overrides["replay_speed"] = args.speed
    return Settings(**overrides)


def _to_env(settings: Settings) -> dict[str, str]:
    """Settings as MUR_* variables, so child processes build the same Settings."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            if name == "replay_speed":
                env["MUR_REPLAY_SPEED"] = "max"
            continue
        if isinstance(value, tuple | list):
            value = ",".join(str(v) for v in value)
        env[f"MUR_{name.upper()}"] = str(value)
    return env


# ---- child processes -------------------------------------------------------------------


def _run_async(make: Callable[[asyncio.Event], Coroutine[Any, Any, object]]) -> None:
    """Run a coroutine until it ends or SIGINT/SIGTERM sets its stop event."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await make(stop)

    asyncio.run(runner())


async def _ingest(settings: Settings, stop: asyncio.Event) -> None:
    from makeusrich.stream.ingest import probe_binance, run_live
    from makeusrich.stream.publisher import TradePublisher, ensure_topics
    from makeusrich.stream.sources import read_trades, run_replay, run_sim

    ensure_topics(settings)
    publisher = TradePublisher(settings)
    try:
        kind = settings.source_kind
        if kind == "auto":
            if await probe_binance(settings):
                kind = "binance"
            else:
                log.warning(
                    "!!! Binance is unreachable at %s within %.0f s: REPLAYING the bundled "
                    "sample %s instead. Every record is labelled source=replay. !!!",
                    settings.binance_ws_url, settings.binance_connect_timeout_s,
                    BUNDLED_SAMPLE.name,
                )
                kind = "replay"
                settings = settings.model_copy(update={"source": f"replay:{BUNDLED_SAMPLE}"})
        if kind == "binance":
            await run_live(settings, publisher, stop)
        elif kind == "sim":
            await run_sim(settings, publisher, stop)
        else:
            path = Path(settings.source.split(":", 1)[1])
            count = await run_replay(read_trades(path), publisher, stop, settings.replay_speed)
            log.info("replay of %s finished: %d trades published", path, count)
    finally:
        publisher.close()


def _cmd_ingest(args: argparse.Namespace) -> None:
    settings = _settings(args)
    _require_services(settings)
    _run_async(lambda stop: _ingest(settings, stop))


def _cmd_worker(args: argparse.Namespace) -> None:
    from makeusrich.stream.app import run_worker

    settings = _settings(args)
    _require_services(settings)
    run_worker(settings)


def _cmd_api(args: argparse.Namespace) -> None:
    from makeusrich.api import serve

    settings = _settings(args)
    if not settings.redis_url:
        raise ConfigError("mur api needs MUR_REDIS_URL (or run `mur up`)")
    serve(settings)


def _cmd_archive(args: argparse.Namespace) -> None:
    from makeusrich.trainer.archive import run_archiver

    settings = _settings(args)
    _require_services(settings)
    _run_async(lambda stop: run_archiver(settings, stop))


def _cmd_backfill(args: argparse.Namespace) -> None:
    from makeusrich.trainer.backfill import backfill

    settings = _settings(args)
    out = args.out or settings.archive_dir
    parts = asyncio.run(backfill(settings, args.symbols or settings.symbols, args.interval,
                                 args.days, out))
    print(f"{len(parts)} archive parts written under {out}")


def _cmd_trainer(args: argparse.Namespace) -> None:
    from makeusrich.trainer.schedule import parse_duration, run_schedule

    settings = _settings(args)
    registry = args.registry or settings.model_dir
    if registry is None:  # never write new versions into the installed package
        raise ConfigError("mur trainer needs --registry DIR or MUR_MODEL_DIR")
    data = args.data or [str(settings.archive_dir)]
    run_schedule(settings, data, Path(registry), every_s=parse_duration(args.every),
                 arch=args.arch, epochs=args.epochs, runs=args.runs)


def _cmd_record(args: argparse.Namespace) -> None:
    from makeusrich.stream.record import record

    settings = _settings(args)
    _run_async(lambda stop: record(settings, Path(args.out), stop, args.max_messages))


def _cmd_train(args: argparse.Namespace) -> None:
    from makeusrich.trainer import train

    version_dir = train(
        [Path(p) for p in args.data], Path(args.out), arch=args.arch, symbols=args.symbols,
        window=args.window, epochs=args.epochs, layers=args.layers,
    )
    print(f"model written to {version_dir}")


def _registry(args: argparse.Namespace) -> "Registry":
    from makeusrich.inference import Registry, bundled_models_dir

    root = args.registry or _settings(args).model_dir or bundled_models_dir()
    return Registry(Path(root))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from makeusrich.trainer.evaluate import evaluate_paths

    report = evaluate_paths(args.model, args.data, _registry(args).root)
    print(report.to_json() if args.json else report.render())


def _cmd_models(args: argparse.Namespace) -> None:
    registry = _registry(args)
    if args.action == "list":
        for info in registry.list():
            flags = " ".join(
                flag for flag, on in (("champion", info.is_champion), ("HASH-MISMATCH",
                                      not info.sha256_ok)) if on
            )
            if info.champion_for:
                flags += f" champion-for:{','.join(info.champion_for)}"
            skill = info.metrics.get("skill")
            skill_text = "" if skill is None else f"skill {skill:+.4f}"
            print(f"{info.version:40} {info.kind or '?':12} {skill_text:16} {flags}")
    elif args.action == "show":
        import msgspec

        details = registry.show(args.version)
        print(msgspec.json.format(msgspec.json.encode(details.manifest), indent=2).decode())
        print(f"champion: {details.info.is_champion}  "
              f"champion for: {', '.join(details.info.champion_for) or '-'}  "
              f"sha256 ok: {details.info.sha256_ok}")
    elif args.action == "promote":
        _promote(args, registry)
    else:
        version = registry.rollback(args.reason or "rollback from the CLI", symbol=args.symbol)
        whose = "" if args.symbol is None else f" for {args.symbol}"
        print(f"rolled back: {version} is champion{whose} again")
        _announce(args, registry, version, args.symbol)


def _promote(args: argparse.Namespace, registry: "Registry") -> None:
    if args.force:
        reason = args.reason or "forced from the CLI"
    else:
        if not args.data:
            raise ConfigError("promote compares on a hold-out: pass --data (or --force)")
        from makeusrich.trainer.promotion import decide_promotion

        decision = decide_promotion(registry, args.version, args.data, args.symbol)
        if not decision.promote:
            print(f"not promoted ({decision.reason}); {args.version} stays in the registry")
            sys.exit(1)
        reason = decision.reason
    registry.promote(args.version, reason, force=args.force, symbol=args.symbol)
    whose = "" if args.symbol is None else f" for {args.symbol}"
    print(f"promoted {args.version}{whose}: {reason}")
    _announce(args, registry, args.version, args.symbol)


def _announce(
    args: argparse.Namespace, registry: "Registry", version: str, symbol: str | None = None
) -> None:
    """Tell running workers, when there is a broker to tell them through."""
    settings = _settings(args)
    if not settings.kafka_bootstrap:
        print("MUR_KAFKA_BOOTSTRAP is unset: workers pick the champion up when they start")
        return
    from makeusrich.inference import read_manifest
    from makeusrich.stream.control import announce_model

    announce_model(settings, version, read_manifest(registry.root / version).sha256, symbol)
    print(f"announced {version} to the workers on {settings.kafka_bootstrap}")


def _require_services(settings: Settings) -> None:
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise ConfigError(
            "this command runs against existing services: set MUR_KAFKA_BOOTSTRAP and "
            "MUR_REDIS_URL, or use `mur up` to start embedded ones"
        )


# ---- mur up: the supervisor ------------------------------------------------------------


class _Supervisor:
    """Starts the embedded services and the three processes; stops all of them together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services: list[EmbeddedService] = []
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self) -> Settings:
        settings = self.settings
        log_dir = settings.state_dir / "logs"
        updates: dict[str, Any] = {}
        if not settings.kafka_bootstrap:
            kafka = start_kafka(settings.kafka_port, log_dir)
            self.services.append(kafka)
            updates["kafka_bootstrap"] = kafka.url
        if not settings.redis_url:
            redis = start_redis(settings.redis_port, log_dir)
            self.services.append(redis)
            updates["redis_url"] = redis.url
        settings = self.settings = settings.model_copy(update=updates)
        env = {**os.environ, **_to_env(settings)}
        # Start order matters little (each retries its connections); API first so the
        # URL answers as soon as it is printed.
        for name in ("api", "worker", "archive", "ingest"):
            self.children[name] = subprocess.Popen(
                [sys.executable, "-m", "makeusrich", name], env=env,
                stdin=subprocess.DEVNULL, preexec_fn=kill_with_parent,
            )
        return settings

    def wait(self) -> int:
        """Block until a signal or a process failure; returns the exit code for `mur up`."""
        while not self.stopping:
            for name, child in self.children.items():
                code = child.poll()
                if code is None:
                    continue
                if name == "ingest" and code == 0:
                    continue  # a finite replay is done; keep serving what it produced
                log.error("%s exited with code %s; stopping everything", name, code)
                return 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        self.stopping = True
        for name in ("ingest", "worker", "archive", "api"):
            child = self.children.get(name)
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15.0
        for child in self.children.values():
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for service in reversed(self.services):
            service.stop()


def _cmd_up(args: argparse.Namespace) -> None:
    supervisor = _Supervisor(_settings(args))

    def on_signal(signum: int, _frame: object) -> None:
        supervisor.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = 0
    try:
        settings = supervisor.start()
        base = f"http://{settings.api_host}:{settings.api_port}"
        print(
            f"make-us-rich is up (source: {settings.source})\n"
            f"  API        {base}/v1/predictions/latest\n"
            f"  live feed  {base}/v1/stream\n"
            f"  docs       {base}/docs\n"
            f"  Kafka      {settings.kafka_bootstrap}\n"
            f"  Redis      {settings.redis_url}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        code = supervisor.wait()
    finally:
        supervisor.stop()
    sys.exit(code)


# ---- argument parsing ------------------------------------------------------------------


def _symbol_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip().upper() for x in text.split(",") if x.strip())


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--symbols", type=_symbol_list)
    parser.add_argument("--intervals", type=parse_intervals)
    parser.add_argument("--source", help="auto | binance | sim | replay:PATH")
    parser.add_argument("--speed", type=_speed, default=argparse.SUPPRESS,
                        help="replay speed: a multiple of real time, or max")
    parser.add_argument("--grace-ms", type=int)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--api-port", type=int)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mur", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole service (embedded Kafka + Redis if unset)")
    _add_common(up)
    up.add_argument("--kafka-port", type=int)
    up.add_argument("--redis-port", type=int)
    up.set_defaults(func=_cmd_up)
    for name, func, text in [
        ("ingest", _cmd_ingest, "publish trades from the source to Kafka"),
        ("worker", _cmd_worker, "the Faust worker: candles + predictions"),
        ("api", _cmd_api, "the HTTP API (REST + SSE)"),
        ("archive", _cmd_archive, "sink the candles topic to Parquet (MUR_ARCHIVE_DIR)"),
    ]:
        cmd = sub.add_parser(name, help=text)
        _add_common(cmd)
        cmd.set_defaults(func=func)
    rec = sub.add_parser("record", help="record the raw Binance trade stream to JSONL")
    _add_common(rec)
    rec.add_argument("--out", required=True)
    rec.add_argument("--max-messages", type=int)
    rec.set_defaults(func=_cmd_record)
    train = sub.add_parser("train", help="train a forecaster on candles and export ONNX")
    train.add_argument("--data", nargs="+", required=True,
                       help="kline CSV/zip files, pipeline candle JSONL, dirs or globs")
    train.add_argument("--out", required=True, help="registry directory for the new version")
    train.add_argument("--arch", default="lstm", choices=ARCHITECTURES)
    train.add_argument("--symbols", type=_symbol_list, help="train on these symbols only")
    train.add_argument("--window", type=int, default=30)
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--layers", type=int, help="default: the architecture's own")
    train.set_defaults(func=_cmd_train)
    evaluate = sub.add_parser("evaluate", help="score a model and the naive baselines on data")
    evaluate.add_argument("--model", default="champion", help="VERSION, champion or naive")
    evaluate.add_argument("--data", nargs="+", required=True)
    evaluate.add_argument("--registry", type=Path, help="default: MUR_MODEL_DIR or bundled")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(func=_cmd_evaluate)
    models = sub.add_parser("models", help="the model registry: list, show, promote, rollback")
    models.add_argument("--registry", type=Path, help="default: MUR_MODEL_DIR or bundled")
    actions = models.add_subparsers(dest="action", required=True)
    actions.add_parser("list")
    actions.add_parser("show").add_argument("version")
    promote = actions.add_parser("promote", help="champion only if it beats the current one")
    promote.add_argument("version")
    promote.add_argument("--data", nargs="+", help="candles whose last 15% are the hold-out")
    promote.add_argument("--force", action="store_true", help="skip the hold-out comparison")
    promote.add_argument("--reason")
    promote.add_argument("--symbol", type=str.upper,
                         help="champion of this symbol only (default: the shared champion)")
    rollback = actions.add_parser("rollback", help="back to the previous champion")
    rollback.add_argument("--reason")
    rollback.add_argument("--symbol", type=str.upper,
                          help="this symbol's own champion (the first goes back to the shared)")
    models.set_defaults(func=_cmd_models)
    backfill = sub.add_parser("backfill", help="Binance REST klines into the candle archive")
    backfill.add_argument("--symbols", type=_symbol_list)
    backfill.add_argument("--interval", default="1m")
    backfill.add_argument("--days", type=float, default=7.0)
    backfill.add_argument("--out", type=Path, help="default: MUR_ARCHIVE_DIR")
    backfill.set_defaults(func=_cmd_backfill)
    trainer = sub.add_parser("trainer", help="retrain on a schedule and promote by the rule")
    trainer.add_argument("--every", default="6h", help="e.g. 6h, 30m, 90s")
    trainer.add_argument("--data", nargs="+", help="default: the candle archive")
    trainer.add_argument("--registry", type=Path, help="default: MUR_MODEL_DIR or bundled")
    trainer.add_argument("--arch", default="lstm", choices=ARCHITECTURES)
    trainer.add_argument("--epochs", type=int, default=10)
    trainer.add_argument("--runs", type=int, help="stop after this many runs")
    trainer.set_defaults(func=_cmd_trainer)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    level = args.log_level or os.environ.get("MUR_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("kafka", "aiokafka"):  # connection chatter at INFO drowns our own logs
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        args.func(args)
    except MakeUsRichError as exc:
        log.error("%s", exc)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
