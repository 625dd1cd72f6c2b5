"""EmbeddedRedis: a private, throwaway redis-server on 127.0.0.1, for tests and local runs.

    EmbeddedRedis() -> free port -> redis-server <temp dir>/redis.conf --bind 127.0.0.1 --port P --save ""
                    -> PING until it answers (bounded) -> .url "redis://127.0.0.1:P/0"
    EmbeddedRedis(password="pw", tls_cert_file=..., tls_key_file=..., tls_ca_cert_file=...)
                    -> --port 0 --tls-port P --tls-cert-file ... (TLS only, no plaintext port)
                    -> PING over TLS -> .url "rediss://:pw@127.0.0.1:P/0?ssl_ca_certs=/abs/ca.pem"
                       (and &ssl_certfile=...&ssl_keyfile=... when a client certificate is configured)
    .stop()         -> SIGTERM by pid, wait, SIGKILL if it lingers; temp dir removed

The password goes into a 0600 config file in the temp dir, not onto the command line:
redis-server rewrites its process title once it runs, but until then `ps` shows its argv
to every local user. Debian's redis-server 7.0 is built with
TLS (linked to libssl; tested with --tls-port). The server's certificate must carry
127.0.0.1 (an IP SAN): redis-py checks the name it dials.

Nothing is persisted (no RDB snapshot, no AOF) and the working directory is a temp dir
of its own, so two instances never share a file and nothing is left behind. A server
is also stopped at interpreter exit (atexit), so a test that forgets stop() does not
leak a process; a process killed with SIGKILL cannot run atexit handlers, though.

The port is found by binding port 0 and closing the socket, then handing the number
to redis-server: another process can take it in between, so a failed start on a busy
port is retried on a new one (start_attempts).
"""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

INSTALL_HINT = ("install it (Debian/Ubuntu: sudo apt-get install redis-server; Fedora: sudo dnf install redis; "
                "macOS: brew install redis), or run `make redis` in the repository root")


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start or answer in time; the message says which and why."""


TLS_AUTH_CLIENTS = ("no", "yes", "optional")  # redis.conf tls-auth-clients: must a client show a certificate?


@dataclass(frozen=True)
class EmbeddedRedisConfig:
    executable: str = "redis-server"  # a name looked up on PATH, or a path
    start_timeout_s: float = 10.0  # how long to wait for the first PONG
    stop_timeout_s: float = 5.0  # how long SIGTERM gets before SIGKILL
    # requirepass; it then appears in .url (redact it with cluster.state.store.redact_url), never in a repr
    password: str | None = field(default=None, repr=False)
    start_attempts: int = 3  # tries on fresh ports when the chosen port was taken meanwhile
    port: int = 0  # 0 = a free port; a fixed one brings a stopped server back where clients look for it
    # TLS: all three files turn it on; the server then listens on `port` with TLS only. Paths are
    # made absolute (redis-server runs in its temp dir) and must be readable files.
    tls_cert_file: str | None = None  # the server's certificate (PEM), with 127.0.0.1 among its names
    tls_key_file: str | None = None  # its private key (PEM, unencrypted)
    tls_ca_cert_file: str | None = None  # the CA clients verify the server with (.url's ssl_ca_certs), and
    #                                      the server verifies client certificates with
    tls_auth_clients: str = "no"  # "yes": clients must show a certificate from that CA; "optional": may
    tls_client_cert_file: str | None = None  # the client certificate .url presents (needed with "yes")
    tls_client_key_file: str | None = None  # its key

    def __post_init__(self) -> None:
        if not isinstance(self.executable, str) or not self.executable:
            raise ValueError(f"executable must be a non-empty string, got {self.executable!r}")
        for name in ("start_timeout_s", "stop_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.password is not None and (not isinstance(self.password, str) or not self.password):
            raise ValueError("password must be None or a non-empty string")
        if self.password is not None and any(ord(c) < 32 or ord(c) == 127 for c in self.password):
            raise ValueError("password must not contain control characters (newlines, NUL, ...)")
        if not isinstance(self.start_attempts, int) or isinstance(self.start_attempts, bool) or self.start_attempts < 1:
            raise ValueError(f"start_attempts must be an int >= 1, got {self.start_attempts!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535] (0 = a free port), got {self.port!r}")
        self._check_tls()

    def _check_tls(self) -> None:
        server = ("tls_cert_file", "tls_key_file", "tls_ca_cert_file")
        client = ("tls_client_cert_file", "tls_client_key_file")
        for name in server + client:
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ValueError(f"{name} must be None or a path, got {value!r}")
            path = Path(value).resolve()
            if not path.is_file() or not os.access(path, os.R_OK):
                raise ValueError(f"{name}: {path} is not a readable file")
            object.__setattr__(self, name, str(path))  # absolute: redis-server runs in its own temp dir
        given = [n for n in server if getattr(self, n) is not None]
        if given and len(given) != len(server):
            missing = ", ".join(n for n in server if getattr(self, n) is None)
            raise ValueError(f"TLS needs tls_cert_file, tls_key_file and tls_ca_cert_file together; missing {missing}")
        if self.tls_auth_clients not in TLS_AUTH_CLIENTS:
            raise ValueError(f"tls_auth_clients must be one of {', '.join(TLS_AUTH_CLIENTS)}, "
                             f"got {self.tls_auth_clients!r}")
        if not self.tls:
            extra = [n for n in client if getattr(self, n) is not None]
            if extra or self.tls_auth_clients != "no":
                raise ValueError(f"{', '.join(extra) or 'tls_auth_clients'} need TLS: set tls_cert_file, "
                                 f"tls_key_file and tls_ca_cert_file too")
            return
        if (self.tls_client_cert_file is None) != (self.tls_client_key_file is None):
            raise ValueError("tls_client_cert_file and tls_client_key_file go together")
        if self.tls_auth_clients == "yes" and self.tls_client_cert_file is None:
            raise ValueError('tls_auth_clients="yes" needs tls_client_cert_file and tls_client_key_file: '
                             "the readiness PING and .url must present a client certificate")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


def _conf_quote(value: str) -> str:
    """value as a double-quoted redis.conf argument (sdssplitargs: backslash escapes inside quotes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedRedis:
    """A private redis-server, started on construction. Use as a context manager or call stop()."""

    HOST = "127.0.0.1"

    def __init__(self, config: EmbeddedRedisConfig | None = None, **overrides):
        if config is not None and overrides:
            raise ValueError("pass either an EmbeddedRedisConfig or keyword overrides, not both")
        self.config = config if config is not None else EmbeddedRedisConfig(**overrides)
        self._binary = shutil.which(self.config.executable)
        if self._binary is None:
            raise RedisServerError(f"{self.config.executable!r} was not found on PATH: {INSTALL_HINT}")
        self._dir = Path(tempfile.mkdtemp(prefix="elasticmoe-redis-"))  # 0700
        self._conf = self._dir / "redis.conf"
        self._proc: subprocess.Popen | None = None
        self.port = 0
        atexit.register(self.stop)  # unregistered by stop(): a stopped server holds no reference here
        try:
            self._write_conf()
            self._start()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        """What redis-py needs to reach and verify this server; it holds the password: log it only
        through cluster.state.store.redact_url."""
        c = self.config
        auth = f":{quote(c.password, safe='')}@" if c.password else ""
        if not c.tls:
            return f"redis://{auth}{self.HOST}:{self.port}/0"
        query = [("ssl_ca_certs", c.tls_ca_cert_file)]
        if c.tls_client_cert_file is not None:
            query += [("ssl_certfile", c.tls_client_cert_file), ("ssl_keyfile", c.tls_client_key_file)]
        return f"rediss://{auth}{self.HOST}:{self.port}/0?" + "&".join(f"{k}={quote(v)}" for k, v in query)

    def _write_conf(self) -> None:
        # the password goes here, 0600, and not on the command line (visible in `ps` until redis-server
        # rewrites its process title)
        fd = os.open(self._conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            if self.config.password:
                f.write(f"requirepass {_conf_quote(self.config.password)}\n")

    def _start(self) -> None:
        errors = []
        for _ in range(self.config.start_attempts):
            self.port = self.config.port or free_port(self.HOST)
            log_path = self._dir / f"redis-{self.port}.log"
            args = [self._binary, str(self._conf), "--bind", self.HOST, "--save", "", "--appendonly", "no",
                    "--dir", str(self._dir), "--daemonize", "no", "--logfile", str(log_path)]
            c = self.config
            if c.tls:
                args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", c.tls_cert_file,
                         "--tls-key-file", c.tls_key_file, "--tls-ca-cert-file", c.tls_ca_cert_file,
                         "--tls-auth-clients", c.tls_auth_clients]
            else:
                args += ["--port", str(self.port)]
            # errors before the logfile opens (a bad argument) go to stderr: a file, so no pipe can fill up
            with open(self._dir / "stderr.log", "wb") as stderr:
                self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=stderr, cwd=self._dir)
            problem = self._wait_ready(log_path)
            if problem is None:
                log.info("embedded redis-server pid %d listening on %s:%d (%s, %s)", self._proc.pid, self.HOST,
                         self.port,
                         f"TLS, client certificates: {c.tls_auth_clients}" if c.tls else "plaintext",
                         "password required" if c.password else "no password")
                return
            errors.append(problem)
            self._terminate()
            if "already in use" not in problem or self.config.port:  # only a race for a free port is worth a retry
                break
        raise RedisServerError(f"redis-server did not start: {errors[-1]}")

    def _wait_ready(self, log_path: Path) -> str | None:
        """None once the server answers PING; otherwise why it did not (exit status, log tail, timeout)."""
        # through .url, as every client dials it (over TLS with the CA when TLS is on); no retries
        # inside redis-py (version 8 retries with backoff by default): this loop is the retry
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5,
                                      retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + self.config.start_timeout_s
        last_error = "none"
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    output = "".join(p.read_text(errors="replace")[-2000:] for p in (self._dir / "stderr.log", log_path)
                                     if p.exists())
                    return self._scrub(f"exited with status {self._proc.returncode}: {output.strip()}")
                try:
                    if client.ping():
                        return None
                except (redis.ConnectionError, redis.TimeoutError) as e:  # not listening yet, or TLS refused
                    last_error = f"{type(e).__name__}: {e}"
                time.sleep(0.02)
            return self._scrub(f"no PONG on {self.HOST}:{self.port}{' over TLS' if self.config.tls else ''} within "
                               f"{self.config.start_timeout_s} s (last error: {last_error})")
        finally:
            client.close()

    def _scrub(self, text: str) -> str:
        return text.replace(self.config.password, "***") if self.config.password else text

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # by pid: this Popen's own process, never a name match
            try:
                proc.wait(self.config.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d ignored SIGTERM for %.1f s: killing it", proc.pid,
                            self.config.stop_timeout_s)
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """Stop the server and remove its temp dir. Idempotent."""
        pid = self.pid
        self._terminate()
        shutil.rmtree(self._dir, ignore_errors=True)
        atexit.unregister(self.stop)
        if pid is not None:
            log.info("embedded redis-server pid %d stopped", pid)

    def __enter__(self) -> "EmbeddedRedis":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
