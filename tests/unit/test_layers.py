"""Which package may import which: the arrows of the README's architecture, read from the source.

Every import statement counts, including those inside functions (a lazy import is still an arrow).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = ("ami", "services", "ami_gateway", "ws_node", "ami_simulator", "balancer", "local_cluster", "ops", "bench",
        "doctor")
#: package -> packages of ours it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    # The AMI codec and the scenario format are the neutral ground both ends of AMI stand on.
    "ami": frozenset(OURS) - {"ami"},
    # The AMI client and the AMI server share only `ami`: neither may lean on the other.
    "ami_gateway": frozenset({"ami_simulator"}),
    "ami_simulator": frozenset({"ami_gateway", "ws_node", "services"}),
    # The shared core is below every process.
    "services": frozenset(OURS) - {"services"},
    "ws_node": frozenset({"ami_gateway", "ami_simulator"}),
}


def imported_packages(source: str) -> Iterator[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``source``."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module.split(".")[0]


def arrows(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, target in imported_packages(path.read_text()):
            if target in FORBIDDEN[package]:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_arrow(package: str) -> None:
    assert (ROOT / package).is_dir()
    assert arrows(package) == []


def test_the_walk_sees_lazy_imports() -> None:
    source = "import os\nfrom ami.protocol import AmiMessage\ndef f() -> None:\n    from ami_simulator import x\n"
    assert list(imported_packages(source)) == [(1, "os"), (2, "ami"), (4, "ami_simulator")]


def test_the_drill_chaos_and_bench_take_creatio_numbers_from_the_codec() -> None:
    from ws_node.creatio_protocol import MsgEventType

    names = set(MsgEventType.__members__)
    copies = []
    for package in ("ops", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                        and isinstance(node.value.value, int):
                    copies += [f"{path.relative_to(ROOT)}:{node.lineno} {t.id}" for t in node.targets
                               if isinstance(t, ast.Name) and t.id in names]
    assert copies == []
