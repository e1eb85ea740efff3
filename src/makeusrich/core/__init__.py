"""Settings, record schemas, errors and the embedded services shared by every stage."""

from makeusrich.core.errors import ConfigError, MakeUsRichError
from makeusrich.core.intervals import interval_ms, parse_intervals
from makeusrich.core.schemas import Candle, EndOfStream, Prediction, Source, Trade
from makeusrich.core.settings import Settings

__all__ = [
    "Candle",
    "ConfigError",
    "EndOfStream",
    "MakeUsRichError",
    "Prediction",
    "Settings",
    "Source",
    "Trade",
    "interval_ms",
    "parse_intervals",
]
