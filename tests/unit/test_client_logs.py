"""ProcessLogs / SetLogFilePath: off unless a folder is configured, never a path outside it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from services.wire import Command
from ws_node.agent_session import AgentSession, SessionOptions
from ws_node.client_logs import ClientLogRefused, ClientLogStore, validate_name
from ws_node.creatio_protocol import MsgErrorType


@pytest.mark.parametrize(
    ("given", "stored"),
    [("agent.log", "agent.log"), ("agent", "agent.log"), ("C:\\Logs\\Terrasoft\\cti.log", "cti.log"),
     ("/var/log/creatio/cti.log", "cti.log")],
)
def test_names_reduce_to_a_plain_file_name(given: str, stored: str) -> None:
    assert validate_name(given) == stored


@pytest.mark.parametrize("bad", ["", "..", "../..", "a/..", ".hidden", "x..log", "name with space", "é.log", "a" * 200])
def test_hostile_names_are_refused(bad: str) -> None:
    with pytest.raises(ClientLogRefused):
        validate_name(bad)


def test_store_appends_inside_its_folder_only(tmp_path: Path) -> None:
    store = ClientLogStore(tmp_path / "logs", max_file_bytes=200, max_entry_bytes=100)
    store.append("/etc/passwd", "first line\nwith a newline")
    assert (tmp_path / "logs" / "passwd.log").read_text() == "first line with a newline\n"
    assert not (tmp_path / "passwd.log").exists()
    with pytest.raises(ClientLogRefused, match="exceeds"):
        store.append("a.log", "x" * 150)
    store.append("a.log", "y" * 90)
    store.append("a.log", "y" * 90)
    with pytest.raises(ClientLogRefused, match="full"):
        store.append("a.log", "y" * 90)


def test_a_symlink_planted_in_the_folder_is_not_followed(tmp_path: Path) -> None:
    store = ClientLogStore(tmp_path / "logs")
    outside = tmp_path / "outside.log"
    outside.write_text("")
    os.symlink(outside, tmp_path / "logs" / "evil.log")
    with pytest.raises(ClientLogRefused):
        store.append("evil.log", "text")
    assert outside.read_text() == ""


class Env:
    def __init__(self, store: ClientLogStore | None) -> None:
        self.store = store
        self.frames: list[dict[str, Any]] = []

    def send_frame(self, text: str) -> None:
        self.frames.append(json.loads(text))

    def claim_line(self, session: AgentSession, line: str) -> None: ...

    def release_line(self, session: AgentSession, line: str) -> None: ...

    def request_snapshot(self, session: AgentSession, line: str) -> None: ...

    def request_agent_state(self, session: AgentSession, line: str) -> None: ...

    def submit_command(self, session: AgentSession, command: Command) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def append_client_log(self, session: AgentSession, name: str, text: str) -> None:
        if self.store is None:
            raise ClientLogRefused("disabled")
        self.store.append(name, text)


def opened(env: Env, enabled: bool) -> AgentSession:
    session = AgentSession(env, options=SessionOptions(client_logs=enabled))
    session.on_text(json.dumps({"command": "LoadLibrary", "parameters": {}}))
    params = {"connectionParams": json.dumps({"ExtensionName": "305"})}
    session.on_text(json.dumps({"command": "OpenConnection", "parameters": params}))
    session.on_claimed([])
    env.frames.clear()
    return session


def test_session_writes_client_logs_when_enabled(tmp_path: Path) -> None:
    store = ClientLogStore(tmp_path)
    env = Env(store)
    session = opened(env, enabled=True)
    session.on_text(json.dumps({"command": "ProcessLogs", "parameters": {"logs": "ring shown"}}))
    assert env.frames == []
    assert "ring shown" in (tmp_path / "line-305.log").read_text()
    session.on_text(json.dumps({"command": "SetLogFilePath", "parameters": {"filePath": "C:\\Temp\\tab1.log"}}))
    session.on_text(json.dumps({"command": "ProcessLogs", "parameters": {"logs": "second"}}))
    assert "second" in (tmp_path / "tab1.log").read_text()
    # A path that climbs out only ever names a file inside the folder...
    session.on_text(json.dumps({"command": "SetLogFilePath", "parameters": {"filePath": "../../etc/cron"}}))
    session.on_text(json.dumps({"command": "ProcessLogs", "parameters": {"logs": "third"}}))
    assert "third" in (tmp_path / "cron.log").read_text() and env.frames == []
    # ...and one with no usable name is refused.
    session.on_text(json.dumps({"command": "SetLogFilePath", "parameters": {"filePath": "../.."}}))
    assert env.frames[-1]["eventType"] == 3
    assert json.loads(env.frames[-1]["content"])["errorType"] == MsgErrorType.COMMAND_ERROR


def test_session_refuses_client_logs_when_disabled(tmp_path: Path) -> None:
    env = Env(None)
    session = opened(env, enabled=False)
    session.on_text(json.dumps({"command": "ProcessLogs", "parameters": {"logs": "x"}}))
    error = json.loads(env.frames[-1]["content"])
    assert error["errorType"] == MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR and "disabled" in error["data"]
    assert list(tmp_path.iterdir()) == []
