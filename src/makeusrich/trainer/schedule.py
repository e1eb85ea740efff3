"""Scheduled retraining: a new model on the latest candles every so often, served only if it
wins.

:func:`run_schedule` (``mur train --every 6h``) repeats one run: train a version into the
registry on the candle files as they are now (paths, directories and globs are resolved
anew each run, so files that appeared since the last one are used), apply the promotion
rule (:func:`makeusrich.trainer.promotion.decide_promotion`) on the same data, and promote
the version only if it wins, announcing it to the workers when a broker is configured; a
losing version stays in the registry, unserved. Each run ends with a printed
:class:`RunSummary`. A failed run is logged and summarised, and the schedule goes on.

With ``Settings.drift_retrain`` (and Redis configured), a drift event raised by a worker
(type ``drift`` on the events stream, see :mod:`makeusrich.monitoring`) starts the next run
at once instead of at its scheduled time.

Each finished run is also recorded in a :class:`makeusrich.core.metrics.TrainerMetrics`
when one is given (``mur trainer`` serves it on ``Settings.trainer_metrics_port``).
"""

import json
import logging
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis

from makeusrich.core.errors import ConfigError, MakeUsRichError
from makeusrich.core.metrics import TrainerMetrics
from makeusrich.core.schemas import now_ms
from makeusrich.core.settings import Settings
from makeusrich.inference import Registry, read_manifest
from makeusrich.trainer.promotion import decide_promotion
from makeusrich.trainer.train import ARCHITECTURES, train

__all__ = ["RunSummary", "parse_duration", "run_schedule"]

log = logging.getLogger(__name__)

_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3_600.0, "d": 86_400.0}
_PART = r"(\d+(?:\.\d+)?)([smhd])"


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``6h``, ``30m``, ``90s``, ``1d`` or ``1h30m``;
    :class:`ConfigError` unless it is one and longer than zero."""
    compact = text.strip().lower()
    if not re.fullmatch(f"(?:{_PART})+", compact):
        raise ConfigError(
            f"{text!r} is not a duration: use numbers with a unit s, m, h or d, "
            "like 6h, 30m, 90s or 1h30m"
        )
    seconds = sum(float(number) * _UNIT_S[unit] for number, unit in re.findall(_PART, compact))
    if seconds <= 0:
        raise ConfigError(f"the duration {text!r} must be longer than zero")
    return seconds


@dataclass
class RunSummary:
    """One scheduled run; ``started_at`` and the open times in UTC epoch ms.

    ``version`` and the data fields are None when training failed. ``pinball_bp`` and
    ``champion_pinball_bp`` are the promotion rule's hold-out pinball losses of the new
    version and of ``champion`` (the champion it was compared with), None when there was none;
    ``validation_mae`` is the manifest's. ``decision``: the rule's reason. ``error``: why
    the run failed (None when it did not).
    """

    run: int
    arch: str
    started_at: int
    trigger: str = "schedule"  # or the drift event that started the run early
    duration_s: float = 0.0
    version: str | None = None
    symbols: tuple[str, ...] = ()
    interval: str | None = None
    first_open_time: int | None = None
    last_open_time: int | None = None
    candles: int | None = None
    validation_mae: float | None = None
    champion: str | None = None
    pinball_bp: float | None = None
    champion_pinball_bp: float | None = None
    promoted: bool = False
    announced: bool = False
    decision: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def render(self) -> str:
        lines = [
            f"run {self.run} ({self.arch}) {'ok' if self.ok else 'FAILED'} "
            f"in {self.duration_s:.1f} s, started by {self.trigger}"
        ]
        if self.version is not None:
            lines += [
                f"  version   {self.version}",
                f"  data      {','.join(self.symbols)} {self.interval}, "
                f"{_utc(self.first_open_time)} .. {_utc(self.last_open_time)} UTC, "
                f"{self.candles} candles",
                f"  pinball   {_number(self.pinball_bp)} bp on the hold-out vs "
                f"{_number(self.champion_pinball_bp)} of champion {self.champion or '(none)'}",
                f"  MAE       {_number(self.validation_mae)} on its validation span",
            ]
        if self.decision is not None:
            outcome = "kept unserved"
            if self.promoted:
                outcome = "promoted and announced" if self.announced else "promoted"
            lines.append(f"  decision  {outcome}: {self.decision}")
        if self.error is not None:
            lines.append(f"  error     {self.error}")
        return "\n".join(lines)


def _utc(ms: int | None) -> str:
    return "?" if ms is None else f"{datetime.fromtimestamp(ms / 1000, UTC):%Y-%m-%d %H:%M}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def _run_once(
    summary: RunSummary,
    settings: Settings,
    data: Sequence[Path | str],
    registry: Registry,
    epochs: int,
    train_options: dict[str, Any],
) -> None:
    """Fill ``summary`` in as the run goes, so a failure keeps what was done before it."""
    version_dir = train(data, registry.root, arch=summary.arch, epochs=epochs, **train_options)
    manifest = read_manifest(version_dir)
    span = manifest.training_data
    summary.version = manifest.version
    summary.symbols, summary.interval = span.symbols, span.interval
    summary.first_open_time, summary.last_open_time = span.first_open_time, span.last_open_time
    summary.candles = span.candles
    summary.validation_mae = manifest.metrics.get("mae")
    summary.champion = registry.champion()
    decision = decide_promotion(registry, manifest.version, data)
    summary.pinball_bp = decision.challenger_pinball_bp
    summary.champion_pinball_bp = decision.champion_pinball_bp
    summary.decision = decision.reason
    if not decision.promote:
        return
    registry.promote(manifest.version, decision.reason)
    summary.promoted = True
    if settings.kafka_bootstrap:
        # Imported here: the broker clients are needed only when there is a broker.
        from makeusrich.stream.control import announce_model

        announce_model(settings, manifest.version, manifest.sha256)
        summary.announced = True


def run_schedule(
    settings: Settings,
    data: Sequence[Path | str],
    registry_dir: Path,
    *,
    every_s: float,
    arch: str = ARCHITECTURES[0],
    epochs: int = 10,
    stop: threading.Event | None = None,
    runs: int | None = None,
    metrics: TrainerMetrics | None = None,
    **train_options: Any,
) -> list[RunSummary]:
    """Train and apply the promotion rule every ``every_s`` seconds; return the summaries.

    ``data``: candle files, directories or globs (see :func:`load_series`), resolved anew
    each run. New versions go into the registry at ``registry_dir``; one that wins is
    promoted and, when ``settings.kafka_bootstrap`` is set, announced to the workers.
    Runs start ``every_s`` apart (at once after a run that took longer) until ``runs``
    runs are done or ``stop`` is set; a run under way is finished first; each finished run
    is recorded in ``metrics`` when given. ``train_options``
    go to :func:`makeusrich.trainer.train` (``symbols``, ``window``, ``stride``, ...).
    :class:`ConfigError` for an invalid schedule; a failed run is logged and summarised.
    """
    if every_s < 0 or (runs is not None and runs < 1):
        raise ConfigError("need every_s >= 0 and runs >= 1 (or None: until stopped)")
    if arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of {list(ARCHITECTURES)}")
    if not data:
        raise ConfigError("no candle data to train on: pass files, directories or globs")
    stop = threading.Event() if stop is None else stop
    registry = Registry(registry_dir)
    summaries: list[RunSummary] = []
    drift = _DriftWatch(settings) if settings.drift_retrain and settings.redis_url else None
    trigger = "schedule"
    while not stop.is_set():
        started = time.monotonic()
        summary = RunSummary(run=len(summaries) + 1, arch=arch, started_at=now_ms(),
                             trigger=trigger)
        log.info("run %d: training %s on %s", summary.run, arch, [str(d) for d in data])
        try:
            _run_once(summary, settings, data, registry, epochs, train_options)
        except Exception as exc:
            # A schedule outlives a bad run: the next one may have more data, or a broker.
            if isinstance(exc, MakeUsRichError):
                log.error("run %d failed: %s", summary.run, exc)
            else:
                log.exception("run %d failed", summary.run)
            summary.error = f"{type(exc).__name__}: {exc}"
        summary.duration_s = round(time.monotonic() - started, 1)
        summaries.append(summary)
        if metrics is not None:
            metrics.run_finished(summary)
        print(summary.render(), flush=True)
        if runs is not None and len(summaries) >= runs:
            break
        wait = max(0.0, every_s - (time.monotonic() - started))
        log.info("run %d: next run in %.0f s", summary.run, wait)
        if drift is None:
            if stop.wait(wait):
                break
            continue
        reason = drift.wait(wait, stop)
        trigger = "schedule" if reason is None else f"drift ({reason})"
        if reason is not None:
            log.warning("drift: %s; retraining now", reason)
    if drift is not None:
        drift.close()
    return summaries


_Entry = tuple[bytes, dict[bytes, bytes]]  # a stream entry as redis-py returns it


class _DriftWatch:
    """Drift events raised on the events stream since the watch began."""

    def __init__(self, settings: Settings) -> None:
        self._client = redis.Redis.from_url(settings.redis_url or "")
        self._key = settings.redis_keys.events
        newest = cast(list[_Entry], self._client.xrevrange(self._key, count=1))
        self._last_id: bytes | str = newest[0][0] if newest else "0-0"

    def wait(self, timeout_s: float, stop: threading.Event) -> str | None:
        """Block up to ``timeout_s`` (or until ``stop``) for a drift event; its reason."""
        deadline = time.monotonic() + timeout_s
        while not stop.is_set():
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                return None
            # Short blocks, so that `stop` is noticed within a second.
            reply = cast(list[tuple[bytes, list[_Entry]]], self._client.xread(
                {self._key: self._last_id}, count=100,
                block=max(1, int(min(remaining_s, 1.0) * 1000)),
            ))
            for _, entries in reply or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id
                    if fields.get(b"type") != b"drift":
                        continue
                    event = json.loads(fields[b"d"])
                    if event.get("status") == "drift":
                        return f"{event.get('symbol')} {event.get('interval')}: " \
                               f"{event.get('reason')}"
        return None

    def close(self) -> None:
        self._client.close()
