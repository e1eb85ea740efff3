"""The dependency locks (written by `make lock`), read as pins: pylock.toml at the root (the
test environment, PEP 751) and requirements/<name>.txt (pip's hash-checking format)."""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCKS_DIR = ROOT / "requirements"
# The lock named "dev" (what `make test` installs) is pylock.toml.
PYLOCK = ROOT / "pylock.toml"

# One requirement of pip's hash-checking format, continuation lines joined:
# `name==version [; marker] --hash=sha256:... --hash=sha256:...`
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)\s*(?:;\s*(.+?))?\s*((?:--hash=\S+\s*)*)$")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


@dataclass(frozen=True)
class Pin:
    version: str
    marker: str | None
    hashes: frozenset[str]


def lock_file(name: str) -> str:
    """The file of lock ``name``, as the messages name it."""
    return "pylock.toml" if name == "dev" else f"requirements/{name}.txt"


def read_lock(name: str) -> dict[str, Pin]:
    """Lock ``name`` ("dev": pylock.toml, else ``requirements/<name>.txt``) as {canonical
    package name: pin}; raises ValueError on a requirement not pinned to one version."""
    if name == "dev":
        return _read_pylock()
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


def _read_pylock() -> dict[str, Pin]:
    pins: dict[str, Pin] = {}
    for package in tomllib.loads(PYLOCK.read_text())["packages"]:
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        hashes = frozenset(file["hashes"]["sha256"] for file in files)
        if "version" not in package:
            raise ValueError(f"pylock.toml: {package['name']} is not pinned to a version")
        pins[canonicalize_name(package["name"])] = Pin(package["version"],
                                                       package.get("marker"), hashes)
    return pins
