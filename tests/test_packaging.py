"""pyproject.toml's version ranges are the ones CI tests.

CI's oldest leg installs with `.ci/oldest.txt` as pip's constraints, so each pin
there must be exactly the lower bound pyproject.toml declares: a raised bound
without its pin (or a pin without its bound) would make "the oldest versions we
declare" untested.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    bounds = {}
    for spec in specs:
        m = re.match(r"^([A-Za-z0-9_.\-]+)(\[[^\]]*\])?\s*(.*)$", spec)
        name = m.group(1).lower()
        lower = re.search(r">=\s*([0-9][^,\s]*)", m.group(3))
        if lower:
            bounds[name] = lower.group(1)
    return bounds


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def test_every_pin_of_the_oldest_leg_is_a_declared_lower_bound():
    bounds, pins = _lower_bounds(), _pins()
    assert pins, ".ci/oldest.txt pins nothing"
    for name, version in pins.items():
        assert name in bounds, f"{name} is pinned in .ci/oldest.txt but not declared"
        assert bounds[name] == version, (
            f"{name}: pyproject.toml declares >= {bounds[name]} but CI's oldest leg "
            f"tests {version}: make them equal"
        )


def test_the_runtime_dependencies_and_flax_are_all_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {
        re.match(r"[A-Za-z0-9_.\-]+", d).group(0).lower()
        for d in project["dependencies"]
    }
    assert runtime | {"flax"} <= set(_pins())
