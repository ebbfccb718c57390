"""The AMI simulator over real TCP on 127.0.0.1 (ephemeral ports), driven like the gateway drives Asterisk."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ami.protocol import AmiMessage, AmiParser, Banner, encode_action, md5_login_key
from ami_simulator.server import AmiSimulator, User, parse_classes

SECRET = "s3cret"
TIMEOUT = 10.0


class Client:
    """A minimal AMI client for tests: actions with ActionIDs, events queued in arrival order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = AmiParser()
        self.inbox: list[AmiMessage | Banner] = []
        self.ids = itertools.count(1)

    open_clients: list[Client] = []

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        cls.open_clients.append(client)
        return client

    async def next(self, pred: Callable[[AmiMessage | Banner], bool] = lambda m: True) -> AmiMessage | Banner:
        async def go() -> AmiMessage | Banner:
            while True:
                for i, m in enumerate(self.inbox):
                    if pred(m):
                        return self.inbox.pop(i)
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("closed")
                self.parser.receive_data(data)
                while (item := self.parser.next_event()) is not None:
                    assert isinstance(item, AmiMessage | Banner), item
                    self.inbox.append(item)

        return await asyncio.wait_for(go(), TIMEOUT)

    async def event(self, name: str, **match: str) -> AmiMessage:
        def pred(m: AmiMessage | Banner) -> bool:
            return isinstance(m, AmiMessage) and m.event == name and all(m.get(k) == v for k, v in match.items())

        m = await self.next(pred)
        assert isinstance(m, AmiMessage)
        return m

    async def action(self, name: str, fields: dict[str, str] | None = None, action_id: str | None = None) -> AmiMessage:
        aid = action_id or f"t-{next(self.ids)}"
        self.writer.write(encode_action(name, fields or {}, aid))
        m = await self.next(
            lambda m: isinstance(m, AmiMessage) and m.response is not None and m.action_id == aid and m.event is None
        )
        assert isinstance(m, AmiMessage)
        return m

    async def event_list(self, name: str, fields: dict[str, str] | None = None) -> tuple[AmiMessage, list[AmiMessage]]:
        response = await self.action(name, fields)
        aid = response.action_id
        items: list[AmiMessage] = []
        if response.response != "Success":
            return response, items
        while True:
            m = await self.next(lambda m: isinstance(m, AmiMessage) and m.event is not None and m.action_id == aid)
            assert isinstance(m, AmiMessage)
            if m.get("EventList") == "Complete":
                assert m["ListItems"] == str(len(items))
                return response, items
            items.append(m)

    async def login(self, username: str = "admin", secret: str = SECRET) -> AmiMessage:
        banner = await self.next()
        assert isinstance(banner, Banner)
        return await self.action("Login", {"Username": username, "Secret": secret})

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def run(test: Callable[[AmiSimulator], Awaitable[None]], **kwargs: Any) -> None:
    async def main() -> None:
        options: dict[str, Any] = {"port": 0, "users": {"admin": SECRET}, "time_scale": 0.02} | kwargs
        try:
            async with AmiSimulator(**options) as sim:
                await test(sim)
        finally:
            while Client.open_clients:
                await Client.open_clients.pop().close()

    asyncio.run(main())


def test_login_plain_banner_and_ping() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        banner = await c.next()
        assert banner == Banner("9.0.0")
        r = await c.action("Login", {"Username": "admin", "Secret": SECRET}, action_id="login-1")
        assert r.headers[:3] == (
            ("Response", "Success"),
            ("ActionID", "login-1"),
            ("Message", "Authentication accepted"),
        )
        await c.event("FullyBooted")
        pong = await c.action("Ping", action_id="p 1")
        assert pong.response == "Success" and pong["Ping"] == "Pong" and pong.action_id == "p 1"
        assert float(pong["Timestamp"]) > 0
        bye = await c.action("Logoff")
        assert bye.response == "Goodbye" and bye["Message"] == "Thanks for all the fish."
        assert await c.reader.read() == b""

    run(t)


def test_login_md5_and_old_banner() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        assert await c.next() == Banner("2.10.6")
        ch = await c.action("Challenge", {"AuthType": "MD5"})
        assert ch.response == "Success"
        r = await c.action(
            "Login", {"AuthType": "MD5", "Username": "admin", "Key": md5_login_key(ch["Challenge"], SECRET)}
        )
        assert r["Message"] == "Authentication accepted"
        bad = await c.action("Challenge", {"AuthType": "plain"})
        assert bad.response == "Error" and bad["Message"] == "Must specify AuthType"

    run(t, version="2.10.6")


def test_bad_password_closes_the_session() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        r = await c.login(secret="wrong")
        assert r.response == "Error" and r["Message"] == "Authentication failed"
        assert await c.reader.read() == b""
        c2 = await Client.connect(sim.port)
        ch = await c2.next()
        assert isinstance(ch, Banner)
        challenge = await c2.action("Challenge", {"AuthType": "MD5"})
        r2 = await c2.action(
            "Login", {"AuthType": "MD5", "Username": "admin", "Key": md5_login_key(challenge["Challenge"], "wrong")}
        )
        assert r2["Message"] == "Authentication failed"

    run(t)


def test_errors_like_asterisk() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.next()
        denied = await c.action("Ping")
        assert denied.response == "Error" and denied["Message"] == "Permission denied"
        await c.action("Login", {"Username": "admin", "Secret": SECRET})
        unknown = await c.action("FlyToTheMoon")
        assert unknown.response == "Error" and unknown["Message"] == "Invalid/unknown command"
        assert unknown.action_id is not None
        c.writer.write(b"ActionID: no-action\r\nFoo: bar\r\n\r\n")
        missing = await c.next(lambda m: isinstance(m, AmiMessage) and m.action_id == "no-action")
        assert isinstance(missing, AmiMessage) and missing["Message"] == "Missing action in request"
        nochan = await c.action("Hangup", {"Channel": "SIP/999-00000000"})
        assert nochan.response == "Error" and nochan["Message"] == "No such channel"
        status = await c.action("Status", {"Channel": "SIP/999-00000000"})
        assert status["Message"] == "No such channel"
        cmd = await c.action("Command", {"Command": "core show version"})
        assert cmd.response == "Success" and cmd["Output"].startswith("Asterisk 20")
        await c.action("Setvar", {"Variable": "GLOBALX", "Value": "42"})
        got = await c.action("Getvar", {"Variable": "GLOBALX"})
        assert got["Value"] == "42"
        for action, fields, message in (
            ("SIPnotify", {"Channel": "305", "Variable": "Event=check-sync"}, "Notify Sent"),
            ("PJSIPNotify", {"Endpoint": "305", "Variable": "Event=check-sync"}, "NOTIFY sent"),
        ):
            r = await c.action(action, fields)
            assert r.response == "Success" and r["Message"] == message

    run(t)


def test_write_permissions_like_cms_user() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login(username="cms", secret="x")
        denied = await c.action("CoreShowChannels")  # needs system or reporting
        assert denied.response == "Error" and denied["Message"] == "Permission denied"
        ok = await c.action(
            "Originate",
            {"Channel": "SIP/305", "Context": "from-internal", "Exten": "5551234", "Priority": "1", "Async": "true"},
        )
        assert ok.response == "Success"
        # read = call,agent,originate: FullyBooted (system) never arrives, call events do
        ev = await c.event("Newchannel")
        assert ev["Privilege"] == "call,all"
        assert not any(isinstance(m, AmiMessage) and m.event == "FullyBooted" for m in c.inbox)

    perms = parse_classes("call,agent,originate")
    run(t, users={"cms": User("x", perms, perms)})


def test_events_mask_off_and_on() -> None:
    async def t(sim: AmiSimulator) -> None:
        quiet = await Client.connect(sim.port)
        await quiet.login()
        r = await quiet.action("Events", {"EventMask": "off"})
        assert r.response == "Success" and r["Events"] == "Off"
        loud = await Client.connect(sim.port)
        await loud.login()
        call = sim.play("inbound-busy", line="307")
        await sim.wait_call(call, TIMEOUT)
        await loud.event("Hangup", Cause="17")
        pong = await quiet.action("Ping")
        assert pong.response == "Success"
        assert not any(isinstance(m, AmiMessage) and m.get("Channel") for m in quiet.inbox)
        r = await quiet.action("Events", {"EventMask": "agent"})
        assert r["Events"] == "On"
        await quiet.action("QueuePause", {"Interface": "Local/305@from-queue/n", "Paused": "true"})
        await quiet.event("QueueMemberPause")

    run(t)


def test_core_show_channels_follows_a_call() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        _, empty = await c.event_list("CoreShowChannels")
        assert empty == []
        call = sim.play("inbound-direct-answered", line="305", caller="79035550101")
        assert call.planned[0].startswith("SIP/trunk-in-") and call.planned[1].startswith("SIP/305-")
        await c.event("BridgeEnter", Channel=call.planned[0])
        response, items = await c.event_list("CoreShowChannels")
        assert response["EventList"] == "start" and response["Message"] == "Channels will follow"
        by_name = {m["Channel"]: m for m in items}
        assert set(by_name) == set(call.planned)
        trunk, agent = by_name[call.planned[0]], by_name[call.planned[1]]
        assert trunk["Uniqueid"] == trunk["Linkedid"] == agent["Linkedid"] == call.id
        assert trunk["ChannelState"] == "6" and trunk["CallerIDNum"] == "79035550101"
        assert trunk["ConnectedLineNum"] == "305" and trunk["Application"] == "Dial"
        assert agent["Application"] == "AppDial" and trunk["BridgeId"] == agent["BridgeId"] != ""
        assert trunk["Duration"].count(":") == 2
        _, status = await c.event_list("Status")
        assert {m["Channel"] for m in status} == set(call.planned)
        await sim.wait_call(call, TIMEOUT)
        _, after = await c.event_list("CoreShowChannels")
        assert after == []
        assert call.state == "finished" and call.ended is not None

    run(t)


def test_calls_report_when_each_phone_rang_and_stopped_ringing_and_a_restart_leaves_unrung_phones_out() -> None:
    """``channelsAlerted``: when each channel first rang, went off hook or up (the chaos verdict owes an agent
    nothing for a phone the PBX created and lost before it rang); ``channelsAnswered``: when it went Up."""
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        call = sim.play("inbound-direct-answered", line="305")
        await sim.wait_call(call, TIMEOUT)
        report = call.to_json()
        phone = call.planned[1]
        assert report["channelsStarted"][phone] <= report["channelsAlerted"][phone] <= report["channelsEnded"][phone]
        # ``channelsAnswered``: when the phone went Up (an answer the chaos verdict owes only if an AMI client heard it)
        assert report["channelsAlerted"][phone] < report["channelsAnswered"][phone] <= report["channelsEnded"][phone]
        # a queue's member that another answered: its leg ends when the PBX cancels its ring, before its Hangup
        answered_elsewhere = sim.play("inbound-queue", line="305", agent2="306")
        phone2 = next(n for n in answered_elsewhere.planned if n.startswith("SIP/306-"))
        await c.event("DialEnd", DestChannel=phone2, DialStatus="CANCEL")
        cancelled_seen = time.time()
        await c.event("Hangup", Channel=phone2)
        assert answered_elsewhere.to_json()["channelsEnded"][phone2] <= cancelled_seen
        await sim.wait_call(answered_elsewhere, TIMEOUT)
        queued = sim.play("inbound-queue", line="305", agent2="306")
        await c.event("Newchannel", Channel=next(n for n in queued.planned if n.startswith("SIP/306-")))
        assert await sim.restart() == 1  # before the phones' Newstate Ringing (10 ms apart in the scenario)
        lost = queued.to_json()
        phones = [name for name in lost["channelsStarted"] if name.startswith(("SIP/305-", "SIP/306-"))]
        assert phones and not any(name in lost["channelsAlerted"] or name in lost["channelsEnded"] for name in phones)
        await c.close()

    run(t)


def test_originate_click_to_dial() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        r = await c.action(
            "Originate",
            {
                "Channel": "PJSIP/306",
                "Context": "from-internal",
                "Exten": "84951112233",
                "Priority": "1",
                "CallerID": "84951112233",
                "Async": "true",
                "Variable": "CMS_CALL=1",
            },
            action_id="c2d-42",
        )
        assert r.response == "Success" and r["Message"] == "Originate successfully queued"
        first = await c.event("Newchannel")
        assert first["Channel"].startswith("PJSIP/306-") and first["Exten"] == "s"
        ring = await c.event("DialBegin")
        assert "Channel" not in ring and ring["DestChannel"] == first["Channel"]  # the agent's phone rings first
        resp = await c.event("OriginateResponse")
        assert resp["ActionID"] == "c2d-42" and resp["Response"] == "Success" and resp["Reason"] == "4"
        assert resp["Uniqueid"] == first["Uniqueid"] and resp["Exten"] == "84951112233"
        far = await c.event("DialBegin", Channel=first["Channel"])
        assert far["DestChannel"].startswith("PJSIP/carrier-") and far["DialString"] == "carrier/84951112233"
        hangups = [await c.event("Hangup"), await c.event("Hangup")]
        assert {h["Channel"] for h in hangups} == {first["Channel"], far["DestChannel"]}
        # synchronous Originate: the answer comes when the phone is up, and there is no OriginateResponse
        sync = await c.action(
            "Originate", {"Channel": "SIP/307", "Context": "from-internal", "Exten": "5550000", "Priority": "1"}
        )
        assert sync.response == "Success"
        assert not any(isinstance(m, AmiMessage) and m.event == "OriginateResponse" for m in c.inbox)

    run(t)


def test_hangup_ends_the_call() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        call = sim.play("inbound-queue", line="305", agent2="306")
        connect = await c.event("AgentConnect")
        agent_channel = next(ch for ch in call.planned if ch.startswith("SIP/305-"))
        r = await c.action("Hangup", {"Channel": agent_channel, "Cause": "16"})
        assert r.response == "Success" and r["Message"] == "Channel Hungup"
        await c.event("HangupRequest", Channel=agent_channel)
        await sim.wait_call(call, TIMEOUT)
        assert call.state == "hungup" and not call.live
        hung = {m["Channel"] for m in c.inbox if isinstance(m, AmiMessage) and m.event == "Hangup"}
        hung.add((await c.event("Hangup", Channel=connect["Channel"]))["Channel"])
        _, items = await c.event_list("CoreShowChannels")
        assert items == []
        assert not sim.model.bridges

    run(t)


def test_queue_pause_and_queue_status() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        r = await c.action(
            "QueuePause",
            {"Interface": "Local/306@from-queue/n", "Paused": "true", "Queue": "support", "Reason": "Lunch break"},
        )
        assert r.response == "Success" and r["Message"] == "Interface paused successfully"
        ev = await c.event("QueueMemberPause")
        assert ev["Privilege"] == "agent,all" and ev["Queue"] == "support" and ev["Paused"] == "1"
        assert ev["PausedReason"] == "Lunch break" and ev["Interface"] == "Local/306@from-queue/n"
        resp, items = await c.event_list("QueueStatus", {"Queue": "support"})
        assert resp["EventList"] == "start"
        params = [m for m in items if m.event == "QueueParams"]
        members = {m["Location"]: m for m in items if m.event == "QueueMember"}
        assert params[0]["Strategy"] == "ringall"
        assert members["Local/306@from-queue/n"]["Paused"] == "1"
        assert members["Local/306@from-queue/n"]["PausedReason"] == "Lunch break"
        assert members["Local/305@from-queue/n"]["Paused"] == "0"
        # a scenario's QueueMemberStatus is re-stamped with the model's pause state
        call = sim.play("inbound-queue", line="305", agent2="306")
        st = await c.event("QueueMemberStatus", Interface="Local/306@from-queue/n")
        assert st["Paused"] == "1" and st["PausedReason"] == "Lunch break"
        await sim.wait_call(call, TIMEOUT)
        _, items = await c.event_list("QueueStatus")
        member305 = next(m for m in items if m.event == "QueueMember" and m["Location"].startswith("Local/305"))
        assert member305["CallsTaken"] == "1"
        unpause = await c.action("QueuePause", {"Interface": "SIP/306", "Paused": "false"})
        assert unpause["Message"] == "Interface unpaused successfully"
        assert (await c.event("QueueMemberPause"))["Paused"] == "0"
        missing = await c.action("QueuePause", {"Interface": "SIP/999", "Paused": "true"})
        assert missing.response == "Error" and missing["Message"] == "Interface not found"
        _, summary = await c.event_list("QueueSummary")
        assert summary[0]["Queue"] == "support" and summary[0]["LoggedIn"] == "2"

    run(t)


def test_blind_transfer_moves_the_caller() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        call = sim.play("inbound-direct-answered", line="305")
        trunk, agent = call.planned
        await c.event("BridgeEnter", Channel=trunk)
        r = await c.action("BlindTransfer", {"Channel": agent, "Exten": "308", "Context": "from-internal"})
        assert r.response == "Success"
        bt = await c.event("BlindTransfer")
        assert bt["TransfererChannel"] == agent and bt["TransfereeChannel"] == trunk and bt["Extension"] == "308"
        await c.event("Hangup", Channel=agent)
        dial = await c.event("DialBegin", Channel=trunk)  # the original call's dial
        assert dial["DestChannel"] == agent
        dial = await c.event("DialBegin", Channel=trunk)  # the transfer's
        assert dial["DestChannel"].startswith("SIP/308-") and dial["DestLinkedid"] == call.id
        await c.event("BridgeEnter", Channel=trunk)
        _, items = await c.event_list("CoreShowChannels")
        assert {m["Channel"] for m in items} == {trunk, dial["DestChannel"]}
        await sim.wait_call(call, TIMEOUT)
        _, items = await c.event_list("CoreShowChannels")
        assert items == []

    run(t)


def test_non_reading_client_is_dropped_without_stalling_others() -> None:
    async def t(sim: AmiSimulator) -> None:
        # A client with a tiny receive window that logs in and then never reads.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", sim.port))
        stuck_reader, stuck_writer = await asyncio.open_connection(sock=sock)
        stuck_writer.write(encode_action("Login", {"Username": "admin", "Secret": SECRET}))
        good = await Client.connect(sim.port)
        await good.login()
        await asyncio.sleep(0.1)
        assert len(sim._sessions) == 2
        # Calls one after another, the good client reading each one; the stuck one fills its kernel buffers,
        # then its user-space buffer passes the limit and it is dropped.
        rounds = 0
        while len(sim._sessions) == 2:
            rounds += 1
            assert rounds < 1000, "the stuck client was never dropped"
            call = sim.play("inbound-queue", line="305")
            await sim.wait_call(call, TIMEOUT)
            await good.event("Hangup", Channel=call.planned[0])
            good.inbox.clear()
        pong = await good.action("Ping")
        assert pong.response == "Success"
        with contextlib.suppress(ConnectionError):
            while await asyncio.wait_for(stuck_reader.read(65536), TIMEOUT):
                pass  # what the kernel held, then EOF or reset
        stuck_writer.close()
        with contextlib.suppress(ConnectionError):
            await stuck_writer.wait_closed()

    run(t, time_scale=0.0, max_client_buffer=64 * 1024)


def http(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> Coroutine[Any, Any, Any]:
    async def go() -> Any:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        data = json.dumps(body).encode() if body is not None else b""
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
        raw = await reader.read()
        writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        return status, json.loads(payload)

    return go()


def test_control_endpoint() -> None:
    async def t(sim: AmiSimulator) -> None:
        port = sim.control_port
        assert port
        c = await Client.connect(sim.port)
        await c.login()
        status, names = await http(port, "GET", "/scenarios")
        assert status == 200 and "inbound-queue" in names["scenarios"]
        status, played = await http(
            port,
            "POST",
            "/play",
            {"scenario": "inbound-direct-noanswer", "vars": {"line": "308", "caller": "74950001122"}},
        )
        assert status == 200 and played["linkedid"] and played["channels"][1].startswith("SIP/308-")
        ev = await c.event("Newchannel", Channel=played["channels"][0])
        assert ev["CallerIDNum"] == "74950001122" and ev["Linkedid"] == played["linkedid"]
        await c.event("DialState", Channel=played["channels"][0])
        status, calls = await http(port, "GET", "/calls")
        assert [x["linkedid"] for x in calls["live"]] == [played["linkedid"]]
        status, result = await http(port, "POST", "/hangup-all")
        assert result == {"hungup": 1}
        await c.event("Hangup", Channel=played["channels"][1])
        await c.event("Hangup", Channel=played["channels"][0])
        await asyncio.sleep(0.05)
        status, calls = await http(port, "GET", "/calls")
        assert calls["live"] == [] and calls["finished"][0]["state"] == "hungup"
        status, err = await http(port, "POST", "/play", {"scenario": "nope"})
        assert status == 400 and "nope" in err["error"]
        status, _ = await http(port, "GET", "/nowhere")
        assert status == 404

    run(t, control_port=0)


async def http_text(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload.decode()


def metric(text: str, name: str) -> float:
    """Sum of the samples of ``name`` (any labels) in Prometheus text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_connections_actions_and_events() -> None:
    async def t(sim: AmiSimulator) -> None:
        port = sim.control_port
        assert port
        c = await Client.connect(sim.port)
        await c.login()
        await c.action("Ping")
        await c.action("Nonsense")
        call = sim.play("inbound-direct-answered", line="305")
        await sim.wait_call(call, TIMEOUT)
        await c.event("Hangup", Channel=call.planned[0])
        status, text = await http_text(port, "/metrics")
        assert status == 200 and "# TYPE ami_simulator_connections_total counter" in text
        assert metric(text, "ami_simulator_connections_total") == 1
        assert 'ami_simulator_actions_total{action="ping",response="handled"} 1.0' in text
        assert metric(text, "ami_simulator_events_sent_total") >= 20  # FullyBooted + the call
        assert metric(text, "ami_simulator_clients") == 1 and metric(text, "ami_simulator_plays_total") == 1
        status, health = await http(port, "GET", "/health")
        assert status == 200 and health["ok"] is True and health["clients"] == 1

    run(t, control_port=0)


def test_park_leaves_the_peer_alone_and_an_originate_into_the_lot_picks_the_call_up() -> None:
    """As res_parking does: the parkee goes to the parking bridge, the basic bridge dissolves and the agent's
    phone (the dialled party) hangs up; the phone is called into the lot to pick the call up again."""

    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        call = sim.play("inbound-direct-long", line="305")
        trunk, agent = call.planned
        await c.event("BridgeEnter", Channel=trunk)
        missing = await c.action("Park", {"Channel": "SIP/nobody-1"})
        assert missing.response == "Error" and missing["Message"] == "No such channel"
        r = await c.action("Park", {"Channel": trunk})
        assert r.response == "Success" and r["Message"] == "Park successful"
        left = await c.event("BridgeLeave", Channel=trunk)
        assert left["BridgeType"] == "basic" and left["BridgeNumChannels"] == "1"
        entered = await c.event("BridgeEnter", Channel=trunk)
        assert (entered["BridgeType"], entered["BridgeTechnology"]) == ("parking", "holding_bridge")
        parked = await c.event("ParkedCall")
        assert parked["ParkeeChannel"] == trunk and parked["ParkingSpace"] == "701"
        assert parked["Parkinglot"] == "default" and parked["Privilege"] == "call,all"
        assert (await c.event("BridgeLeave", Channel=agent))["BridgeNumChannels"] == "0"
        await c.event("BridgeDestroy", BridgeUniqueid=left["BridgeUniqueid"])
        assert (await c.event("Hangup", Channel=agent))["Cause"] == "16"
        assert agent not in sim.model.channels and sim.model.channels[trunk].bridge == entered["BridgeUniqueid"]
        gone = await c.action("Redirect", {"Channel": agent, "Context": "parkedcalls", "Exten": "701",
                                           "Priority": "1"})
        assert gone.response == "Error" and gone["Message"] == "No such channel"

        r = await c.action("Originate", {"Channel": "SIP/305", "Context": "parkedcalls", "Exten": "701",
                                         "Priority": "1", "Async": "true", "ChannelId": "cms-resume-1"})
        assert r.response == "Success"
        ring = await c.event("Newchannel", Uniqueid="cms-resume-1")
        assert ring["Channel"].startswith("SIP/305-") and ring["Linkedid"] == "cms-resume-1"
        phone = ring["Channel"]
        assert (await c.event("OriginateResponse"))["Response"] == "Success"
        unparked = await c.event("UnParkedCall")
        assert unparked["ParkeeChannel"] == trunk and unparked["RetrieverChannel"] == phone
        await c.event("BridgeEnter", Channel=phone)
        assert [p.name for p in sim.model.bridge_partners(sim.model.channels[phone])] == [trunk]
        assert not sim.parked
        taken = await c.action("Originate", {"Channel": "SIP/306", "Context": "from-internal", "Exten": "1",
                                             "Async": "true", "ChannelId": "cms-resume-1"})
        assert taken.response == "Error"  # a ChannelId must be unique

        # TimeoutChannel = the peer: the peer parks it, hears the space, then leaves; a timeout calls it back.
        await c.action("Park", {"Channel": trunk, "TimeoutChannel": phone})
        again = await c.event("ParkedCall")
        assert again["ParkerDialString"] == "SIP/305" and again["ParkingSpace"] == "701"
        await c.event("Hangup", Channel=phone)
        sim.hangup_all()
        giveup = await c.event("ParkedCallGiveUp")
        assert giveup["ParkeeChannel"] == trunk and not sim.parked

        # Called into an empty space, the phone answers and is hung up (ParkedCall finds nobody).
        await c.action("Originate", {"Channel": "SIP/306", "Context": "parkedcalls", "Exten": "702",
                                     "Priority": "1", "Async": "true", "ChannelId": "cms-resume-2"})
        assert (await c.event("Hangup", Uniqueid="cms-resume-2"))["Cause"] == "16"

    run(t, time_scale=0.1)


def test_park_between_answer_and_bridge_hangs_up_the_dial_partner() -> None:
    """Parked before Dial() bridged the two: the caller is taken from Dial, which hangs up the phone."""

    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        call = sim.play("inbound-direct-long", line="305")
        trunk, agent = call.planned
        await c.event("DialEnd", DialStatus="ANSWER")
        r = await c.action("Park", {"Channel": trunk})
        assert r.response == "Success"
        await c.event("ParkedCall", ParkeeChannel=trunk)
        await c.event("Hangup", Channel=agent)
        assert agent not in sim.model.channels and trunk in sim.model.channels

    run(t, time_scale=1.0)


def test_atxfer_consults_through_a_local_channel_and_cancelatxfer_returns() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        call = sim.play("inbound-direct-long", line="305")
        trunk, agent = call.planned
        await c.event("BridgeEnter", Channel=trunk)
        nothing = await c.action("CancelAtxfer", {"Channel": agent})
        assert nothing.response == "Error"
        c.inbox.clear()
        r = await c.action("Atxfer", {"Channel": agent, "Exten": "306", "Context": "from-internal"})
        assert r.response == "Success"
        assert (await c.event("MusicOnHoldStart"))["Channel"] == trunk
        one = await c.event("Newchannel")
        assert one["Channel"].startswith("Local/306@from-internal-") and one["Channel"].endswith(";1")
        assert one["Linkedid"] == call.id  # the consultation belongs to the call
        await c.event("LocalBridge")
        enter = await c.event("BridgeEnter", Channel=agent)  # with the ;1 half, before the target answers
        dial = await c.event("DialBegin")
        assert dial["Channel"].endswith(";2") and dial["DestChannel"].startswith("SIP/306-")
        assert enter["BridgeUniqueid"] != ""
        await c.event("DialEnd", DialStatus="ANSWER")
        again = await c.action("Atxfer", {"Channel": agent, "Exten": "307"})
        assert again.response == "Error" and again["Message"] == "Transfer already in progress"
        cancel = await c.action("CancelAtxfer", {"Channel": agent})
        assert cancel.response == "Success"
        await c.event("Hangup", Channel=dial["DestChannel"])
        back = await c.event("BridgeEnter", Channel=agent)
        assert [p.name for p in sim.model.bridge_partners(sim.model.channels[agent])] == [trunk]
        assert back["BridgeUniqueid"] == sim.model.channels[trunk].bridge

    run(t, time_scale=0.1)


def test_atxfer_completes_when_the_transferer_hangs_up() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        call = sim.play("inbound-direct-long", line="305")
        trunk, agent = call.planned
        await c.event("BridgeEnter", Channel=trunk)
        await c.action("Atxfer", {"Channel": agent, "Exten": "306", "Context": "from-internal"})
        await c.event("DialEnd", DialStatus="ANSWER")
        await c.action("Hangup", {"Channel": agent})
        done = await c.event("AttendedTransfer")
        assert done["Result"] == "Success" and done["OrigTransfererChannel"] == agent
        assert done["TransfereeChannel"] == trunk and done["TransferTargetChannel"].endswith(";1")
        await c.event("Hangup", Channel=agent)
        await c.event("BridgeEnter", Channel=trunk)
        partners = {p.name for p in sim.model.bridge_partners(sim.model.channels[trunk])}
        assert partners == {done["TransferTargetChannel"]}
        await sim.wait_call(call, TIMEOUT)

    run(t, time_scale=0.1)


def test_notify_talk_answers_a_ringing_phone_and_dtmf_is_reported() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        call = sim.play("inbound-direct-noanswer", line="305")
        trunk, agent = call.planned
        await c.event("Newstate", Channel=agent, ChannelState="5")
        no_var = await c.action("SIPnotify", {"Channel": "305"})
        assert no_var.response == "Error" and no_var["Message"] == "At least one variable required"
        r = await c.action("SIPnotify", {"Channel": "305", "Variable": "Event=talk"})
        assert r.response == "Success" and r["Message"] == "Notify Sent"
        await c.event("DialEnd", DialStatus="ANSWER", DestChannel=agent)
        await c.event("BridgeEnter", Channel=trunk)
        d = await c.action("PlayDTMF", {"Channel": trunk, "Digit": "5", "Duration": "120"})
        assert d.response == "Success"
        end = await c.event("DTMFEnd", Channel=trunk)
        assert (end["Digit"], end["DurationMs"], end["Direction"]) == ("5", "120", "Sent")

    run(t, time_scale=0.5)


def test_astdb_actions_and_filters() -> None:
    async def t(sim: AmiSimulator) -> None:
        c = await Client.connect(sim.port)
        await c.login()
        missing = await c.action("DBGet", {"Family": "DND", "Key": "305"})
        assert missing.response == "Error" and missing["Message"] == "Database entry not found"
        assert (await c.action("DBPut", {"Family": "DND", "Key": "305", "Val": "YES"})).response == "Success"
        response, items = await c.event_list("DBGet", {"Family": "DND", "Key": "305"})
        assert response["Message"] == "Result will follow" and items[0]["Val"] == "YES"
        assert (await c.action("DBDel", {"Family": "DND", "Key": "305"}))["Message"] == "Key deleted successfully"
        assert (await c.action("DBDel", {"Family": "DND", "Key": "305"})).response == "Error"
        r = await c.action("Filter", {"Operation": "Add", "Filter": "!Event: Newstate"})
        assert r.response == "Success"
        call = sim.play("inbound-direct-answered", line="305")
        await sim.wait_call(call, TIMEOUT)
        await c.event("Hangup", Channel=call.planned[0])
        assert not any(isinstance(m, AmiMessage) and m.event == "Newstate" for m in c.inbox)
        cms = await Client.connect(sim.port)
        await cms.login("cms")
        denied = await cms.action("DBPut", {"Family": "DND", "Key": "305", "Val": "YES"})
        assert denied.response == "Error" and denied["Message"] == "Permission denied"

    cms_user = User(SECRET, parse_classes("call,agent"), parse_classes("call,agent,originate"))
    run(t, time_scale=0.02, users={"admin": SECRET, "cms": cms_user})


def test_demo_loop_plays_a_realistic_mix_on_the_demo_lines(tmp_path: Any) -> None:
    """``python -m ami_simulator --demo-lines 305,306,307,308 --loop``, sped up: every line gets calls, queue
    calls ring two agents of a queue, and /health and /metrics answer on the control port."""
    import subprocess
    import sys
    import time

    from local_cluster.infra import free_port, port_open

    ami_port, control_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ami_simulator", "--port", str(ami_port), "--control-port", str(control_port),
         "--secret", SECRET, "--demo-lines", "305,306,307,308", "--loop", "--time-scale", "0.05",
         "--pause", "0.05", "0.2", "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_open(ami_port) or not port_open(control_port):
            assert process.poll() is None and time.monotonic() < deadline, "simulator did not start"
            time.sleep(0.05)

        async def watch() -> tuple[list[AmiMessage], dict[str, Any], str]:
            c = await Client.connect(ami_port)
            Client.open_clients.remove(c)  # closed below, in this loop
            await c.login()
            seen: list[AmiMessage] = []
            end = asyncio.get_running_loop().time() + 12
            while asyncio.get_running_loop().time() < end:
                with contextlib.suppress(TimeoutError):
                    m = await asyncio.wait_for(c.next(), 1)
                    if isinstance(m, AmiMessage):
                        seen.append(m)
                queue_rings = _queue_calls_ringing_two(seen)
                lines = {m["DestChannel"].split("/")[1].split("-")[0] for m in seen
                         if m.event == "DialBegin" and m.get("DestChannel", "").startswith("SIP/3")}
                kinds = {m.event for m in seen}
                # Stop once the mix has shown everything asserted below (the order of the plays is random).
                if (len(queue_rings) >= 2 and lines >= {"305", "306", "307", "308"}
                        and {"OriginateResponse", "AgentConnect", "Hangup"} <= kinds):
                    break
            _, queues = await http(control_port, "GET", "/queues")
            _, text = await http_text(control_port, "/metrics")
            await c.close()
            return seen, queues, text

        seen, queues, text = asyncio.run(watch())
    finally:
        process.terminate()
        _, err = process.communicate(timeout=20)
    assert process.returncode == 0, err.decode()[-2000:]
    assert set(queues) == {"support", "sales"}
    support = {m["Interface"] for m in queues["support"]["members"]}
    assert support == {"Local/305@from-queue/n", "Local/306@from-queue/n"}
    rung = _queue_calls_ringing_two(seen)
    assert len(rung) >= 2, "no queue call rang two agents"
    for queue, interfaces in rung:
        members = {m["Interface"] for m in queues[queue]["members"]}
        assert interfaces <= members and len(interfaces) == 2
    scenarios = {m.event for m in seen}
    assert {"OriginateResponse", "AgentConnect", "Hangup"} <= scenarios
    assert metric(text, "ami_simulator_plays_total") >= 4


def _queue_calls_ringing_two(seen: list[AmiMessage]) -> list[tuple[str, set[str]]]:
    """(queue, interfaces rung) of every call whose AgentCalled events rang two different members."""
    by_call: dict[str, tuple[str, set[str]]] = {}
    for m in seen:
        if m.event == "AgentCalled":
            queue, interfaces = by_call.setdefault(m.get("Linkedid") or "", (m.get("Queue") or "", set()))
            interfaces.add(m.get("Interface") or "")
    return [v for v in by_call.values() if len(v[1]) == 2]
