"""CMS appsettings.json compatibility and validation messages that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.config import ConfigError, load_settings, parse_asterisk, redact_url

CMS_SAMPLE = {
    "Logging": {"LogLevel": {"Default": "Information"}},
    "Asterisk": {
        "url": "10.0.0.5", "port": "5038", "userName": "terrasoft", "secret": "s3cr3t-pw",
        "originateContext": "from-internal", "parkingLotContext": "parkedcalls",
        "autoPauseOnCommutationStart": "true", "queueExtensionFormat": "Local/{0}@from-queue/n",
        "asyncOriginate": "true", "sendRingStartedOnRingingState": "false", "traceQueuesState": "false",
        "protocol": "PJSIP", "packetInfoConfig": "", "filePath": "",
    },
}


def write(tmp_path: Path, document: object) -> Path:
    path = tmp_path / "appsettings.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_cms_appsettings_block_is_read_unchanged(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, CMS_SAMPLE), env={})
    ast = settings.asterisk
    assert (ast.url, ast.port, ast.user_name, ast.secret) == ("10.0.0.5", 5038, "terrasoft", "s3cr3t-pw")
    assert ast.auto_pause_on_commutation_start is True
    assert ast.send_ring_started_on_ringing_state is False
    assert ast.protocol == "PJSIP" and ast.parking_lot_context == "parkedcalls"
    assert settings.cluster.prefix == "cms"


def test_keys_are_case_insensitive_and_native_json_values_work(tmp_path: Path) -> None:
    document = {"asterisk": {"URL": "pbx", "Port": 5039, "USERNAME": "u", "Secret": "x", "asyncOriginate": False}}
    ast = load_settings(write(tmp_path, document), env={}).asterisk
    assert (ast.url, ast.port, ast.async_originate) == ("pbx", 5039, False)


def test_block_nested_deeper_and_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "appsettings.json"
    path.write_text("\ufeff" + json.dumps({"Telephony": {"Asterisk": {"url": "pbx", "userName": "u"}}}), "utf-8")
    assert load_settings(path, env={}).asterisk.url == "pbx"


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"url": "pbx", "userName": "u", "port": "50x8"}, "Asterisk.port"),
        ({"url": "pbx", "userName": "u", "port": "70000"}, "Asterisk.port"),
        ({"url": "pbx", "userName": "u", "asyncOriginate": "maybe"}, "Asterisk.asyncOriginate"),
        ({"url": "pbx", "userName": "u", "queueExtensionFormat": "Local/305@q"}, "Asterisk.queueExtensionFormat"),
        ({"url": "pbx", "userName": "u", "protocol": "SIP/x"}, "Asterisk.protocol"),
        ({"url": "pbx", "userName": "u", "protocol": "/"}, "Asterisk.protocol"),
        ({"url": "pbx"}, "Asterisk.userName"),
        ({"url": "pbx", "userName": "u", "originateContex": "x"}, "originatecontex"),
    ],
)
def test_errors_name_the_key(block: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_asterisk(block)


def test_environment_overrides_cluster_block(tmp_path: Path) -> None:
    document = {**CMS_SAMPLE, "Cluster": {"prefix": "prod", "redisUrl": "redis://r:6379/0"}}
    settings = load_settings(write(tmp_path, document), env={"CMS_PREFIX": "staging"})
    assert settings.cluster.prefix == "staging" and settings.cluster.redis_url == "redis://r:6379/0"
    with pytest.raises(ConfigError, match="Cluster.amqpUrl"):
        load_settings(write(tmp_path, document), env={"CMS_AMQP_URL": "http://nope"})


def test_secrets_never_in_redacted_forms(tmp_path: Path) -> None:
    ast = load_settings(write(tmp_path, CMS_SAMPLE), env={}).asterisk
    assert "s3cr3t-pw" not in repr(ast) and "s3cr3t-pw" not in str(ast.redacted())
    assert redact_url("amqp://user:pw@host:5672/") == "amqp://user:***@host:5672/"


def test_unreadable_or_invalid_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.json", env={})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad.json:1:2: not valid JSON"):
        load_settings(bad, env={})
    with pytest.raises(ConfigError, match="cannot read: it is a folder"):
        load_settings(tmp_path, env={})
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00{")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_settings(binary, env={})


FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "cms"


@pytest.mark.parametrize("name", ["guide-appsettings.json", "Terrasoft.Messaging.Service.exe.config"])
def test_creatio_guide_samples_are_read_unchanged(name: str) -> None:
    """The setup guide's .NET Core appsettings.json (a flat block, protocol "PJSIP/") and its
    .NET Framework <asterisk .../> element, exactly as the guide prints them."""
    settings = load_settings(FIXTURES / name, env={})
    ast = settings.asterisk
    assert (ast.url, ast.port, ast.user_name, ast.secret) == ("10.0.15.185", 5038, "creatio", "creatio")
    assert ast.protocol == "PJSIP" and ast.originate_context == "from-internal"
    assert ast.auto_pause_on_commutation_start and ast.async_originate and ast.send_ring_started_on_ringing_state
    assert not ast.trace_queues_state and ast.queue_extension_format == "Local/{0}@from-queue/n"
    assert ast.file_path == "" and ast.packet_info_config == ""
    assert settings.warnings == ()


def test_the_guides_placeholder_template_names_the_first_value_to_replace() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(FIXTURES / "guide-template-appsettings.json", env={})
    message = str(caught.value)
    assert message.startswith(str(FIXTURES / "guide-template-appsettings.json"))
    assert "Asterisk.port" in message and "Asterisk server port" in message and "\n" not in message


@pytest.mark.parametrize(("written", "read"), [("SIP", "SIP"), ("SIP/", "SIP"), ("pjsip/", "pjsip"),
                                               (" PJSIP/ ", "PJSIP"), ("SIP/, PJSIP/", "SIP,PJSIP")])
def test_protocol_as_the_guide_writes_it(written: str, read: str) -> None:
    assert parse_asterisk({"url": "pbx", "userName": "u", "protocol": written}).protocol == read


def test_unknown_keys_warn_with_a_suggestion_and_do_not_stop_the_start(tmp_path: Path) -> None:
    document = {
        "Logging": {"LogLevel": {"Default": "Information"}},
        "Asterisk": {**CMS_SAMPLE["Asterisk"], "originateContex": "x", "nlogConfig": "nlog.config"},  # type: ignore[dict-item]
        "Cluster": {"prefx": "p"},
    }
    settings = load_settings(write(tmp_path, document), env={})
    assert settings.asterisk.originate_context == "from-internal"
    text = "\n".join(settings.warnings)
    assert "Asterisk.originatecontex: unknown key; did you mean originateContext?" in text
    assert "Asterisk.nlogconfig: unknown key; it is ignored" in text
    assert "Cluster.prefx: unknown key; did you mean prefix?" in text
    assert all(w.startswith(str(tmp_path)) for w in settings.warnings)


def test_every_load_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"Asterisk": {"url": "pbx", "userName": "u", "port": "x"}})
    with pytest.raises(ConfigError, match=rf"^{path}: Asterisk.port: expected a whole number"):
        load_settings(path, env={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<configuration><asterisk url='pbx' userName='u'", r":1:\d+: not well-formed XML"),
        ("<configuration><appSettings/></configuration>", "no <asterisk"),
        ("<!DOCTYPE x [<!ENTITY a 'b'>]><configuration><asterisk url='&a;'/></configuration>", "DOCTYPE"),
        ("<configuration><asterisk url='pbx' userName='u' port='0'/></configuration>", "Asterisk.port"),
    ],
)
def test_xml_config_errors_are_one_clear_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "Terrasoft.Messaging.Service.exe.config"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as caught:
        load_settings(path, env={})
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))


def test_xml_cluster_element_beside_asterisk(tmp_path: Path) -> None:
    path = tmp_path / "service.exe.config"
    path.write_text(
        "<configuration><asterisk url='pbx' userName='u' protocol='SIP/'/>"
        "<cluster prefix='prod' redisUrl='redis://r:6379/1'/></configuration>",
        encoding="utf-8",
    )
    settings = load_settings(path, env={})
    assert settings.cluster.prefix == "prod" and settings.cluster.redis_url == "redis://r:6379/1"
    assert settings.asterisk.protocol == "SIP"
