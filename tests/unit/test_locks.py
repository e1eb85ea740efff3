"""The locks (uv.lock, its export pylock.toml, requirements/) pin what pyproject.toml asks for,
consistently.

`make run`, `make test` and the Dockerfile install only from these files, so a dependency
added to pyproject.toml without `make lock` would go missing at install time, and a range
tightened past the lock would go unnoticed: both fail here, without a network.
"""

import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kit.locks import ROOT, lock_file, read_lock

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
BUILD_REQUIRES = [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
# What each lock installs: the project's dependencies plus these extras.
LOCK_EXTRAS = {"run": [], "train": ["train"], "dev": ["train", "dev"]}
# The packages that come with PyPI's torch and have no place in the serving install.
TORCH_FAMILY = re.compile(r"^(torch|triton|nvidia-.*)$")


def _requirements(extras: list[str]) -> list[Requirement]:
    specs = PROJECT["dependencies"] + [spec for extra in extras for spec in EXTRAS[extra]]
    return [Requirement(spec) for spec in specs]


@pytest.mark.parametrize("lock", sorted(LOCK_EXTRAS))
def test_lock_pins_every_requirement_within_its_range(lock: str) -> None:
    pins = read_lock(lock)
    for requirement in _requirements(LOCK_EXTRAS[lock]) + BUILD_REQUIRES:
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{lock_file(lock)} lacks {requirement.name}: run `make lock`"
        assert requirement.specifier.contains(pin.version, prereleases=True), (
            f"{lock_file(lock)} pins {requirement.name}=={pin.version} outside {requirement}: "
            "run `make lock`"
        )


@pytest.mark.parametrize("lock", [*sorted(LOCK_EXTRAS), "uv"])
def test_every_pin_is_exact_and_hashed(lock: str) -> None:
    pins = read_lock(lock)  # raises on any line that is not `name==version`
    assert pins
    unhashed = sorted(name for name, pin in pins.items() if not pin.hashes)
    assert not unhashed, f"{lock_file(lock)}: no hash for {unhashed}"


@pytest.mark.parametrize(("smaller", "larger"), [("run", "train"), ("train", "dev")])
def test_smaller_locks_are_subsets_at_the_same_versions(smaller: str, larger: str) -> None:
    small, large = read_lock(smaller), read_lock(larger)
    missing = sorted(small.keys() - large.keys())
    assert not missing, f"{lock_file(smaller)} has {missing}, {lock_file(larger)} does not"
    # The same release's files: pylock.toml leaves out those no Python >= 3.11 installs
    # (cp310 wheels), so one lock's hashes may be a subset of the other's.
    differing = {
        name: (pin.version, large[name].version)
        for name, pin in small.items()
        if pin.version != large[name].version
        or not (pin.hashes <= large[name].hashes or large[name].hashes <= pin.hashes)
    }
    assert not differing, f"{lock_file(smaller)} vs {lock_file(larger)}: {differing}"


def test_serving_lock_has_no_torch_and_the_train_lock_has_it() -> None:
    assert not [name for name in read_lock("run") if TORCH_FAMILY.match(name)]
    torch = Requirement(next(spec for spec in EXTRAS["train"] if spec.startswith("torch")))
    assert torch.specifier.contains(read_lock("train")["torch"].version)



def test_pylock_is_the_export_of_uv_lock() -> None:
    """`make lock` resolves uv.lock (the project's lock) and exports pylock.toml from it:
    the two hold the same versions."""
    project = canonicalize_name(PROJECT["name"])
    resolved = {canonicalize_name(package["name"]): package["version"]
                for package in tomllib.loads((ROOT / "uv.lock").read_text())["package"]
                if canonicalize_name(package["name"]) != project}
    exported = {name: pin.version for name, pin in read_lock("dev").items()}
    assert resolved == exported
