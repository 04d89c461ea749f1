"""InfluxDB 2.7 (`influxd` built from source by commands/stack/build_influxd.py), run with its own
bolt and engine paths under <state>/influx2 on a loopback port of its own (8087 by default, so it
can run beside the 1.x one). It speaks /api/v2 (token, org, bucket), Flux, and InfluxQL on /query.

On first start it is set up (POST /api/v2/setup) with the org and bucket from the settings and a
token generated here, kept in <state>/influx2/token (mode 600) where Settings picks it up.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx

from laggard.commands.stack.process import ManagedService, StackError, http_answers, write_private
from laggard.settings import local_influx2_token_file


class InfluxDB2(ManagedService):
    name = "influx2"
    start_timeout_s = 90.0
    username = "laggard"  # the setup's first user; laggard itself only uses the token

    def __init__(self, state_dir: Path, port: int, org: str, bucket: str) -> None:
        super().__init__(state_dir, port)
        self.org = org
        self.bucket = bucket
        self.url = f"http://127.0.0.1:{port}"
        self.token_path = local_influx2_token_file(state_dir)
        self.influxd: Path | None = None  # set by prepare()

    @property
    def bolt_path(self) -> Path:
        return self.home / "data" / "influxd.bolt"

    def marker(self) -> str:
        return str(self.bolt_path)

    def prepare(self) -> None:
        # Imported here, not at the top: `python -m laggard.commands.stack.build_influxd` imports this package first.
        from laggard.commands.stack.build_influxd import ensure_influxd

        self.influxd = ensure_influxd()  # builds it the first time on this machine
        self.bolt_path.parent.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        data = self.bolt_path.parent
        return [
            str(self.influxd),
            "--bolt-path", str(self.bolt_path),
            "--engine-path", str(data / "engine"),
            "--sqlite-path", str(data / "influxd.sqlite"),
            "--http-bind-address", f"127.0.0.1:{self.port}",
            "--reporting-disabled",
            "--log-level", "warn",
        ]

    def healthy(self) -> bool:
        return http_answers(f"{self.url}/health", 200)

    def token(self) -> str:
        try:
            return self.token_path.read_text().strip()
        except FileNotFoundError:
            raise StackError(
                f"influx2: the server in {self.home} is set up, but its token file {self.token_path} is "
                "missing. Wipe it and set it up again: laggard stack up --influx 2 --reset"
            ) from None

    def after_start(self) -> None:
        """Set up org, bucket and token once; later starts check the token still opens the bucket."""
        with httpx.Client(base_url=self.url, timeout=30) as http:
            if http.get("/api/v2/setup").json().get("allowed"):
                token = secrets.token_urlsafe(32)
                write_private(self.token_path, token)  # kept before the server knows it, so never lost
                reply = http.post("/api/v2/setup", json={
                    "username": self.username, "org": self.org, "bucket": self.bucket, "token": token,
                })
                if reply.status_code != 201:
                    raise StackError(f"influx2: setup failed: HTTP {reply.status_code} {reply.text[:300]}")
                return
            headers = {"Authorization": f"Token {self.token()}"}
            reply = http.get("/api/v2/buckets", params={"org": self.org, "name": self.bucket}, headers=headers)
            if reply.status_code != 200 or not reply.json().get("buckets"):
                raise StackError(
                    f"influx2: bucket {self.bucket!r} of org {self.org!r} is not reachable with the token in "
                    f"{self.token_path}: HTTP {reply.status_code} {reply.text[:300]}. Were org or bucket "
                    "renamed since the setup? `laggard stack up --influx 2 --reset` sets it up afresh."
                )
