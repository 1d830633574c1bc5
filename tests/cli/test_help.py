"""Every option of every azu command line has help text and shows its default; defaults read from the
environment say which variable, and show its value."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from azu import cli
from azu.cli import processes, worker
from tests.support import REPO

AZU_COMMANDS = list(cli.SUBCOMMANDS)
PROCESS_MAINS = {"azu-api": processes.api_main, "azu-scheduler": processes.scheduler_main,
                 "azu-registry": processes.registry_main, "azu-core": processes.core_main,
                 "collector": processes.collector_main, "verifier": processes.verifier_main,
                 "azu-worker": worker.main}
# Options whose flag sets something to a value with no default, or flags (off unless given).
NO_DEFAULT = {"-h", "--help"}


def _help(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def option_blocks(text: str) -> dict[str, str]:
    """{first option string: its whole help entry} of an argparse help page (entries may wrap)."""
    blocks: dict[str, str] = {}
    current = None
    in_options = False
    for line in text.splitlines():
        if re.match(r"^\S.*:$", line):  # "options:", "positional arguments:", a group's title
            in_options = True
            current = None
            continue
        if not in_options or not line.strip():
            current = None if not line.strip() else current
            continue
        m = re.match(r"^  (\S+?)(,| |$)", line)
        if m:
            current = m.group(1)
            blocks[current] = line
        elif current is not None and line.startswith("    "):
            blocks[current] += " " + line.strip()
    return blocks


def _described(entry: str) -> str:
    """The help text of an entry, without its option strings and metavars."""
    return re.sub(r"^\s*(-{1,2}[\w-]+( [A-Z_]+)?(, )?)+\s*", "", entry).strip()


def _check(text: str, parser_actions: dict[str, object], prog: str) -> None:
    blocks = option_blocks(text)
    assert blocks, f"{prog}: no options found in\n{text}"
    for option, entry in blocks.items():
        if option in NO_DEFAULT:
            continue
        assert _described(entry), f"{prog} {option}: no help text: {entry!r}"
        default = parser_actions.get(option)
        if default is not None and default is not False and option.startswith("-"):
            assert "default" in entry, f"{prog} {option}: default {default!r} not shown: {entry!r}"


def _defaults(parser) -> dict[str, object]:
    return {a.option_strings[0] if a.option_strings else a.dest: a.default for a in parser._actions}


@pytest.fixture(autouse=True)
def _wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "240")  # fewer wrapped lines; wrapped ones are joined anyway


@pytest.mark.parametrize("command", AZU_COMMANDS)
def test_every_azu_subcommand_option_has_help_and_default(command, capsys):
    text = _help(cli.main, [command], capsys)
    parser = cli.parser_for("azu", "")
    sub = parser.add_subparsers()
    p = sub.add_parser(command, formatter_class=cli.HelpFormatter)
    import importlib

    importlib.import_module(cli.SUBCOMMANDS[command][0]).add_arguments(p)
    _check(text, _defaults(p), f"azu {command}")


@pytest.mark.parametrize("prog", list(PROCESS_MAINS))
def test_every_process_option_has_help_and_default(prog, capsys):
    text = _help(PROCESS_MAINS[prog], [], capsys)
    assert "--loglevel" in text
    defaults = {}
    for line in text.splitlines():
        m = re.match(r"^  (--[\w-]+)", line)
        if m:
            defaults[m.group(1)] = "?"
    # Which options have a default: every one of these commands' options does, but the worker's listed here.
    for name in ("--core-url", "--worker-id", "--key-file", "--registry-url", "--p2p-url", "--wallet",
                 "--wallet-signature", "--cache-dir", "--device", "--dtype", "--memory-bytes",
                 "--print-wallet-message", "--events"):
        defaults.pop(name, None)
    _check(text, defaults, prog)
    if prog == "azu-worker":
        blocks = option_blocks(text)
        # No silent default for who the worker is and where it enrolls: the help says it is required.
        for option, variable in (("--core-url", "AZU_CORE_URL"), ("--worker-id", "AZU_WORKER_ID")):
            assert "required" in blocks[option] and variable in blocks[option], blocks[option]
        for option in ("--key-file", "--cache-dir", "--device", "--dtype", "--memory-bytes", "--wallet"):
            assert "default" in blocks[option], blocks[option]


@pytest.mark.parametrize(("prog", "option", "variable", "value"), [
    ("azu-api", "--port", "AZU_API_PORT", "8123"),
    ("azu-api", "--host", "AZU_API_HOST", "10.1.2.3"),
    ("azu-core", "--web-workers", "AZU_WEB_WORKERS", "7"),
    ("azu-scheduler", "--pool", "AZU_CORE_POOL", "threads"),
    ("azu-registry", "--registry-port", "AZU_REGISTRY_PORT", "8999"),
    ("collector", "--loglevel", "AZU_LOGLEVEL", "WARNING"),
    ("azu-worker", "--worker-id", "AZU_WORKER_ID", "gpu-from-env"),
    ("azu-worker", "--core-url", "AZU_CORE_URL", "https://core.example"),
])
def test_a_default_from_the_environment_names_its_variable_and_shows_its_value(prog, option, variable, value,
                                                                              monkeypatch, capsys):
    monkeypatch.setenv(variable, value)
    entry = option_blocks(_help(PROCESS_MAINS[prog], [], capsys))[option]
    assert variable in entry and value in entry, entry


def test_help_of_the_installed_command_lines_runs_for_real():
    """The real processes (python -m, as azu up starts them): help, exit 0, defaults shown."""
    for argv in (["-m", "azu.cli", "up", "--help"], ["-m", "azu.cli.processes", "core", "--help"],
                 ["-m", "azu.cli.processes", "worker", "--help"]):
        done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=120,
                              env={"PATH": "/usr/bin:/bin", "COLUMNS": "240", "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr
        assert "(default: " in done.stdout, done.stdout


def test_a_malformed_environment_default_names_the_variable(monkeypatch):
    monkeypatch.setenv("AZU_API_PORT", "eighty")
    with pytest.raises(SystemExit, match="AZU_API_PORT must be an integer, got 'eighty'"):
        processes.api_main(["--help"])
