"""API keys, plans and the shared rate limiter of the public API.

:mod:`makeusrich.access.keys` creates and stores keys (only their sha256);
:mod:`makeusrich.access.limits` enforces their limits atomically in Redis. The HTTP side
(who presents which key, which route is limited how, the response headers) is
:mod:`makeusrich.api.access`.
"""

from makeusrich.access.keys import PLANS, ApiKey, KeyStore, Limits, plan_limits
from makeusrich.access.limits import ROUTE_CLASSES, Decision, Limiter, RouteClass, Subject, Usage

__all__ = [
    "PLANS",
    "ROUTE_CLASSES",
    "ApiKey",
    "Decision",
    "KeyStore",
    "Limiter",
    "Limits",
    "RouteClass",
    "Subject",
    "Usage",
    "plan_limits",
]
