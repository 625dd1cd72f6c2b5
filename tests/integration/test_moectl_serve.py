"""`moectl serve` as a user runs it: foreground process, a client from outside, Ctrl-C."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from urllib.parse import unquote, urlsplit

import pytest
import redis

from cluster.state.redis_server import free_port
from router_service.client import MoEClient
from router_service.model.reference import ReferenceModel

READY = "serving elasticmoe.v1.MoEService"


def test_serve_generate_status_then_ctrl_c(tiny_checkpoint, tmp_path):
    port, http_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "w+")
    home = tmp_path / "home"  # where serve.json goes
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--checkpoint", str(tiny_checkpoint),
                             "--groups", "2", "--port", str(port), "--http-port", str(http_port), "--http-host",
                             "127.0.0.1", "--served-model-name", "demo"], stdout=log, stderr=subprocess.STDOUT,
                            env=os.environ | {"PYTHONUNBUFFERED": "1", "ELASTICMOE_HOME": str(home)})
    try:
        deadline = time.monotonic() + 180
        while READY not in (tmp_path / "serve.log").read_text():
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "moectl serve did not become ready in 180 s"
            time.sleep(0.5)
        prompt = [7, 8, 9, 10]
        expected = ReferenceModel.from_pretrained(tiny_checkpoint).generate_greedy(prompt, 5)
        expected = expected[: expected.index(1)] if 1 in expected else expected  # </s> stops
        with MoEClient(f"127.0.0.1:{port}", timeout_s=60) as client:
            assert client.generate(prompt, max_tokens=5).token_ids == expected
        # the same service over HTTP, as the curl line moectl serve prints
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", headers={
            "content-type": "application/json"}, data=json.dumps({"model": "demo", "prompt": prompt, "max_tokens": 5,
                                                                  "return_tokens_as_token_ids": True,
                                                                  "logprobs": 0}).encode())
        reply = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert [int(t.split(":")[1]) for t in reply["choices"][0]["logprobs"]["tokens"]] == expected
        status = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and "placement v1" in status.stdout and "layer   1:" in status.stdout
        # the embedded Redis has a password: another local user cannot rewrite the cluster's state
        serve_file = home / "serve.json"
        assert stat.S_IMODE(serve_file.stat().st_mode) == 0o600
        url = json.loads(serve_file.read_text())["redis_url"]
        password = unquote(urlsplit(url).password or "")
        assert len(password) >= 24
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=urlsplit(url).port, socket_timeout=5).ping()
        text = (tmp_path / "serve.log").read_text()
        assert "allow_unauthenticated" in text and password not in text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text = (tmp_path / "serve.log").read_text()
    assert code == 0, text[-3000:]
    assert "embedded redis-server pid" in text and "stopped" in text


def test_serve_refuses_a_bad_checkpoint_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", "--checkpoint", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
