"""Record Binance's raw combined trade stream to JSONL, for replay later.

Each line is one websocket message exactly as Binance sent it, e.g.
``{"stream":"btcusdt@trade","data":{"e":"trade",...}}``; the replay reader reads this format.
Duplicates and gaps from reconnects are kept as received: replay dedupes by trade id.
"""

import asyncio
import contextlib
import logging
from pathlib import Path

from makeusrich.core.settings import Settings
from makeusrich.stream.ingest import CombinedStream, validate_symbols

__all__ = ["record"]

log = logging.getLogger(__name__)


async def record(
    settings: Settings, out_path: Path, stop: asyncio.Event, max_messages: int | None = None
) -> int:
    """Append messages to ``out_path`` until ``stop`` is set or ``max_messages`` are written;
    returns how many were written. Raises IngestError if a symbol is unknown."""
    if max_messages == 0:
        return 0
    await validate_symbols(settings)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stream = CombinedStream(settings, stop)
    written = 0
    # Line-buffered so a killed recorder loses at most the line being written.
    with out_path.open("a", encoding="utf-8", buffering=1) as out:
        async with contextlib.aclosing(stream.messages()) as messages:
            async for raw in messages:
                text = raw.decode() if isinstance(raw, bytes) else raw
                # JSON never holds a raw newline inside a string, so this keeps one message
                # per line without changing its meaning.
                out.write(text.replace("\r", "").replace("\n", "") + "\n")
                written += 1
                if written == max_messages:
                    break
    log.info("recorded %d messages to %s (%d reconnects)", written, out_path, stream.reconnects)
    return written
