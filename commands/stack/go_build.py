"""Building a Go program from source once per machine (influxd, Alertmanager): each step's output
to the build log, progress on stdout, and a failure named by its step with the log's last lines."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from laggard.commands.stack.process import StackError, log_tail


@dataclass
class Step:
    name: str
    argv: list[str]
    cwd: Path


def go_env(build: Path, **extra: str) -> dict[str, str]:
    """The environment of a build whose Go module and build caches live under `build` (kept, so a
    rebuild takes seconds), plus `extra`."""
    return {
        **os.environ,
        "GOPATH": str(build / "gopath"),
        "GOMODCACHE": str(build / "gopath" / "pkg" / "mod"),
        "GOCACHE": str(build / "gocache"),
        "GOFLAGS": "-mod=mod -buildvcs=false",
        **extra,
    }


def run_steps(product: str, steps: list[Step], env: dict[str, str], log_path: Path) -> None:
    """Run `steps` in order, their output appended to `log_path`; StackError naming the step that failed."""
    for number, step in enumerate(steps, 1):
        print(f"{product} build [{number}/{len(steps)}] {step.name} ...", flush=True)
        started = time.monotonic()
        with log_path.open("ab") as log:
            log.write(f"\n--- {step.name}: {' '.join(step.argv)} ---\n".encode())
            log.flush()
            proc = subprocess.Popen(step.argv, cwd=step.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
            while True:
                try:
                    code = proc.wait(timeout=60)
                    break
                except subprocess.TimeoutExpired:
                    print(f"{product} build: still at '{step.name}' ({(time.monotonic() - started) / 60:.0f} min)",
                          flush=True)
        if code != 0:
            raise StackError(
                f"{product} build failed at step '{step.name}' (exit {code}): `{' '.join(step.argv)}` in {step.cwd}.\n"
                f"Full log: {log_path}. Last lines:\n{log_tail(log_path, 30)}"
            )
        print(f"{product} build: {step.name} done in {time.monotonic() - started:.0f} s", flush=True)
