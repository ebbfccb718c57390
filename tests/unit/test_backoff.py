from __future__ import annotations

import random

from services.backoff import Backoff


def test_delays_grow_are_capped_and_jittered() -> None:
    backoff = Backoff(initial=0.5, maximum=8.0, rand=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5
    jittered = Backoff(initial=0.5, maximum=8.0, rand=random.Random(1).random)
    delays = [jittered.next_delay() for _ in range(50)]
    assert all(0.25 <= d <= 8.0 for d in delays) and len(set(delays)) > 40
