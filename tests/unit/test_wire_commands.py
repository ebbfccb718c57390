"""Typed command arguments (services/wire.py): one frozen type per command, checked on decode, and a wire
that version-1 nodes and gateways still read."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.wire import (
    COMMAND_ARGS,
    BadCommand,
    CallArgs,
    Command,
    CommandName,
    DialArgs,
    DndArgs,
    DndMode,
    NoArgs,
    PauseArgs,
    RecordOwnerArgs,
    WrapUpArgs,
    command_args,
)


def raw(name: str, args: Any, **envelope: Any) -> bytes:
    return json.dumps({"v": 1, "id": "c1", "line": "305", "name": name, "args": args, "issued_at": 5.0,
                       **envelope}).encode()


def test_every_command_has_an_argument_type_and_round_trips() -> None:
    assert set(COMMAND_ARGS) == set(CommandName)
    samples = {DialArgs: DialArgs("5551234", "from-vip"), RecordOwnerArgs: RecordOwnerArgs("c0ffee", "https://x", "u")}
    for name, kind in COMMAND_ARGS.items():
        args = samples.get(kind) or command_args(name, {"number": "1", "digits": "1", "call_id": "a1"})
        command = Command("c1", "305", name, args, 5.0)
        assert Command.decode(command.encode()) == command


def test_an_older_nodes_strings_are_read_and_unknown_fields_ignored() -> None:
    assert Command.decode(raw("wrap_up", {"active": "false"})).args == WrapUpArgs(active=False)
    assert Command.decode(raw("wrap_up", {"active": " TRUE "})).args == WrapUpArgs(active=True)
    assert Command.decode(raw("set_dnd", {"mode": "On"})).args == DndArgs(DndMode.ON)
    assert Command.decode(raw("agent_unpause", {"from_a_newer_node": "x"})).args == NoArgs()
    assert Command.decode(raw("agent_pause", {"reason": "Lunch", "state_code": "Paused"})).args == \
        PauseArgs("Lunch", "Paused")
    assert Command.decode(raw("hangup", None)).args == CallArgs()


def test_an_older_gateway_reads_a_new_nodes_boolean() -> None:
    # What a version-1 gateway did with every argument: str() of the JSON value, then lower().
    for active in (True, False):
        body = json.loads(Command("c1", "305", CommandName.WRAP_UP, WrapUpArgs(active)).encode())
        assert body["args"] == {"active": active}
        assert (str(body["args"]["active"]).strip().lower() == "true") is active


@pytest.mark.parametrize(
    ("name", "args", "message"),
    [
        ("make_call", {}, "bad command: make_call.number is missing"),
        ("make_call", {"number": 5551234}, "bad command: make_call.number must be a string, not int"),
        ("wrap_up", {"active": "yes"}, "bad command: wrap_up.active must be true or false, not 'yes'"),
        ("set_dnd", {"mode": "maybe"}, "bad command: set_dnd.mode must be one of on, off, toggle, not 'maybe'"),
        ("dtmf", {"digits": ["1"]}, "bad command: dtmf.digits must be a string, not list"),
        ("record_owner", {"user": "u"}, "bad command: record_owner.contact is missing"),
        ("hangup", ["a1"], "bad command: hangup: args must be an object"),
    ],
)
def test_bad_arguments_name_the_command_and_the_field(name: str, args: Any, message: str) -> None:
    with pytest.raises(BadCommand) as info:
        Command.decode(raw(name, args))
    assert str(info.value) == message
    assert info.value.command_id == "c1"  # the sender can still be answered


def test_a_command_carries_the_type_of_its_name() -> None:
    with pytest.raises(TypeError, match="hangup takes CallArgs, not DialArgs"):
        Command("c1", "305", CommandName.HANGUP, DialArgs("1"))
    assert Command("c1", "305", CommandName.HOLD).args == CallArgs()
    with pytest.raises(BadCommand, match="make_call.number is missing"):
        Command("c1", "305", CommandName.MAKE_CALL)
    with pytest.raises(TypeError, match="hold carries CallArgs, not DialArgs"):
        Command("c1", "305", CommandName.HOLD).args_as(DialArgs)
