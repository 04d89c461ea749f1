"""Prometheus Alertmanager and amtool, built from source once per machine (Go modules from the Go
module proxy), and an Alertmanager process to run with a given config file.
`python -m laggard.commands.stack.alertmanager` builds them and prints their paths.

The binaries land in <cache>/alertmanager-<version>/{alertmanager,amtool} (~/.cache/laggard unless
LAGGARD_CACHE_DIR), with what the build downloads or compiles beside them in build/ (GOPATH with
the module cache, GOCACHE), so a second run finds them and returns. A cold build takes about
1.5 minutes (~2 CPU-minutes) and ~1 GB of disk in build/ (a rebuild with its caches, a few
seconds); delete build/ afterwards to get the space back (the module cache is read-only:
`chmod -R u+w build` first).

Why not a plain `go install .../cmd/alertmanager@v0.35.0`: the web UI is embedded from
ui/app/dist (`//go:embed app/dist`), which is built with npm/Elm and is not in the module zip, so
that install fails ("pattern app/dist: no matching files found"). The build copies the module's
source from the module cache, puts a placeholder file in ui/app/dist, and builds both commands
there with the module's own go.mod/go.sum. Only the web UI is missing (its pages answer 404); the
API (/api/v2), routing, grouping, inhibition, silences and receivers are the released code.

Alertmanager is not one of `laggard stack up`'s services: tests (tests/test_alertmanager.py) start
their own with `Alertmanager(state_dir, port, config_file).start()`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from laggard.commands.stack.go_build import Step, go_env, run_steps
from laggard.commands.stack.kafka import CACHE_ROOT
from laggard.commands.stack.process import ManagedService, StackError, http_answers

ALERTMANAGER_VERSION = "0.35.0"
ALERTMANAGER_MODULE = "github.com/prometheus/alertmanager"
COMMANDS = ("alertmanager", "amtool")
UI_PLACEHOLDER = "The web UI is not built (laggard builds Alertmanager from the Go module, API only).\n"


@dataclass(frozen=True)
class AlertmanagerBinaries:
    alertmanager: Path
    amtool: Path


def alertmanager_dir(version: str = ALERTMANAGER_VERSION) -> Path:
    return CACHE_ROOT / f"alertmanager-{version}"


def binaries_path(version: str = ALERTMANAGER_VERSION) -> AlertmanagerBinaries:
    home = alertmanager_dir(version)
    return AlertmanagerBinaries(home / "alertmanager", home / "amtool")


def ensure_alertmanager(version: str = ALERTMANAGER_VERSION) -> AlertmanagerBinaries:
    """The cached `alertmanager` and `amtool` of `version`, built first when missing. Raises
    StackError naming the step that failed."""
    found = binaries_path(version)
    if found.alertmanager.exists() and found.amtool.exists():
        return found
    if shutil.which("go") is None:
        raise StackError("alertmanager build: `go` is not on PATH; install Go 1.26 or newer (https://go.dev/dl/)")
    build = alertmanager_dir(version) / "build"
    build.mkdir(parents=True, exist_ok=True)
    log_path = build / "build.log"
    env = go_env(build, CGO_ENABLED="0")
    print(f"alertmanager {version}: not in {build.parent}; building it from source once (log: {log_path})", flush=True)
    module = f"{ALERTMANAGER_MODULE}@v{version}"
    run_steps("alertmanager", [Step("download the module", ["go", "mod", "download", module], build)], env, log_path)
    src = build / "src"
    if src.exists():
        subprocess.run(["chmod", "-R", "u+w", str(src)], check=False)
        shutil.rmtree(src)
    shutil.copytree(build / "gopath" / "pkg" / "mod" / module, src)  # GOMODCACHE/<module>@<version>
    subprocess.run(["chmod", "-R", "u+w", str(src)], check=True)  # the module cache is read-only
    for ui in ("elm", "mantine"):
        (src / "ui" / "app" / "dist" / ui).mkdir(parents=True, exist_ok=True)
        (src / "ui" / "app" / "dist" / ui / "README.txt").write_text(UI_PLACEHOLDER)
    out = build / "out"
    ldflags = " ".join(f"-X github.com/prometheus/common/version.{k}={v}" for k, v in
                       (("Version", version), ("Revision", "go-module-proxy"), ("Branch", "HEAD")))
    run_steps("alertmanager", [Step("compile alertmanager and amtool", ["go", "build", "-ldflags", ldflags, "-o",
                                                                         f"{out}/", *(f"./cmd/{c}" for c in COMMANDS)],
                                    src)], env, log_path)
    for command in COMMANDS:  # only a finished build takes the binaries' names
        (out / command).replace(build.parent / command)
    print(f"alertmanager {version}: built {found.alertmanager} and {found.amtool}", flush=True)
    return found


class Alertmanager(ManagedService):
    """One Alertmanager on 127.0.0.1:`port` with `config_file`, its data (silences, notification
    log) under <state_dir>/alertmanager/data. Clustering is off (no gossip port)."""

    name = "alertmanager"
    start_timeout_s = 30.0

    def __init__(self, state_dir: Path, port: int, config_file: Path, version: str = ALERTMANAGER_VERSION) -> None:
        super().__init__(state_dir, port)
        self.config_file = config_file
        self.version = version
        self.url = f"http://127.0.0.1:{port}"
        self.binaries: AlertmanagerBinaries | None = None  # set by prepare()

    @property
    def storage_path(self) -> Path:
        return self.home / "data"

    @property
    def alerts_url(self) -> str:
        """Where a laggard `alertmanager` receiver posts (its url_env/url_file holds this)."""
        return f"{self.url}/api/v2/alerts"

    def marker(self) -> str:
        return f"--web.listen-address=127.0.0.1:{self.port}"

    def prepare(self) -> None:
        self.binaries = ensure_alertmanager(self.version)
        self.storage_path.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        assert self.binaries is not None
        return [
            str(self.binaries.alertmanager),
            f"--config.file={self.config_file}",
            f"--storage.path={self.storage_path}",
            self.marker(),
            "--cluster.listen-address=",  # no HA peers: no gossip port to take
            "--log.level=info",
        ]

    def healthy(self) -> bool:
        return http_answers(f"{self.url}/-/ready", 200)

    def amtool(self, *args: str, timeout: float = 30.0) -> str:
        """Run `amtool <args> --alertmanager.url=<this one>`; returns its stdout, raises StackError on failure."""
        binaries = self.binaries or ensure_alertmanager(self.version)
        argv = [str(binaries.amtool), *args, f"--alertmanager.url={self.url}"]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise StackError(f"amtool {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout


if __name__ == "__main__":
    try:
        built = ensure_alertmanager()
        print(built.alertmanager)
        print(built.amtool)
    except StackError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
