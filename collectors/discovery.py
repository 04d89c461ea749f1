"""Prometheus-style file discovery of scrape targets (`file_sd`), for `laggard collect dcgm --file-sd`.

The file is what Prometheus's `file_sd_configs` read: JSON (`.json`) or YAML (any other name), a
list of target groups

    [{"targets": ["gpu-node-1:9400", "gpu-node-2:9400"], "labels": {"__scheme__": "https"}}]

Each target is `host:port`; its URL is `<__scheme__>://<target><__metrics_path__>` (defaults http
and /metrics, as in Prometheus). Other labels are accepted and kept with the target, but laggard
takes host and GPU identity from the exporter's own labels. `FileSd` re-reads the file when it
changes (its mtime, size or inode); a file that cannot be used keeps the previous targets and is
reported once per version, as one `FileSdError` naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from laggard.events import describe_validation_error

DEFAULT_SCHEME = "http"
DEFAULT_METRICS_PATH = "/metrics"
MAX_FILE_BYTES = 4 * 1024 * 1024


class FileSdError(ValueError):
    """A discovery file that cannot be used; the message names the file and what is wrong."""


class TargetGroup(BaseModel):
    """One entry of a file_sd file."""

    model_config = ConfigDict(extra="forbid")

    targets: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)


_GROUPS = TypeAdapter(list[TargetGroup])


@dataclass(frozen=True)
class Discovered:
    """One scrape target found in a file: its URL and the labels of its group."""

    url: str
    labels: dict[str, str] = field(default_factory=dict, hash=False)


def parse_groups(text: str, *, yaml_syntax: bool) -> list[TargetGroup]:
    """The target groups in `text` (JSON, or YAML when `yaml_syntax`); ValueError saying what is wrong."""
    try:
        raw = yaml.safe_load(text) if yaml_syntax else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise ValueError(f"not valid {'YAML' if yaml_syntax else 'JSON'}: {' '.join(str(err).split())}") from None
    if raw is None:  # an empty file: no targets (Prometheus reads it so too)
        return []
    try:
        return _GROUPS.validate_python(raw)
    except ValidationError as err:
        raise ValueError(f"not a list of {{targets: [...], labels: {{...}}}} groups: {describe_validation_error(err)}")


def target_url(target: str, labels: dict[str, str]) -> str:
    """`host:port` -> the URL Prometheus would scrape; ValueError when the target or labels cannot make one."""
    scheme = labels.get("__scheme__", DEFAULT_SCHEME)
    path = labels.get("__metrics_path__", DEFAULT_METRICS_PATH)
    if scheme not in ("http", "https"):
        raise ValueError(f"__scheme__ {scheme!r} is not http or https")
    if not path.startswith("/"):
        raise ValueError(f"__metrics_path__ {path!r} does not start with /")
    if not target or "/" in target or any(c.isspace() for c in target):
        raise ValueError(f"target {target!r} is not host:port")
    return f"{scheme}://{target}{path}"


def _accept(url: str) -> None:
    return None


def discovered_targets(groups: list[TargetGroup], check: Callable[[str], object] = _accept) -> list[Discovered]:
    """Every target of every group, once each (first group wins), in file order.

    `check` vets each URL (ValueError saying what is wrong), as the scraper checks a URL given to it.
    """
    out: dict[str, Discovered] = {}
    for number, group in enumerate(groups):
        for target in group.targets:
            try:
                url = target_url(target, group.labels)
                check(url)
            except ValueError as err:
                raise ValueError(f"group {number}: {err}") from None
            out.setdefault(url, Discovered(url, dict(group.labels)))
    return list(out.values())


def load_file_sd(path: Path, check: Callable[[str], object] = _accept) -> list[Discovered]:
    """The targets in the discovery file at `path`; FileSdError naming the file and what is wrong."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise FileSdError(f"file_sd {path}: cannot read it: {err.strerror or err}") from None
    try:
        if len(data) > MAX_FILE_BYTES:
            raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"not UTF-8 (byte {err.start})") from None
        return discovered_targets(parse_groups(text, yaml_syntax=path.suffix.lower() != ".json"), check)
    except ValueError as err:
        raise FileSdError(f"file_sd {path}: {err}") from None


def _version(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows a symlink swapped in place (Kubernetes ConfigMap volumes)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class FileSd:
    """One discovery file, re-read whenever it changes; `targets` are the last good file's."""

    def __init__(self, path: Path, check: Callable[[str], object] = _accept) -> None:
        """Reads the file now: FileSdError if it cannot be used at start."""
        self.path = path
        self.check = check
        self._version = _version(path)
        self.targets: list[Discovered] = load_file_sd(path, check)

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last look: True when the targets changed.

        FileSdError (once per version of the file) when the changed file cannot be used; the
        previous targets stay.
        """
        version = _version(self.path)
        if version == self._version:
            return False
        self._version = version
        if version is None:
            raise FileSdError(f"file_sd {self.path}: it is gone; keeping its {len(self.targets)} previous target(s)")
        try:
            found = load_file_sd(self.path, self.check)
        except FileSdError as err:
            raise FileSdError(f"{err}; keeping its {len(self.targets)} previous target(s)") from None
        changed = found != self.targets
        self.targets = found
        return changed
