"""A real local fake Binance: the combined trade websocket and the REST endpoints we use.

The websocket streams every symbol's trades merged in time order, as fast as the client
reads, then idles. Its position is shared by all connections, like exchange time: a new
connection continues where the last one stopped. A ``Script`` makes it misbehave the ways
the real one does: dropped connections, ids never sent on the socket, trades that happen
while the client is away, trades re-sent after a reconnect, and garbage frames. Every trade
stays available over REST (``historicalTrades``), as on Binance. Serve one client per
fake: concurrent connections would split the stream between them. Given 1m klines, it also
serves ``klines`` (1m only: it does not aggregate other intervals).

    async with FakeBinance({"BTCUSDT": trades}, Script(drops=[Drop(100)])) as fake:
        settings = Settings(binance_ws_url=fake.ws_url, binance_rest_url=fake.rest_url, ...)
"""

import bisect
import collections
import csv
import json
import random
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from makeusrich.core.schemas import Trade

__all__ = [
    "BTCUSDT_KLINES_CSV",
    "BTCUSDT_TRADES_CSV",
    "Drop",
    "FakeBinance",
    "FakeTrade",
    "Script",
    "generate_trades",
    "load_klines_csv",
    "load_trades_csv",
]

# Real Binance BTCUSDT trades (ids 109344068.., contiguous), copied into tests/data.
BTCUSDT_TRADES_CSV = Path(__file__).parents[1] / "data" / "BTCUSDT-trades-2019-04-01-0000-0029.csv"
# Real Binance BTCUSDT 1m klines of 2025-11-20 (1,440 rows, times in µs).
BTCUSDT_KLINES_CSV = Path(__file__).parents[1] / "data" / "BTCUSDT-1m-2025-11-20.csv"

_INVALID_SYMBOL = {"code": -1121, "msg": "Invalid symbol."}
_BAD_LIMIT = {"code": -1130, "msg": "Data sent for parameter 'limit' is not valid."}
_UNAVAILABLE = {"code": -1001, "msg": "Internal error; unable to process your request."}
_BAD_INTERVAL = {"code": -1120, "msg": "Invalid interval."}
_NO_SYMBOL = {
    "code": -1102,
    "msg": "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
}


@dataclass(frozen=True, slots=True)
class FakeTrade:
    """One trade, with Binance's decimal strings kept as strings."""

    symbol: str
    id: int
    price: str
    qty: str
    quote_qty: str
    time_ms: int
    is_buyer_maker: bool
    is_best_match: bool = True

    def ws_message(self) -> str:
        """The exact combined-stream message Binance sends for this trade."""
        data = {
            "e": "trade", "E": self.time_ms + 1, "s": self.symbol, "t": self.id,
            "p": self.price, "q": self.qty, "T": self.time_ms, "m": self.is_buyer_maker,
            "M": self.is_best_match,
        }
        return json.dumps(
            {"stream": f"{self.symbol.lower()}@trade", "data": data}, separators=(",", ":")
        )

    def as_trade(self) -> Trade:
        """The trade the ingestor publishes for it (``ts_ingest``, a wall-clock stamp, is
        ``time_ms`` here)."""
        price, qty = float(self.price), float(self.qty)
        return Trade(symbol=self.symbol, trade_id=self.id, price=price, qty=qty,
                     quote_qty=price * qty, is_buyer_maker=self.is_buyer_maker,
                     ts_event=self.time_ms, ts_ingest=self.time_ms, source="live")

    def rest_row(self) -> dict[str, Any]:
        """The trade as a ``historicalTrades`` row."""
        return {
            "id": self.id, "price": self.price, "qty": self.qty, "quoteQty": self.quote_qty,
            "time": self.time_ms, "isBuyerMaker": self.is_buyer_maker,
            "isBestMatch": self.is_best_match,
        }


def generate_trades(
    symbol: str, count: int, *, first_id: int = 1, start_ms: int = 1_554_076_800_000,
    step_ms: int = 50, price: float = 100.0, seed: int = 0,
) -> list[FakeTrade]:
    """``count`` trades with consecutive ids from a seeded random walk."""
    rng = random.Random(seed)
    trades = []
    for offset in range(count):
        price = max(0.01, price * (1 + rng.gauss(0, 0.0005)))
        qty = rng.uniform(0.001, 2.0)
        trades.append(FakeTrade(
            symbol=symbol, id=first_id + offset, price=f"{price:.8f}", qty=f"{qty:.8f}",
            quote_qty=f"{price * qty:.8f}", time_ms=start_ms + offset * step_ms,
            is_buyer_maker=rng.random() < 0.5,
        ))
    return trades


def load_trades_csv(path: Path, symbol: str, limit: int) -> list[FakeTrade]:
    """The first ``limit`` trades of a Binance trades CSV (id,price,qty,quote_qty,time_ms,
    is_buyer_maker,is_best_match; no header)."""
    trades = []
    with path.open(newline="") as src:
        for row, _ in zip(csv.reader(src), range(limit), strict=False):
            trades.append(FakeTrade(
                symbol=symbol, id=int(row[0]), price=row[1], qty=row[2], quote_qty=row[3],
                time_ms=int(row[4]), is_buyer_maker=row[5] == "True",
                is_best_match=row[6] == "True",
            ))
    return trades


def load_klines_csv(path: Path) -> list[list[Any]]:
    """A data.binance.vision kline CSV (no header) as REST ``klines`` rows: times in ms (the
    files of 2025 on have µs), decimals kept as strings, ``trades`` an int."""
    rows = []
    with path.open(newline="") as src:
        for row in csv.reader(src):
            open_time, close_time = int(row[0]), int(row[6])
            if open_time > 10**14:  # µs
                open_time, close_time = open_time // 1000, close_time // 1000
            rows.append([open_time, *row[1:6], close_time, row[7], int(row[8]), *row[9:12]])
    return rows


@dataclass(frozen=True, slots=True)
class Drop:
    """Drop the connection once ``after`` trade messages were sent in total (all
    connections): a close frame (like Binance's 24 h close), or a TCP abort if ``abrupt``."""

    after: int
    abrupt: bool = False


@dataclass(frozen=True)
class Script:
    """How the fake websocket misbehaves. Counts are trade messages sent, all connections."""

    drops: Sequence[Drop] = ()
    skip_ids: Mapping[str, Collection[int]] = field(default_factory=dict)
    missed_on_reconnect: int = 0  # trades (all symbols) that happen while the client is away
    replayed_on_reconnect: int = 0  # last trades sent, sent again when a client reconnects
    inject: Mapping[int, Sequence[str]] = field(default_factory=dict)  # raw frames after N
    rejected_handshakes: int = 0  # first websocket handshakes answered 503 (maintenance)
    failed_history_requests: int = 0  # first historicalTrades requests answered 503
    failed_kline_requests: int = 0  # first klines requests answered 503


class _Dropped(Exception):
    """The script dropped the connection."""


class FakeBinance:
    """Async context manager running the fake; ``ws_url`` / ``rest_url`` are valid inside.

    ``withheld`` holds the ids of each symbol never sent on the socket (skipped or missed),
    ``sent`` every trade message sent, ``connections`` how many websocket clients came, and
    ``rest_requests`` each REST request path with its query. ``klines`` maps a symbol to its
    1m ``klines`` rows (see :func:`load_klines_csv`).
    """

    def __init__(
        self, trades: Mapping[str, Sequence[FakeTrade]], script: Script | None = None, *,
        klines: Mapping[str, Sequence[list[Any]]] | None = None,
    ) -> None:
        self.script = script or Script()
        self.ws_url = ""
        self.rest_url = ""
        self.connections = 0
        self.sent: list[FakeTrade] = []
        self.withheld: dict[str, set[int]] = {symbol: set() for symbol in trades}
        self.rest_requests: list[str] = []
        self._trades = {symbol: sorted(rows, key=lambda t: t.id) for symbol, rows in trades.items()}
        self._ids = {symbol: [t.id for t in rows] for symbol, rows in self._trades.items()}
        self._klines = {symbol: sorted(rows) for symbol, rows in (klines or {}).items()}
        self._kline_opens = {symbol: [r[0] for r in rows] for symbol, rows in self._klines.items()}
        self._merged = sorted(
            (t for rows in self._trades.values() for t in rows),
            key=lambda t: (t.time_ms, t.symbol, t.id),
        )
        self._cursor = 0
        self._handshakes_to_reject = self.script.rejected_handshakes
        self._history_to_fail = self.script.failed_history_requests
        self._klines_to_fail = self.script.failed_kline_requests
        self._rest_lock = threading.Lock()
        self._drops = collections.deque(sorted(self.script.drops, key=lambda d: d.after))
        self._ws_server: Server | None = None
        self._http: ThreadingHTTPServer | None = None
        self._http_thread: threading.Thread | None = None

    async def __aenter__(self) -> "FakeBinance":
        self._ws_server = await serve(
            self._serve_ws, "127.0.0.1", 0, process_request=self._check_path
        )
        ws_port = self._ws_server.sockets[0].getsockname()[1]
        self.ws_url = f"ws://127.0.0.1:{ws_port}"
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._http.daemon_threads = True
        self._http_thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._http_thread.start()
        self.rest_url = f"http://127.0.0.1:{self._http.server_address[1]}/api"
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ws_server is not None:
            self._ws_server.close()
            await self._ws_server.wait_closed()
        if self._http is not None and self._http_thread is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http_thread.join(timeout=5)

    # websocket

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path != "/stream" or not parse_qs(url.query).get("streams"):
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        if self._handshakes_to_reject:
            self._handshakes_to_reject -= 1
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "maintenance\n")
        return None

    async def _serve_ws(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        streams = parse_qs(urlsplit(ws.request.path).query)["streams"][0].split("/")
        wanted = {name.removesuffix("@trade").upper() for name in streams}
        self.connections += 1
        try:
            if self.connections > 1:
                await self._reconnected(ws, wanted)
            while self._cursor < len(self._merged):
                trade = self._merged[self._cursor]
                self._cursor += 1
                if trade.symbol not in wanted:
                    continue
                if trade.id in self.script.skip_ids.get(trade.symbol, ()):
                    self.withheld[trade.symbol].add(trade.id)
                else:
                    await self._send(ws, trade)
            await ws.wait_closed()
        except (_Dropped, ConnectionClosed):
            pass

    async def _reconnected(self, ws: ServerConnection, wanted: set[str]) -> None:
        count = self.script.replayed_on_reconnect
        replays = [t for t in self.sent if t.symbol in wanted][-count:] if count else []
        for trade in replays:
            await self._send(ws, trade)
        missed = self._merged[self._cursor:self._cursor + self.script.missed_on_reconnect]
        for trade in missed:
            self.withheld[trade.symbol].add(trade.id)
        self._cursor += len(missed)

    async def _send(self, ws: ServerConnection, trade: FakeTrade) -> None:
        await ws.send(trade.ws_message())
        self.sent.append(trade)
        for raw in self.script.inject.get(len(self.sent), ()):
            await ws.send(raw)
        if self._drops and len(self.sent) >= self._drops[0].after:
            if self._drops.popleft().abrupt:
                ws.transport.abort()
            else:
                await ws.close(1001, "fake drop")
            raise _Dropped

    # REST: runs in the HTTP server's threads, so shared mutable state is behind _rest_lock.

    def rest(self, path: str) -> tuple[int, object]:
        """Answer a GET for ``path`` (with query) as Binance would: (status, JSON body)."""
        with self._rest_lock:
            self.rest_requests.append(path)
        url = urlsplit(path)
        params = {key: values[-1] for key, values in parse_qs(url.query).items()}
        if url.path == "/api/v3/ping":
            return 200, {}
        if url.path == "/api/v3/time":
            return 200, {"serverTime": time.time_ns() // 1_000_000}
        if url.path == "/api/v3/exchangeInfo":
            return self._exchange_info(params)
        if url.path == "/api/v3/historicalTrades":
            return self._historical_trades(params)
        if url.path == "/api/v3/klines":
            return self._klines_page(params)
        return 404, {"code": -1, "msg": f"no route {url.path}"}

    def _exchange_info(self, params: dict[str, str]) -> tuple[int, object]:
        if "symbol" in params:
            names = [params["symbol"]]
        elif "symbols" in params:
            names = json.loads(params["symbols"])
        else:
            names = list(self._trades)
        if any(name not in self._trades for name in names):
            return 400, _INVALID_SYMBOL
        symbols = [
            {"symbol": name, "status": "TRADING", "baseAsset": name.removesuffix("USDT"),
             "quoteAsset": "USDT"}
            for name in names
        ]
        return 200, {"timezone": "UTC", "serverTime": time.time_ns() // 1_000_000,
                     "rateLimits": [], "exchangeFilters": [], "symbols": symbols}

    def _historical_trades(self, params: dict[str, str]) -> tuple[int, object]:
        symbol = params.get("symbol")
        if not symbol:
            return 400, _NO_SYMBOL
        if symbol not in self._trades:
            return 400, _INVALID_SYMBOL
        with self._rest_lock:
            if self._history_to_fail:
                self._history_to_fail -= 1
                return 503, _UNAVAILABLE
        limit = int(params.get("limit", "500"))
        if not 1 <= limit <= 1000:
            return 400, _BAD_LIMIT
        ids, rows = self._ids[symbol], self._trades[symbol]
        start = (bisect.bisect_left(ids, int(params["fromId"])) if "fromId" in params
                 else max(0, len(rows) - limit))
        return 200, [trade.rest_row() for trade in rows[start:start + limit]]

    def _klines_page(self, params: dict[str, str]) -> tuple[int, object]:
        symbol = params.get("symbol")
        if not symbol:
            return 400, _NO_SYMBOL
        if symbol not in self._klines:
            return 400, _INVALID_SYMBOL
        if params.get("interval") != "1m":
            return 400, _BAD_INTERVAL
        with self._rest_lock:
            if self._klines_to_fail:
                self._klines_to_fail -= 1
                return 503, _UNAVAILABLE
        limit = int(params.get("limit", "500"))
        if not 1 <= limit <= 1000:
            return 400, _BAD_LIMIT
        # Binance: open times within [startTime, endTime]; the earliest `limit` of them, or
        # the latest without startTime.
        opens, rows = self._kline_opens[symbol], self._klines[symbol]
        stop = bisect.bisect_right(opens, int(params.get("endTime", opens[-1] if opens else 0)))
        if "startTime" in params:
            start = bisect.bisect_left(opens, int(params["startTime"]))
            return 200, rows[start:min(stop, start + limit)]
        return 200, rows[max(0, stop - limit):stop]


def _handler_for(fake: FakeBinance) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status, payload = fake.rest(self.path)
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json;charset=UTF-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    return Handler
