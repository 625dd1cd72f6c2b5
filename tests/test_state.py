"""ClusterState against a real redis-server (EmbeddedRedis): placement round trip, versions,
pub/sub notification, group registry, URL redaction, and that the server leaves no process."""
from __future__ import annotations

import os
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster.placement_table import PlacementTable
from cluster.redis_server import EmbeddedRedis, EmbeddedRedisConfig, RedisServerError
from cluster.state import ClusterState, StaleVersionError, redact_url

NO_RETRY = Retry(NoBackoff(), 0)  # redis-py 8 retries a failed connection with backoff: seconds per expected failure


@pytest.fixture(scope="module")
def server():
    with EmbeddedRedis() as s:
        yield s


@pytest.fixture
def state(server, request):
    # one namespace per test: tests share the server, never each other's keys
    s = ClusterState(server.url, namespace=f"t{abs(hash(request.node.name))}")
    yield s
    s.close()


def table(version: int, groups=("127.0.0.1:1", "127.0.0.1:2")) -> PlacementTable:
    return PlacementTable(version, tuple(groups), {(0, 0): (0,), (0, 1): (1,), (1, 0): (0, 1)})


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_placement_round_trip(state):
    assert state.load_placement() is None
    assert state.placement_version() == 0
    state.publish_placement(table(1))
    assert state.load_placement() == table(1)
    assert state.placement_version() == 1
    raw = state.client.get(f"{state.namespace}:placement")
    assert PlacementTable.from_json(raw) == table(1)  # the documented key holds the JSON


def test_version_must_increase(state):
    state.publish_placement(table(3))
    for stale in (3, 2):
        with pytest.raises(StaleVersionError, match="publish version 4"):
            state.publish_placement(table(stale, groups=("127.0.0.1:9", "127.0.0.1:8")))
    assert state.load_placement() == table(3)  # a refused write changes nothing
    state.publish_placement(table(5))
    assert state.load_placement().version == 5


def test_subscriber_is_notified_with_the_version(state):
    sub = state.subscribe_placement()
    try:
        state.publish_placement(table(1))
        state.publish_placement(table(2))
        got, deadline = [], time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            msg = sub.get_message(timeout=0.5)
            if msg is not None:
                got.append((msg["channel"], msg["data"]))
        channel = f"{state.namespace}:placement:changes"
        assert got == [(channel, "1"), (channel, "2")]
        # a refused publish sends nothing
        with pytest.raises(StaleVersionError):
            state.publish_placement(table(2))
        assert sub.get_message(timeout=0.3) is None
    finally:
        sub.close()


def test_group_registry(state):
    assert state.groups() == {}
    before = time.time()
    state.register_group("g0", "127.0.0.1:5000", [(0, 0), (1, 2)])
    state.register_group("g1", "127.0.0.1:5001", [])
    state.register_group("g0", "127.0.0.1:6000", [(0, 0)])  # re-register overwrites
    groups = state.groups()
    assert set(groups) == {"g0", "g1"}
    assert groups["g0"]["address"] == "127.0.0.1:6000" and groups["g0"]["slots"] == [(0, 0)]
    assert groups["g1"]["slots"] == []
    assert before <= groups["g0"]["updated_at"] <= time.time()
    state.unregister_group("g0")
    assert set(state.groups()) == {"g1"}


def test_redact_url_hides_passwords():
    cases = {
        "redis://:s3cret@host:6379/0": "redis://:***@host:6379/0",
        "rediss://user:s3cret@host:6380/1": "rediss://user:***@host:6380/1",
        "redis://s3cret@host:6379": "redis://***@host:6379",
        "redis://host:6379/0?password=s3cret&db=2": "redis://host:6379/0?password=***&db=2",
        "redis://127.0.0.1:6379/0": "redis://127.0.0.1:6379/0",
    }
    for url, want in cases.items():
        assert redact_url(url) == want
        assert "s3cret" not in redact_url(url)
    assert "s3cret" not in redact_url("redis://:s3cret@host:notaport/0")


def test_password_in_url_is_used_and_never_logged(caplog):
    with EmbeddedRedis(password="s3cret") as server:
        for password in (None, "wrong"):  # the server really requires it, so the URL's password is what works
            with pytest.raises(redis.AuthenticationError):
                redis.Redis(host="127.0.0.1", port=server.port, password=password, retry=NO_RETRY).ping()
        state = ClusterState(server.url)
        with caplog.at_level("INFO", logger="cluster.state"):
            state.publish_placement(table(1))
        assert state.load_placement() == table(1)
        state.close()
    assert "published placement version 1" in caplog.text
    assert "s3cret" not in caplog.text and ":***@" in caplog.text


def test_stop_leaves_no_process():
    server = EmbeddedRedis()
    pid, url = server.pid, server.url
    assert pid_alive(pid)
    assert redis.Redis.from_url(url).ping()
    server.stop()
    server.stop()  # idempotent
    assert server.pid is None
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:  # stop() waited, so this should not loop
        time.sleep(0.05)
    assert not pid_alive(pid)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5, retry=NO_RETRY).ping()


def test_missing_redis_server_says_how_to_install():
    with pytest.raises(RedisServerError, match="apt-get install redis-server"):
        EmbeddedRedis(EmbeddedRedisConfig(executable="no-such-redis-server-binary"))


def test_unknown_config_values_are_rejected():
    with pytest.raises(TypeError):
        EmbeddedRedis(no_such_key=1)
    with pytest.raises(ValueError, match="start_timeout_s"):
        EmbeddedRedisConfig(start_timeout_s=0)
    with pytest.raises(ValueError, match="redis_url"):
        ClusterState("http://127.0.0.1:6379")
