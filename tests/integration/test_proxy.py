"""The reverse proxy of docker-compose.yml for real: Debian's nginx (``make proxy``) runs
infra/nginx/api-proxy.conf, included as it is, in front of two `mur api` replicas on the
session's redis-server.

Loopback is a whole /8, which makes client addresses visible: the proxy connects to the
replicas from 127.0.0.3, the only address their MUR_FORWARDED_ALLOW_IPS trusts, and each
client comes from an address of its own. The API's per-client-IP quota counters in Redis
then show which address it took for the client.
"""

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from httpx_sse import aconnect_sse

from kit.api import settings_factory, wait_http
from kit.builders import T0_MS, make_candles
from kit.metrics import sample, scrape
from kit.worker import wait_until
from makeusrich.core.embedded import EmbeddedService, free_port, kill_with_parent, terminate
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROXY_RULES = Path(__file__).parents[2] / "infra" / "nginx" / "api-proxy.conf"
PROXY_ADDRESS = "127.0.0.3"
REST_PATH = "/v1/candles/BTCUSDT"
REST_ROUTE = "/v1/candles/{symbol}"

# What infra/nginx/nginx.conf adds around the rules in a container, for local processes:
# the replicas on loopback ports, temporary files in the test's directory.
_NGINX_CONF = """
daemon off;
user {user};
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
events {{
    worker_connections 256;
}}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream mur_api {{
{servers}
        keepalive 8;
    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_bind {proxy_address};
        include {rules};
    }}
}}
"""


@pytest.fixture(scope="module")
def make_settings(redis_server: EmbeddedService) -> Callable[..., Settings]:
    return settings_factory(redis_server.url, symbols=("BTCUSDT",), intervals=("1m",),
                            api_host="127.0.0.1", forwarded_allow_ips=(PROXY_ADDRESS,),
                            log_level="WARNING")


@pytest.fixture(scope="module")
def replicas(make_settings: Callable[..., Settings]) -> Iterator[list[str]]:
    """Two `mur api` processes; their base URLs."""
    with contextlib.ExitStack() as stack:
        started = []
        for _ in range(2):
            settings = make_settings(api_port=free_port())
            process = subprocess.Popen(
                [sys.executable, "-m", "makeusrich", "api"],
                env={**os.environ, **settings.as_env()}, preexec_fn=kill_with_parent,
            )
            stack.callback(terminate, process, 15)
            started.append((f"http://127.0.0.1:{settings.api_port}", process))
        for url, process in started:
            wait_http(f"{url}/healthz", process, timeout_s=60)
        yield [url for url, _ in started]


@pytest.fixture(scope="module")
def proxy(replicas: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """nginx with the compose proxy's rules in front of ``replicas``; its base URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    assert Path(nginx).exists(), "nginx is not installed: run `make proxy` (apt)"
    directory = tmp_path_factory.mktemp("nginx")
    port = free_port()
    servers = "\n".join(f"        server {url.removeprefix('http://')};" for url in replicas)
    conf = directory / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(
        user=pwd.getpwuid(os.getuid()).pw_name, dir=directory, servers=servers, port=port,
        proxy_address=PROXY_ADDRESS, rules=PROXY_RULES,
    ))
    process = subprocess.Popen(
        [nginx, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
        preexec_fn=kill_with_parent,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", process, timeout_s=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        terminate(process, 15)


# Each replica's own /metrics, scraped directly as Prometheus does.


def _rest_requests(base_url: str) -> float:
    return sample(scrape(f"{base_url}/metrics"), "mur_http_request_duration_seconds_count",
                  method="GET", route=REST_ROUTE, status_class="2xx") or 0.0


def _sse_clients(replicas: list[str]) -> float:
    return sum(sample(scrape(f"{url}/metrics"), "mur_sse_clients") or 0.0 for url in replicas)


async def test_each_sse_event_passes_the_proxy_as_it_is_written(
    proxy: str, replicas: list[str], store: RedisStore
) -> None:
    candles = make_candles([100.0 + i for i in range(5)])
    async with (
        httpx.AsyncClient(base_url=proxy, timeout=10) as client,
        aconnect_sse(client, "GET", "/v1/stream", params={"events": "candle"}) as source,
    ):
        assert source.response.status_code == 200
        assert source.response.headers["x-accel-buffering"] == "no"  # for a proxy in front
        await asyncio.to_thread(wait_until, lambda: _sse_clients(replicas) == 1,
                                "the stream's subscription on its replica", 30)
        events = source.aiter_sse()
        for candle in candles:
            await store.write_candle(candle)
            # Read before the next one is written: a buffering proxy would sit on it until
            # its buffer filled, and this read would never end (bounded only by the wait).
            event = await asyncio.wait_for(anext(events), 10)
            assert event.event == "candle"
            assert json.loads(event.data)["open_time"] == candle.open_time


async def test_sse_clients_on_both_replicas_each_get_every_event(
    proxy: str, replicas: list[str], store: RedisStore
) -> None:
    """Replicas fan out from the one Redis pub/sub channel: whichever replica the proxy
    picked, a client gets every event, in order."""
    # After the candles of the other tests: Redis refuses ids at or below the newest.
    candles = make_candles([200.0 + i for i in range(20)], start_ms=T0_MS + 86_400_000)
    async with contextlib.AsyncExitStack() as stack:
        streams = []
        for _ in range(4):  # round robin: two on each replica
            client = await stack.enter_async_context(httpx.AsyncClient(base_url=proxy,
                                                                       timeout=10))
            source = await stack.enter_async_context(
                aconnect_sse(client, "GET", "/v1/stream", params={"events": "candle"}))
            assert source.response.status_code == 200
            streams.append(source.aiter_sse())
        # Streams of earlier tests may still be closing: wait for the gauges to settle.
        await asyncio.to_thread(
            wait_until,
            lambda: [sample(scrape(f"{url}/metrics"), "mur_sse_clients") for url in replicas]
            == [2.0, 2.0],
            "two streams on each replica", 30)
        for candle in candles:
            await store.write_candle(candle)

        async def read_all(events: Any) -> list[int]:
            return [json.loads((await anext(events)).data)["open_time"] for _ in candles]

        received = await asyncio.wait_for(asyncio.gather(*map(read_all, streams)), 30)
    assert received == [[c.open_time for c in candles]] * 4


def test_polling_is_spread_over_both_replicas(proxy: str, replicas: list[str]) -> None:
    before = [_rest_requests(url) for url in replicas]
    with httpx.Client(base_url=proxy, timeout=10) as client:
        for _ in range(10):
            assert client.get(REST_PATH).status_code == 200
        assert client.get("/metrics").status_code == 404  # Prometheus scrapes replicas only
    served = [_rest_requests(url) - count for url, count in zip(replicas, before, strict=True)]
    assert sum(served) == 10 and min(served) >= 1, served


def _get_from(address: str, url: str, **headers: str) -> int:
    """GET ``url`` over a connection from ``address``; the status."""
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.get(url, headers=headers).status_code


def test_the_api_limits_the_client_address_the_proxy_forwards(
    proxy: str, replicas: list[str], make_settings: Callable[..., Settings]
) -> None:
    assert _get_from("127.0.0.2", proxy + REST_PATH) == 200
    # A forged header does not pass the proxy: it sends the address it saw.
    assert _get_from("127.0.0.2", proxy + REST_PATH, **{"X-Forwarded-For": "10.9.9.9"}) == 200
    assert _get_from("127.0.0.4", proxy + REST_PATH) == 200
    # Straight to a replica from an address that is not the proxy: the header is ignored.
    assert _get_from("127.0.0.5", replicas[0] + REST_PATH,
                     **{"X-Forwarded-For": "10.8.8.8"}) == 200

    keys = make_settings().redis_keys
    client = redis.Redis.from_url(make_settings().redis_url or "")
    try:
        counted = {
            address: int(client.hget(keys.daily_quota(f"ip:{address}"), "total") or 0)
            for address in ("127.0.0.2", "127.0.0.4", "127.0.0.5", PROXY_ADDRESS,
                            "10.9.9.9", "10.8.8.8")
        }
    finally:
        client.close()
    assert counted == {"127.0.0.2": 2, "127.0.0.4": 1, "127.0.0.5": 1, PROXY_ADDRESS: 0,
                       "10.9.9.9": 0, "10.8.8.8": 0}
