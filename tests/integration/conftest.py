"""Fixtures shared by the integration tests."""

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kit.api import RunningApi, serve_in_thread
from makeusrich.core.settings import Settings


@pytest.fixture
def start_api(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., RunningApi]]:
    """Starts real APIs on the module's ``make_settings(**overrides)``; all stop at the end."""
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> RunningApi:
            return stack.enter_context(serve_in_thread(make_settings(**overrides)))

        yield start
