"""ClusterState against a real redis-server (EmbeddedRedis): placement round trip, versions,
pub/sub notification, group registry, URL checking and redaction, a password and TLS
(mutual too) end to end with clear errors for each misconfiguration, and that the server
leaves no process."""
from __future__ import annotations

import os
import time
from urllib.parse import quote

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from cluster.placement.table import PlacementTable
from cluster.state.redis_server import EmbeddedRedis, EmbeddedRedisConfig, RedisServerError
from cluster.state.redis_url import QUERY_KEYS, TLS_QUERY_KEYS, check_tls_files, check_url, explain_error
from cluster.state.store import ClusterState, RedisAccessError, StaleVersionError, redact_url
from cluster.state.telemetry import Telemetry
from helpers.pki import make_pki

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


def test_a_malformed_request_costs_no_other_request_its_place(state):
    """One bad entry in {ns}:autoscaler:requests used to lose every queued `moectl scale` request
    (the list was deleted, then parsing raised); now each is parsed on its own."""
    first = state.push_request({"kind": "scale", "layer": 0, "expert": 1, "replicas": 2})
    state.client.rpush(state.requests_key, "{not json", json_dumps([1, 2]), json_dumps({"kind": "scale"}))
    last = state.push_request({"kind": "scale", "layer": 1, "expert": 3, "replicas": 1})
    popped = state.pop_requests()
    assert [r["id"] for r in popped] == [first, None, None, None, last]
    assert [r.get("invalid", "")[:10] for r in popped] == ["", "not JSON (", "not a JSON", "no request", ""]
    assert state.pop_requests() == []


def json_dumps(value) -> str:
    import json

    return json.dumps(value)


def test_redact_url_hides_passwords():
    cases = {
        "redis://:s3cret@host:6379/0": "redis://:***@host:6379/0",
        "rediss://user:s3cret@host:6380/1": "rediss://user:***@host:6380/1",
        "redis://s3cret@host:6379": "redis://***@host:6379",
        "redis://host:6379/0?password=s3cret&db=2": "redis://host:6379/0?password=***&db=2",
        "redis://127.0.0.1:6379/0": "redis://127.0.0.1:6379/0",
        # TLS: paths are not secrets and stay readable; a key passphrase is one
        "rediss://:s3cret@h:6380/0?ssl_ca_certs=/etc/redis/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/c.key"
        "&ssl_password=s3cret":
            "rediss://:***@h:6380/0?ssl_ca_certs=/etc/redis/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/c.key"
            "&ssl_password=***",
        "rediss://:s3cr%40t@h:6380/0?ssl_cert_reqs=none&PASSWORD=s3cret":
            "rediss://:***@h:6380/0?ssl_cert_reqs=none&PASSWORD=***",
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
        with caplog.at_level("INFO", logger="cluster.state.store"):
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


# --- URL forms: what check_url accepts is what redis-py can build a connection from ---------------

SAMPLE_VALUES = {"db": "2", "username": "app", "password": "s3cret", "client_name": "router",
                 "socket_timeout": "1.5", "socket_connect_timeout": "2", "health_check_interval": "10",
                 "ssl_ca_certs": "/etc/ca.pem", "ssl_ca_path": "/etc/ssl/certs", "ssl_certfile": "/c.pem",
                 "ssl_keyfile": "/c.key", "ssl_password": "s3cret", "ssl_cert_reqs": "optional",
                 "ssl_check_hostname": "false"}


def test_every_accepted_query_key_reaches_redis_py_as_a_connection_argument():
    assert set(SAMPLE_VALUES) == set(QUERY_KEYS) | set(TLS_QUERY_KEYS)
    for key, value in SAMPLE_VALUES.items():
        scheme = "rediss" if key in TLS_QUERY_KEYS else "redis"
        query = f"{key}={value}" + ("&ssl_certfile=/c.pem" if key == "ssl_keyfile" else "")
        url = f"{scheme}://127.0.0.1:6380/0?{query}"
        check_url(url)
        # builds the connection object without dialling: a key redis-py does not take fails here (TypeError)
        conn = redis.ConnectionPool.from_url(url).make_connection()
        assert type(conn).__name__ == ("SSLConnection" if scheme == "rediss" else "Connection")
    # how redis-py 8 reads the TLS keys (redis/connection.py parse_url): strings, one bool
    parsed = redis.connection.parse_url("rediss://:pw@h:6380/1?ssl_ca_certs=/a%20b/ca.pem&ssl_cert_reqs=required"
                                        "&ssl_check_hostname=false&ssl_certfile=/c.pem&ssl_keyfile=/c.key")
    assert parsed["ssl_ca_certs"] == "/a b/ca.pem" and parsed["ssl_cert_reqs"] == "required"
    assert parsed["ssl_check_hostname"] is False and parsed["password"] == "pw" and parsed["db"] == 1
    assert parsed["connection_class"] is redis.SSLConnection


@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:6379", "must start with one of"),
    ("redis://:s3cret@127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs is a TLS setting and needs rediss://"),
    ("unix://:s3cret@/run/redis.sock?ssl_certfile=/c.pem", "needs rediss://"),
    ("rediss://:s3cret@h:6380/0?ssl_ca_cert=/ca.pem", "unknown query key 'ssl_ca_cert'"),
    ("rediss://:s3cret@h:6380/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of none, optional, required"),
    ("rediss://:s3cret@h:6380/0?ssl_check_hostname=perhaps", "ssl_check_hostname must be true or false"),
    ("rediss://:s3cret@h:6380/0?ssl_ca_certs=", "ssl_ca_certs must be the path"),
    ("rediss://:s3cret@h:6380/0?ssl_keyfile=/c.key", "ssl_keyfile needs ssl_certfile"),
    ("rediss://h:6380/0?ssl_ca_certs=/a&ssl_ca_certs=/b", "gives ssl_ca_certs twice"),
    ("redis://h:6379/0?password=", r"password must be a non-empty string, got \*\*\*"),
    ("redis://:s3cret@h:6379/0?db=x", "db must be an int >= 0"),
    ("redis://:s3cret@h:port/0", "cannot be parsed"),
    ("rediss://:s3cret@h:6380/0?ssl_password=s3cret&socket_timeout=0", "socket_timeout must be a positive"),
])
def test_bad_urls_are_refused_with_a_message_that_names_the_part_and_no_secret(url, message):
    with pytest.raises(ValueError, match=message) as info:
        check_url(url)
    assert "s3cret" not in str(info.value)


def test_tls_files_are_checked_where_the_connection_is_made(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("not used")
    check_tls_files(f"rediss://h:6380/0?ssl_ca_certs={ca}")
    with pytest.raises(ValueError, match=f"ssl_certfile={tmp_path}/none.pem is not a readable file") as info:
        ClusterState(f"rediss://:s3cret@h:6380/0?ssl_ca_certs={ca}&ssl_certfile={tmp_path}/none.pem")
    assert "s3cret" not in str(info.value)
    with pytest.raises(ValueError, match="ssl_ca_path=.* is not a readable directory"):
        check_tls_files(f"rediss://h:6380/0?ssl_ca_path={ca}")


def test_explained_errors_never_repeat_a_secret_redis_py_put_in_its_message():
    url = "rediss://:s3cr%2Fet@h:6380/0?ssl_password=k3y"
    for error in (redis.ConnectionError("boom s3cr/et and k3y"), redis.AuthenticationError("WRONGPASS s3cr%2Fet"),
                  RuntimeError("s3cr/et")):
        text = explain_error(error, url)
        assert "s3cr" not in text and "k3y" not in text and "rediss://:***@h:6380/0" in text


# --- EmbeddedRedis with a password and TLS ------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("redis-pki"))


def tls_config(pki, **overrides) -> dict:
    return {"tls_cert_file": pki / "server.pem", "tls_key_file": pki / "server.key", "tls_ca_cert_file": pki / "ca.pem",
            **overrides}


def test_embedded_redis_tls_config_is_validated(pki, tmp_path):
    c = EmbeddedRedisConfig(**tls_config(pki))
    assert c.tls and c.tls_ca_cert_file == str((pki / "ca.pem").resolve())  # absolute: the server runs elsewhere
    assert not EmbeddedRedisConfig().tls
    bad = [
        (dict(tls_cert_file=pki / "server.pem"), "missing tls_key_file, tls_ca_cert_file"),
        (tls_config(pki, tls_key_file=tmp_path / "none.key"), "tls_key_file: .*none.key is not a readable file"),
        (tls_config(pki, tls_auth_clients="required"), "tls_auth_clients must be one of no, yes, optional"),
        (tls_config(pki, tls_auth_clients="yes"), 'tls_auth_clients="yes" needs tls_client_cert_file'),
        (tls_config(pki, tls_client_cert_file=pki / "client.pem"), "go together"),
        (dict(tls_client_cert_file=pki / "client.pem", tls_client_key_file=pki / "client.key"), "need TLS"),
        (dict(tls_auth_clients="optional"), "tls_auth_clients need TLS"),
        (dict(password="two\nlines"), "control characters"),
        (dict(password=""), "non-empty"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message):
            EmbeddedRedisConfig(**overrides)


def test_password_and_tls_end_to_end_with_clear_errors(pki, caplog):
    password = "pa ss/w@rd:\"x\\y"  # characters the URL must percent-encode and redis.conf must quote
    secrets = (password, "pa ss", "pa%20ss")
    with caplog.at_level("DEBUG"), EmbeddedRedis(password=password, **tls_config(pki)) as server:
        url = server.url
        assert url.startswith("rediss://:") and f"ssl_ca_certs={(pki / 'ca.pem').resolve()}" in url
        # not in argv (redis-server rewrites its process title once up, but until then `ps` shows argv
        # to every local user): in a config file only its owner reads
        assert not any(s in " ".join(server._proc.args) for s in secrets)
        assert os.stat(server._conf).st_mode & 0o777 == 0o600
        state = ClusterState(url, namespace="tls")
        state.ping()
        sub = state.subscribe_placement()  # pub/sub over the same TLS connection pool
        try:
            state.publish_placement(table(1))
            msg = wait_message(sub)
            assert msg["data"] == "1" and state.load_placement() == table(1)
        finally:
            sub.close()
        Telemetry(state).record_router("r0", {(0, 1): 5}, version=1)  # the pipelined telemetry writes
        assert Telemetry(state).expert_load(5.0) == {(0, 1): 5}
        state.close()

        base = f"127.0.0.1:{server.port}/0"
        ca = f"ssl_ca_certs={(pki / 'ca.pem').resolve()}"
        cases = {  # what a client got wrong -> what the error must say
            f"rediss://:wrong-pass@{base}?{ca}": "refused the credentials in the URL",
            f"rediss://{base}?{ca}": "requires a password and the URL gives none",
            f"redis://:{quote(password, safe='')}@{base}": "if that port speaks TLS, use rediss://",
            f"rediss://:x@{base}": "certificate did not verify .*set ssl_ca_certs",
        }
        for bad_url, message in cases.items():
            bad = ClusterState(bad_url)
            with pytest.raises(RedisAccessError, match=message) as info:
                bad.ping()
            bad.close()
            assert not any(s in str(info.value) for s in secrets + ("wrong-pass",)), str(info.value)
    assert "rediss://:***@127.0.0.1" in caplog.text  # the URL was logged, redacted
    assert not any(s in caplog.text for s in secrets + ("wrong-pass",))


def test_mutual_tls_needs_the_client_certificate(pki, capsys):
    from cluster.cli.main import main

    config = tls_config(pki, tls_auth_clients="yes", tls_client_cert_file=pki / "client.pem",
                        tls_client_key_file=pki / "client.key")
    with EmbeddedRedis(password="s3cret", **config) as server:
        assert "&ssl_certfile=" in server.url and "&ssl_keyfile=" in server.url
        ClusterState(server.url).ping()
        without = server.url.split("&ssl_certfile=")[0]
        with pytest.raises(RedisAccessError, match="may require a client certificate; add ssl_certfile"):
            ClusterState(without).ping()
        # moectl: a refused connection is one line and exit status 1, no traceback, no password
        assert main(["autoscaler", "pause", "--redis-url", server.url, "--namespace", "mtls"]) == 0
        assert main(["autoscaler", "pause", "--redis-url", without, "--namespace", "mtls"]) == 1
        err = capsys.readouterr().err
        assert "moectl: error: TLS to rediss://:***@127.0.0.1" in err and "s3cret" not in err


def wait_message(sub, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = sub.get_message(timeout=0.5)
        if msg is not None:
            return msg
    raise AssertionError(f"no pub/sub message within {timeout_s} s")
