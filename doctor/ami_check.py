"""The AMI checks over a real socket: the host resolves, AMI answers, login works, the write
classes our commands need are granted (probed, see ``ami_rights``), and events arrive with the
gateway's event mask. One short manager session; it sends no action that changes the PBX."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from dataclasses import dataclass, field

from ami.protocol import AmiMessage, AmiParser, Banner, MalformedMessage, encode_action
from ami_gateway.ami_client import DEFAULT_EVENT_MASK
from doctor.ami_rights import (
    PROBES,
    READ_NEEDS,
    READ_OPTIONAL,
    Grant,
    judge_answer,
    judge_needs,
    needs_for,
    privilege_classes,
)
from doctor.report import Result, failed, passed, skipped, warned
from services.config import AsteriskConfig

MANAGER_HINT = (
    "in /etc/asterisk/manager.conf: [general] enabled = yes, port = {port}, bindaddr reachable from here; "
    "then `asterisk -rx \"manager reload\"`"
)


class _Closed(Exception):
    pass


@dataclass
class _Conversation:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parser: AmiParser = field(default_factory=AmiParser)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    events: list[AmiMessage] = field(default_factory=list)
    banner: str = ""

    async def _next(self, deadline: float) -> AmiMessage | Banner:
        while True:
            item = self.parser.next_event()
            if item is not None and not isinstance(item, MalformedMessage):
                return item
            if item is not None:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                data = await self.reader.read(65536)
            if not data:
                raise _Closed
            self.parser.receive_data(data)

    async def read_banner(self, timeout: float) -> str:
        item = await self._next(time.monotonic() + timeout)
        self.banner = item.version if isinstance(item, Banner) else ""
        return self.banner

    async def action(self, name: str, fields: tuple[tuple[str, str], ...] = (), timeout: float = 5.0) -> AmiMessage:
        """Send one action and return its response; events read meanwhile are kept in ``events``."""
        action_id = f"doctor-{next(self.ids)}"
        self.writer.write(encode_action(name, fields, action_id))
        await self.writer.drain()
        deadline = time.monotonic() + timeout
        while True:
            item = await self._next(deadline)
            if not isinstance(item, AmiMessage):
                continue
            if item.response is not None and item.action_id == action_id:
                return item
            if item.event is not None and item.action_id is None:
                self.events.append(item)  # list entries of earlier probes carry their ActionID: dropped

    async def listen(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while True:
                item = await self._next(deadline)
                if isinstance(item, AmiMessage) and item.event is not None and item.action_id is None:
                    self.events.append(item)


def _check_replay(path: str) -> Result:
    """``filePath``: the gateway replays this capture instead of talking to a PBX; it must load."""
    from ami.scenario import ScenarioError, load_scenario

    name = "Asterisk.filePath replay loads"
    try:
        scenario = load_scenario(path)
    except OSError as exc:
        return failed(name, f"{path}: {exc.strerror}", "Asterisk.filePath must name a readable AMI capture, "
                      "or be empty to use the PBX in Asterisk.url")
    except ScenarioError as exc:
        return failed(name, f"{path}: {exc}",
                      "fix the capture at the place named (see ami_simulator/scenarios/README.md)")
    return passed(name, f"{path}: {len(scenario)} steps (no AMI: the PBX checks are skipped)")


async def check_ami(ast: AsteriskConfig, *, listen_seconds: float = 5.0, timeout: float = 5.0) -> list[Result]:
    """Every AMI check, in order; a check that cannot run because an earlier one failed is skipped."""
    if ast.file_path:
        return [_check_replay(ast.file_path)]
    if not ast.url:
        return [skipped("PBX", "no Asterisk.url: `make run` uses the built-in simulator")]
    where = f"{ast.url}:{ast.port}"
    results: list[Result] = []
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(ast.url, ast.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return [failed("PBX host resolves", f"{ast.url!r}: {exc.strerror}",
                       "Asterisk.url: give the PBX's DNS name or IP address as this machine can resolve it")]
    addresses = sorted({str(info[4][0]) for info in infos})
    results.append(passed("PBX host resolves", f"{ast.url} -> {', '.join(addresses)}"))

    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(ast.url, ast.port)
    except (OSError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        results.append(failed("AMI answers", f"cannot connect to {where}: {reason}",
                              "Asterisk.port: the AMI port (5038 by default); " + MANAGER_HINT.format(port=ast.port)
                              + "; a firewall between here and the PBX must let this port through"))
        return results
    conv = _Conversation(reader, writer)
    try:
        return results + await _logged_in_checks(conv, ast, where, listen_seconds, timeout)
    finally:
        with contextlib.suppress(Exception):
            writer.write(encode_action("Logoff", (), "doctor-bye"))
            writer.close()
            async with asyncio.timeout(2):
                await writer.wait_closed()


async def _logged_in_checks(
    conv: _Conversation, ast: AsteriskConfig, where: str, listen_seconds: float, timeout: float
) -> list[Result]:
    results: list[Result] = []
    try:
        banner = await conv.read_banner(timeout)
    except (TimeoutError, _Closed, OSError):
        return [failed("AMI answers", f"{where} accepted the connection but sent no AMI banner",
                       f"Asterisk.port {ast.port} is not Asterisk's manager port? "
                       + MANAGER_HINT.format(port=ast.port))]
    if not banner:
        return [failed("AMI answers", f"{where} did not greet with 'Asterisk Call Manager/...'",
                       f"Asterisk.port {ast.port} is some other service; " + MANAGER_HINT.format(port=ast.port))]
    results.append(passed("AMI answers", f"{where}: Asterisk Call Manager/{banner}"))

    if not ast.user_name:
        results.append(failed("AMI login", "Asterisk.userName is empty", "Asterisk.userName: the [section] name "
                              "of the manager user in manager.conf"))
        return results
    try:
        answer = await conv.action("Login", (("Username", ast.user_name), ("Secret", ast.secret),
                                             ("Events", DEFAULT_EVENT_MASK)), timeout)
    except (TimeoutError, _Closed, OSError) as exc:
        return [*results, failed("AMI login", f"no answer to Login ({type(exc).__name__})",
                                 "check the AMI user's permit=/deny= lines cover this host")]
    if (answer.response or "").lower() != "success":
        message = answer.get("Message") or "refused"
        return [*results, failed(
            "AMI login", f"user {ast.user_name!r} refused: {message}",
            f"Asterisk.secret must equal secret= in the [{ast.user_name}] section of /etc/asterisk/manager.conf, "
            "and its permit= must include this host;\nthen `asterisk -rx \"manager reload\"` and check with "
            f"`asterisk -rx \"manager show user {ast.user_name}\"`",
        )]
    results.append(passed("AMI login", f"as {ast.user_name}"))

    grants: dict[str, Grant] = {}
    for probe in PROBES.values():
        try:
            reply = await conv.action(probe.action, probe.fields, timeout)
        except (TimeoutError, _Closed, OSError) as exc:
            results.append(failed("AMI permissions", f"no answer to {probe.action} ({type(exc).__name__})",
                                  "the PBX stopped answering; run doctor again"))
            return results
        grants[probe.action] = judge_answer(reply.response, reply.get("Message"))
    techs = [t for t in ast.protocol.split(",") if t.strip()]
    for verdict in judge_needs(needs_for(techs), grants):
        name = f"AMI write: {verdict.need.feature}"
        if verdict.ok:
            results.append(passed(name))
            continue
        detail_parts = []
        fixes = []
        if verdict.denied:
            detail_parts.append("Permission denied for " + ", ".join(verdict.denied))
            fixes.append(f"add {','.join(verdict.classes_to_add())} to write= of [{ast.user_name}] in "
                         "manager.conf, then `asterisk -rx \"manager reload\"`")
        if verdict.missing:
            detail_parts.append("not on this PBX: " + ", ".join(verdict.missing))
            fixes.append("load the Asterisk module that provides " + ", ".join(verdict.missing)
                         + " (or set Asterisk.protocol to the channel technology the phones use)")
        make = failed if verdict.need.required else warned
        results.append(make(name, "; ".join(detail_parts), "\n".join(fixes)))

    await conv.listen(listen_seconds)
    seen: set[str] = set()
    for event in conv.events:
        seen |= privilege_classes(event.get("Privilege"))
    names = sorted({e.event or "" for e in conv.events})
    shown = ", ".join(names[:6]) + ("..." if len(names) > 6 else "")
    for cls, why in {**READ_NEEDS, **READ_OPTIONAL}.items():
        name = f"AMI events: {cls}"
        if cls in seen:
            results.append(passed(name, f"{sum(cls in privilege_classes(e.get('Privilege')) for e in conv.events)} "
                                  f"events in {listen_seconds:g} s"))
        elif cls in READ_NEEDS:
            results.append(warned(
                name,
                f"no '{cls}' events in {listen_seconds:g} s with event mask {DEFAULT_EVENT_MASK}"
                + (f" (other events arrived: {shown})" if names else ""),
                f"if calls were in progress, add {cls} to read= of [{ast.user_name}] in manager.conf (needed for "
                f"{why});\non an idle PBX, run doctor again during a call or with --listen 60",
            ))
        else:
            results.append(warned(name, f"none in {listen_seconds:g} s (optional: {why})",
                                  f"add {cls} to read= of [{ast.user_name}] if agents should see dialled digits"))
    return results
