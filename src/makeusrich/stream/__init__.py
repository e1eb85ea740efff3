"""Trades in, candles out: ingest (live websocket, replay, sim), the pure candle builder and
pipeline, and the Faust worker that adapts them to Kafka.

Submodules import heavy clients (kafka-python, websockets, Faust) only where used, so
``from makeusrich.stream.candles import CandleBuilder`` stays cheap for tests and tools.
"""

from makeusrich.stream.candles import CandleBuilder, UpdateResult
from makeusrich.stream.pipeline import Outputs, TradePipeline

__all__ = ["CandleBuilder", "Outputs", "TradePipeline", "UpdateResult"]
