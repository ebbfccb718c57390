"""StreamPosition: the one shape of a line's stream position (services/wire.py)."""

from __future__ import annotations

import pytest

from services.wire import LINE_START, EventType, LineEvent, StreamPosition

P = StreamPosition


def test_epochs_compare_as_numbers_and_no_epoch_comes_first() -> None:
    assert P("999", 50) < P("1000", 1)  # as text, "999" > "1000"
    assert LINE_START < P("1", 0) < P("1", 1) < P("2", 0)
    assert sorted([P("1000", 2), P("", 0), P("999", 7), P("1000", 1)]) == [
        P("", 0), P("999", 7), P("1000", 1), P("1000", 2),
    ]
    assert P("5", 3) >= P("5", 3) and P("5", 3) <= P("5", 3) and not P("5", 3) > P("5", 3)
    assert P("1000", 1).newer_epoch_than(P("999", 80)) and not P("999", 80).newer_epoch_than(P("999", 1))


def test_positions_are_values() -> None:
    assert P("7", 2) == P("7", 2) and P("7", 2) != P("7", 3)
    assert len({P("7", 2), P("7", 2), LINE_START}) == 2
    assert LineEvent("305", EventType.RING_STARTED, "7", 2).position == P("7", 2)
    assert str(P("7", 2)) == "7/2" and str(LINE_START) == "-/0"


@pytest.mark.parametrize("position", [P("1718000000000", 42), LINE_START, P("3", 0)])
def test_the_stored_form_reads_back(position: StreamPosition) -> None:
    assert P.decode(position.encode()) == position
    assert P.decode(position.encode().encode()) == position


@pytest.mark.parametrize("raw", [None, "", "17", "17 x", "17 -3", b"\xff"])
def test_anything_else_reads_as_no_position(raw: bytes | str | None) -> None:
    assert P.decode(raw) is None
