"""Many SSE clients, held by child processes on raw asyncio sockets.

The clients share the 2-core machine with what they measure, so they must be cheap: they
parse the HTTP head, the chunked body and the SSE frames themselves (as an asyncio.Protocol
that cost 12-18 us of CPU per event here, against ~38 us for httpx + httpx-sse in
``bench.load``; not re-measured since they read raw sockets), and thousands of connections
fit in one process. Each connection holds ``/v1/stream?QUERY``
open; for every event it records two latencies (one machine, one clock): ``arrival -
ts_ingest``, where arrival is the kernel's receive stamp (``SO_TIMESTAMPNS``), the
server's delivery time; and ``read - ts_ingest``, when this process read it, which adds the
clients' own wait for a core and their turn among a burst's thousand sockets (a remote
client reads its one socket at once). It counts events, and gaps in each symbol's
``open_time`` sequence (missed events).

A benchmark steers the client processes through :class:`Fleet`: grow to N connections,
collect what arrived since the last collect (with the clients' own CPU time), wait until
every connection has received a given number of events, close.
"""

import argparse
import asyncio
import multiprocessing as mp
import socket
import struct
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from bench._common import BenchError

__all__ = ["Batch", "Fleet", "client_steps"]

_OPENING_AT_ONCE: Final = 50  # connections being opened concurrently, per process
_RETRY_503_S: Final = 0.5  # the API answers 503 until its Redis subscription is up
_POLL_S: Final = 0.05
_READ_BYTES: Final = 65_536
# Linux's SO_TIMESTAMPNS (Python names no constant): the kernel stamps each received
# segment, and recvmsg hands the stamp over as ancillary data (a struct timespec).
_SO_TIMESTAMPNS: Final = 35
_TIMESPEC: Final = struct.Struct("qq")
_STAMP_SPACE: Final = socket.CMSG_SPACE(_TIMESPEC.size)


def _stamp_ms(timespec: bytes) -> float:
    seconds: int
    nanoseconds: int
    seconds, nanoseconds = _TIMESPEC.unpack(timespec[:_TIMESPEC.size])
    return seconds * 1e3 + nanoseconds / 1e6


class _Stamp(msgspec.Struct):
    ts_ingest: int
    symbol: str = ""
    open_time: int = 0


_decoder: Final = msgspec.json.Decoder(_Stamp)


@dataclass
class Batch:
    """What the clients saw since the previous collect."""

    # arrival at the client's socket (the kernel's stamp) - ts_ingest: the server's delivery
    latency_ms: "array[float]" = field(default_factory=lambda: array("d"))
    # read by the client process - ts_ingest: adds the clients' own queueing
    read_latency_ms: "array[float]" = field(default_factory=lambda: array("d"))
    counts: list[int] = field(default_factory=list)  # events, per connection
    missed: int = 0  # gaps in a symbol's open_time sequence, in events
    closed_by_server: int = 0  # streams the server ended (e.g. a client too slow)
    open: int = 0  # connections open now
    cpu_s: float = 0.0  # the client processes' CPU time
    errors: list[str] = field(default_factory=list)  # events that could not be read

    def merge(self, other: "Batch") -> None:
        self.latency_ms.extend(other.latency_ms)
        self.read_latency_ms.extend(other.read_latency_ms)
        self.counts.extend(other.counts)
        self.missed += other.missed
        self.closed_by_server += other.closed_by_server
        self.open += other.open
        self.cpu_s += other.cpu_s
        self.errors.extend(other.errors)


def client_steps(text: str) -> list[int]:
    """The argparse type of ``--clients``: increasing connection counts such as 1,100,5000."""
    try:
        steps = [int(part) for part in text.split(",")]
    except ValueError:
        steps = []
    if not steps or min(steps) < 1 or steps != sorted(steps):
        raise argparse.ArgumentTypeError(f"{text!r}: need increasing numbers >= 1, like 1,100")
    return steps


# ---- in the client process -------------------------------------------------------------


class _Connection:
    """One SSE connection on a raw non-blocking socket, read with ``recvmsg`` for the
    kernel's receive time stamp."""

    def __init__(self, clients: "_Clients", sock: socket.socket) -> None:
        self._clients = clients
        self.sock = sock
        self.status: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.open = False
        self.count = 0
        self.open_times: dict[str, int] = {}
        self._head = bytearray()
        self._chunked = False
        self._raw = bytearray()  # body bytes still in chunked framing
        self._left = 0  # payload bytes left in the current chunk
        self._skip = 0  # bytes of the CRLF after a chunk still to skip
        self._frames = bytearray()  # SSE text after the last complete event

    def readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(_READ_BYTES, _STAMP_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.lost(exc)
            return
        if not data:
            self.lost(None)
            return
        read_ms = time.time_ns() / 1e6
        # The time the last of these bytes reached the socket: the server's delivery,
        # whenever this process got round to reading it (the stamp is absent only if the
        # kernel took none).
        arrived_ms = next((_stamp_ms(value) for level, kind, value in ancillary
                           if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS), read_ms)
        self.data_received(data, arrived_ms, read_ms)

    def data_received(self, data: bytes, arrived_ms: float, read_ms: float) -> None:
        if not self.status.done():
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self._head[:end]).split(b"\r\n")
            data = bytes(self._head[end + 4:])
            self._head.clear()
            self._chunked = b"transfer-encoding: chunked" in (line.lower() for line in lines)
            self.status.set_result(int(lines[0].split()[1]))
        self._frames += (self._dechunk(data) if self._chunked else data).replace(b"\r", b"")
        frames, start = self._frames, 0
        while (end := frames.find(b"\n\n", start)) >= 0:
            at = frames.find(b"data: ", start, end)  # heartbeats are comments: no data
            if at >= 0:
                line_end = frames.find(b"\n", at, end)
                payload = frames[at + 6:end if line_end < 0 else line_end]
                try:
                    self._clients.record(self, _decoder.decode(payload), arrived_ms, read_ms)
                except msgspec.DecodeError as exc:  # ValidationError too
                    self._clients.error(f"{exc}: {bytes(payload[:200])!r}")
            start = end + 2
        del frames[:start]

    def _dechunk(self, data: bytes) -> bytes:
        raw, out, pos = self._raw, bytearray(), 0
        raw += data
        while pos < len(raw):
            if self._left:
                take = min(self._left, len(raw) - pos)
                out += raw[pos:pos + take]
                pos += take
                self._left -= take
                self._skip = 0 if self._left else 2
            elif self._skip:
                skipped = min(self._skip, len(raw) - pos)
                pos += skipped
                self._skip -= skipped
            else:
                end = raw.find(b"\r\n", pos)
                if end < 0:
                    break
                self._left = int(raw[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if not self._left:  # the last chunk: the server ended the response
                    self.lost(None)
                    break
        del raw[:pos]
        return bytes(out)

    def lost(self, exc: Exception | None) -> None:
        if self.sock.fileno() < 0:
            return
        if not self.status.done():
            self.status.set_exception(ConnectionError(f"closed before a response: {exc}"))
        if self.open and not self._clients.closing:
            self._clients.closed_by_server += 1
        self.open = False
        self.close()

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


class _Clients:
    def __init__(self, host: str, port: int, path: str, step_ms: int) -> None:
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        "Accept: text/event-stream\r\n\r\n").encode()
        self._host, self._port, self._step_ms = host, port, step_ms
        self.connections: list[_Connection] = []
        self.refused: Counter[str] = Counter()
        self.closing = False
        self.closed_by_server = 0
        self._batch = Batch()
        self._cpu_at = time.process_time()

    def error(self, message: str) -> None:
        if len(self._batch.errors) < 10:  # a few say what is wrong
            self._batch.errors.append(message)

    def record(self, connection: _Connection, stamp: _Stamp, arrived_ms: float,
               read_ms: float) -> None:
        self._batch.latency_ms.append(arrived_ms - stamp.ts_ingest)
        self._batch.read_latency_ms.append(read_ms - stamp.ts_ingest)
        connection.count += 1
        if self._step_ms and stamp.symbol:
            last = connection.open_times.get(stamp.symbol)
            if last is None or stamp.open_time > last:
                connection.open_times[stamp.symbol] = stamp.open_time
                if last is not None:
                    self._batch.missed += (stamp.open_time - last) // self._step_ms - 1

    async def _open_one(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            sock = socket.socket()
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)  # before any byte arrives
            connection = _Connection(self, sock)
            try:
                await loop.sock_connect(sock, (self._host, self._port))
                await loop.sock_sendall(sock, self.request)
                loop.add_reader(sock.fileno(), connection.readable)
                status = await asyncio.wait_for(connection.status,
                                                max(0.1, deadline - loop.time()))
            except (OSError, TimeoutError) as exc:
                connection.close()
                self.refused[type(exc).__name__] += 1
                return
            if status == 200:
                connection.open = True
                self.connections.append(connection)
                return
            connection.close()
            if status != 503 or loop.time() > deadline:
                self.refused[f"http_{status}"] += 1
                return
            await asyncio.sleep(_RETRY_503_S)

    async def grow(self, total: int, timeout_s: float) -> dict[str, int]:
        deadline = asyncio.get_running_loop().time() + timeout_s
        gate = asyncio.Semaphore(_OPENING_AT_ONCE)

        async def one() -> None:
            async with gate:
                await self._open_one(deadline)

        await asyncio.gather(*(one() for _ in range(total - len(self.connections))))
        return dict(self.refused)

    def collect(self) -> Batch:
        batch, self._batch = self._batch, Batch()
        batch.counts = [connection.count for connection in self.connections]
        for connection in self.connections:
            connection.count = 0
        batch.closed_by_server, self.closed_by_server = self.closed_by_server, 0
        batch.open = sum(connection.open for connection in self.connections)
        cpu = time.process_time()
        batch.cpu_s, self._cpu_at = cpu - self._cpu_at, cpu
        return batch

    async def drain(self, expected: int, timeout_s: float) -> bool:
        """Wait until every open connection has ``expected`` events since the last collect."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while any(c.open and c.count < expected for c in self.connections):
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True

    def close(self) -> None:
        self.closing = True
        for connection in self.connections:
            connection.close()


async def _serve(pipe: Connection, host: str, port: int, path: str, step_ms: int) -> None:
    clients = _Clients(host, port, path, step_ms)
    while True:
        command, *args = await asyncio.to_thread(pipe.recv)
        reply: Any = None
        if command == "grow":
            reply = await clients.grow(*args)
        elif command == "collect":
            reply = clients.collect()
        elif command == "drain":
            reply = await clients.drain(*args)
        else:  # "close"
            clients.close()
            pipe.send(None)
            return
        pipe.send(reply)


def _client_process(pipe: Connection, host: str, port: int, path: str, step_ms: int) -> None:
    asyncio.run(_serve(pipe, host, port, path, step_ms))


# ---- in the benchmark process ----------------------------------------------------------


class Fleet:
    """SSE clients of ``base``/v1/stream?``query`` spread over ``procs`` child processes.

    ``step_ms``: the open-time step of one symbol's consecutive events (the candle
    interval), to count missed events; 0 counts none.
    """

    def __init__(self, base: str, query: str, *, procs: int = 1, step_ms: int = 0) -> None:
        url = urlsplit(base)
        if url.hostname is None or url.port is None:
            raise BenchError(f"need a base URL with host and port, got {base}")
        ctx = mp.get_context("spawn")
        self._pipes: list[Connection] = []
        self.processes: list[mp.process.BaseProcess] = []
        self.size = 0
        for _ in range(procs):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(
                target=_client_process, daemon=True,
                args=(theirs, url.hostname, url.port, f"/v1/stream?{query}", step_ms),
            )
            process.start()
            theirs.close()
            self._pipes.append(ours)
            self.processes.append(process)

    def __enter__(self) -> "Fleet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, commands: list[tuple[Any, ...]], timeout_s: float) -> list[Any]:
        for pipe, command in zip(self._pipes, commands, strict=True):
            pipe.send(command)
        replies = []
        deadline = time.monotonic() + timeout_s
        for pipe, process in zip(self._pipes, self.processes, strict=True):
            while not pipe.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
                if not process.is_alive():
                    raise BenchError(f"SSE client process {process.pid} died "
                                     f"(exit code {process.exitcode})")
                if time.monotonic() > deadline:
                    raise BenchError(f"SSE client process {process.pid} did not answer "
                                     f"{commands[0][0]!r} within {timeout_s:.0f} s")
            replies.append(pipe.recv())
        return replies

    def grow(self, total: int, timeout_s: float = 120.0) -> None:
        """Open connections until ``total`` are open; BenchError if any is refused."""
        procs = len(self._pipes)
        shares = [total // procs + (i < total % procs) for i in range(procs)]
        refused: Counter[str] = Counter()
        for reply in self._ask([("grow", share, timeout_s) for share in shares],
                               timeout_s + 30):
            refused.update(reply)
        if refused:
            raise BenchError(f"SSE connections refused on the way to {total}: {dict(refused)}")
        self.size = total

    def collect(self) -> Batch:
        """What every client received since the previous collect (then forgotten);
        BenchError when an event could not be read."""
        batch = Batch()
        for part in self._ask([("collect",)] * len(self._pipes), 60):
            batch.merge(part)
        if batch.errors:
            raise BenchError("SSE events without a readable ts_ingest: "
                             + "; ".join(batch.errors[:3]))
        return batch

    def drain(self, expected: int, timeout_s: float) -> bool:
        """Wait until every open connection has ``expected`` events since the last collect;
        False when some had not after ``timeout_s``."""
        return all(self._ask([("drain", expected, timeout_s)] * len(self._pipes),
                             timeout_s + 30))

    def close(self) -> None:
        for pipe, process in zip(self._pipes, self.processes, strict=True):
            if process.is_alive():
                try:
                    pipe.send(("close",))
                    if pipe.poll(10):
                        pipe.recv()
                except (OSError, EOFError):
                    pass
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        self._pipes.clear()
        self.processes.clear()
