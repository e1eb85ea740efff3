"""make-us-rich: a real-time crypto price forecaster.

Binance trades -> Kafka -> Faust candles -> ONNX forecast -> Redis -> FastAPI (REST + SSE).
"""

__version__ = "0.1.0"
