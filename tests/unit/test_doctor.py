"""doctor's pure parts: judging AMI answers, what each feature needs, certificates, the checklist."""

from __future__ import annotations

import datetime as dt
import socket

from doctor.ami_rights import (
    PROBES,
    Grant,
    judge_answer,
    judge_needs,
    needs_for,
    privilege_classes,
)
from doctor.creatio_check import site_root
from doctor.infra_checks import check_ports
from doctor.report import Status, exit_code, failed, passed, render, skipped, warned
from doctor.tls_check import check_certificate, name_matches
from tests.support.certs import make_pem

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


def test_permission_denied_is_the_only_refusal() -> None:
    assert judge_answer("Error", "Permission denied") is Grant.DENIED
    assert judge_answer("Error", "Invalid/unknown command") is Grant.MISSING
    assert judge_answer("Error", "Channel not specified") is Grant.GRANTED
    assert judge_answer("Error", "No family specified.") is Grant.GRANTED
    assert judge_answer("Success", None) is Grant.GRANTED


def test_every_needed_action_has_a_probe() -> None:
    for need in needs_for(["SIP", "PJSIP"]):
        for action in need.actions:
            assert action in PROBES, action


def test_answer_action_follows_the_protocol() -> None:
    def answer_actions(techs: list[str]) -> tuple[str, ...]:
        return next(n.actions for n in needs_for(techs) if n.feature.startswith("answer"))

    assert answer_actions(["PJSIP/"]) == ("PJSIPNotify",)
    assert answer_actions(["SIP"]) == ("SIPnotify",)
    assert answer_actions(["SIP", "PJSIP"]) == ("SIPnotify", "PJSIPNotify")


def test_missing_originate_fails_click_to_dial_and_names_the_class() -> None:
    grants = {a: Grant.GRANTED for a in PROBES}
    grants["Originate"] = Grant.DENIED
    grants["SIPnotify"] = Grant.DENIED
    verdicts = {v.need.feature: v for v in judge_needs(needs_for(["SIP"]), grants)}
    dial = verdicts["click to dial (make_call)"]
    assert not dial.ok and dial.need.required and dial.classes_to_add() == ("originate",)
    answer = next(v for k, v in verdicts.items() if k.startswith("answer"))
    assert not answer.ok and not answer.need.required and answer.classes_to_add() == ("system",)
    assert verdicts["blind transfer"].ok


def test_privilege_header_to_classes() -> None:
    assert privilege_classes("call,all") == {"call"}
    assert privilege_classes("agent,all") == {"agent"}
    assert privilege_classes(None) == frozenset()


def test_certificate_good_and_matching() -> None:
    pem = make_pem(["cms.example.com"], not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=90))
    results = check_certificate(pem, "cert.pem", "cms.example.com", NOW)
    assert [r.status for r in results] == [Status.PASS] * 3, results


def test_certificate_wrong_name_expired_and_soon() -> None:
    expired = make_pem(["a.example.com"], not_before=NOW - dt.timedelta(days=90), not_after=NOW - dt.timedelta(days=1))
    results = check_certificate(expired, "c.pem", "b.example.com", NOW)
    assert [r.status for r in results] == [Status.PASS, Status.FAIL, Status.FAIL]
    assert "b.example.com is not among a.example.com" in results[1].detail
    soon = make_pem(["a.example.com"], not_before=NOW - dt.timedelta(days=80), not_after=NOW + dt.timedelta(days=5))
    assert check_certificate(soon, "c.pem", "a.example.com", NOW)[2].status is Status.WARN


def test_certificate_without_key_or_with_another_key() -> None:
    window = {"not_before": NOW - dt.timedelta(days=1), "not_after": NOW + dt.timedelta(days=90)}
    no_key = check_certificate(make_pem(["h"], with_key=False, **window), "c.pem", "h", NOW)
    assert no_key[0].status is Status.FAIL and "no private key" in no_key[0].detail
    other = check_certificate(make_pem(["h"], other_key=True, **window), "c.pem", "h", NOW)
    assert other[0].status is Status.FAIL and "does not belong" in other[0].detail
    garbage = check_certificate(b"not a pem", "c.pem", "h", NOW)
    assert len(garbage) == 1 and garbage[0].status is Status.FAIL


def test_name_matching() -> None:
    assert name_matches("cms.example.com", ["*.example.com"], [])
    assert not name_matches("a.b.example.com", ["*.example.com"], [])
    assert not name_matches("example.com", ["*.example.com"], [])
    assert name_matches("CMS.Example.com.", ["cms.example.com"], [])
    assert name_matches("10.0.0.5", [], ["10.0.0.5"])
    assert not name_matches("10.0.0.5", ["10.0.0.5"], [])


def test_port_in_use_fails_with_the_port_named() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        [result] = check_ports([("node", "127.0.0.1", port)])
    assert result.status is Status.FAIL
    assert f"127.0.0.1:{port} is already in use" in result.detail and f"sport = :{port}" in result.fix
    [free] = check_ports([("node", "127.0.0.1", port)])
    assert free.status is Status.PASS


def test_checklist_text_and_exit_code() -> None:
    results = [passed("a"), warned("b", "meh", "do x"), skipped("c", "n/a")]
    assert exit_code(results) == 0
    text = render([*results, failed("d", "broken", "line one\nline two")])
    assert "[FAIL] d: broken\n       fix: line one\n            line two\n" in text
    assert "[warn] b: meh\n       fix: do x\n" in text
    assert text.endswith("NOT READY: 1 ok, 1 warnings, 1 failed, 1 skipped\n")
    assert exit_code([*results, failed("d", "x", "y")]) == 1


def test_creatio_site_root() -> None:
    assert site_root("https://crm.example.com/0/") == "https://crm.example.com"
    assert site_root(" https://crm.example.com ") == "https://crm.example.com"
