"""The model registry: a directory of version directories plus a champion pointer.

Layout::

    root/
      <version>/model.onnx, manifest.json   # one trained model (see Manifest)
      champion.json                         # which version serves, and how it got there
      .staging-*/                           # unfinished writes, never listed

``champion.json`` is ``{"version", "promoted_at", "history": [{"version", "promoted_at",
"reason", "action", "forced"}, ...], "symbols": {SYMBOL: {"version", "promoted_at",
"history"}}}`` (times in epoch ms). ``history`` is append-only: every promotion and
rollback is an entry, so it doubles as the audit log. ``version`` is the shared champion,
which serves every symbol without one of its own in ``symbols`` (optional: files without it
have no per-symbol champions). It is rewritten atomically (temporary file + ``os.replace``),
so a reader sees the old or the new pointer, never half of one. Without ``champion.json``,
:func:`load_forecaster` serves the newest version by name, as before the registry existed.

The registry only records decisions: whether a challenger beats the champion on a hold-out
is for the caller to decide before calling :meth:`Registry.promote`. What the registry does
enforce is integrity: it never points at a version whose ``model.onnx`` does not match its
manifest's sha256 or that onnxruntime cannot load. Only numpy and onnxruntime, never torch.
"""

import contextlib
import fcntl
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import msgspec

from makeusrich.core.errors import ModelError, RegistryError
from makeusrich.core.schemas import now_ms
from makeusrich.inference.model import (
    BASELINE_KINDS,
    MANIFEST_FILE,
    MODEL_FILE,
    Manifest,
    OnnxForecaster,
    read_manifest,
    sha256_of,
)

__all__ = [
    "CHAMPION_FILE",
    "HEADLINE_METRICS",
    "ChampionPointer",
    "Promotion",
    "Registry",
    "SymbolChampion",
    "VersionDetails",
    "VersionInfo",
]

CHAMPION_FILE: Final = "champion.json"
#: The manifest metrics a listing shows (those a version has; the manifest holds them all).
HEADLINE_METRICS: Final = ("skill", "mae", "mae_persistence", "coverage_80", "pinball",
                           "pinball_naive")

log = logging.getLogger(__name__)

_LOCK_FILE: Final = ".registry.lock"
# Names that are safe as one path component (what the trainer produces: lstm-YYYYMMDD-...).
_VERSION_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


class Promotion(msgspec.Struct, frozen=True):
    """One entry of the champion history."""

    version: str
    promoted_at: int
    reason: str = ""
    action: Literal["promote", "rollback"] = "promote"
    #: The caller overrode (or skipped) the hold-out comparison.
    forced: bool = False


class SymbolChampion(msgspec.Struct, frozen=True):
    """One champion slot: the shared one, or a symbol's own in ``ChampionPointer.symbols``.
    ``version`` is None when there is none (for a symbol: rolled back to the shared one)."""

    version: str | None = None
    promoted_at: int = 0
    history: tuple[Promotion, ...] = ()


class ChampionPointer(msgspec.Struct, frozen=True):
    """``champion.json``. Defaults let an operator write ``{"version": "..."}`` by hand.
    ``version`` is None when only symbols have champions."""

    version: str | None = None
    promoted_at: int = 0
    history: tuple[Promotion, ...] = ()
    symbols: dict[str, SymbolChampion] = {}


@dataclass(frozen=True, slots=True)
class VersionInfo:
    """One version as listed. Manifest-derived fields are None/empty when the manifest
    cannot be read; ``problem`` then says why."""

    version: str
    path: Path
    kind: str | None
    created_at: str | None
    window: int | None
    symbols: tuple[str, ...]
    interval: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    #: model.onnx hashes to the manifest's sha256 (recomputed on every call).
    sha256_ok: bool = False
    is_champion: bool = False
    #: The symbols it serves as their own champion (see ``Registry.promote(symbol=...)``).
    champion_for: tuple[str, ...] = ()
    #: Why the version cannot be promoted or served; None when it looks usable.
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    @property
    def is_baseline(self) -> bool:
        """A baseline packaged as a version (GARCH), not a trained network."""
        return self.kind in BASELINE_KINDS


@dataclass(frozen=True, slots=True)
class VersionDetails:
    """:meth:`Registry.show`: the listing plus the whole manifest (None if unreadable)."""

    info: VersionInfo
    manifest: Manifest | None


_pointer_decoder: Final = msgspec.json.Decoder(ChampionPointer)


def _has_version_files(path: Path) -> bool:
    return (path / MANIFEST_FILE).exists() or (path / MODEL_FILE).exists()


def _replay(history: tuple[Promotion, ...]) -> list[str]:
    """The champion stack: promotions push, rollbacks pop; the top is the champion."""
    stack: list[str] = []
    for entry in history:
        if entry.action == "rollback" and stack:
            stack.pop()
            # A consistent history has the rolled-back-to version on top already; an empty
            # version is a symbol's rollback to the shared champion.
            if entry.version and (not stack or stack[-1] != entry.version):
                stack.append(entry.version)
        else:
            stack.append(entry.version)
    return stack


class Registry:
    """Model versions under ``root`` and the champion pointer.

    ``root`` may also be a single version directory (what ``--model-dir`` accepts): it is
    then listed as the only version, has no champion, and cannot be changed.
    """

    def __init__(self, root: Path) -> None:
        root = Path(root)
        self._only: str | None = None
        if root.is_dir() and _has_version_files(root):
            self._only = root.name
            root = root.parent
        self.root = root

    @property
    def pointer_path(self) -> Path:
        return self.root / CHAMPION_FILE

    # ------------------------------------------------------------------- reads

    def versions(self) -> list[str]:
        """Version names, oldest first by the ``YYYYMMDD-HHMMSS`` in ``<arch>-<date>-<time>-<hash>``
        (the architecture prefix would otherwise decide the order)."""
        if self._only is not None:
            return [self._only]
        try:
            children = list(self.root.iterdir())
        except FileNotFoundError as exc:
            raise RegistryError(f"model registry {self.root} does not exist") from exc
        except OSError as exc:
            raise RegistryError(f"cannot read model registry {self.root}: {exc}") from exc
        return sorted(
            (
                child.name
                for child in children
                if child.is_dir() and not child.name.startswith(".") and _has_version_files(child)
            ),
            key=_chronological,
        )

    def pointer(self) -> ChampionPointer | None:
        """The parsed ``champion.json``; None when there is none."""
        if self._only is not None:
            return None
        try:
            return _pointer_decoder.decode(self.pointer_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            raise RegistryError(f"{self.pointer_path} is unreadable: {exc}") from exc

    def champion(self, symbol: str | None = None) -> str | None:
        """The promoted version (``symbol``'s own champion if it has one, else the shared
        one), or None when nothing was promoted."""
        pointer = self.pointer()
        if pointer is None:
            return None
        own = pointer.symbols.get(symbol) if symbol is not None else None
        return own.version if own is not None and own.version is not None else pointer.version

    def symbol_champions(self) -> dict[str, str]:
        """Symbol -> its own champion, for the symbols that have one."""
        pointer = self.pointer()
        if pointer is None:
            return {}
        return {sym: c.version for sym, c in pointer.symbols.items() if c.version is not None}

    def selected(self) -> str | None:
        """The version :func:`load_forecaster` serves from here: the champion, else the
        newest; None for an empty registry."""
        versions = self.versions()
        champion = self.champion()
        if champion is None:
            return versions[-1] if versions else None
        if champion not in versions:
            raise RegistryError(
                f"champion {champion!r} named in {self.pointer_path} is not in the registry"
            )
        return champion

    def list(self) -> list[VersionInfo]:
        """Every version, oldest first, with hashes recomputed."""
        champion, serves = self.champion(), self._serves()
        return [self._inspect(name, champion, serves)[0] for name in self.versions()]

    def show(self, version: str) -> VersionDetails:
        """One version's manifest and status; :class:`RegistryError` if unknown."""
        self._require_known(version)
        info, manifest = self._inspect(version, self.champion(), self._serves())
        return VersionDetails(info=info, manifest=manifest)

    def _require_known(self, version: str) -> None:
        # Membership in the scanned names is the only check needed before building a path:
        # a name from a URL or the command line never reaches the filesystem otherwise.
        known = self.versions()
        if version not in known:
            listed = ", ".join(known) if known else "none"
            raise RegistryError(
                f"unknown model version {version!r} in {self.root}; known: {listed}"
            )

    def _serves(self) -> dict[str, tuple[str, ...]]:
        """Version -> the symbols it is the own champion of."""
        serves: dict[str, list[str]] = {}
        for symbol, version in sorted(self.symbol_champions().items()):
            serves.setdefault(version, []).append(symbol)
        return {version: tuple(symbols) for version, symbols in serves.items()}

    def _inspect(
        self, name: str, champion: str | None, serves: dict[str, tuple[str, ...]] | None = None
    ) -> tuple[VersionInfo, Manifest | None]:
        path = self.root / name
        problem: str | None = None
        sha256_ok = False
        manifest: Manifest | None = None
        try:
            manifest = read_manifest(path)
        except ModelError as exc:
            problem = str(exc)
        if manifest is not None:
            model_path = path / MODEL_FILE
            try:
                digest = sha256_of(model_path)
            except OSError as exc:
                problem = f"cannot read {model_path}: {exc}"
            else:
                sha256_ok = digest == manifest.sha256
                if not sha256_ok:
                    problem = f"{model_path} has sha256 {digest}, manifest says {manifest.sha256}"
            if problem is None and manifest.version != name:
                # The worker reports manifest.version as what it serves: they must agree.
                problem = f"manifest version {manifest.version!r} differs from directory {name!r}"
        info = VersionInfo(
            version=name,
            path=path,
            kind=None if manifest is None else manifest.architecture.kind,
            created_at=None if manifest is None else manifest.created_at,
            window=None if manifest is None else manifest.window,
            symbols=() if manifest is None else manifest.training_data.symbols,
            interval=None if manifest is None else manifest.training_data.interval,
            metrics={}
            if manifest is None
            else {k: manifest.metrics[k] for k in HEADLINE_METRICS if k in manifest.metrics},
            sha256_ok=sha256_ok,
            is_champion=name == champion,
            champion_for=(serves or {}).get(name, ()),
            problem=problem,
        )
        return info, manifest

    def _verify(self, version: str) -> Manifest:
        """RegistryError unless ``version`` exists, matches its hash and loads; returns
        its manifest."""
        self._require_known(version)
        info, manifest = self._inspect(version, None)
        if info.problem is not None:
            raise RegistryError(f"refusing version {version}: {info.problem}")
        try:
            OnnxForecaster(info.path)  # hashes the bytes it loads, checks the signature
        except ModelError as exc:
            raise RegistryError(f"refusing version {version}: {exc}") from exc
        assert manifest is not None  # an unreadable manifest is a problem
        return manifest

    # ------------------------------------------------------------------ writes

    def promote(
        self, version: str, reason: str, *, force: bool = False, symbol: str | None = None
    ) -> None:
        """Make ``version`` the champion (of ``symbol`` only, when given), recording
        ``reason`` in the history.

        ``force`` only records that the caller overrode (or skipped) its hold-out
        comparison; integrity is checked regardless. Promoting the current champion again
        changes nothing. A version trained without ``symbol`` may serve it (with a warning).
        """
        self._require_writable()
        with self._locked():
            trained_on = self._verify(version).training_data.symbols
            if symbol is not None and trained_on and symbol not in trained_on:
                log.warning("promoting %s for %s although it was trained on %s only",
                            version, symbol, ", ".join(trained_on))
            pointer = self.pointer()
            slot = _slot(pointer, symbol)
            if slot is not None and slot.version == version:
                return
            now = now_ms()
            entry = Promotion(version=version, promoted_at=now, reason=reason, forced=force)
            history = (*_history_of(slot), entry)
            self._write_pointer(_with_slot(
                pointer, symbol, SymbolChampion(version=version, promoted_at=now, history=history)
            ))

    def rollback(self, reason: str = "", *, symbol: str | None = None) -> str:
        """Make the champion before the current one champion again; returns the version now
        serving (``symbol``, when given: its own previous champion, else the shared one).

        Repeated rollbacks walk further back. RegistryError when there is no earlier
        champion or it no longer passes the integrity check (promote another version).
        """
        self._require_writable()
        with self._locked():
            pointer = self.pointer()
            slot = _slot(pointer, symbol)
            whose = "" if symbol is None else f" for {symbol}"
            if pointer is None or slot is None or slot.version is None:
                raise RegistryError(f"no champion{whose} in {self.root}: nothing to roll back")
            history = _history_of(slot)
            stack = _replay(history)
            note = f"rollback from {slot.version}" + (f": {reason}" if reason else "")
            previous: str | None
            serving: str | None
            if len(stack) >= 2:
                previous = serving = stack[-2]
                self._verify(previous)
            elif symbol is not None:
                # A symbol's first own champion rolls back to the shared one; the entry's
                # empty version records that.
                previous, serving = None, pointer.version or self.selected()
                if serving is None:
                    raise RegistryError(f"no shared champion in {self.root} to roll back to")
            else:
                raise RegistryError(
                    f"{slot.version} is the first champion in {self.pointer_path}: "
                    "nothing to roll back to"
                )
            now = now_ms()
            entry = Promotion(version=previous or "", promoted_at=now, reason=note,
                              action="rollback")
            self._write_pointer(_with_slot(pointer, symbol, SymbolChampion(
                version=previous, promoted_at=now, history=(*history, entry)
            )))
            return serving

    def add(self, version_dir: Path) -> str:
        """Copy a trained version directory in (named after its manifest's version) after
        checking its hash, and check the copy again; returns the version. The champion is
        not changed."""
        self._require_writable()
        source = Path(version_dir)
        try:
            manifest = read_manifest(source)
            digest = sha256_of(source / MODEL_FILE)
        except (ModelError, OSError) as exc:
            raise RegistryError(f"cannot add {source}: {exc}") from exc
        if digest != manifest.sha256:
            raise RegistryError(
                f"cannot add {source}: {MODEL_FILE} has sha256 {digest}, "
                f"manifest says {manifest.sha256}"
            )
        name = manifest.version
        if not _VERSION_NAME.fullmatch(name):
            raise RegistryError(f"cannot add {source}: version {name!r} is not a valid name")
        target = self.root / name
        if target.exists():
            raise RegistryError(f"version {name} is already in {self.root}")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # Copy to a hidden directory, then rename: listings never see half a version.
            staging = Path(tempfile.mkdtemp(prefix=".staging-add-", dir=self.root))
        except OSError as exc:
            raise RegistryError(f"cannot write to model registry {self.root}: {exc}") from exc
        try:
            staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a service user
            shutil.copytree(source, staging, dirs_exist_ok=True)
            try:
                OnnxForecaster(staging)  # what lands in the registry is what was verified
            except ModelError as exc:
                raise RegistryError(f"cannot add {source}: {exc}") from exc
            os.replace(staging, target)
        except OSError as exc:
            raise RegistryError(f"cannot add {source} to {self.root}: {exc}") from exc
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already after the rename
        return name

    def _require_writable(self) -> None:
        if self._only is not None:
            raise RegistryError(
                f"{self.root / self._only} is a single version directory, not a registry"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise read-modify-write of champion.json between processes."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            lock = (self.root / _LOCK_FILE).open("a+b")
        except OSError as exc:
            raise RegistryError(f"cannot write to model registry {self.root}: {exc}") from exc
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            yield  # the lock is released when the file closes

    def _write_pointer(self, pointer: ChampionPointer) -> None:
        data = msgspec.json.format(msgspec.json.encode(pointer), indent=2) + b"\n"
        try:
            fd, tmp = tempfile.mkstemp(prefix=".champion-", suffix=".tmp", dir=self.root)
        except OSError as exc:
            raise RegistryError(f"cannot write {self.pointer_path}: {exc}") from exc
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())  # the rename must not land before the bytes
            os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a service user
            os.replace(tmp, self.pointer_path)
        except OSError as exc:
            raise RegistryError(f"cannot write {self.pointer_path}: {exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _chronological(version: str) -> tuple[str, str]:
    parts = version.split("-")
    return ("-".join(parts[1:3]), version) if len(parts) >= 4 else ("", version)


def _slot(pointer: ChampionPointer | None, symbol: str | None) -> SymbolChampion | None:
    """The shared champion slot (``symbol`` None) or the symbol's own; None if absent."""
    if pointer is None:
        return None
    if symbol is None:
        return SymbolChampion(pointer.version, pointer.promoted_at, pointer.history)
    return pointer.symbols.get(symbol)


def _with_slot(
    pointer: ChampionPointer | None, symbol: str | None, slot: SymbolChampion
) -> ChampionPointer:
    base = ChampionPointer() if pointer is None else pointer
    if symbol is None:
        return msgspec.structs.replace(
            base, version=slot.version, promoted_at=slot.promoted_at, history=slot.history
        )
    return msgspec.structs.replace(base, symbols={**base.symbols, symbol: slot})


def _history_of(slot: SymbolChampion | None) -> tuple[Promotion, ...]:
    """The slot's history, with the current champion entered if a hand-written pointer
    left it out (so a rollback can return to it)."""
    if slot is None or slot.version is None:
        return () if slot is None else slot.history
    stack = _replay(slot.history)
    if stack and stack[-1] == slot.version:
        return slot.history
    entry = Promotion(
        version=slot.version, promoted_at=slot.promoted_at,
        reason="champion.json without a matching history entry",
    )
    return (*slot.history, entry)
