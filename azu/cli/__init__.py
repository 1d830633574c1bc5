"""``azu`` command line: one subcommand per area, each implemented next to the code it drives.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Every parser of azu's
command lines (``azu <command>``, ``azu-core``, ``azu-api``, ``azu-scheduler``, ``azu-registry``, the
collector, ``azu-worker``) uses ``HelpFormatter``: each option's help ends with its default.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from typing import Any

# subcommand -> (module, one-line help). Modules are imported only when their subcommand runs, so
# `azu --help` stays fast and the API processes never import torch.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "shard": ("azu.registry.sharder",
              "split a Hugging Face model (hub id or folder) into per-layer safetensors"),
    "generate": (
        "azu.engine.local",
        "run a sharded model as N stages in one process (a worker's self-check)",
    ),
    "demo-model": ("azu.cli.demo", "build a tiny random model of a supported family (no download)"),
    "up": ("azu.cli.up", "start a whole local network: API, scheduler, registry, workers"),
    "key": ("azu.cli.wallet", "get an API key: sign the API's challenge with a dev-chain test account"),
    "deposit": ("azu.cli.wallet", "send AMOUNT to the platform on the chain and credit it (POST /deposit)"),
    "balance": ("azu.cli.wallet", "show your spendable balance (GET /balance)"),
    "payouts": ("azu.cli.wallet", "show (--watch: follow) worker wallets being paid on chain"),
    "verdicts": ("azu.cli.verdicts", "verification: banned and suspect workers, the ledger's verdicts"),
    "unban": ("azu.cli.verdicts", "put a banned worker back on routes and pay it again (core; after review)"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option's help, except where the help already says its default (one
    computed at run time or read from an environment variable, explained in words), for flags (off unless
    given) and for options without a default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # Identity, not ==: a default of 0 is a default to show (0 == False).
        if (not action.option_strings or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS or "%(default)" in text):
            return text
        if "default" in text:
            # The default is told in words, but the environment set one: show what applies now (a value
            # that may be secret is only said to be set).
            secret = _SECRET.search(action.dest)
            return text + (" (now: set in the environment)" if secret else " (now: %(default)s)")
        return text + " (default: %(default)s)"


_SECRET = re.compile(r"key|secret|password|signature|token", re.IGNORECASE)


def env_help(text: str, variable: str) -> str:
    """The help of an option whose default an environment variable may set: "..., env VAR"."""
    return f"{text}; env {variable}"


def parser_for(prog: str, description: str, **kwargs: Any) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with azu's help formatter (each option shows its default)."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter,
                                   **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = parser_for("azu", "azu: decentralized LLM inference")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.set_defaults(_module=module_name)
        # Arguments are declared by the module; import it only for the subcommand asked for.
        if len(sys.argv if argv is None else argv) and name in (sys.argv[1:] if argv is None else argv)[:1]:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
