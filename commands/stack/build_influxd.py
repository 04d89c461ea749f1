"""Builds InfluxDB 2.x's `influxd` from source once per machine: Go modules from the Go module
proxy, its Flux engine (libflux, Rust) from crates.io. `python -m laggard.commands.stack.build_influxd`.

The binary lands in <cache>/influxd-<version>/influxd (~/.cache/laggard unless LAGGARD_CACHE_DIR)
with everything the build downloads or compiles beside it in build/ (GOPATH with the module cache,
GOCACHE, which also holds libflux's cargo target), so a second run finds the binary and returns.
A cold build takes ~13 CPU-minutes and ~3 GB of disk; delete build/ afterwards to get the space
back (the module cache is read-only: `chmod -R u+w build` first).

Three things differ from a plain `go install .../cmd/influxd@v2.7.12`, each for a reason:
- `go install pkg@version` refuses modules with replace directives, and influxdb's go.mod replaces
  nats-streaming-server, so the build runs in a scratch module that repeats that replace.
- cgo finds libflux through `pkg-config`; InfluxData's wrapper of that name (first on PATH) builds
  libflux with cargo on demand, then calls the system pkg-config.
- libflux pins Rust 1.72 (rust-toolchain.toml), which rustup cannot fetch everywhere, and
  flux-core says #![deny(warnings)], which newer compilers' lints break: so the build uses the
  `stable` toolchain with workspace crates' lints capped at warnings.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from laggard.commands.stack.go_build import Step, go_env, run_steps
from laggard.commands.stack.kafka import CACHE_ROOT
from laggard.commands.stack.process import StackError

INFLUXD_VERSION = "2.7.12"
PKG_CONFIG_MODULE = "github.com/influxdata/pkg-config@v0.2.14"
INFLUXD_PACKAGE = "github.com/influxdata/influxdb/v2/cmd/influxd"
SCRATCH_GO_MOD = """module local/influxd-build

go 1.23.0

replace github.com/nats-io/nats-streaming-server v0.11.2 => github.com/influxdata/nats-streaming-server v0.11.3-0.20201112040610-c277f7560803
"""
CAP_LINTS_WRAPPER = """#!/bin/sh
# RUSTC_WORKSPACE_WRAPPER: $1 is rustc. Lower flux's #![deny(warnings)] to warnings (workspace crates only).
rustc="$1"; shift
exec "$rustc" "$@" --cap-lints warn
"""
# Tools the build runs itself; cgo also needs a C compiler, and the wrapper needs the real pkg-config.
REQUIRED_TOOLS = {
    "go": "Go 1.23 or newer (https://go.dev/dl/)",
    "cargo": "Rust's cargo (rustup, stable toolchain)",
    "cc": "a C compiler (apt-get install -y gcc)",
    "pkg-config": "pkg-config (apt-get install -y pkg-config)",
}


def influxd_path(version: str = INFLUXD_VERSION) -> Path:
    return CACHE_ROOT / f"influxd-{version}" / "influxd"


def build_steps(version: str, build: Path, output: Path) -> list[Step]:
    ldflags = f"-X main.version=v{version} -X main.commit=go-module-proxy"  # /ping reports this version
    return [
        Step("install InfluxData's pkg-config wrapper", ["go", "install", PKG_CONFIG_MODULE], build),
        Step("resolve influxd's Go modules", ["go", "get", f"{INFLUXD_PACKAGE}@v{version}"], build / "mod"),
        Step("compile influxd (Go, and libflux with cargo)",
             ["go", "build", "-ldflags", ldflags, "-o", str(output), INFLUXD_PACKAGE], build / "mod"),
    ]


def build_env(build: Path) -> dict[str, str]:
    return go_env(build, GOBIN=str(build / "bin"), CGO_ENABLED="1",
                  PATH=f"{build / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", RUSTUP_TOOLCHAIN="stable",
                  RUSTC_WORKSPACE_WRAPPER=str(build / "bin" / "rustc-cap-lints"))


def ensure_influxd(version: str = INFLUXD_VERSION) -> Path:
    """The cached `influxd` of `version`, built first when missing. Raises StackError naming the step."""
    binary = influxd_path(version)
    if binary.exists():
        return binary
    missing = [f"`{tool}`: {hint}" for tool, hint in REQUIRED_TOOLS.items() if shutil.which(tool) is None]
    if missing:
        raise StackError("influxd build: missing tools on PATH:\n  " + "\n  ".join(missing))
    build = binary.parent / "build"
    (build / "mod").mkdir(parents=True, exist_ok=True)
    (build / "bin").mkdir(exist_ok=True)
    (build / "mod" / "go.mod").write_text(SCRATCH_GO_MOD)
    wrapper = build / "bin" / "rustc-cap-lints"
    wrapper.write_text(CAP_LINTS_WRAPPER)
    wrapper.chmod(0o755)
    partial = build / "influxd.partial"
    log_path = build / "build.log"
    print(f"influxd {version}: not in {binary.parent}; building it from source once "
          f"(~13 CPU-minutes cold; log: {log_path})", flush=True)
    run_steps("influxd", build_steps(version, build, partial), build_env(build), log_path)
    partial.replace(binary)  # only a finished build takes the binary's name
    print(f"influxd {version}: built {binary}", flush=True)
    return binary


if __name__ == "__main__":
    try:
        print(ensure_influxd())
    except StackError as err:
        print(err, file=sys.stderr)
        sys.exit(1)
