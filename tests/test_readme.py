"""The README's operator part (everything above "How it works (internals)") names only laggard
commands, options and settings that exist: each `laggard ...` line of its shell blocks runs with
`--help`, and each LAGGARD_* variable it mentions is one the code reads."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from laggard.commands.cli import app
from laggard.rules.loader import DEFAULT_RULES, load_rules
from laggard.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INTERNALS = "\n## How it works (internals)\n"
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTIONS = {">", ">>", "<", "<<", "<<<", "2>", "2>&1"}


def operator_part(text: str = README) -> str:
    assert INTERNALS in text, "the README has no 'How it works (internals)' section"
    return text.split(INTERNALS, 1)[0]


def shell_blocks(text: str) -> list[str]:
    """Fenced code blocks in a shell language (or none): not the YAML and JSON examples."""
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)
            if lang in ("", "sh", "bash", "shell", "console")]


def laggard_commands(block: str) -> list[list[str]]:
    """The argument lists of every `laggard` invocation in a shell block: after `VAR=value`s, after
    `sudo -u USER`, after `kubectl exec ... --`, in each part of a pipeline or `&&` chain."""
    commands = []
    for line in re.sub(r"\\\n", " ", block).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        tokens = list(lexer)
        segment: list[str] = []
        for token in [*tokens, ";"]:
            if token in SHELL_OPERATORS:
                if (found := _laggard_args(segment)) is not None:
                    commands.append(found)
                segment = []
            else:
                segment.append(token)
    return commands


def _laggard_args(segment: list[str]) -> list[str] | None:
    for i, token in enumerate(segment):
        if token in REDIRECTIONS:
            segment = segment[:i]
            break
    if "--" in segment:  # kubectl exec POD -- laggard ...
        segment = segment[segment.index("--") + 1:]
    words = list(segment)
    while words and (re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]) or words[0] == "sudo"):
        if words[0] == "sudo":
            words.pop(0)
            while words and words[0].startswith("-"):
                option = words.pop(0)
                if option in ("-u", "-g") and words:
                    words.pop(0)
        else:
            words.pop(0)
    if words and Path(words[0]).name == "laggard":
        return words[1:]
    return None


def runs_with_help(args: list[str]) -> tuple[int, str]:
    """`laggard ARGS --help` in-process: exits 0 only for a real command whose options all exist."""
    result = CliRunner().invoke(app, [*args, "--help"])
    return result.exit_code, result.output


OPERATOR_COMMANDS = [args for block in shell_blocks(operator_part()) for args in laggard_commands(block)]


def test_the_operator_part_comes_first_and_has_its_sections() -> None:
    part = operator_part()
    for heading in ("## What it finds", "## The two commands", "## Connect it to your cluster",
                    "## Run it as a daemon", "## Tune the rules"):
        assert f"\n{heading}\n" in part, heading
    for heading in ("### Kafka (TLS, SASL)", "### Which job and rank each GPU runs (attribution)",
                    "### systemd", "### Kubernetes", "### Docker Compose"):
        assert heading in part, heading


def test_the_two_commands_are_the_ones_ci_runs() -> None:
    """.ci/run runs `make test`; the README's two commands stay `make demo` and `make test`."""
    section = README.split("## The two commands\n", 1)[1].split("\n## ", 1)[0]
    block = shell_blocks(section)[0]  # then the demo's output
    assert [line.split("#")[0].strip() for line in block.splitlines()] == ["make demo", "make test"]


def test_the_extractor_finds_the_operator_commands() -> None:
    found = {" ".join(args[:2]) for args in OPERATOR_COMMANDS}
    for expected in ("collect nvml", "collect dcgm", "worker", "rules check", "alerts test", "silence add",
                     "stack up", "simulate collectors/scenarios/straggler.yaml", "detect -"):
        assert any(command.startswith(expected) for command in found), (expected, sorted(found))


def test_the_extractor_reads_shell_the_way_an_operator_types_it() -> None:
    block = ('LAGGARD_X=1 laggard stack up   # comment --bogus\n'
             'laggard simulate s.yaml --stdout | laggard detect -\n'
             'sudo -u laggard A=b /opt/laggard/bin/laggard silence list > out.txt\n'
             'kubectl -n laggard exec deploy/laggard-worker -- laggard rules check \\\n  /etc/laggard/rules.yaml\n'
             'make demo\n')
    assert laggard_commands(block) == [["stack", "up"], ["simulate", "s.yaml", "--stdout"], ["detect", "-"],
                                       ["silence", "list"], ["rules", "check", "/etc/laggard/rules.yaml"]]


@pytest.mark.parametrize("args", OPERATOR_COMMANDS, ids=[shlex.join(args) for args in OPERATOR_COMMANDS])
def test_every_command_the_operator_part_names_exists(args: list[str]) -> None:
    code, output = runs_with_help(args)
    assert code == 0, f"README: `laggard {shlex.join(args)}` is not a laggard command:\n{output}"


def test_a_command_that_does_not_exist_fails_the_check() -> None:
    assert runs_with_help(["topics"])[0] != 0
    assert runs_with_help(["collect", "nvml", "--no-such-option"])[0] != 0


def test_every_setting_the_operator_part_names_is_read_by_the_code() -> None:
    fields = set(Settings.model_fields)
    webhooks = {r.url_env for r in load_rules(DEFAULT_RULES).receivers if r.url_env}
    read_by_settings_module = {"LAGGARD_SECRETS_DIR", "LAGGARD_ENV_FILE"}
    cli_options = {param.envvar for command in typer.main.get_command(app).commands.values()
                   for param in command.params if isinstance(param.envvar, str)}
    cli_options |= {param.envvar for param in typer.main.get_command(app).params if isinstance(param.envvar, str)}
    names = set(re.findall(r"\bLAGGARD_[A-Z0-9_]*[A-Z0-9]\b", operator_part()))
    unknown = sorted(n for n in names if n.removeprefix("LAGGARD_").lower() not in fields
                     and n not in webhooks | read_by_settings_module | cli_options)
    assert unknown == [], f"the README's operator part names settings the code does not read: {unknown}"
