"""``mur``: one entry point for every process of the pipeline.

``mur up`` is the whole service on one machine: it starts an embedded Kafka-compatible
broker and a redis-server (unless MUR_KAFKA_BOOTSTRAP / MUR_REDIS_URL point elsewhere),
then the ingestor, the Faust worker and the API as child processes, and stops them all on
Ctrl-C or SIGTERM. Each part also runs alone (``mur ingest|worker|api``) against external
services, as in production.
"""

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from makeusrich.core.apache_kafka import ApacheKafka, start_apache_kafka
from makeusrich.core.embedded import (
    EmbeddedService,
    free_port,
    kill_with_parent,
    start_kafka,
    start_redis,
)
from makeusrich.core.errors import ConfigError, IngestError, MakeUsRichError, StreamError
from makeusrich.core.intervals import parse_intervals
from makeusrich.core.settings import Settings
from makeusrich.inference.features import FEATURES
from makeusrich.trainer import (  # importing the trainer does not import torch
    ARCHITECTURES,
    BASELINE_ARCHITECTURES,
)

if TYPE_CHECKING:
    from makeusrich.backtest import BacktestResult
    from makeusrich.inference import Registry
    from makeusrich.stream.replay import ReplaySpec

__all__ = ["main"]

log = logging.getLogger("makeusrich")

_Service = EmbeddedService | ApacheKafka  # what `mur up` starts, and stops at the end

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
        ("kafka", "kafka_engine"),
        ("grace_ms", "grace_ms"), ("model_dir", "model_dir"),
        ("retrain_on_drift", "drift_retrain"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            overrides[field] = value
    if hasattr(args, "speed"):  # absent unless given: None means "max"
        overrides["replay_speed"] = args.speed
    try:
        return Settings(**overrides)
    except ValidationError as exc:  # one line per bad setting, not a traceback
        problems = "; ".join(f"MUR_{str(error['loc'][0]).upper()}: {error['msg']}"
                             for error in exc.errors() if error["loc"])
        raise ConfigError(f"invalid settings: {problems or exc}") from None


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
    from makeusrich.core.metrics import IngestMetrics, serve_metrics
    from makeusrich.stream.ingest import MeteredSink, probe_binance, run_live
    from makeusrich.stream.publisher import TradePublisher, ensure_topics
    from makeusrich.stream.sources import read_batches, run_replay, run_sim

    metrics = IngestMetrics()
    if settings.ingest_metrics_port is not None:
        serve_metrics(metrics, settings.api_host, settings.ingest_metrics_port)
    ensure_topics(settings)
    producer = TradePublisher(settings)
    publisher = MeteredSink(producer, metrics)
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
            await run_live(settings, publisher, stop, metrics)
        elif kind == "sim":
            await run_sim(settings, publisher, stop)
        else:
            path = Path(settings.source.split(":", 1)[1])
            count = await run_replay(read_batches(path), publisher, stop, settings.replay_speed)
            log.info("replay of %s finished: %d trades published", path, count)
    finally:
        producer.close()


def _cmd_ingest(args: argparse.Namespace) -> None:
    settings = _settings(args)
    _require_services(settings)
    _run_async(lambda stop: _ingest(settings, stop))


def _cmd_worker(args: argparse.Namespace) -> None:
    from makeusrich.stream.app import run_worker

    settings = _settings(args)
    _require_services(settings)
    run_worker(_worker_settings(settings))


def _worker_settings(settings: Settings) -> Settings:
    """``settings`` for `mur worker`: instance ``auto`` named after this host, and the
    symbols of a replay the ingestor may publish (its ``replay:FILE``, or the bundled sample
    ``auto`` falls back to) accepted with the configured ones."""
    from makeusrich.stream.sources import replay_symbols

    update: dict[str, Any] = {}
    if settings.worker_instance == "auto":
        update["worker_instance"] = socket.gethostname()
    kind = settings.source_kind
    if kind in ("auto", "replay"):
        path = BUNDLED_SAMPLE if kind == "auto" else Path(settings.source.split(":", 1)[1])
        try:
            replayed = replay_symbols(path)
        except IngestError as exc:  # e.g. the file exists only where the ingestor runs
            log.warning("the worker accepts only MUR_SYMBOLS: %s", exc)
        else:
            update["symbols"] = tuple(dict.fromkeys(settings.symbols + replayed))
    return settings.model_copy(update=update)


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
    from makeusrich.core.metrics import TrainerMetrics, serve_metrics
    from makeusrich.trainer.schedule import parse_duration, run_schedule

    settings = _settings(args)
    registry = args.registry or settings.model_dir
    if registry is None:  # never write new versions into the installed package
        raise ConfigError("mur trainer needs --registry DIR or MUR_MODEL_DIR")
    data = args.data or [str(settings.archive_dir)]
    every_s = parse_duration(args.every)
    metrics = TrainerMetrics()
    if settings.trainer_metrics_port is not None:
        serve_metrics(metrics, settings.api_host, settings.trainer_metrics_port)
    run_schedule(settings, data, Path(registry), every_s=every_s, arch=args.arch,
                 epochs=args.epochs, runs=args.runs, metrics=metrics, horizons=args.horizons)


def _cmd_record(args: argparse.Namespace) -> None:
    from makeusrich.stream.record import record

    settings = _settings(args)
    _run_async(lambda stop: record(settings, Path(args.out), stop, args.max_messages))


def _cmd_train(args: argparse.Namespace) -> None:
    from makeusrich.trainer import train

    version_dir = train(
        [Path(p) for p in args.data], Path(args.out), arch=args.arch, symbols=args.symbols,
        features=args.features, window=args.window, epochs=args.epochs, layers=args.layers,
        horizons=args.horizons,
    )
    print(f"model written to {version_dir}")


def _registry(args: argparse.Namespace) -> "Registry":
    from makeusrich.inference import Registry, bundled_models_dir

    root = args.registry or _settings(args).model_dir or bundled_models_dir()
    return Registry(Path(root))


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from makeusrich.trainer.evaluate import evaluate_paths

    report = evaluate_paths(args.model, args.data, _registry(args).root, holdout=args.holdout)
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
    elif args.action == "reference":
        from makeusrich.monitoring import reference_for_version, write_reference

        directory = registry.root / args.version
        if args.version not in registry.versions():
            raise ConfigError(f"unknown model version {args.version!r} in {registry.root}")
        path = write_reference(directory, reference_for_version(directory, args.data))
        print(f"training reference for drift detection written to {path}")
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


def _start_missing_services(settings: Settings, started: list[_Service]) -> Settings:
    """Start a broker (``settings.kafka_engine``: Tansu, or a one-node Apache Kafka) and a
    redis-server for the URLs ``settings`` leave unset (appending them to ``started``, for
    the caller to stop); the settings with every URL."""
    log_dir = settings.state_dir / "logs"
    updates: dict[str, Any] = {}
    if not settings.kafka_bootstrap and settings.kafka_engine == "apache":
        cluster = start_apache_kafka(
            nodes=1, libs_dir=settings.kafka_libs_dir, properties=settings.kafka_properties,
            data_dir=settings.state_dir / "apache-kafka", log_dir=log_dir)
        started.append(cluster)
        updates["kafka_bootstrap"] = cluster.bootstrap
    elif not settings.kafka_bootstrap:
        kafka = start_kafka(settings.kafka_port, log_dir)
        started.append(kafka)
        updates["kafka_bootstrap"] = kafka.url
    if not settings.redis_url:
        redis = start_redis(settings.redis_port, log_dir)
        started.append(redis)
        updates["redis_url"] = redis.url
    return settings.model_copy(update=updates)


def _require_services(settings: Settings) -> None:
    if not settings.kafka_bootstrap or not settings.redis_url:
        raise ConfigError(
            "this command runs against existing services: set MUR_KAFKA_BOOTSTRAP and "
            "MUR_REDIS_URL, or use `mur up` to start embedded ones"
        )


# ---- replays and backtests ---------------------------------------------------------------


def _timestamp(text: str) -> int:
    """Epoch ms, or an ISO-8601 date/time (UTC unless it names a zone) -> epoch ms."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: use ISO-8601 (2019-04-01T00:30, 2019-04-01) or epoch ms"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


class _Progress:
    """Reports a replay's or backtest's progress: a bar on a terminal, JSON lines on stdout
    (for the API's job runner) or nothing."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.share = 0.0
        self._bar: Any = None
        if mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=100, unit="%", disable=None, leave=False,
                             bar_format="{l_bar}{bar}| {elapsed}")

    def __call__(self, share: float, text: str, stage: str = "replay") -> None:
        self.share = share
        if self._bar is not None:
            self._bar.set_description_str(text[:60])
            self._bar.update(round(share * 100) - self._bar.n)
        elif self.mode == "jsonl":
            self.emit({"stage": stage, "progress": round(share, 4), "message": text})

    def emit(self, line: dict[str, Any]) -> None:
        print(json.dumps(line), flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _replay_spec(args: argparse.Namespace) -> "ReplaySpec":
    from makeusrich.stream.replay import ReplaySpec

    return ReplaySpec(source=args.source_from, symbols=args.symbols or (),
                      start_ms=args.start, end_ms=args.end, speed=args.speed)


async def _with_services(
    settings: Settings, work: Callable[[Settings], Coroutine[Any, Any, None]]
) -> None:
    started: list[_Service] = []
    # A signal cancels the work, so that its cleanup (stopping the replay's worker,
    # deleting a backtest's namespaces) runs before the services stop.
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        settings = await asyncio.to_thread(_start_missing_services, settings, started)
        await work(settings)
    except asyncio.CancelledError:
        raise StreamError("stopped by a signal before the end") from None
    finally:
        for service in reversed(started):
            service.stop()


def _cmd_replay(args: argparse.Namespace) -> None:
    from makeusrich.stream.replay import replay

    settings = _settings(args)
    spec = _replay_spec(args)
    run_id = args.run_id or time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    progress = _Progress(args.progress)
    embedded = not settings.kafka_bootstrap or not settings.redis_url

    async def work(settings: Settings) -> None:
        model_dir = None
        if args.model:
            from makeusrich.backtest.run import resolve_model_dir
            from makeusrich.stream.control import registry_root

            model_dir = resolve_model_dir(args.model, registry_root(settings))
        result = await replay(settings, spec, run_id, model_dir=model_dir, progress=progress)
        progress.close()
        run = result.settings
        print(f"replayed {result.messages} {'candles' if spec.source == 'archive' else 'trades'}"
              f" of {','.join(result.symbols)} in {result.elapsed_s:.1f} s: {result.candles} "
              f"candles, {result.predictions} predictions\n"
              f"  run {run_id}: Redis keys {run.redis_prefix}:*, topics {run.topic_prefix}*")
        if embedded:
            print("  (embedded Kafka and Redis stop now; set MUR_KAFKA_BOOTSTRAP and "
                  "MUR_REDIS_URL to keep a replay)")
        else:
            print(f"  browse it: MUR_REDIS_URL={run.redis_url} "
                  f"MUR_REDIS_PREFIX={run.redis_prefix} mur api")

    asyncio.run(_with_services(settings, work))


def _cmd_backtest(args: argparse.Namespace) -> None:
    from makeusrich.backtest import Costs
    from makeusrich.backtest.run import run_backtest

    settings = _settings(args)
    progress = _Progress(args.progress)
    out = args.out or settings.state_dir / "backtests" / (
        time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2))

    async def work(settings: Settings) -> None:
        outcome = await run_backtest(
            settings, _replay_spec(args), args.model, Path(out),
            Costs(fee_bp=args.fee_bp, slippage_bp=args.slippage_bp), long_only=args.long_only,
            progress=progress, keep=args.keep,
        )
        progress.close()
        if progress.mode == "jsonl":
            import msgspec

            progress.emit({"stage": "done", "progress": 1.0, "report_dir": str(out),
                           "files": {name: str(path) for name, path in outcome.files.items()},
                           "metrics": msgspec.to_builtins(outcome.result)})
        else:
            print(_backtest_summary(outcome.result))
            print(f"report: {outcome.files.get('report.html', out)}")

    try:
        asyncio.run(_with_services(settings, work))
    except Exception as exc:
        if progress.mode == "jsonl":
            progress.emit({"stage": "failed", "progress": progress.share, "message": str(exc)})
        raise


def _backtest_summary(result: "BacktestResult") -> str:
    lines = [f"{'model':<40}{'forecasts':>10}{'pinball bp':>11}{'pb skill':>9}{'MAE':>12}"
             f"{'cover80':>9}{'return':>9}{'sharpe':>8}{'maxDD':>8}{'hold':>9}"]
    for label, model in result.models.items():
        for series in model.series:
            own, strategy, hold = series.metrics["model"], series.strategy, series.buy_and_hold
            skill = "n/a" if own.pinball_skill is None else f"{own.pinball_skill:+.4f}"
            sharpe = "n/a" if strategy.sharpe is None else f"{strategy.sharpe:.2f}"
            lines.append(
                f"{label[:28] + ' ' + series.symbol + ' ' + series.interval:<40}"
                f"{series.forecasts:>10}{own.pinball_bp:>11.4f}{skill:>9}{own.mae:>12.6g}"
                f"{own.coverage_80:>9.1%}{strategy.total_return:>9.2%}"
                f"{sharpe:>8}{strategy.max_drawdown:>8.2%}{hold.total_return:>9.2%}"
            )
    costs = result.costs
    lines.append(f"costs: fee {costs.fee_bp} bp + slippage {costs.slippage_bp} bp per unit "
                 "of position change")
    return "\n".join(lines)


# ---- mur keys: API keys ---------------------------------------------------------------


def _keys_settings() -> Settings:
    settings = Settings()
    if not settings.redis_url:
        raise ConfigError(
            "mur keys needs MUR_REDIS_URL: the Redis of the API whose keys to manage, e.g. "
            "redis://localhost:6379/0 (`mur up` prints the one it started); MUR_REDIS_PREFIX "
            "too if the API uses another prefix than 'mur'"
        )
    return settings


def _utc(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"


def _cmd_keys(args: argparse.Namespace) -> None:
    import redis.asyncio as aioredis

    from makeusrich.access import KeyStore, Limiter, Subject, plan_limits

    settings = _keys_settings()

    async def work() -> None:
        client = aioredis.Redis.from_url(str(settings.redis_url), socket_connect_timeout=5)
        keys = KeyStore(client, settings.redis_keys)
        limiter = Limiter(client, settings.redis_keys)
        try:
            if args.action == "create":
                limits = plan_limits(args.plan, args.rpm, args.daily, args.sse)
                key, record = await keys.create(args.name, args.plan, limits, admin=args.admin)
                print(key, flush=True)  # alone on stdout: KEY=$(mur keys create ...)
                print(f"created API key {record.id} ('{record.name}', plan {record.plan}: "
                      f"{record.rpm} rpm, {record.daily}/day, {record.sse} streams"
                      f"{', admin' if record.admin else ''}). It is shown only now: store it; "
                      "Redis keeps only its sha256.", file=sys.stderr)
            elif args.action == "list":
                records = await keys.list()
                if args.json:
                    print(json.dumps([record.to_dict() for record in records], indent=2))
                    return
                print(f"{'ID':<10}{'NAME':<24}{'PLAN':<8}{'RPM':>9}{'DAILY':>11}{'SSE':>5}  "
                      f"{'ADMIN':<6}{'CREATED (UTC)':<21}STATUS")
                for r in records:
                    status = "active" if not r.revoked else f"revoked {_utc(r.revoked_ms)}"
                    print(f"{r.id:<10}{r.name[:23]:<24}{r.plan:<8}{r.rpm:>9}{r.daily:>11}"
                          f"{r.sse:>5}  {'yes' if r.admin else 'no':<6}"
                          f"{_utc(r.created_ms):<21}{status}")
            elif args.action == "revoke":
                record = await keys.revoke(args.id)
                print(f"revoked API key {record.id} ('{record.name}') at "
                      f"{_utc(record.revoked_ms)} UTC: every API replica now answers 401 to "
                      "it (open streams run until they end)")
            else:
                records = [await keys.get(args.id)] if args.id else await keys.list()
                usages = [(r, await limiter.usage(Subject.for_key_id(r.id), r.limits))
                          for r in records]
                if args.json:
                    print(json.dumps([{"id": r.id, "name": r.name, "revoked": r.revoked,
                                       **u.to_dict()} for r, u in usages], indent=2))
                    return
                for r, u in usages:
                    state = " REVOKED" if r.revoked else ""
                    print(f"{r.id} '{r.name}' (plan {r.plan}){state}\n"
                          f"  today (UTC)  {u.today} of {u.daily_limit} requests, "
                          f"{u.daily_remaining} left; resets in {_duration(u.daily_reset_s)}")
                    for c in u.classes:
                        line = (f"  {c.route_class:<12} {c.today} today; "
                                f"{c.remaining} of {c.capacity} left now ({c.capacity}/min)")
                        if c.route_class == "stream":
                            line += f"; {u.streams_open} of {u.streams_limit} streams open"
                        print(line)
                    print(f"  last request {_utc(u.last_ms)}")
        finally:
            await client.aclose()

    asyncio.run(work())


# ---- mur up: the supervisor ------------------------------------------------------------


class _Supervisor:
    """Starts the embedded services and the three processes; stops all of them together."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.services: list[_Service] = []
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stopping = False

    def start(self) -> Settings:
        settings = _start_missing_services(self.settings, self.services)
        if "environment" not in settings.model_fields_set:  # `mur up` is for developers
            settings = settings.model_copy(update={"environment": "dev"})
        if settings.worker_metrics_port is None:  # a free port, so two `mur up` coexist
            settings = settings.model_copy(update={"worker_metrics_port": free_port()})
        self.settings = settings
        env = {**os.environ, **settings.as_env()}
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
            f"  dashboard  {base}/\n"
            f"  docs       {base}/docs\n"
            f"  metrics    {base}/metrics (API), "
            f"http://127.0.0.1:{settings.worker_metrics_port}/metrics (worker)\n"
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


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in _name_list(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text}") from exc


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--symbols", type=_symbol_list)
    parser.add_argument("--intervals", type=parse_intervals)
    parser.add_argument("--source", help="auto | binance | sim | replay:PATH")
    parser.add_argument("--speed", type=_speed, default=argparse.SUPPRESS,
                        help="replay speed: a multiple of real time, or max")
    parser.add_argument("--grace-ms", type=int)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--api-port", type=int)


def _add_span(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source_from", required=True,
                        help="kafka (the live trades topic), archive (Parquet candles) or a "
                        "trades file (Binance CSV/zip, JSONL)")
    parser.add_argument("--symbols", type=_symbol_list, help="default: all in the source")
    parser.add_argument("--intervals", type=parse_intervals)
    parser.add_argument("--start", type=_timestamp, help="ISO-8601 UTC or epoch ms (inclusive)")
    parser.add_argument("--end", type=_timestamp, help="ISO-8601 UTC or epoch ms (exclusive)")
    parser.add_argument("--speed", type=_speed, default=None,
                        help="a multiple of real time, or max (default)")
    parser.add_argument("--grace-ms", type=int)
    parser.add_argument("--model-dir", type=Path, help="model registry (default: bundled)")
    parser.add_argument("--progress", choices=("bar", "jsonl", "none"), default="bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mur", description=__doc__.split("\n\n")[0])
    parser.add_argument("--log-level", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="run the whole service (embedded Kafka + Redis if unset)")
    _add_common(up)
    up.add_argument("--kafka", choices=("tansu", "apache"),
                    help="the broker to start when MUR_KAFKA_BOOTSTRAP is unset: tansu "
                         "(embedded, default) or apache (needs java and `make kafka-libs`)")
    up.add_argument("--kafka-port", type=int, help="Tansu's port (default: a free one)")
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
    train.add_argument("--arch", default="lstm",
                       choices=ARCHITECTURES + BASELINE_ARCHITECTURES)
    train.add_argument("--symbols", type=_symbol_list, help="train on these symbols only")
    train.add_argument("--features", type=_name_list,
                       help="comma-separated model features (default: every supported one "
                       "that all the training candles have), of: " + ",".join(FEATURES))
    train.add_argument("--window", type=int, default=30)
    train.add_argument("--horizons", type=_int_list, default=(1,), metavar="H,H,...",
                       help="candles ahead to forecast, from 1, e.g. 1,5,15,60 (default 1)")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--layers", type=int, help="default: the architecture's own")
    train.set_defaults(func=_cmd_train)
    evaluate = sub.add_parser("evaluate", help="score a model and the naive baselines on data")
    evaluate.add_argument("--model", default="champion", help="VERSION, champion or naive")
    evaluate.add_argument("--data", nargs="+", required=True)
    evaluate.add_argument("--registry", type=Path, help="default: MUR_MODEL_DIR or bundled")
    evaluate.add_argument("--holdout", type=float, metavar="FRACTION",
                          help="score only the last FRACTION of the data's span, e.g. 0.15")
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
    reference = actions.add_parser(
        "reference", help="(re)build a version's training feature reference for drift "
        "detection from the data it was trained on")
    reference.add_argument("version")
    reference.add_argument("--data", nargs="+", required=True,
                           help="the candles it was trained on (its training span is used)")
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
    replay = sub.add_parser("replay", help="replay a recorded span into its own namespace")
    _add_span(replay)
    replay.add_argument("--model", help="VERSION or champion (default: what workers serve)")
    replay.add_argument("--run-id", help="names the namespace (default: time + random)")
    replay.set_defaults(func=_cmd_replay)
    backtest = sub.add_parser("backtest", help="replay a span per model, score it, report")
    _add_span(backtest)
    backtest.add_argument("--model", action="append", required=True,
                          help="VERSION, champion or a version directory; repeat to compare")
    backtest.add_argument("--fee-bp", type=float, default=10.0,
                          help="fee per unit of position change, basis points")
    backtest.add_argument("--slippage-bp", type=float, default=2.0)
    backtest.add_argument("--long-only", action="store_true",
                          help="the strategy stays flat instead of going short")
    backtest.add_argument("--out", type=Path, help="report directory "
                          "(default: STATE_DIR/backtests/<time>-<random>)")
    backtest.add_argument("--keep", action="store_true",
                          help="keep the replays' Redis keys and topics")
    backtest.set_defaults(func=_cmd_backtest)
    trainer = sub.add_parser("trainer", help="retrain on a schedule and promote by the rule")
    trainer.add_argument("--every", default="6h", help="e.g. 6h, 30m, 90s")
    trainer.add_argument("--data", nargs="+", help="default: the candle archive")
    trainer.add_argument("--registry", type=Path, help="default: MUR_MODEL_DIR or bundled")
    trainer.add_argument("--arch", default="lstm", choices=ARCHITECTURES)
    trainer.add_argument("--epochs", type=int, default=10)
    trainer.add_argument("--horizons", type=_int_list, default=(1,), metavar="H,H,...",
                         help="candles ahead to forecast, as mur train's (default 1)")
    trainer.add_argument("--runs", type=int, help="stop after this many runs")
    trainer.add_argument("--retrain-on-drift", action="store_true", default=None,
                         help="start a run at once when a worker raises a drift event "
                         "(MUR_DRIFT_RETRAIN; needs MUR_REDIS_URL)")
    trainer.set_defaults(func=_cmd_trainer)
    keys = sub.add_parser(
        "keys", help="API keys: create, list, revoke, usage (needs MUR_REDIS_URL)",
        description="API keys of the HTTP API, kept in the Redis of MUR_REDIS_URL under "
        "MUR_REDIS_PREFIX. Plans: free (60 rpm, 10000/day, 2 streams), pro (1200 rpm, "
        "1000000/day, 20 streams), custom (--rpm, --daily and --sse).")
    key_actions = keys.add_subparsers(dest="action", required=True)
    create = key_actions.add_parser("create", help="a new key, printed once on stdout")
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--plan", required=True, choices=("free", "pro", "custom"))
    create.add_argument("--rpm", type=int, help="custom: requests a minute (REST); SSE "
                        "stream opens get a tenth, backtests a sixtieth")
    create.add_argument("--daily", type=int, help="custom: requests a UTC day")
    create.add_argument("--sse", type=int, help="custom: concurrent SSE streams")
    create.add_argument("--admin", action="store_true", help="may use /admin (when "
                        "MUR_ADMIN_API is on)")
    key_list = key_actions.add_parser("list", help="every key (never the keys themselves)")
    key_list.add_argument("--json", action="store_true")
    key_actions.add_parser("revoke", help="refuse a key from now on").add_argument("id")
    key_usage = key_actions.add_parser("usage", help="today's requests and what is left")
    key_usage.add_argument("id", nargs="?", help="one key (default: all)")
    key_usage.add_argument("--json", action="store_true")
    keys.set_defaults(func=_cmd_keys)
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
