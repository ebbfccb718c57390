"""ProcessLogs / SetLogFilePath: Creatio's "start processing logs" and "the file from which logs will be processed"
(CMS replaying a recorded PBX log). A browser must not make the cluster replay calls, so both are refused with
ERROR(4), whatever they carry and whatever the node was started with; nothing a client sends reaches a file."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_agent_session import FakeEnv, cmd, content, new_session, open_cmd, opened
from ws_node.__main__ import build_parser, obsolete_settings
from ws_node.creatio_protocol import MsgErrorType

HOSTILE_PARAMS: list[dict[str, Any] | None] = [
    None,
    {},
    {"filePath": "C:\\Logs\\Terrasoft\\cti.log"},
    {"filePath": "/etc/passwd"},
    {"filePath": "../../../var/spool/cron/root"},
    {"logs": "Event: Newchannel\r\nChannel: SIP/305-1\r\n\r\n" * 200},
    {"filePath": "x", "logs": ["not", {"a": "string"}]},
]


def refusal(env: FakeEnv) -> dict[str, Any]:
    frames = env.take()
    assert len(frames) == 1 and frames[0]["eventType"] == 3, frames
    error: dict[str, Any] = content(frames[0])
    return error


@pytest.mark.parametrize("params", HOSTILE_PARAMS)
@pytest.mark.parametrize("name", ["ProcessLogs", "SetLogFilePath"])
def test_log_replay_commands_are_refused_whatever_they_carry(name: str, params: dict[str, Any] | None) -> None:
    session, env = opened()
    session.on_text(cmd(name, params))
    error = refusal(env)
    assert error["errorType"] == MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR
    # what Creatio's client logs: which command, that it is refused, and the admin's way to replay
    assert error["data"].startswith(f"{name} is refused") and "Asterisk.filePath" in error["data"]
    assert "\n" not in error["data"]
    assert env.commands == [] and env.closed == []
    # the session carries on as before
    session.on_text(cmd("QueryLineState"))
    assert [f["eventType"] for f in env.take()] == [11]


@pytest.mark.parametrize("name", ["ProcessLogs", "SetLogFilePath"])
def test_before_open_connection_the_refusal_says_why_not_that_the_connection_is_closed(name: str) -> None:
    session, env = new_session()
    session.on_text(cmd("LoadLibrary", {"AssemblyName": "Terrasoft.Messaging.Asterisk"}))
    env.take()
    session.on_text(cmd(name, {"filePath": "cti.log"}))
    error = refusal(env)
    assert error["errorType"] == MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR and "refused" in error["data"]
    # and the connection opens normally afterwards
    session.on_text(open_cmd())
    assert [f["eventType"] for f in env.take()] == [2]


def test_a_file_path_then_process_logs_is_still_refused() -> None:
    """The pair Creatio sends (the file, then "start"): the first refusal leaves nothing behind for the second."""
    session, env = opened()
    session.on_text(cmd("SetLogFilePath", {"filePath": "C:\\Logs\\cti.log"}))
    session.on_text(cmd("ProcessLogs", {}))
    errors = [content(f) for f in env.take()]
    assert [e["errorType"] for e in errors] == [MsgErrorType.COMMAND_NOT_IMPLEMENTED_ERROR] * 2
    assert errors[1]["data"].startswith("ProcessLogs is refused")


def test_the_old_client_log_dir_is_accepted_and_reported_as_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    assert obsolete_settings(build_parser().parse_args([])) == []
    [warning] = obsolete_settings(build_parser().parse_args(["--client-log-dir", "/var/log/cms-client"]))
    assert warning.startswith("--client-log-dir / CMS_NODE_CLIENT_LOG_DIR is ignored") and "\n" not in warning
    assert "refused" in warning and "remove the setting" in warning
    monkeypatch.setenv("CMS_NODE_CLIENT_LOG_DIR", "/var/log/cms-client")
    assert obsolete_settings(build_parser().parse_args([])) == [warning]

