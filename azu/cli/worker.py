"""``azu-worker``: a GPU/CPU worker node. It enrolls with the core, then becomes its Celery worker
(``celery -A workers worker -Q gpu.<id>,ctl.<id> --pool solo``), which runs azu.network.node.

1. It needs the core's API (``--core-url`` / ``AZU_CORE_URL``): there is no default to guess.
2. Its Ed25519 key lives in ``AZU_WORKER_KEY_FILE`` (default ``<cache dir>/worker.key``), made on the first
   start with mode 0600; the worker id is bound to that key by the first enrollment.
3. ``POST /workers/challenge``, sign, ``POST /workers/enroll``: the answer is its own broker login.
4. It execs Celery with an environment that holds the worker's login (``REDIS_URL`` = ``w-<id>``), the
   core's public key (``AZU_CORE_PUBLIC_KEY``) and its key file, and nothing of the core's: no
   ``DATABASE_URL``, ``AUTH_SECRET_KEY``, core Redis URL or chain keys, even if the operator's shell has them.

``--pool solo``: one task at a time, in the process that holds the layers (a prefork child would hold its
own copy of the weights).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from azu.cli import parser_for
from azu.cli.processes import celery_argv
from azu.config import SettingsError, WorkerSettings, get_settings
from azu.network import identity
from azu.network.dispatch import worker_queues

# What a worker's Celery must never inherit: the core's logins and secrets (and the chain's keys).
CORE_ONLY = (
    "DATABASE_URL", "AUTH_SECRET_KEY", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "SCHEDULER_PRIVATE_KEY",
    "SOLANA_PRIVATE_KEY", "SOLANA_RPC_URL", "SOLANA_ADDRESS", "HYPERLIQUID_RPC_URL", "HYPERLIQUID_ADDRESS",
    "HYPERLIQUID_CHAIN_ID", "PAYMENT_PROVIDER", "HF_TOKEN", "AZU_BROKER_PUBLIC_URL", "AZU_TEST_PG_URL",
    "AZU_WALLET_SIGNATURE", "PGPASSWORD", "PROMETHEUS_MULTIPROC_DIR", "AZU_METRICS_TOKEN",
)
ENROLL_TIMEOUT_S = 120.0
CACHE_DIR_DEFAULT = ".azu/cache/<worker id>"
KEY_FILE_DEFAULT = "<cache dir>/worker.key"


class EnrollmentFailed(RuntimeError):
    pass


def worker_argv(worker_id: str, *, loglevel: str = "INFO", events: bool = False) -> list[str]:
    """The Celery command line of worker node ``worker_id``."""
    return celery_argv(worker_queues(worker_id), name=worker_id, pool="solo", loglevel=loglevel,
                       events=events)


def default_key_file(worker_id: str, cache_dir: str | None) -> Path:
    return Path(cache_dir or f".azu/cache/{worker_id}") / "worker.key"


def enroll(core_url: str, worker_id: str, key: Any, *, wallet: str | None = None,
           wallet_signature: str | None = None, timeout: float = ENROLL_TIMEOUT_S) -> dict[str, Any]:
    """Challenge, sign, enroll; retried while the core is unreachable or busy (429, 5xx) up to ``timeout``."""
    import requests

    base = core_url.rstrip("/")
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            got = requests.post(f"{base}/workers/challenge", json={"worker_id": worker_id}, timeout=30)
            if got.status_code == 201:
                challenge = got.json()["challenge"]
                signed = key.sign(identity.enroll_message(challenge)).signature.hex()
                body: dict[str, Any] = {"worker_id": worker_id, "public_key": key.verify_key.encode().hex(),
                                        "challenge": challenge, "signature": signed}
                if wallet:
                    body.update(wallet=wallet, wallet_signature=wallet_signature)
                got = requests.post(f"{base}/workers/enroll", json=body, timeout=30)
                if got.status_code == 201:
                    return dict(got.json())
            if got.status_code not in (429, 502, 503, 504):
                raise EnrollmentFailed(f"the core refused the enrollment ({got.status_code}): {_reason(got)}")
            reason = f"{got.status_code}: {_reason(got)}"
        except requests.ConnectionError as exc:
            reason = f"cannot reach {base} ({type(exc).__name__})"
        if time.monotonic() + delay > deadline:
            raise EnrollmentFailed(f"could not enroll within {timeout:.0f}s: {reason}")
        time.sleep(delay)  # back off before asking again (the core is starting or busy)
        delay = min(delay * 2, 5.0)


def _reason(resp: Any) -> str:
    try:
        error = resp.json().get("error")
    except ValueError:
        return str(resp.text)[:300]
    return str(error.get("message") if isinstance(error, dict) else error)


def worker_environment(base: Mapping[str, str], enrolled: Mapping[str, Any], *, worker_id: str, core_url: str,
                       key_file: Path, extra: Mapping[str, str | None]) -> dict[str, str]:
    """The worker's Celery environment: ``base`` less every core-only variable, plus what enrollment gave."""
    env = {k: v for k, v in base.items() if k not in CORE_ONLY}
    env.update(REDIS_URL=str(enrolled["broker_url"]), AZU_CORE_PUBLIC_KEY=str(enrolled["core_public_key"]),
               AZU_WORKER_KEY_FILE=str(key_file.resolve()), AZU_WORKER_ID=worker_id, AZU_CORE_URL=core_url,
               REGISTRY_URL=str(enrolled["registry_url"]))
    env.update({k: v for k, v in extra.items() if v})
    return env


def build_parser(w: WorkerSettings) -> argparse.ArgumentParser:
    """``azu-worker``'s options; defaults come from the environment (``w``, read by azu.config)."""
    p = parser_for("azu-worker", "an azu worker node (GPU or CPU): enrolls at the core with its own key, "
                   "then runs its Celery queues gpu.<id> and ctl.<id> with the broker login it got there")
    p.add_argument("--core-url", default=w.core_url,
                   help="the core's API, where this worker enrolls and gets its broker login and the "
                   "registry's URL, e.g. https://core.example; env AZU_CORE_URL (required: no default)")
    p.add_argument("--worker-id", default=w.worker_id,
                   help="this worker's id, 1-40 of a-z 0-9 '-'; its first enrollment binds it to this "
                   "worker's key for good; env AZU_WORKER_ID (required: no default)")
    p.add_argument("--key-file", default=w.key_file,
                   help="the worker's Ed25519 key, made on first start with mode 0600; env "
                   f"AZU_WORKER_KEY_FILE (default: {KEY_FILE_DEFAULT})")
    p.add_argument("--registry-url", default=None,
                   help="fetch layer files from this registry instead (default: the one enrollment answers)")
    p.add_argument("--p2p-url", default=w.p2p_url,
                   help="where other workers reach this one directly, tcp://host:port (reported in its "
                   "heartbeats; the hop before then sends its hand-overs there, encrypted to this worker's "
                   "key, instead of through Redis); it listens on that port, or on AZU_P2P_LISTEN; env "
                   "P2P_PUBLIC_URL (default: none: everything through Redis)")
    p.add_argument("--wallet", default=w.wallet,
                   help="the payout address this worker's earnings go to; env AZU_WALLET_ADDRESS (default: "
                   "none, earnings wait in the ledger)")
    p.add_argument("--wallet-signature", default=w.wallet_signature,
                   help="the wallet's signature over the text --print-wallet-message prints; env "
                   "AZU_WALLET_SIGNATURE (default: none)")
    p.add_argument("--print-wallet-message", action="store_true",
                   help="print what the wallet must sign to receive this worker's earnings, and exit")
    p.add_argument("--cache-dir", default=w.cache_dir,
                   help=f"where layer files are cached; env AZU_CACHE_DIR (default: {CACHE_DIR_DEFAULT})")
    p.add_argument("--device", default=w.device,
                   help="cpu, cuda or cuda:N; env AZU_DEVICE (default: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--dtype", default=w.dtype,
                   help="float32, bfloat16 or float16; env AZU_DTYPE (default: float32)")
    p.add_argument("--memory-bytes", type=int, default=w.memory_bytes,
                   help="offer at most this much memory for layers; env AZU_MEMORY_BYTES (default: what the "
                   "device has)")
    p.add_argument("--loglevel", default=os.environ.get("AZU_LOGLEVEL", "INFO"),
                   help="Celery's log level; env AZU_LOGLEVEL (default: %(default)s)")
    p.add_argument("--events", action="store_true", help="send task events (for Flower)")
    return p


def parse_args(w: WorkerSettings, argv: Sequence[str] | None) -> argparse.Namespace:
    return build_parser(w).parse_args(list(argv) if argv is not None else None)


def missing_arguments(a: argparse.Namespace) -> list[str]:
    """Why ``a`` cannot start a worker, one line each, ending with the command to type; [] when it can."""
    problems = []
    if not a.worker_id:
        suggestion = socket.gethostname().split(".")[0].lower()
        hint = f" (e.g. --worker-id {suggestion})" if identity.WORKER_ID_RE.fullmatch(suggestion) else ""
        problems.append("azu-worker: pass --worker-id ID (or set AZU_WORKER_ID): there is no default, "
                        f"since the first enrollment binds the id to this worker's key for good{hint}")
    elif not identity.WORKER_ID_RE.fullmatch(a.worker_id):
        problems.append("azu-worker: --worker-id must be 1-40 characters of a-z, 0-9 and '-' (starting "
                        f"with a letter or digit), got {a.worker_id!r}")
    if not a.core_url and not a.print_wallet_message:
        problems.append("azu-worker: pass --core-url URL (or set AZU_CORE_URL): the core's API, where the "
                        "worker enrolls and gets its own broker login and the registry's URL; there is no "
                        "default")
    if problems:
        problems.append("  start it as: azu-worker --core-url https://<core> --worker-id <id>")
        problems.append(f"  it then uses: key file {KEY_FILE_DEFAULT} (made on first start, mode 0600), "
                        f"cache {CACHE_DIR_DEFAULT}, device cuda when torch sees a GPU else cpu, dtype "
                        "float32, all of the device's memory, no payout wallet (see azu-worker --help)")
    return problems


def main(argv: Sequence[str] | None = None, *,
         exec_fn: Callable[[str, list[str], dict[str, str]], Any] = os.execve) -> int:
    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"azu-worker: {exc}", file=sys.stderr)
        return 2
    a = parse_args(settings.worker, argv)
    problems = missing_arguments(a)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    key_file = Path(a.key_file) if a.key_file else default_key_file(a.worker_id, a.cache_dir)
    try:
        key = identity.load_or_create_key(key_file)
    except (OSError, ValueError) as exc:
        print(f"azu-worker: {exc}", file=sys.stderr)
        return 2
    public_key = key.verify_key.encode().hex()
    if a.print_wallet_message:
        if not a.wallet:
            print("azu-worker: --print-wallet-message needs --wallet", file=sys.stderr)
            return 2
        print(identity.wallet_message(a.worker_id, public_key, a.wallet))
        return 0
    if a.wallet and not a.wallet_signature:
        print("azu-worker: --wallet needs --wallet-signature (sign the text of --print-wallet-message with "
              "the wallet)", file=sys.stderr)
        return 2
    device = a.device or _default_device()
    cache_dir = a.cache_dir or f".azu/cache/{a.worker_id}"
    print(f"azu-worker: worker id {a.worker_id}, key {key_file} ({public_key[:16]}…), cache {cache_dir}, "
          f"device {device}, dtype {a.dtype or 'float32'}, memory {a.memory_bytes or 'all'}; enrolling at "
          f"{a.core_url}", file=sys.stderr, flush=True)
    try:
        enrolled = enroll(a.core_url, a.worker_id, key, wallet=a.wallet, wallet_signature=a.wallet_signature)
    except EnrollmentFailed as exc:
        print(f"azu-worker: {exc}", file=sys.stderr)
        return 1
    print(f"azu-worker: enrolled as {a.worker_id} (key {public_key[:16]}…), queues "
          f"{', '.join(enrolled['queues'])}", file=sys.stderr, flush=True)
    env = worker_environment(os.environ, enrolled, worker_id=a.worker_id, core_url=a.core_url,
                             key_file=key_file, extra={
                                 "REGISTRY_URL": a.registry_url, "P2P_PUBLIC_URL": a.p2p_url,
                                 "AZU_WALLET_ADDRESS": enrolled.get("wallet") or a.wallet,
                                 "AZU_CACHE_DIR": a.cache_dir, "AZU_DEVICE": device,
                                 "AZU_DTYPE": a.dtype,
                                 "AZU_MEMORY_BYTES": str(a.memory_bytes) if a.memory_bytes else None})
    cmd = worker_argv(a.worker_id, loglevel=a.loglevel, events=a.events)
    sys.stdout.flush()
    sys.stderr.flush()
    exec_fn(cmd[0], cmd, env)  # the worker is the Celery process itself: signals reach it directly
    return 0  # reached only with a test's exec_fn


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


if __name__ == "__main__":
    sys.exit(main())
