"""The `laggard` command itself: its version, as operators check it against a deployment."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version


def test_version_prints_the_installed_distributions_and_exits_0() -> None:
    done = subprocess.run([sys.executable, "-m", "laggard.commands.cli", "--version"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == f"laggard {version('laggard')}\n", done.stderr
