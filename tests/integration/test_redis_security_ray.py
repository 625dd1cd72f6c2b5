"""Redis with a password and TLS, end to end: real Ray (controller and two expert groups),
a real redis-server speaking only TLS and requiring a password (EmbeddedRedis, certificates
made here), real gRPC, and a real router in this process (test_autoscaler_ray.Cluster).

Greedy traffic equals the reference with no failure; the placement travels over TLS
(published by the controller, announced on pub/sub, followed by the router); router
and group telemetry land in Redis; `moectl` reaches it. Then the password must appear
nowhere: this process's logs (DEBUG), moectl's output, the router's Status, what the
cluster wrote to Redis, the Ray session's log files, and the errors a client gets for a
wrong password or for plaintext against the TLS port (which must say what failed).
"""
from __future__ import annotations

import logging
import secrets
from pathlib import Path

import pytest
import ray

from cluster.cli.main import main
from cluster.state.redis_server import EmbeddedRedis
from cluster.state.store import ClusterState, RedisAccessError
from cluster.state.telemetry import Telemetry
from helpers.cluster import FAST, Cluster
from helpers.pki import make_pki
from helpers.traffic import Traffic, wait_for
from router_service.model.reference import ReferenceModel

# Unique per run, so a hit in a grep can only be a leak from this test.
PASSWORD = f"pw-{secrets.token_hex(12)}"


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray of our own, its workers logging at DEBUG to the session's files (by default
    they drop INFO and below, which would make the grep below see little); yields the session
    directory (not session_latest: another test run here may have started a newer one)."""
    if ray.is_initialized():  # another module's Ray, without the logging config
        ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_config=ray.LoggingConfig(log_level="DEBUG"))
    from ray._private import worker

    yield Path(worker._global_node.get_session_dir_path())
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    return ReferenceModel.from_pretrained(tiny_checkpoint)


def redis_dump(state: ClusterState) -> str:
    """Every value the cluster wrote under its namespace, as one string."""
    c, out = state.client, []
    for key in c.scan_iter(f"{state.namespace}:*"):
        kind = c.type(key)
        value = {"string": c.get, "hash": c.hgetall, "list": lambda k: c.lrange(k, 0, -1)}.get(kind, lambda k: "")(key)
        out.append(f"{key} {value}")
    return "\n".join(out)


def files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if needle in path.read_bytes():
                    hits.append(str(path))
            except OSError:
                pass  # a socket or a file Ray removed meanwhile
    return hits


def test_password_and_tls_end_to_end_and_no_secret_anywhere(ray_session, tiny_checkpoint, reference, tmp_path,
                                                            caplog, capsys):
    caplog.set_level(logging.DEBUG)
    pki = make_pki(tmp_path)
    with EmbeddedRedis(password=PASSWORD, tls_cert_file=pki / "server.pem", tls_key_file=pki / "server.key",
                       tls_ca_cert_file=pki / "ca.pem") as server:
        url = server.url
        assert url.startswith(f"rediss://:{PASSWORD}@127.0.0.1:") and "ssl_ca_certs=" in url
        cluster = Cluster(tiny_checkpoint, url, 2, FAST)
        flags = ["--redis-url", url, "--namespace", cluster.namespace]
        traffic, sub = None, None
        try:
            assert main(["autoscaler", "pause", *flags]) == 0  # only the manual change below moves experts
            sub = cluster.state.subscribe_placement()
            traffic = Traffic(cluster.router, reference, list(range(2, 200)), seed=11)
            wait_for(lambda: traffic.ok >= 3, 30, what="traffic through the router")
            telemetry = Telemetry(cluster.state)
            wait_for(lambda: telemetry.expert_load(10.0), 10, what="router load telemetry in Redis")
            wait_for(lambda: telemetry.group_load(10.0), 10, what="group telemetry from the controller in Redis")
            wait_for(lambda: cluster.router.reporter.router_id in telemetry.routers(), 10, what="router heartbeat")

            # a placement change over TLS: controller publishes, pub/sub announces, the router follows
            before = cluster.state.placement_version()
            layer = cluster.spec.sparse_layers[-1]
            assert main(["scale", "--layer", str(layer), "--expert", "3", "--replicas", "2", "--timeout-s", "30",
                         *flags]) == 0
            msg = wait_for(lambda: sub.get_message(timeout=0.2), 10, what="the placement change on pub/sub")
            version = cluster.state.placement_version()  # the change may have taken more than one version
            assert version >= int(msg["data"]) > before and cluster.state.load_placement().version == version
            wait_for(lambda: cluster.router.experts.version_in_use >= version, 10, what="the router to switch")
            served = traffic.ok
            wait_for(lambda: traffic.ok >= served + 3, 30, what="traffic on the new placement")
            traffic.stop()
            assert traffic.failed == 0 and traffic.mismatched == 0, traffic.errors[:5]

            # Status answers from snapshots refreshed every second: wait for one taken after the switch
            status = wait_for(lambda: (s := cluster.router.status()).placement_version >= version and s, 10,
                              what="a Status snapshot of the new placement")
            assert status.serving and status.autoscaler.paused
            autoscaler_json = cluster.state.client.get(cluster.state.autoscaler_status_key)
            assert autoscaler_json and '"paused": true' in autoscaler_json
            written = redis_dump(cluster.state)
            assert f"{cluster.namespace}:placement" in written

            # what a client gets wrong, and what it is told
            base = f"127.0.0.1:{server.port}/0"
            ca = f"ssl_ca_certs={pki / 'ca.pem'}"
            errors = {}
            for name, bad_url, message in [
                ("wrong password", f"rediss://:wrong-{PASSWORD}@{base}?{ca}", "refused the credentials in the URL"),
                ("plaintext to the TLS port", f"redis://:{PASSWORD}@{base}", "if that port speaks TLS, use rediss://"),
            ]:
                bad = ClusterState(bad_url)
                with pytest.raises(RedisAccessError, match=message) as info:
                    bad.ping()
                bad.close()
                errors[name] = str(info.value)
                assert main(["autoscaler", "status", "--redis-url", bad_url]) == 1, name
            moectl_output = capsys.readouterr()
            assert moectl_output.err.count("moectl: error: ") == 2
        finally:
            if sub is not None:
                sub.close()
            if traffic is not None:
                traffic.stop()
            cluster.close()

    places = {"this process's logs": caplog.text, "moectl's output": moectl_output.out + moectl_output.err,
              "the router's Status": str(status), "the autoscaler status in Redis": autoscaler_json,
              "what the cluster wrote to Redis": written, **{f"the {k} error": v for k, v in errors.items()}}
    for where, text in places.items():
        assert PASSWORD not in text, f"the Redis password appears in {where}"
    assert f"placement v{version} received" in caplog.text  # the router's log was captured
    ray_logs = ray_session / "logs"
    # the grep reads this session's real logs: the controller's lines are there, with the URL redacted
    assert files_holding(ray_logs, cluster.name.encode())
    assert files_holding(ray_logs, b"to rediss://:***@127.0.0.1")  # "published placement version ..."
    assert files_holding(ray_logs, PASSWORD.encode()) == []
