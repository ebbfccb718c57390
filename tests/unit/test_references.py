"""File paths named in the source (comments, docstrings, messages) and the docs name files that exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = ("ami", "ami_gateway", "ami_simulator", "balancer", "bench", "compose", "docs", "doctor", "local_cluster", "ops",
       "scripts", "services", "tests", "ws_node")
# A path of ours: one of the top folders, then folders and a file with an extension we keep.
PATH_RE = re.compile(r"(?<![\w./-])(?:" + "|".join(TOP) + r")/[\w./-]*\.(?:py|md|j2|yml|yaml|json|sh|js|ami|conf)\b")


def test_every_path_named_in_the_source_exists() -> None:
    missing = []
    files = [*ROOT.glob("*.md")]
    files += [p for top in TOP for pattern in ("*.py", "*.md") for p in (ROOT / top).rglob(pattern)]
    for path in sorted(p for p in files if "node_modules" not in p.parts):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            missing += [f"{path.relative_to(ROOT)}:{number}: {ref}" for ref in PATH_RE.findall(line)
                        if not (ROOT / ref).exists()]
    assert missing == []


def test_the_pattern_finds_a_path_in_a_comment() -> None:
    assert PATH_RE.findall("# see ws_node/__main__.py and docs/gateway.md, not http://x/docs/a.md") == [
        "ws_node/__main__.py", "docs/gateway.md"]
