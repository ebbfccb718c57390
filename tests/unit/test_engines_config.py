"""Several broker members, Sentinel discovery, and which member a process tries next (no sockets)."""

from __future__ import annotations

import pytest

from services.broker import MemberOrder, Outcome, with_default_heartbeat
from services.config import ConfigError, parse_cluster
from services.redis_client import RedisUrlError, is_sentinel_url, parse_sentinel_url

A, B, C = ("amqp://u:p@10.0.0.1:5672/", "amqp://u:p@10.0.0.2:5672/", "amqp://u:p@10.0.0.3:5672/")


def test_one_broker_url_stays_one() -> None:
    cfg = parse_cluster({"amqpUrl": A}, {})
    assert cfg.amqp_url == A and cfg.amqp_urls == () and cfg.broker_urls == (A,)


@pytest.mark.parametrize("block", [{"amqpUrls": [A, B, C]}, {"amqpUrls": f"{A}, {B},{C}"}, {"amqpUrl": f"{A},{B},{C}"}])
def test_broker_members_as_a_list_or_comma_separated(block: dict[str, object]) -> None:
    cfg = parse_cluster(block, {})
    assert cfg.broker_urls == (A, B, C) and cfg.amqp_url == A


def test_the_environment_list_replaces_the_files() -> None:
    cfg = parse_cluster({"amqpUrls": [A, B]}, {"CMS_AMQP_URL": f"{C},{A}"})
    assert cfg.broker_urls == (C, A)


@pytest.mark.parametrize(("block", "says"), [
    ({"amqpUrls": [A, "redis://x/"]}, "must start with amqp://"),
    ({"amqpUrls": [A, A]}, "listed twice"),
    ({"amqpUrls": [A, 5]}, "must be a string"),
])
def test_bad_broker_lists_are_named(block: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        parse_cluster(block, {})
    assert "Cluster.amqpUrls" in str(caught.value) and "u:p@" not in str(caught.value)


def test_sentinel_keys_become_a_sentinel_url_with_the_urls_password_and_db() -> None:
    cfg = parse_cluster({"redisUrl": "redis://:s3cret@ignored:6379/2", "sentinels": "h1:26379, h2:26380",
                         "sentinelMaster": "mymaster"}, {})
    assert cfg.redis_url == "redis+sentinel://:s3cret@h1:26379,h2:26380/mymaster/2"
    spec = parse_sentinel_url(cfg.redis_url)
    assert spec.sentinels == (("h1", 26379), ("h2", 26380))
    assert (spec.master, spec.db, spec.password, spec.username) == ("mymaster", 2, "s3cret", None)


def test_sentinels_without_a_master_name_are_refused() -> None:
    with pytest.raises(ConfigError, match="sentinelMaster"):
        parse_cluster({"sentinels": ["h1:26379"]}, {})
    with pytest.raises(ConfigError, match="not host:port"):
        parse_cluster({"sentinels": ["h1"], "sentinelMaster": "m"}, {})


def test_a_sentinel_url_is_checked_at_load() -> None:
    assert parse_cluster({"redisUrl": "redis+sentinel://a:1,b:2/m"}, {}).redis_url == "redis+sentinel://a:1,b:2/m"
    with pytest.raises(ConfigError, match="master name is missing"):
        parse_cluster({"redisUrl": "redis+sentinel://a:1,b:2/"}, {})
    with pytest.raises(ConfigError, match="must start with"):
        parse_cluster({"redisUrl": "http://a:1/"}, {})


def test_sentinel_url_parsing() -> None:
    assert is_sentinel_url("redis+sentinel://a:1/m") and not is_sentinel_url("redis://a:1/0")
    spec = parse_sentinel_url("rediss+sentinel://user:p%40ss@[::1]:26379,b:26379/m%20x")
    assert spec.tls and spec.username == "user" and spec.password == "p@ss"
    assert spec.sentinels == (("::1", 26379), ("b", 26379)) and spec.master == "m x" and spec.db == 0
    for bad in ("redis+sentinel://a/m/0", "redis+sentinel://a:1/m/x", "redis://a:1/m"):
        with pytest.raises(RedisUrlError):
            parse_sentinel_url(bad)


def test_member_order_stays_on_its_member_and_moves_on_after_a_loss() -> None:
    order = MemberOrder(3)
    assert order.round() == [0, 1, 2]
    assert order.connected(0) is Outcome.FIRST
    order.lost()
    assert order.round() == [1, 2, 0]  # the failed member last
    assert order.connected(1) is Outcome.FAILOVER
    order.lost()
    assert order.round() == [2, 0, 1]
    assert order.connected(1) is Outcome.RECONNECT  # 2 and 0 refused; 1 took us back
    with pytest.raises(ValueError):
        MemberOrder(0)


def test_heartbeat_added_unless_the_url_sets_one() -> None:
    assert with_default_heartbeat(A, 15) == A + "?heartbeat=15"
    assert with_default_heartbeat(A + "?heartbeat=5", 15) == A + "?heartbeat=5"
    assert with_default_heartbeat(A + "?x=1", 15) == A + "?x=1&heartbeat=15"
