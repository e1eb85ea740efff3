"""Fixtures shared by the integration tests."""

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from kit.api import RunningApi, scratch_store, serve_in_thread
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore


@pytest.fixture
def start_api(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningApi]]:
    """Starts real APIs on the module's ``make_settings(**overrides)``; all stop at the end."""
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> RunningApi:
            return stack.enter_context(serve_in_thread(make_settings(**overrides)))

        yield start


@pytest.fixture
async def store(make_settings: Callable[..., Settings]) -> AsyncIterator[RedisStore]:
    """A store on the module's ``make_settings()``; its keys are deleted afterwards."""
    async with scratch_store(make_settings()) as store:
        yield store
