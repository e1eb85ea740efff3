"""Forecast quality by the serving rule: ``python -m bench.forecasts`` (``make forecasts``).

Trains the candidates for the bundled default on the 2025 BTCUSDT 1m klines in
``../shared/data`` (``--quick``: the one test day), every one forecasting horizons 1, 5, 15
and 60 with one shared split: an LSTM and a TFT (the networks) and GARCH(1,1) packaged as a
version (the baseline that serves when no network passes). Each is scored, with every
baseline beside it, on the last 15% of the windows, which training held out (its
manifest's evaluation, adaptive conformal as the worker serves); the serving rule
(:func:`makeusrich.trainer.evaluate.judge`) picks the champion: the network with the lowest
horizon-1 pinball among those that pass, else the packaged GARCH.

Writes ``bench/results/forecasts.json`` and rewrites the README's table between its
``forecasts`` markers (``--table-only``: just the table, from that file). ``--install``
also replaces the bundled models (``src/makeusrich/models``) with the candidates and
promotes the champion there.
A benchmark, not a test: it asserts nothing about the figures.
"""

import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from bench._common import SHARED_SPOT, TEST_DATA, parse_stage, run_stage, stage_parser
from makeusrich.inference import Registry, bundled_models_dir, read_manifest
from makeusrich.trainer import train
from makeusrich.trainer.evaluate import MODEL

HORIZONS = (1, 5, 15, 60)
#: (architecture, train() options): a network's defaults, the TFT on every 4th window
#: (13x the LSTM's time per epoch in bench.models; on every window it also overfits: h1
#: pinball 1.7510 against 1.7436), GARCH on the default 30-candle window.
CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("lstm", {}),
    ("tft", {"stride": 4}),
    ("garch", {}),
)
_BASELINES = {"persistence": "persistence", "ewma_vol": "EWMA vol",
              "garch": "GARCH(1,1), refit daily"}
_README = Path(__file__).resolve().parent.parent / "README.md"
_BEGIN, _END = "<!-- forecasts:begin -->", "<!-- forecasts:end -->"


def _data(quick: bool) -> list[Path]:
    files = [] if quick else sorted((SHARED_SPOT / "klines" / "1m").glob("BTCUSDT-1m-2025-*.csv"))
    return files or [TEST_DATA / "BTCUSDT-1m-2025-11-20.csv"]


def _by_horizon(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {"1": evaluation["overall"], **evaluation["ahead"]}


def measure(scratch: Path, quick: bool) -> dict[str, Any]:
    data = _data(quick)
    candidates: dict[str, dict[str, Any]] = {}
    for arch, options in CANDIDATES:
        print(f"training {arch} on {len(data)} file(s)", flush=True)
        version_dir = train(data, scratch / "models", arch=arch, horizons=HORIZONS,
                            progress=False, **({"epochs": 1} if quick else {}), **options)
        manifest = read_manifest(version_dir)
        assert manifest.evaluation is not None  # the trainer always evaluates
        candidates[manifest.version] = {
            "arch": arch,
            "path": str(version_dir),
            "options": options,
            "seconds": manifest.training.get("wall_time_s"),
            "evaluation": manifest.evaluation,
        }
    networks = [v for v, c in candidates.items() if c["arch"] != "garch"
                and c["evaluation"]["verdict"]["passes"]]
    champion = (min(networks, key=lambda v: _pinball(candidates[v], "1")) if networks
                else next(v for v, c in candidates.items() if c["arch"] == "garch"))
    return {"data": [p.name for p in data], "horizons": list(HORIZONS),
            "champion": champion, "candidates": candidates}


def _pinball(candidate: dict[str, Any], horizon: str, name: str = MODEL) -> float:
    value: float = _by_horizon(candidate["evaluation"])[horizon]["metrics"][name]["pinball_bp"]
    return value


def table(result: dict[str, Any]) -> str:
    """The README's table: per horizon, the champion against every baseline and network."""
    candidates, champion = result["candidates"], result["champion"]
    served = candidates[champion]
    networks = {v: c for v, c in candidates.items() if c["arch"] != "garch"}
    header = (["horizon", f"served: {served['arch']}"] + list(_BASELINES.values())
              + [c["arch"].upper() for c in networks.values()]
              + ["served coverage (weeks' min..max)", "served width (bp)"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for horizon in map(str, result["horizons"]):
        scores = _by_horizon(served["evaluation"])[horizon]
        model = scores["metrics"][MODEL]
        cells = [f"{horizon} min", f"**{model['pinball_bp']:.4f}**"]
        cells += [f"{scores['metrics'][name]['pinball_bp']:.4f}" for name in _BASELINES]
        cells += [f"{_pinball(c, horizon):.4f}" for c in networks.values()]
        weekly = [week["coverage_80"][MODEL] for week in scores["weeks"]] or [math.nan]
        cells += [f"{model['coverage_80']:.1%} ({min(weekly):.1%}..{max(weekly):.1%})",
                  f"{model['interval_width_bp']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    first = _by_horizon(served["evaluation"])["1"]
    return "\n".join([
        f"Pinball loss of the 10/50/90% quantiles in bp, on {first['forecasts']:,} forecasts "
        f"per horizon (targets from {_day(first['first_target_open_time'])} to "
        f"{_day(first['last_target_open_time'])} UTC), as served (split + adaptive "
        f"conformal). Champion: `{champion}`; {_why(result)}.",
        "",
        *lines,
    ])


def _day(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def _rewrite_readme(text: str) -> None:
    readme = _README.read_text()
    pattern = re.compile(re.escape(_BEGIN) + ".*?" + re.escape(_END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {_BEGIN} ... {_END} section to rewrite")
    _README.write_text(pattern.sub(lambda _: f"{_BEGIN}\n{text}\n{_END}", readme))


def _install(result: dict[str, Any]) -> None:
    """Replace the bundled versions with the candidates; promote the champion."""
    bundled = bundled_models_dir()
    for child in bundled.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        elif child.name.endswith(".json"):
            child.unlink()
    registry = Registry(bundled)
    for candidate in result["candidates"].values():
        registry.add(Path(candidate["path"]))
    registry.promote(result["champion"], "bench.forecasts: " + _why(result))
    (bundled / ".registry.lock").unlink(missing_ok=True)  # the promotion's, not a file to ship


def _why(result: dict[str, Any]) -> str:
    """Why the champion serves: its verdict, or the networks' when none passed."""
    champion = result["candidates"][result["champion"]]
    if champion["arch"] != "garch":
        return f"{champion['arch'].upper()} {champion['evaluation']['verdict']['reason']}"
    return "no network passed the serving rule: " + "; ".join(
        f"{c['arch'].upper()}: {c['evaluation']['verdict']['reason']}"
        for c in result["candidates"].values() if c["arch"] != "garch")


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("forecasts", __doc__, "one test day, one epoch")
    parser.add_argument("--install", action="store_true",
                        help="replace the bundled models with the candidates")
    parser.add_argument("--table-only", action="store_true",
                        help="only rewrite the README's table from the results file")
    args = parse_stage(parser, argv, "forecasts")
    if args.table_only:
        _rewrite_readme(table(json.loads(args.out.read_text())))
        return 0

    def run(scratch: Path) -> dict[str, Any]:
        result = measure(scratch, args.quick)
        if args.install:
            _install(result)
        for candidate in result["candidates"].values():
            del candidate["path"]  # a scratch directory, gone after the run
        return result

    def summary(result: dict[str, Any], out: Path) -> None:
        text = table(result)
        print(text)
        if not args.quick:
            _rewrite_readme(text)
        print(f"results: {out}")

    return run_stage(run, args.out, summary, quick=args.quick)


if __name__ == "__main__":
    sys.exit(main())
