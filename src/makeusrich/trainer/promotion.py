"""The promotion rule: a challenger becomes champion only if it beats the current champion
on the same recent hold-out span; otherwise it stays in the registry, unserved."""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from makeusrich.inference import OnnxForecaster, Registry
from makeusrich.trainer.data import load_series
from makeusrich.trainer.evaluate import MODEL, evaluate

__all__ = ["Decision", "decide_promotion"]

HOLDOUT_FRACTION = 0.15  # the most recent share of the candles, as in training's validation


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    challenger_mae: float | None = None
    champion_mae: float | None = None


def decide_promotion(
    registry: Registry, challenger: str, data: Sequence[Path | str]
) -> Decision:
    """Compare ``challenger`` with the champion on the last 15% of ``data`` (by open time)."""
    champion = registry.champion()
    if champion is None:
        return Decision(True, "no champion yet")
    if champion == challenger:
        return Decision(False, f"{challenger} is already the champion")
    series = load_series(data)
    last_open = max(int(s.open_time[-1]) for s in series)
    first_open = min(int(s.open_time[0]) for s in series)
    start = int(np.floor(last_open - (last_open - first_open) * HOLDOUT_FRACTION))
    scores = {
        version: evaluate(OnnxForecaster(registry.root / version), series,
                          start_open_time=start).overall.metrics[MODEL].mae
        for version in (challenger, champion)
    }
    ours, theirs = scores[challenger], scores[champion]
    span = f"hold-out from open_time {start} ({len(series)} series)"
    if ours < theirs:
        return Decision(True, f"MAE {ours:.4f} < champion {champion}'s {theirs:.4f} on {span}",
                        ours, theirs)
    return Decision(False, f"MAE {ours:.4f} >= champion {champion}'s {theirs:.4f} on {span}",
                    ours, theirs)
