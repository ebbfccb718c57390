"""The pure security rules (issue 12): who may open a line, contexts, command budgets, debug budgets,
counting every inbound record, error texts, log rotation."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from ami_gateway.command_plan import plan_command
from ami_gateway.lines import LineMatcher
from services import logs
from services.config import AsteriskConfig, ConfigError, load_settings
from services.line_access import SecurityConfig, UserAssignment, Verdict, decide, originate_context_refusal
from services.wire import CommandName, DialArgs
from tests.unit.test_agent_session import FakeEnv, cmd, content, open_cmd
from tests.unit.test_gateway_command_plan import View
from ws_node import creatio_protocol as cp
from ws_node.admission import (
    AdmissionPolicy,
    CommandLimit,
    CommandLimiter,
    DebugBudget,
    RateGuard,
    RateVerdict,
    parse_command_limits,
)
from ws_node.agent_session import AgentSession, SessionOptions, SessionState
from ws_node.creatio_protocol import MsgErrorType

ALICE, BOB, CAROL = "aaaaaaaa-0000-0000-0000-000000000001", "bbbbbbbb-0000-0000-0000-000000000002", "c-3"
SECURITY = SecurityConfig(
    users=(UserAssignment(ALICE, "305", name="Alice", debug=True), UserAssignment(BOB, "306"),
           UserAssignment(BOB, "316")),
    shared_lines=frozenset({"100"}),
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---- who may open a line ---------------------------------------------------------------------------


def test_an_assigned_line_opens_only_for_its_users_whatever_the_case_of_the_uid() -> None:
    assert decide(SECURITY, "305", ALICE.upper()).verdict is Verdict.ALLOW
    refused = decide(SECURITY, "305", BOB)
    assert (refused.verdict, refused.reason) == (Verdict.REFUSE, "assigned_to_other")
    assert refused.message == "line 305 is assigned to another user"
    assert decide(SECURITY, "305", "").verdict is Verdict.REFUSE


def test_a_user_with_assignments_opens_only_those_lines() -> None:
    refused = decide(SECURITY, "307", BOB)
    assert (refused.reason, refused.message) == ("not_your_line", "this user is assigned line(s) 306, 316, not 307")
    assert decide(SECURITY, "316", BOB).allowed


def test_first_come_holds_an_unassigned_line_unless_it_is_shared() -> None:
    assert decide(SECURITY, "307", CAROL).verdict is Verdict.FIRST_COME  # ask the holder store
    assert decide(SECURITY, "307", CAROL, holders=[]).verdict is Verdict.ALLOW
    assert decide(SECURITY, "307", CAROL, holders=[CAROL.upper()]).verdict is Verdict.ALLOW  # own other tab
    held = decide(SECURITY, "307", "d-4", holders=[CAROL])
    assert (held.verdict, held.reason, held.message) == (
        Verdict.REFUSE, "held_by_other", "line 307 is in use by another user"
    )
    assert decide(SECURITY, "100", "d-4", holders=[CAROL]).verdict is Verdict.ALLOW
    strict = SecurityConfig(require_assignment=True)
    assert decide(strict, "307", CAROL).reason == "unassigned"


def write(tmp_path: Path, document: dict[str, Any]) -> Path:
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps(document))
    return path


def test_the_security_block_is_read_case_insensitively(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {
        "Asterisk": {"originateContext": "from-internal", "AllowedOriginateContexts": "from-vip, from-sales"},
        "security": {"Users": [{"UserUId": ALICE, "Line": 305, "Name": "Alice", "OriginateContext": "from-vip",
                                "Debug": "true"}],
                     "sharedLines": ["100"], "requireAssignment": "false", "debugLinesPerMinute": "30"},
    }), env={})
    assert settings.asterisk.allowed_originate_contexts == ("from-vip", "from-sales")
    security = settings.security
    assert security.assignment(ALICE, "305") == UserAssignment(ALICE, "305", "Alice", "from-vip", True)
    assert security.shared_lines == {"100"} and security.debug_lines_per_minute == 30
    assert load_settings(None, env={}).security == SecurityConfig()


@pytest.mark.parametrize(
    ("security", "asterisk", "message"),
    [
        ({"users": [{"line": "305"}]}, {}, "Security.users[0].userUId: required"),
        ({"users": [{"userUId": ALICE, "line": "3 05"}]}, {}, "Security.users[0].line: required"),
        ({"users": [{"userUId": ALICE, "line": "305", "originateContext": "from-trunk"}]}, {},
         "Security.users[0].originateContext: 'from-trunk' must also be listed in Asterisk.allowedOriginateContexts"),
        ({"users": [{"userUId": ALICE, "line": "305"}, {"userUId": ALICE.upper(), "line": "305"}]}, {},
         "is given line 305 twice"),
        ({"users": {}}, {}, "Security.users: expected a list"),
        ({"sharedLine": ["1"]}, {}, "Security: unknown key(s) sharedline"),
        ({"users": [{"userUId": ALICE, "line": "305", "debug": "maybe"}]}, {}, "Security.users[0].debug"),
        ({}, {"allowedOriginateContexts": ["ok", "not ok"]}, "Asterisk.allowedOriginateContexts: 'not ok'"),
    ],
)
def test_a_bad_security_block_names_the_key(
    tmp_path: Path, security: dict[str, Any], asterisk: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, {"Asterisk": asterisk, "Security": security}), env={})
    assert message in str(info.value)


# ---- contexts -------------------------------------------------------------------------------------


def test_one_validator_allows_the_default_and_the_listed_contexts_only() -> None:
    config = AsteriskConfig(originate_context="from-internal", allowed_originate_contexts=("from-vip",))
    assert originate_context_refusal("from-internal", config) is None
    assert originate_context_refusal("from-vip", config) is None
    refusal = originate_context_refusal("from-trunk", config)
    assert refusal is not None and "'from-trunk' is not allowed on this server (allowed: from-internal, from-vip)" \
        in refusal
    assert originate_context_refusal("a b", config) == "bad dialplan context 'a b'"
    assert originate_context_refusal("x\r\nAction: Hangup", AsteriskConfig(originate_context="x\r\nAction: Hangup")) \
        == "bad dialplan context 'x\\r\\nAction: Hangup'"  # even the default cannot end an AMI header


def test_a_context_the_configuration_allows_is_one_the_node_and_the_gateway_allow(tmp_path: Path) -> None:
    # The node's and the gateway's patterns used to disagree about '.', and the configuration's too.
    settings = load_settings(write(tmp_path, {"Asterisk": {"allowedOriginateContexts": "from-crm.vip"}}), env={})
    session, env = session_with(SecurityConfig(), asterisk=settings.asterisk)
    open_as(session, CAROL, "307", OriginateContext="from-crm.vip")
    assert [f["eventType"] for f in env.take()] == [2]  # CONNECTION_CREATED, no error
    session.on_text(cmd("MakeCall", {"targetAddress": "200"}))
    (command,) = env.commands
    assert command.args == DialArgs("200", context="from-crm.vip")
    plan = plan_command(command, View(), settings.asterisk, LineMatcher(protocol="SIP"))
    assert plan.data["context"] == "from-crm.vip"


def session_with(security: SecurityConfig = SECURITY, **kw: Any) -> tuple[AgentSession, FakeEnv]:
    env = FakeEnv()
    kw.setdefault("asterisk", AsteriskConfig(originate_context="from-internal",
                                             allowed_originate_contexts=("from-vip",)))
    options = SessionOptions(security=security, **kw)
    session = AgentSession(env, options=options, clock=lambda: 1000.0, new_id=lambda: "cmd-1")
    session.on_text(cmd("LoadLibrary", {}))
    env.take()
    return session, env


def open_as(session: AgentSession, user: str, line: str, **params: Any) -> None:
    session.on_text(cmd("OpenConnection", {
        "connectionParams": json.dumps({"ExtensionName": line, **params}),
        "sessionServiceParams": json.dumps({"UserUId": user}),
    }))
    session.on_claimed([])


def test_a_context_the_admin_did_not_allow_is_reported_at_open_and_refuses_every_dialling_command() -> None:
    session, env = session_with()
    open_as(session, CAROL, "307", OriginateContext="from-trunk")
    created, error = env.take()
    assert created["eventType"] == 2 and session.state is SessionState.OPEN  # the line still rings
    assert error["eventType"] == 3 and content(error)["errorType"] == MsgErrorType.CONNECTION_CONFIG_ERROR
    assert "OriginateContext: dialplan context 'from-trunk' is not allowed" in content(error)["data"]
    session.on_text(cmd("MakeCall", {"targetAddress": "200"}))
    (refused,) = env.take()
    assert content(refused)["errorType"] == MsgErrorType.COMMAND_ERROR
    assert "make_call: dialplan context 'from-trunk'" in content(refused)["data"]
    assert env.commands == []


def test_the_admins_context_for_the_user_wins_and_only_an_override_travels() -> None:
    security = SecurityConfig(users=(UserAssignment(ALICE, "305", originate_context="from-vip"),))
    session, env = session_with(security)
    open_as(session, ALICE, "305", OriginateContext="from-trunk")  # the browser's value is ignored
    assert [f["eventType"] for f in env.take()] == [2]
    session.on_text(cmd("MakeCall", {"targetAddress": "200"}))
    assert env.commands.pop().args == DialArgs("200", context="from-vip")
    open_as(session, CAROL, "307", OriginateContext="from-internal")  # the default is the gateway's
    env.take()
    session.on_text(cmd("MakeCall", {"targetAddress": "200"}))
    assert env.commands.pop().args == DialArgs("200")


# ---- a refused line -------------------------------------------------------------------------------


def test_a_refused_line_gets_an_error_and_a_final_disconnect_and_nothing_else() -> None:
    session, env = session_with()
    session.on_text(cmd("OpenConnection", {"connectionParams": json.dumps({"ExtensionName": "305"}),
                                           "sessionServiceParams": json.dumps({"UserUId": BOB})}))
    env.take()
    session.on_line_refused("305", "line 305 is assigned to another user")
    error, disconnected = env.take()
    assert content(error)["errorType"] == MsgErrorType.CONNECTION_CONFIG_ERROR
    assert content(error)["data"] == "line 305 is assigned to another user"
    assert disconnected["eventType"] == 14 and disconnected["privateData"] == {"ignoreTryReconnection": True}
    assert session.state is SessionState.LIBRARY and session.line is None
    session.on_text(cmd("DropCall", {}))
    assert "connection is not open" in content(env.take()[0])["data"]


# ---- command budgets ------------------------------------------------------------------------------


def test_commands_share_their_lines_budget_across_connections_and_recover() -> None:
    clock = Clock()
    limiter = CommandLimiter({"originate": CommandLimit(3, 6)}, clock)
    assert [limiter.check("305", CAROL, CommandName.MAKE_CALL) for _ in range(3)] == [None, None, None]
    refusal = limiter.check("305", "someone-else", CommandName.MAKE_CALL)  # another tab, another user
    assert refusal == ("too many originate commands from line 305 (limit 3 at once, 6 a minute): "
                       "try again in 10 s")
    assert limiter.check("305", CAROL, CommandName.HANGUP) is None  # a kind without a limit here
    clock.now += 10
    assert limiter.check("305", CAROL, CommandName.MAKE_CALL) is None
    assert limiter.check("305", CAROL, CommandName.MAKE_CALL) is not None


def test_a_user_cannot_escape_the_budget_by_spreading_over_lines() -> None:
    limiter = CommandLimiter({"dtmf": CommandLimit(2, 60)}, Clock())
    assert limiter.check("305", ALICE, CommandName.DTMF) is None
    assert limiter.check("306", ALICE, CommandName.DTMF) is None
    refusal = limiter.check("307", ALICE, CommandName.DTMF)
    assert refusal is not None and "from this user" in refusal
    assert limiter.check("307", BOB, CommandName.DTMF) is None  # line 307's own budget was not taken


def test_command_limit_specs() -> None:
    limits = parse_command_limits("originate=2:10, dtmf=0:0")
    assert limits["originate"] == CommandLimit(2, 10) and limits["dtmf"] == CommandLimit(0, 0)
    assert limits["state"].burst > 0
    for bad in ("originate=2", "fax=1:1", "originate=0:5"):
        with pytest.raises(ValueError, match="command limit"):
            parse_command_limits(bad)
    off = CommandLimiter(limits, Clock())
    assert all(off.check("305", ALICE, CommandName.DTMF) is None for _ in range(1000))


# ---- every inbound message counts ----------------------------------------------------------------


def test_a_batch_costs_one_per_record_and_a_flood_is_disconnected_at_once() -> None:
    clock = Clock()
    guard = RateGuard(AdmissionPolicy(messages_per_second=20, message_burst=60, flood_tolerance=50), clock)
    assert guard.check(60) is RateVerdict.ACCEPT
    assert guard.check(1) is RateVerdict.REFUSE_AND_WARN
    assert guard.check(400) is RateVerdict.DISCONNECT
    fresh = RateGuard(AdmissionPolicy(), clock)
    assert fresh.check(59) is RateVerdict.ACCEPT
    assert fresh.check(2) is RateVerdict.REFUSE_AND_WARN  # none taken: the whole batch is refused
    assert fresh.check(1) is RateVerdict.ACCEPT


# ---- debugging ------------------------------------------------------------------------------------


def test_debug_mode_only_for_users_the_admin_allows(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ws_node.agent_session")
    session, env = session_with()
    open_as(session, CAROL, "307", debugMode=True)
    assert session.debug_mode is False
    assert "debugMode refused" in caplog.text and "debug in" not in caplog.text
    allowed, _ = session_with()
    open_as(allowed, ALICE, "305", debugMode=True)
    assert allowed.debug_mode is True and "debug in" in caplog.text


def test_debug_lines_are_bounded_per_user_in_number_and_length(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    budget = DebugBudget(lines_per_minute=5, max_chars=100, clock=clock)
    caplog.set_level(logging.INFO, "ws_node.agent_session")
    tabs = [session_with(debug_budget=budget)[0] for _ in range(3)]
    for tab in tabs:
        open_as(tab, ALICE, "305", debugMode=True)
    for _ in range(50):
        for tab in tabs:
            tab.on_text(cmd("QueryLineState", {}, padding="x" * 5000))
    debug_lines = [r for r in caplog.records if r.getMessage().startswith("debug ")]
    assert len(debug_lines) == 5  # one budget for the user's three tabs
    assert all(len(r.getMessage()) < 400 for r in debug_lines)
    clock.now += 60
    caplog.clear()
    tabs[0].on_text(cmd("QueryLineState", {}))
    assert any("lines not logged (over 5 a minute)" in r.getMessage() for r in caplog.records)


def test_a_debug_frame_cannot_forge_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "ws_node.agent_session")
    session, _env = session_with()
    open_as(session, ALICE, "305", debugMode=True)
    session.on_text('{"command":"QueryLineState",\n"x":"\r\n2026-12-07 ws_node INFO forged"}')
    forged = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert forged and all("\n" not in m and "\r" not in m for m in forged)


def test_rotating_log_file(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.configure("test", log_file=str(tmp_path / "node.log"), max_bytes=10_000, backups=2)
        for i in range(2000):
            logging.getLogger("flood").info("line %d %s", i, "y" * 50)
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["node.log", "node.log.1", "node.log.2"]
    assert all((tmp_path / name).stat().st_size <= 10_000 for name in files)


# ---- error texts -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("[" * 5000 + "]" * 5000, "message is not JSON: nested too deeply"),
        ('{"a":' + "1" * 5000 + "}", "message is not JSON: a value is out of range (e.g. a number too long)"),
        ("{", "message is not JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ],
)
def test_json_errors_say_what_is_wrong_with_the_input_not_with_python(frame: str, expected: str) -> None:
    with pytest.raises(cp.ProtocolError) as info:
        cp.decode_client_message(frame, max_bytes=1 << 20)
    assert info.value.message == expected
    assert "recursion" not in expected and "digits" not in expected


def test_open_cmd_helper_still_opens() -> None:  # the shared helper of these tests
    session, env = session_with(SecurityConfig())
    session.on_text(open_cmd())
    assert env.take()[0]["eventType"] == 2


# ---- the whole-request deadline (slowloris), without sockets --------------------------------------


def _channel(deadline: float) -> tuple[Any, Any, Any]:
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    from ws_node.http_deadline import BoundedHTTPChannel

    clock = MemoryReactorClock()
    root = Resource()
    root.putChild(b"health", _Static(b"ok"))
    site = Site(root, reactor=clock)
    site_any: Any = site
    site_any.protocol = lambda: BoundedHTTPChannel(deadline)
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport, clock


class _Static:
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        self.body = body

    def render(self, request: Any) -> bytes:
        return self.body

    def getChildWithDefault(self, name: bytes, request: Any) -> Any:
        return self


def test_a_request_dribbled_a_line_at_a_time_is_cut_at_the_deadline() -> None:
    channel, transport, clock = _channel(10.0)
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    for _ in range(9):  # a header a second: the idle timer alone would never fire
        clock.advance(1)
        channel.dataReceived(b"X-Slow: y\r\n")
    assert not transport.disconnecting
    clock.advance(1.1)
    assert transport.disconnecting  # aborted


def test_a_complete_request_is_not_cut_and_the_next_one_gets_its_own_deadline() -> None:
    channel, transport, clock = _channel(10.0)
    clock.advance(5)
    channel.dataReceived(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"200 OK" in transport.value()
    clock.advance(9)
    assert not transport.disconnecting
    channel.dataReceived(b"GET /health HTTP/1.1\r\n")  # the next request starts its own 10 s
    clock.advance(9.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting
