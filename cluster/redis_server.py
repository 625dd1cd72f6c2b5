"""EmbeddedRedis: a private, throwaway redis-server on 127.0.0.1, for tests and local runs.

    EmbeddedRedis() -> free port -> redis-server --bind 127.0.0.1 --port P --save "" --appendonly no
                    -> PING until it answers (bounded) -> .url "redis://127.0.0.1:P/0"
    .stop()         -> SIGTERM by pid, wait, SIGKILL if it lingers; temp dir removed

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
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

INSTALL_HINT = ("install it (Debian/Ubuntu: sudo apt-get install redis-server; Fedora: sudo dnf install redis; "
                "macOS: brew install redis), or run `make redis` in the repository root")


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start or answer in time; the message says which and why."""


@dataclass(frozen=True)
class EmbeddedRedisConfig:
    executable: str = "redis-server"  # a name looked up on PATH, or a path
    start_timeout_s: float = 10.0  # how long to wait for the first PONG
    stop_timeout_s: float = 5.0  # how long SIGTERM gets before SIGKILL
    password: str | None = None  # requirepass; it then appears in .url (redact it with cluster.state.redact_url)
    start_attempts: int = 3  # tries on fresh ports when the chosen port was taken meanwhile
    port: int = 0  # 0 = a free port; a fixed one brings a stopped server back where clients look for it

    def __post_init__(self) -> None:
        if not isinstance(self.executable, str) or not self.executable:
            raise ValueError(f"executable must be a non-empty string, got {self.executable!r}")
        for name in ("start_timeout_s", "stop_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.password is not None and (not isinstance(self.password, str) or not self.password):
            raise ValueError("password must be None or a non-empty string")
        if not isinstance(self.start_attempts, int) or isinstance(self.start_attempts, bool) or self.start_attempts < 1:
            raise ValueError(f"start_attempts must be an int >= 1, got {self.start_attempts!r}")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an int in [0, 65535] (0 = a free port), got {self.port!r}")


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
        self._dir = Path(tempfile.mkdtemp(prefix="elasticmoe-redis-"))
        self._proc: subprocess.Popen | None = None
        self.port = 0
        atexit.register(self.stop)  # unregistered by stop(): a stopped server holds no reference here
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        auth = f":{self.config.password}@" if self.config.password else ""
        return f"redis://{auth}{self.HOST}:{self.port}/0"

    def _start(self) -> None:
        errors = []
        for _ in range(self.config.start_attempts):
            self.port = self.config.port or free_port(self.HOST)
            log_path = self._dir / f"redis-{self.port}.log"
            args = [self._binary, "--bind", self.HOST, "--port", str(self.port), "--save", "", "--appendonly", "no",
                    "--dir", str(self._dir), "--daemonize", "no", "--logfile", str(log_path)]
            if self.config.password:
                args += ["--requirepass", self.config.password]
            # errors before the logfile opens (a bad argument) go to stderr: a file, so no pipe can fill up
            with open(self._dir / "stderr.log", "wb") as stderr:
                self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                              stderr=stderr, cwd=self._dir)
            problem = self._wait_ready(log_path)
            if problem is None:
                log.info("embedded redis-server pid %d listening on %s:%d", self._proc.pid, self.HOST, self.port)
                return
            errors.append(problem)
            self._terminate()
            if "already in use" not in problem or self.config.port:  # only a race for a free port is worth a retry
                break
        raise RedisServerError(f"redis-server did not start: {errors[-1]}")

    def _wait_ready(self, log_path: Path) -> str | None:
        """None once the server answers PING; otherwise why it did not (exit status, log tail, timeout)."""
        # no retries inside redis-py (version 8 retries with backoff by default): this loop is the retry
        client = redis.Redis(host=self.HOST, port=self.port, password=self.config.password,
                             socket_connect_timeout=0.5, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + self.config.start_timeout_s
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    output = "".join(p.read_text(errors="replace")[-2000:] for p in (self._dir / "stderr.log", log_path)
                                     if p.exists())
                    return f"exited with status {self._proc.returncode}: {output.strip()}"
                try:
                    if client.ping():
                        return None
                except redis.exceptions.ConnectionError:
                    pass  # not listening yet
                time.sleep(0.02)
            return f"no PONG on {self.HOST}:{self.port} within {self.config.start_timeout_s} s"
        finally:
            client.close()

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
