"""The scenarios shipped with the simulator (``ami_simulator/scenarios/*.ami``), by name.

The format and its loader are :mod:`ami.scenario`; this module only knows where the simulator keeps
its own files.
"""

from __future__ import annotations

import re
from importlib import resources

from ami.scenario import Scenario, ScenarioError, load_scenario

__all__ = ["builtin_scenario", "builtin_scenario_names"]

_CACHE: dict[str, Scenario] = {}


def builtin_scenario_names() -> list[str]:
    """Names of the scenarios shipped in ``ami_simulator/scenarios``."""
    folder = resources.files("ami_simulator") / "scenarios"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".ami"))


def builtin_scenario(name: str) -> Scenario:
    """A shipped scenario by name (``inbound-direct-answered``...), loaded once."""
    scenario = _CACHE.get(name)
    if scenario is None:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ScenarioError(f"bad scenario name {name!r}")
        resource = resources.files("ami_simulator") / "scenarios" / f"{name}.ami"
        if not resource.is_file():
            raise ScenarioError(f"no scenario named {name!r}; known: {', '.join(builtin_scenario_names())}")
        scenario = load_scenario(resource.read_bytes(), name=name)
        _CACHE[name] = scenario
    return scenario
