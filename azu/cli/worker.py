"""``azu-worker``: a GPU/CPU worker node. Sets the worker's environment from its flags, then becomes its
Celery worker (``celery -A workers worker -Q gpu.<id> --pool solo``), which runs azu.network.node.

``--pool solo``: one task at a time, in the process that holds the layers (a prefork child would hold its
own copy of the weights).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from azu.cli.processes import celery_argv
from azu.config import SettingsError, get_settings
from azu.network.dispatch import worker_queue


def worker_argv(worker_id: str, *, loglevel: str = "INFO", events: bool = False) -> list[str]:
    """The Celery command line of worker node ``worker_id``."""
    return celery_argv(worker_queue(worker_id), name=worker_id, pool="solo", loglevel=loglevel, events=events)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"azu-worker: {exc}", file=sys.stderr)
        return 2
    w = settings.worker
    p = argparse.ArgumentParser(prog="azu-worker", description="an azu worker node (GPU or CPU)")
    p.add_argument("--worker-id", default=w.worker_id or socket.gethostname().split(".")[0])
    p.add_argument("--registry-url", default=settings.registry_url)
    p.add_argument("--p2p-url", default=w.p2p_url)
    p.add_argument("--wallet", default=w.wallet)
    p.add_argument("--cache-dir", default=w.cache_dir)
    p.add_argument("--device", default=w.device or _default_device())
    p.add_argument("--dtype", default=w.dtype)
    p.add_argument("--memory-bytes", type=int, default=None, help="offer at most this much memory")
    p.add_argument("--loglevel", default=os.environ.get("AZU_LOGLEVEL", "INFO"))
    p.add_argument("--events", action="store_true", help="send task events (for flower)")
    a = p.parse_args(list(argv) if argv is not None else None)
    if ":" in a.worker_id or "/" in a.worker_id:
        print("azu-worker: --worker-id must not contain ':' or '/'", file=sys.stderr)
        return 2
    env = dict(os.environ, AZU_WORKER_ID=a.worker_id, AZU_DEVICE=a.device)
    for name, value in (("REGISTRY_URL", a.registry_url), ("P2P_PUBLIC_URL", a.p2p_url),
                        ("AZU_WALLET_ADDRESS", a.wallet), ("AZU_CACHE_DIR", a.cache_dir),
                        ("AZU_DTYPE", a.dtype),
                        ("AZU_MEMORY_BYTES", str(a.memory_bytes) if a.memory_bytes else None)):
        if value:
            env[name] = value
    cmd = worker_argv(a.worker_id, loglevel=a.loglevel, events=a.events)
    os.execve(cmd[0], cmd, env)  # the worker is the Celery process itself: signals reach it directly
    return 0  # not reached


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


if __name__ == "__main__":
    sys.exit(main())
