"""One write-class table (ami/permissions.py) for the gateway's errors, the simulator and the doctor."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ami.permissions import WRITE_CLASSES, write_classes
from ami_gateway.command_executor import explain
from ami_gateway.command_plan import AmiAction
from doctor.ami_rights import PROBES, needs_for

PLANNER = Path(__file__).resolve().parents[2] / "ami_gateway" / "command_plan.py"


def planned_actions() -> set[str]:
    """Every AMI action the command planner can send, read from its source."""
    return set(re.findall(r'_action\(\s*"([A-Za-z]+)"', PLANNER.read_text()))


def test_every_action_the_gateway_or_the_doctor_sends_is_in_the_table() -> None:
    actions = planned_actions() | {a for need in needs_for(["SIP", "PJSIP"]) for a in need.actions} | set(PROBES)
    assert {"Originate", "QueuePause", "PlayDTMF", "DBGet"} <= actions  # the walk found the planner's actions
    assert sorted(a for a in actions if a.lower() not in WRITE_CLASSES) == []


def test_an_action_sent_with_any_of_several_classes_says_so() -> None:
    # Asterisk registers Hangup for call or system: the error must not send the administrator after
    # the wrong one, and the doctor's fix names the narrower (the one CMS's user already has).
    assert explain(AmiAction("Hangup", ()), "Permission denied") == \
        "Hangup was refused: the AMI user needs write = call (or system) in manager.conf"
    assert PROBES["Hangup"].classes == ("call", "system")
    assert PROBES["DBGet"].classes == write_classes("dbget") == ("system", "reporting")


def test_an_action_outside_the_table_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        write_classes("NoSuchAction")
