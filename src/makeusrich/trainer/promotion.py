"""The promotion rule: a challenger becomes champion only if its forecasts score a lower
mean pinball loss (a proper score of the served quantiles) than the current champion's on
the same recent hold-out span, and, when it is a network, only if it also passes the
serving rule there (:func:`makeusrich.trainer.evaluate.judge`: at least 1% better than the
best baseline at horizon 1 and better at every other horizon it serves); otherwise it stays
in the registry, unserved. A baseline packaged as a version (``garch``) needs only to beat
the champion: it is what serves when no network earns its place."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from makeusrich.core.errors import TrainingError
from makeusrich.inference import BASELINE_KINDS, OnnxForecaster, Registry, read_manifest
from makeusrich.trainer.data import load_series
from makeusrich.trainer.evaluate import MODEL, evaluate, holdout_start

__all__ = ["Decision", "decide_promotion"]

HOLDOUT_FRACTION = 0.15  # the most recent share of the candles, as in training's validation


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_pinball_bp: float | None = None
    champion_pinball_bp: float | None = None


def decide_promotion(
    registry: Registry, challenger: str, data: Sequence[Path | str],
    symbol: str | None = None,
) -> Decision:
    """Judge ``challenger`` by the serving rule and against the champion on the last 15%
    of ``data`` (by open time).

    With ``symbol``: with that symbol's champion (its own, else the shared one), on that
    symbol's series only."""
    champion = registry.champion(symbol)
    if champion == challenger:
        return Decision(False, f"{challenger} is already the champion")
    series = [s for s in load_series(data) if symbol is None or s.symbol == symbol]
    if not series:
        raise TrainingError(f"no {symbol} candles in the hold-out data")
    start = holdout_start(series, HOLDOUT_FRACTION)
    # Never score the challenger on candles it was fitted on.
    manifest = read_manifest(registry.root / challenger)
    start = max(start, manifest.training_data.validation_first_target_open_time)
    span = f"hold-out from open_time {start} ({len(series)} series)"
    report = evaluate(OnnxForecaster(registry.root / challenger), series,
                      start_open_time=start)
    ours = report.overall.metrics[MODEL].pinball_bp
    verdict = report.verdict
    if not verdict.passes and manifest.architecture.kind not in BASELINE_KINDS:
        return Decision(False, f"{challenger} fails the serving rule on {span}: "
                        f"{verdict.reason}", ours)
    if champion is None:
        return Decision(True, f"no champion yet; {verdict.reason}", ours)
    theirs = evaluate(OnnxForecaster(registry.root / champion), series,
                      start_open_time=start).overall.metrics[MODEL].pinball_bp
    if ours < theirs:
        return Decision(True, f"pinball {ours:.4f} bp < champion {champion}'s {theirs:.4f} bp "
                        f"on {span}", ours, theirs)
    return Decision(False, f"pinball {ours:.4f} bp >= champion {champion}'s {theirs:.4f} bp "
                    f"on {span}", ours, theirs)
