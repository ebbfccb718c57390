from __future__ import annotations

import pytest

from ami_gateway.lines import LineMatcher, LineMatcherError, split_channel


def test_sip_and_pjsip_channels_map_to_lines() -> None:
    m = LineMatcher(protocol="SIP,PJSIP")
    assert m.line_of_channel("SIP/305-00000a1") == "305"
    assert m.line_of_channel("PJSIP/305-00000a1") == "305"
    assert m.line_of_channel("pjsip/305-0000001b") == "305"


def test_only_configured_protocols() -> None:
    m = LineMatcher(protocol="PJSIP")
    assert m.line_of_channel("SIP/305-00000004") is None
    assert m.line_of_channel("PJSIP/305-00000004") == "305"
    assert m.line_of_channel("IAX2/305-00000004") is None


def test_trunks_are_not_lines() -> None:
    m = LineMatcher(protocol="SIP")
    assert m.line_of_channel("SIP/trunk-in-00000003") is None
    assert m.line_of_channel("SIP/carrier-00000006") is None
    assert m.line_of_channel("SIP/1-00000006") is None  # too short for the default pattern
    assert m.line_of_channel("SIP/123456789-00000006") is None  # too long


def test_known_lines_and_custom_pattern() -> None:
    m = LineMatcher(protocol="SIP", lines=["alice"], line_pattern=r"7\d{3}")
    assert m.line_of_channel("SIP/alice-00000001") == "alice"
    assert m.line_of_channel("SIP/7001-00000001") == "7001"
    assert m.line_of_channel("SIP/305-00000001") is None
    only_known = LineMatcher(protocol="SIP", lines=["305"], line_pattern=None)
    assert only_known.line_of_channel("SIP/305-00000001") == "305"
    assert only_known.line_of_channel("SIP/306-00000001") is None


def test_local_channels_via_queue_extension_format() -> None:
    m = LineMatcher(protocol="SIP", queue_extension_format="Local/{0}@from-queue/n")
    assert m.line_of_local("Local/305@from-queue-00000012;1") == "305"
    assert m.line_of_local("Local/305@from-queue-00000012;2") == "305"
    assert m.line_of_local("Local/305@from-queueX-00000012;1") is None
    assert m.line_of_local("Local/305@other-00000012;1") is None
    # Local channels are never phone channels
    assert m.line_of_channel("Local/305@from-queue-00000012;1") is None
    assert m.line_of("Local/305@from-queue-00000012;1") == "305"


def test_queue_member_interfaces() -> None:
    m = LineMatcher(protocol="SIP,PJSIP", queue_extension_format="Local/{0}@from-queue/n")
    assert m.line_of_interface("Local/305@from-queue/n") == "305"
    assert m.line_of_interface("SIP/305") == "305"
    assert m.line_of_interface("PJSIP/306") == "306"
    assert m.line_of_interface("Local/305@agents/n") is None
    assert m.line_of_interface("SIP/trunk-in") is None
    assert m.interface_for("305") == "Local/305@from-queue/n"


def test_regex_metacharacters_in_the_format_are_literal() -> None:
    m = LineMatcher(protocol="SIP", queue_extension_format="Local/{0}@agents.q+x/n")
    assert m.line_of_interface("Local/305@agents.q+x/n") == "305"
    assert m.line_of_interface("Local/305@agentsXqqx/n") is None
    assert m.line_of_local("Local/305@agents.q+x-0000000a;2") == "305"
    assert m.line_of_local("Local/305@agentsAqqx-0000000a;2") is None


def test_format_without_options_and_other_contexts() -> None:
    m = LineMatcher(protocol="PJSIP", queue_extension_format="Local/{0}@agents")
    assert m.line_of_interface("Local/305@agents") == "305"
    assert m.line_of_local("Local/305@agents-00000001;1") == "305"
    braces = LineMatcher(protocol="SIP", queue_extension_format="Local/{0}@q{{x}}/n")
    assert braces.line_of_interface("Local/305@q{x}/n") == "305"
    assert braces.interface_for("305") == "Local/305@q{x}/n"


def test_non_local_format() -> None:
    m = LineMatcher(protocol="PJSIP", queue_extension_format="PJSIP/{0}")
    assert m.line_of_interface("PJSIP/305") == "305"
    assert m.line_of_local("Local/305@x-00000001;1") is None


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"protocol": ""}, "protocol"),
        ({"protocol": " , "}, "protocol"),
        ({"protocol": "SIP/x"}, "protocol"),
        ({"queue_extension_format": "Local/305@from-queue/n"}, "queueExtensionFormat"),
        ({"queue_extension_format": "{0}"}, "queueExtensionFormat"),
        ({"queue_extension_format": "Local/{1}@q"}, "queueExtensionFormat"),
        ({"line_pattern": "("}, "linePattern"),
    ],
)
def test_bad_settings_name_the_key(kwargs: dict[str, str], key: str) -> None:
    with pytest.raises(LineMatcherError, match=key):
        LineMatcher(**kwargs)  # type: ignore[arg-type]


def test_split_channel() -> None:
    assert split_channel("SIP/trunk-in-00000003") == ("SIP", "trunk-in", "")
    assert split_channel("Local/305@from-queue-00000000;2") == ("Local", "305@from-queue", ";2")
    assert split_channel("SIP/305") is None
