"""The node's garbage-collector settings once started (ws_node/__main__.py, ``settle_heap``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_start_up_objects_are_frozen_and_full_collections_are_rarer() -> None:
    # In a process of its own: the collector's settings are process-wide.
    probe = (
        "import gc, json; from ws_node.__main__ import settle_heap, FULL_COLLECTION_EVERY;"
        "before = gc.get_threshold(); settle_heap();"
        "print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count(), FULL_COLLECTION_EVERY]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    before, after, frozen, every = json.loads(done.stdout)
    assert after == [before[0], before[1], every]
    assert every >= 10 * before[2]  # a tenth of the default's full collections, at most
    assert frozen > 10_000
