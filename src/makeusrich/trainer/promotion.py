"""The promotion rule: a challenger becomes champion only if its forecasts score a lower
mean pinball loss (:func:`makeusrich.trainer.evaluate.pinball`, a proper score of the served
quantiles) than the current champion's on the same recent hold-out span; otherwise it stays
in the registry, unserved."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from makeusrich.core.errors import TrainingError
from makeusrich.inference import OnnxForecaster, Registry, read_manifest
from makeusrich.trainer.data import load_series
from makeusrich.trainer.evaluate import MODEL, evaluate

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
    """Compare ``challenger`` with the champion on the last 15% of ``data`` (by open time).

    With ``symbol``: with that symbol's champion (its own, else the shared one), on that
    symbol's series only."""
    champion = registry.champion(symbol)
    if champion is None:
        return Decision(True, "no champion yet")
    if champion == challenger:
        return Decision(False, f"{challenger} is already the champion")
    series = [s for s in load_series(data) if symbol is None or s.symbol == symbol]
    if not series:
        raise TrainingError(f"no {symbol} candles in the hold-out data")
    last_open = max(int(s.open_time[-1]) for s in series)
    first_open = min(int(s.open_time[0]) for s in series)
    start = int(np.floor(last_open - (last_open - first_open) * HOLDOUT_FRACTION))
    # Never score the challenger on candles it was fitted on.
    trained = read_manifest(registry.root / challenger).training_data
    start = max(start, trained.validation_first_target_open_time)
    scores = {
        version: evaluate(OnnxForecaster(registry.root / version), series,
                          start_open_time=start).overall.metrics[MODEL].pinball_bp
        for version in (challenger, champion)
    }
    ours, theirs = scores[challenger], scores[champion]
    span = f"hold-out from open_time {start} ({len(series)} series)"
    if ours < theirs:
        return Decision(True, f"pinball {ours:.4f} bp < champion {champion}'s {theirs:.4f} bp "
                        f"on {span}", ours, theirs)
    return Decision(False, f"pinball {ours:.4f} bp >= champion {champion}'s {theirs:.4f} bp "
                    f"on {span}", ours, theirs)
