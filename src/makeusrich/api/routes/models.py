"""``/v1/models``: the model registry's versions, which one is champion and which one the
worker serves.

The registry is ``settings.model_dir`` (or the bundled models), read from disk on every
request: hashes are recomputed, so a corrupted ``model.onnx`` shows up at once.
"""

import asyncio
from typing import Annotated, Any, Final

import msgspec
from fastapi import APIRouter, HTTPException, Path

from makeusrich.api.deps import SettingsDep, StoreDep
from makeusrich.api.models import ErrorOut, ModelDetailsOut, ModelOut
from makeusrich.core.errors import RegistryError
from makeusrich.core.settings import Settings
from makeusrich.core.store import RedisStore
from makeusrich.inference.model import bundled_models_dir
from makeusrich.inference.registry import Registry, VersionDetails, VersionInfo

__all__ = ["registry_for", "router"]

router = APIRouter(prefix="/models", tags=["models"])

_UNUSABLE: Final[dict[int | str, dict[str, Any]]] = {
    500: {"model": ErrorOut, "description": "the registry or its champion.json is unreadable"},
}


def registry_for(settings: Settings) -> Registry:
    """The registry the API lists: ``settings.model_dir``, else the bundled models."""
    return Registry(bundled_models_dir() if settings.model_dir is None else settings.model_dir)


async def _serving_version(store: RedisStore) -> str | None:
    return (await store.model_info()).get("version")


def _fields(info: VersionInfo, serving: str | None) -> dict[str, Any]:
    return {
        "version": info.version,
        "kind": info.kind,
        "created_at": info.created_at,
        "window": info.window,
        "symbols": list(info.symbols),
        "interval": info.interval,
        "metrics": info.metrics,
        "sha256_ok": info.sha256_ok,
        "is_champion": info.is_champion,
        "baseline": info.is_baseline,
        "champion_for": list(info.champion_for),
        "serving": info.version == serving,
        "problem": info.problem,
    }


def _details(registry: Registry, version: str) -> VersionDetails | None:
    """None for an unknown version (a 404), so that RegistryError means a broken registry."""
    if version not in registry.versions():
        return None
    return registry.show(version)


@router.get("", response_model=list[ModelOut], responses=_UNUSABLE)
async def list_models(settings: SettingsDep, store: StoreDep) -> list[ModelOut]:
    """Every version, oldest first, with its integrity rechecked."""
    registry = registry_for(settings)
    try:
        # Disk reads and hashing: off the event loop.
        infos = await asyncio.to_thread(registry.list)
    except RegistryError as exc:
        raise HTTPException(500, str(exc)) from exc
    serving = await _serving_version(store)
    return [ModelOut(**_fields(info, serving)) for info in infos]


@router.get(
    "/{version}",
    response_model=ModelDetailsOut,
    responses={**_UNUSABLE, 404: {"model": ErrorOut, "description": "unknown version"}},
)
async def get_model(
    version: Annotated[str, Path(description="a version name as listed by /v1/models")],
    settings: SettingsDep,
    store: StoreDep,
) -> ModelDetailsOut:
    """One version: the listing fields plus its whole manifest."""
    registry = registry_for(settings)
    try:
        details = await asyncio.to_thread(_details, registry, version)
        known = None if details is not None else await asyncio.to_thread(registry.versions)
    except RegistryError as exc:
        raise HTTPException(500, str(exc)) from exc
    if details is None:
        listed = ", ".join(known or []) or "none"
        raise HTTPException(404, f"unknown model version '{version}'; known: {listed}")
    serving = await _serving_version(store)
    manifest = None if details.manifest is None else msgspec.to_builtins(details.manifest)
    return ModelDetailsOut(**_fields(details.info, serving), manifest=manifest)
