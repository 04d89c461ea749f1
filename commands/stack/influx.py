"""InfluxDB from Debian's `influxdb` package (1.6.7 on Debian 12), run with its own config,
data folder and port. It speaks `/write?db=` and InfluxQL; `/ping` answers 204 when up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import httpx

from laggard.commands.stack.process import ManagedService, StackError, http_answers


class InfluxDB(ManagedService):
    name = "influx"
    start_timeout_s = 60.0

    def __init__(self, state_dir: Path, port: int, database: str) -> None:
        super().__init__(state_dir, port)
        self.database = database
        self.url = f"http://127.0.0.1:{port}"

    @property
    def config_path(self) -> Path:
        return self.home / "influxdb.conf"

    def marker(self) -> str:
        return str(self.config_path)

    def _influxd(self) -> str:
        found = shutil.which("influxd")
        if found:
            return found
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise StackError(
                "influx: `influxd` is not installed. Install Debian's package: sudo apt-get install -y influxdb"
            )
        print("influx: installing Debian's influxdb package (apt-get) ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "influxdb"]):
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if result.returncode != 0:
                raise StackError(f"influx: `{' '.join(cmd)}` failed:\n{result.stderr[-1500:]}")
        found = shutil.which("influxd")
        if not found:
            raise StackError("influx: the influxdb package installed no `influxd` on PATH")
        return found

    def prepare(self) -> None:
        self._influxd()
        data = self.home / "data"
        # Every listener on loopback and on ports next to the HTTP one, so two stacks can coexist.
        self.config_path.write_text(
            f"""reporting-disabled = true
bind-address = "127.0.0.1:{self.port + 2}"

[meta]
  dir = "{data / 'meta'}"

[data]
  dir = "{data / 'data'}"
  wal-dir = "{data / 'wal'}"
  query-log-enabled = false
  index-version = "tsi1"

[monitor]
  store-enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{self.port}"
  log-enabled = false
  max-body-size = 0

[ifql]
  enabled = false

[logging]
  level = "warn"

[continuous_queries]
  enabled = false
"""
        )

    def command(self) -> list[str]:
        return [self._influxd(), "-config", str(self.config_path)]

    def healthy(self) -> bool:
        return http_answers(f"{self.url}/ping", 204)

    def after_start(self) -> None:
        reply = httpx.post(f"{self.url}/query", data={"q": f'CREATE DATABASE "{self.database}"'}, timeout=10)
        if reply.status_code != 200 or "error" in reply.text:
            raise StackError(f"influx: creating database {self.database!r} failed: {reply.text[:300]}")
