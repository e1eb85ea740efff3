"""The dependency locks in requirements/ (written by `make lock`), read as pins."""

import re
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

LOCKS_DIR = Path(__file__).resolve().parents[2] / "requirements"

# One requirement of pip's hash-checking format, continuation lines joined:
# `name==version [; marker] --hash=sha256:... --hash=sha256:...`
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)\s*(?:;\s*(.+?))?\s*((?:--hash=\S+\s*)*)$")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Pin:
    version: str
    marker: str | None
    hashes: frozenset[str]


def read_lock(name: str) -> dict[str, Pin]:
    """``requirements/<name>.txt`` as {canonical package name: pin}; raises ValueError on a
    requirement that is not pinned to one version."""
    text = (LOCKS_DIR / f"{name}.txt").read_text().replace("\\\n", " ")
    pins: dict[str, Pin] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"{name}.txt: not a pinned requirement: {line[:80]!r}")
        package, version, marker, hashes = match.groups()
        pins[canonicalize_name(package)] = Pin(version, marker, frozenset(_HASH.findall(hashes)))
    return pins
