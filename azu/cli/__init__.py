"""``azu`` command line: one subcommand per area, each implemented next to the code it drives.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="azu", description="azu: decentralized LLM inference")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are declared by the module; import it only for the subcommand asked for.
        if len(sys.argv if argv is None else argv) and name in (sys.argv[1:] if argv is None else argv)[:1]:
            importlib.import_module(module_name).add_arguments(p)
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
