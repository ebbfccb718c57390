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
        ({"url": "pbx", "userName": "u", "protocol": "SIP/"}, "Asterisk.protocol"),
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
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_settings(bad, env={})
