"""Scenario files: captures as scenarios, directives, templates with fresh ids, timing."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from ami.protocol import AmiMessage
from ami.scenario import IdAllocator, ScenarioError, Step, load_scenario, play_steps
from ami_simulator.builtin import builtin_scenario, builtin_scenario_names

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ami"
CAPTURE_VARS = {"line": "305", "agent2": "306", "caller": "79161234567", "callerName": "Ivan Petrov"}


def events(steps: tuple[Step, ...]) -> list[AmiMessage]:
    return [s.item for s in steps if isinstance(s.item, AmiMessage)]


@pytest.mark.parametrize(("name", "count"), [("inbound-direct", 28), ("inbound-queue", 104), ("outbound", 36)])
def test_raw_captures_are_scenarios(name: str, count: int) -> None:
    scenario = load_scenario(FIXTURES / f"{name}.ami", default_gap=0.25)
    assert scenario.name == name and len(scenario) == count
    assert all(isinstance(s.item, AmiMessage) and s.item.event for s in scenario)  # banner, responses dropped
    assert scenario.steps[0].delay == 0 and all(s.delay == 0.25 for s in scenario.steps[1:])
    assert not scenario.is_template
    assert (
        load_scenario(FIXTURES.joinpath(f"{name}.ami").read_bytes()).steps
        == load_scenario(FIXTURES / f"{name}.ami").steps
    )


def test_builtin_scenarios() -> None:
    names = builtin_scenario_names()
    for required in (
        "inbound-direct-answered",
        "inbound-direct-noanswer",
        "inbound-busy",
        "inbound-queue",
        "outbound-originate",
        "demo",
    ):
        assert required in names
    ids = IdAllocator()
    for name in names:
        scenario = builtin_scenario(name)
        assert scenario.is_template
        rendered = scenario.render(ids, {"line": "401", "agent2": "402"}, tech="PJSIP")
        for msg in events(rendered.steps):
            for _, value in msg.headers:
                assert "{{" not in value, (name, msg)
        # every channel created is hung up by the end: the call really ends
        created = [m["Channel"] for m in events(rendered.steps) if m.event == "Newchannel"]
        hung = [m["Channel"] for m in events(rendered.steps) if m.event == "Hangup"]
        assert sorted(created) == sorted(hung), name
        assert rendered.channels == tuple(created)
        assert any(c.startswith("PJSIP/401-") for c in created)


@pytest.mark.parametrize(
    ("scenario", "capture", "extra"),
    [
        ("inbound-direct-answered", "inbound-direct", {}),
        ("inbound-queue", "inbound-queue", {}),
        ("outbound-originate", "outbound", {"actionid": "drv-79"}),
    ],
)
def test_templates_reproduce_the_captures(scenario: str, capture: str, extra: dict[str, str]) -> None:
    """Rendered with the capture's values, a template gives the capture back except for the ids."""
    rendered = builtin_scenario(scenario).render(IdAllocator(), CAPTURE_VARS | extra)
    real = events(load_scenario(FIXTURES / f"{capture}.ami").steps)
    ours = events(rendered.steps)
    assert len(ours) == len(real)
    mapping: dict[str, str] = {}
    id_like = re.compile(r"^\d+\.\d+$|^[0-9a-f-]{36}$|-[0-9a-f]{8}(;[12])?$")
    for a, b in zip(ours, real, strict=True):
        assert [n for n, _ in a.headers] == [n for n, _ in b.headers]
        for (name, va), (_, vb) in zip(a.headers, b.headers, strict=True):
            if name in ("LastCall", "LoginTime"):
                continue
            if id_like.search(vb):
                # ids differ, but consistently: one real id <-> one rendered id
                assert mapping.setdefault(vb, va) == va, (name, va, vb)
            else:
                assert va == vb, (a.event, name)


def test_renders_give_unique_ids() -> None:
    ids = IdAllocator()
    scenario = builtin_scenario("inbound-queue")
    seen_uids: set[str] = set()
    seen_channels: set[str] = set()
    for _ in range(20):
        rendered = scenario.render(ids, {"line": "305"})
        uids = {m["Uniqueid"] for m in events(rendered.steps) if m.event == "Newchannel"}
        assert len(uids) == 7 and not uids & seen_uids
        assert not set(rendered.channels) & seen_channels
        seen_uids |= uids
        seen_channels |= set(rendered.channels)
        assert rendered.linkedid in uids
        assert re.fullmatch(r"\d{10}\.\d+", rendered.linkedid or "")


def test_uniqueid_epoch_follows_the_timeline() -> None:
    rendered = builtin_scenario("outbound-originate").render(IdAllocator(), {}, start=1_000_000_000.0)
    newchannels = [m for m in events(rendered.steps) if m.event == "Newchannel"]
    first, carrier = (int(m["Uniqueid"].split(".")[0]) for m in newchannels)
    assert first == 1_000_000_000 and carrier == 1_000_000_001  # the far end is created after the 1 s ring


def test_directives_and_placeholders() -> None:
    data = (
        b"# a comment\n"
        b"#@ var who=Bob\n"
        b"#@ gap 0.5\n"
        b"Event: One\nName: {{who}} on {{tech}}/{{line}}-{{chan:1}}\nUid: {{uid:1}}\n\n"
        b"#@ +2.5\n"
        b"Event: Two\nUid: {{uid:1}} {{uid:2}}\nBridge: {{bridge:1}}\n\n"
        b"Event: Three\n\n"
        b"#@ raw Event: Raw\\r\\nLine: {{line}}\\r\\n\\r\\n\n"
        b"Response: Success\nMessage: skipped\n\n"
    )
    scenario = load_scenario(data, name="t")
    assert [s.delay for s in scenario] == [0.0, 2.5, 0.5, 0.5]
    assert scenario.duration == 3.5
    rendered = scenario.render(
        IdAllocator(first_sequence=10, first_suffix=0x1A), {"line": "777"}, tech="PJSIP", start=1000.0
    )
    one, two, three, raw = (s.item for s in rendered.steps)
    assert isinstance(one, AmiMessage) and isinstance(two, AmiMessage)
    assert one["Name"] == "Bob on PJSIP/777-0000001a"
    assert one["Uid"] == "1000.10" and two["Uid"] == "1000.10 1002.11"  # epoch: when the id is first due
    assert re.fullmatch(r"[0-9a-f-]{36}", two["Bridge"])
    assert raw == b"Event: Raw\r\nLine: 777\r\n\r\n"
    assert rendered.variables["who"] == "Bob"


@pytest.mark.parametrize(
    "data",
    [b"#@ wait 3\nEvent: X\n\n", b"#@ +abc\n", b"#@ +-1\n", b"#@ var nothing\n", b"Event: X\nbad line\n\n"],
)
def test_bad_scenarios_raise(data: bytes) -> None:
    with pytest.raises(ScenarioError):
        load_scenario(data)


def test_missing_placeholder_raises() -> None:
    scenario = load_scenario(b"Event: X\nA: {{nosuchvar}}\n\n")
    with pytest.raises(ScenarioError, match="nosuchvar"):
        scenario.render(IdAllocator())
    with pytest.raises(ScenarioError):
        load_scenario(b"Event: X\nA: {{foo:1}}\n\n").render(IdAllocator())


def test_unknown_builtin() -> None:
    with pytest.raises(ScenarioError):
        builtin_scenario("nope")
    with pytest.raises(ScenarioError):
        builtin_scenario("../etc/passwd")


def test_play_steps_timing() -> None:
    scenario = load_scenario(b"Event: A\n\n#@ +1\nEvent: B\n\n#@ +1\nEvent: C\n\n")
    got: list[tuple[float, str]] = []

    async def main() -> None:
        t0 = time.monotonic()

        async def emit(item: AmiMessage | bytes) -> None:
            assert isinstance(item, AmiMessage)
            got.append((time.monotonic() - t0, item.event or ""))

        await play_steps(scenario, emit, time_scale=0.05)

    asyncio.run(main())
    assert [e for _, e in got] == ["A", "B", "C"]
    # Each step waits at least its scaled delay; how much longer depends on a shared machine's load.
    assert 0.045 <= got[1][0] <= got[2][0] and 0.095 <= got[2][0] < 2.0
