"""A service process that `laggard stack` starts, finds again by pid file, and stops.

Each service keeps `<state>/<name>/<name>.pid` and `<name>.log`. A pid counts as ours only while
that process is alive and its command line still names the service's marker (pids are reused).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import httpx

PORT_RELEASE_S = 5.0


class StackError(RuntimeError):
    """A service could not be prepared or started; the message says what and how to fix it."""


@dataclass
class ServiceStatus:
    name: str
    pid: int | None
    port: int
    running: bool
    healthy: bool
    detail: str = ""


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port() -> int:
    """A free local port below Linux's ephemeral range (32768-60999 by default). A port inside it
    can be taken, while its server is down, by a client's own reconnect attempt: a TCP
    self-connect whose source port happens to equal the destination port."""
    for port in random.sample(range(20_000, 32_000), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise StackError("no free local port between 20000 and 32000")


def write_private(path: Path, text: str) -> None:
    """Create or replace `path` readable by its owner only (mode 600 from the start, no window)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def http_answers(url: str, status: int) -> bool:
    """A health check: one GET of `url` answered with `status`; False on any HTTP error."""
    try:
        return httpx.get(url, timeout=2).status_code == status
    except httpx.HTTPError:
        return False


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    """Poll `condition` until it is true or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return "(no log written)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class ManagedService(ABC):
    """One local service. Subclasses say how to prepare, run and health-check it."""

    name: str
    start_timeout_s: float = 60.0

    def __init__(self, state_dir: Path, port: int) -> None:
        self.home = state_dir / self.name
        self.port = port

    @property
    def pid_path(self) -> Path:
        return self.home / f"{self.name}.pid"

    @property
    def log_path(self) -> Path:
        return self.home / f"{self.name}.log"

    @abstractmethod
    def prepare(self) -> None:
        """Install, resolve and configure what the service needs (idempotent)."""

    @abstractmethod
    def command(self) -> list[str]: ...

    @abstractmethod
    def marker(self) -> str:
        """A string in the process command line that identifies this service instance."""

    @abstractmethod
    def healthy(self) -> bool:
        """One quick real request to the service."""

    def after_start(self) -> None:
        """Runs once the service answers (create databases, topics...)."""

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
        return pid if self.marker() in cmdline and not zombie else None

    def status(self) -> ServiceStatus:
        pid = self.pid()
        healthy = pid is not None and self.healthy()
        return ServiceStatus(self.name, pid, self.port, pid is not None, healthy)

    def start(self) -> str:
        """Start unless running; wait until healthy. Returns a line for the user."""
        if (pid := self.pid()) is not None:
            if wait_until(self.healthy, self.start_timeout_s):
                return f"{self.name}: already running (pid {pid}, port {self.port})"
            raise StackError(
                f"{self.name} (pid {pid}) is running but does not answer on port {self.port}.\n"
                f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
            )
        # A killed process's sockets close only once its last thread has exited, which for a
        # large JVM can lag behind its pid turning into a zombie: give that a few seconds.
        if port_in_use(self.port) and not wait_until(lambda: not port_in_use(self.port), PORT_RELEASE_S):
            raise StackError(
                f"{self.name}: port {self.port} is already taken by another process. Stop that "
                f"process or choose another port (LAGGARD_{self.name.upper()}_PORT)."
            )
        self.home.mkdir(parents=True, exist_ok=True)
        self.prepare()
        with self.log_path.open("ab") as log:
            log.write(f"\n--- laggard stack: starting {self.name} at {time.ctime()} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.home, start_new_session=True,
            )
        self.pid_path.write_text(str(proc.pid))
        started = wait_until(lambda: proc.poll() is None and self.healthy(), self.start_timeout_s)
        if not started:
            exit_code = proc.poll()
            if exit_code is None:
                self._terminate(proc.pid)
            why = "exited with code %s" % exit_code if exit_code is not None else (
                f"did not answer within {self.start_timeout_s:.0f} s")
            raise StackError(
                f"{self.name} failed to start: it {why}.\n"
                f"Last lines of {self.log_path}:\n{log_tail(self.log_path)}"
            )
        self.after_start()
        return f"{self.name}: started (pid {proc.pid}, port {self.port})"

    def stop(self) -> str:
        pid = self.pid()
        if pid is None:
            self.pid_path.unlink(missing_ok=True)
            return f"{self.name}: not running"
        self._terminate(pid)
        self.pid_path.unlink(missing_ok=True)
        return f"{self.name}: stopped (pid {pid})"

    def _terminate(self, pid: int, grace_s: float = 30.0) -> None:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        if not wait_until(lambda: not _alive(pid), grace_s):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            wait_until(lambda: not _alive(pid), 10)


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
