"""Settings: every environment variable azu reads, parsed and checked in one place.

``get_settings()`` is what every process reads (API, scheduler, registry, worker nodes, the CLI). It parses
the environment once per distinct environment, so a variable changed at run time (a test's monkeypatch, a
CLI flag copied into the environment) is seen on the next call, and nothing is frozen at import time.
Nothing else in azu/, web/ or workers/ reads ``os.environ``; the command lines (azu/cli/) only write it
for the processes they start.

Secrets (``AUTH_SECRET_KEY``, chain private keys, ``HF_TOKEN``, ``DATABASE_URL``) are kept out of ``repr``
so a logged settings object leaks nothing. README.md lists every variable.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# AZU_CPU_KERNELS's choices: azu.engine.kernels.KERNELS (not imported here: it would import torch).
CPU_KERNELS = ("auto", "packed", "transposed", "mlas", "plain", "torch")
# AZU_DECODE_GRAPHS: a job's one-token steps as CUDA graph replays (azu.engine.graphs). "auto": on a GPU,
# where the stage's family allows it; "on": also on a CPU (the same static step, run eagerly: for tests).
DECODE_GRAPHS = ("auto", "on", "off")


class SettingsError(ValueError):
    """A variable is set to something azu cannot use; the message names it and says what is expected."""


def _text(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    return value.strip() if value is not None and value.strip() != "" else default


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _text(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise SettingsError(f"{name} must be a positive number of seconds, got {raw!r}")
    return value


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...], default: str) -> str:
    value = (_text(env, name) or default).lower()
    if value not in choices:
        raise SettingsError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    return (_text(env, name) or "").lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class WorkerSettings:
    """What a worker node is told by its operator (``azu-worker`` writes these from its flags)."""

    worker_id: str | None = None  # AZU_WORKER_ID
    device: str | None = None  # AZU_DEVICE: "cpu", "cuda", "cuda:1"; None: the worker picks
    dtype: str | None = None  # AZU_DTYPE
    wallet: str | None = None  # AZU_WALLET_ADDRESS: where payouts go
    memory_bytes: int | None = None  # AZU_MEMORY_BYTES: offer at most this much memory
    cache_dir: str | None = None  # AZU_CACHE_DIR: default .azu/cache/<worker id>
    p2p_url: str | None = None  # P2P_PUBLIC_URL: where other workers send hand-overs (azu.network.direct)
    p2p_listen: str | None = None  # AZU_P2P_LISTEN: host:port to listen on (default 0.0.0.0:<that port>)
    max_cached_tokens: int = 32768  # AZU_MAX_CACHED_TOKENS: KV-cache bound per stage
    kv_idle_s: float = 600.0  # AZU_KV_IDLE_S: free a job's caches after this long untouched
    linger_s: float = 10.0  # AZU_LINGER_S: how long an idle worker's session waits on its inbox for more
    session_s: float = 2.0  # AZU_SESSION_S: how often a forward task looks for a waiting control message
    prefill_chunk: int = 128  # AZU_PREFILL_CHUNK: prompt positions a stage runs per turn
    # AZU_CPU_KERNELS: auto, packed, transposed, mlas, plain, torch (azu.engine.kernels)
    cpu_kernels: str = "auto"
    decode_graphs: str = "auto"  # AZU_DECODE_GRAPHS: one-token steps as CUDA graph replays (auto, on, off)
    step_trace: str | None = None  # AZU_STEP_TRACE: a folder for its steps' times (azu.network.steptrace)
    heartbeat_s: float = 3.0  # AZU_HEARTBEAT_S
    key_file: str | None = None  # AZU_WORKER_KEY_FILE: the worker's Ed25519 key (made on first start, 0600)
    core_url: str | None = None  # AZU_CORE_URL: the core's API, where azu-worker enrolls
    wallet_signature: str | None = field(default=None, repr=False)  # AZU_WALLET_SIGNATURE: binds the wallet


@dataclass(frozen=True)
class PaymentSettings:
    """The chain side: which provider, where its RPC is, the platform's addresses and keys."""

    provider: str = "hyperliquid"  # PAYMENT_PROVIDER
    hyperliquid_rpc_url: str | None = None  # HYPERLIQUID_RPC_URL
    hyperliquid_address: str | None = None  # HYPERLIQUID_ADDRESS
    hyperliquid_chain_id: int | None = None  # HYPERLIQUID_CHAIN_ID
    scheduler_private_key: str | None = field(default=None, repr=False)  # SCHEDULER_PRIVATE_KEY
    solana_rpc_url: str | None = None  # SOLANA_RPC_URL
    solana_address: str | None = None  # SOLANA_ADDRESS
    solana_private_key: str | None = field(default=None, repr=False)  # SOLANA_PRIVATE_KEY
    min_confirmations: int | None = None  # MIN_CONFIRMATIONS
    price_per_token_layer: str | None = None  # PRICE_PER_TOKEN_LAYER (parsed by azu.billing.economics)
    payout_threshold: str | None = None  # PAYOUT_THRESHOLD (parsed by azu.billing.economics)


# --- the API's edge: CORS, rate limits, request size limits, who may shard what (web/) ---------------------
def _rate_limit(env: Mapping[str, str], name: str, default: str) -> str | None:
    """A Flask-Limiter limit string ("30/minute", "5/second;100/hour"); "off" turns the limit off."""
    raw = _text(env, name, default) or default
    if raw.lower() in ("off", "0", "none", "false"):
        return None
    from limits import parse_many

    try:
        parse_many(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a rate limit like '30/minute' or 'off', got {raw!r}") from None
    return raw


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value is None or value <= 0:
        raise SettingsError(f"{name} must be a positive integer")
    return value


@dataclass(frozen=True)
class ApiSettings:
    cors_origins: tuple[str, ...] = ()  # AZU_CORS_ORIGINS: comma-separated origins (or "*"); empty: no CORS
    rate_limit_jobs: str | None = "120/minute"  # AZU_RATE_LIMIT_JOBS: submit, chat; per key and per address
    rate_limit_accounts: str | None = "30/minute"  # AZU_RATE_LIMIT_ACCOUNTS: auth, deposit, shard, enroll
    max_url_bytes: int = 8192  # AZU_MAX_URL_BYTES: a longer URL is a 414
    max_header_bytes: int = 16384  # AZU_MAX_HEADER_BYTES: larger request headers are a 431
    max_shard_bytes: int = 200 * 10**9  # AZU_MAX_SHARD_BYTES: the largest checkpoint a request may shard
    shard_quota: int = 10  # AZU_SHARD_QUOTA: shard requests one account may start per (UTC) day
    allow_reshard: bool = False  # AZU_ALLOW_RESHARD=1: a shard request may replace a ready model
    max_open_challenges: int = 5  # AZU_MAX_OPEN_CHALLENGES: unexpired sign-in challenges per address

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ApiSettings:
        origins = tuple(o.strip() for o in (_text(env, "AZU_CORS_ORIGINS") or "").split(",") if o.strip())
        return cls(
            cors_origins=origins,
            rate_limit_jobs=_rate_limit(env, "AZU_RATE_LIMIT_JOBS", "120/minute"),
            rate_limit_accounts=_rate_limit(env, "AZU_RATE_LIMIT_ACCOUNTS", "30/minute"),
            max_url_bytes=_positive_int(env, "AZU_MAX_URL_BYTES", 8192),
            max_header_bytes=_positive_int(env, "AZU_MAX_HEADER_BYTES", 16384),
            max_shard_bytes=_positive_int(env, "AZU_MAX_SHARD_BYTES", 200 * 10**9),
            shard_quota=_positive_int(env, "AZU_SHARD_QUOTA", 10),
            allow_reshard=_flag(env, "AZU_ALLOW_RESHARD"),
            max_open_challenges=_positive_int(env, "AZU_MAX_OPEN_CHALLENGES", 5),
        )


API_VARIABLES = (
    "AZU_CORS_ORIGINS", "AZU_RATE_LIMIT_JOBS", "AZU_RATE_LIMIT_ACCOUNTS", "AZU_MAX_URL_BYTES",
    "AZU_MAX_HEADER_BYTES", "AZU_MAX_SHARD_BYTES", "AZU_SHARD_QUOTA", "AZU_ALLOW_RESHARD",
    "AZU_MAX_OPEN_CHALLENGES",
)


@dataclass(frozen=True)
class MetricsSettings:
    """Prometheus metrics (azu/metrics.py)."""

    port: int | None = None  # AZU_METRICS_PORT: a worker (or core process) serves /metrics on this port
    host: str = "127.0.0.1"  # AZU_METRICS_HOST: where that port listens (loopback: the operator's only)
    token: str | None = field(default=None, repr=False)  # AZU_METRICS_TOKEN: the API's /metrics wants it
    multiproc_dir: str | None = None  # PROMETHEUS_MULTIPROC_DIR: gunicorn's processes count into files here

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MetricsSettings:
        port = _int(env, "AZU_METRICS_PORT", None)
        if port is not None and not 0 < port < 65536:
            raise SettingsError(f"AZU_METRICS_PORT must be a TCP port (1-65535), got {port}")
        return cls(port=port, host=_text(env, "AZU_METRICS_HOST", "127.0.0.1") or "127.0.0.1",
                   token=_text(env, "AZU_METRICS_TOKEN"),
                   multiproc_dir=_text(env, "PROMETHEUS_MULTIPROC_DIR"))


@dataclass(frozen=True)
class VerifySettings:
    """Verified work (azu.verification): how often the core re-computes jobs, and what workers keep for it."""

    rate: float = 0.05  # AZU_VERIFY_RATE: share of ended jobs re-computed (new and suspect workers: all)
    new_jobs: int = 20  # AZU_VERIFY_NEW_JOBS: a worker's jobs are all checked until this many passed
    ban_after: int = 2  # AZU_VERIFY_BAN_AFTER: failed checks that take a worker off routes, payouts frozen
    rtol: float = 1e-3  # AZU_VERIFY_RTOL: tolerance, relative to a row's largest magnitude (fp32; bf16: 5e-2)
    wait_s: float = 30.0  # AZU_VERIFY_WAIT_S: how long the verifier waits for commitments and evidence
    evidence_bytes: int = 256 << 20  # AZU_EVIDENCE_BYTES: signed hand-overs a worker keeps for disputes
    evidence_s: float = 1800.0  # AZU_EVIDENCE_S: ... and for how long

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> VerifySettings:
        raw = _text(env, "AZU_VERIFY_RATE")
        try:
            rate = 0.05 if raw is None else float(raw)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            raise SettingsError(f"AZU_VERIFY_RATE must be a share between 0 and 1, got {raw!r}")
        return cls(rate=rate, new_jobs=max(0, _int(env, "AZU_VERIFY_NEW_JOBS", 20) or 0),
                   ban_after=max(1, _int(env, "AZU_VERIFY_BAN_AFTER", 2) or 2),
                   rtol=_float(env, "AZU_VERIFY_RTOL", 1e-3), wait_s=_float(env, "AZU_VERIFY_WAIT_S", 30.0),
                   evidence_bytes=max(0, _int(env, "AZU_EVIDENCE_BYTES", 256 << 20) or 0),
                   evidence_s=_float(env, "AZU_EVIDENCE_S", 1800.0))


VERIFY_VARIABLES = ("AZU_VERIFY_RATE", "AZU_VERIFY_NEW_JOBS", "AZU_VERIFY_BAN_AFTER", "AZU_VERIFY_RTOL",
                    "AZU_VERIFY_WAIT_S", "AZU_EVIDENCE_BYTES", "AZU_EVIDENCE_S")
METRICS_VARIABLES = ("AZU_METRICS_PORT", "AZU_METRICS_HOST", "AZU_METRICS_TOKEN", "PROMETHEUS_MULTIPROC_DIR")


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"  # REDIS_URL, else REDIS_HOST / REDIS_PORT
    database_url: str | None = field(default=None, repr=False)  # DATABASE_URL: the ledger (core only)
    registry_url: str = "http://127.0.0.1:8002"  # REGISTRY_URL
    auth_secret_key: str | None = field(default=None, repr=False)  # AUTH_SECRET_KEY: the core's Ed25519 seed
    core_public_key: str | None = None  # AZU_CORE_PUBLIC_KEY: the core's Ed25519 public key (hex)
    dispatcher: str = "workers"  # AZU_DISPATCHER: the module that registers the task sender
    registry_dir: Path = Path(".azu/registry")  # AZU_REGISTRY_DIR
    allowed_model_dirs: tuple[Path, ...] = ()  # AZU_ALLOWED_MODEL_DIRS (os.pathsep-separated)
    hf_token: str | None = field(default=None, repr=False)  # HF_TOKEN
    hf_endpoint: str | None = None  # HF_ENDPOINT (a hub mirror)
    cache_dir: str | None = None  # AZU_CACHE_DIR (the API's tokenizer cache; a worker's layer cache)
    copies: int = 2  # AZU_COPIES: copies of each span the placement plans (spares while memory allows)
    step_timeout_s: float | None = None  # AZU_STEP_TIMEOUT_S: no token + a silent worker this long = lost
    step_deadline_s: float = 120.0  # AZU_STEP_DEADLINE_S: a running job idle longer than this fails
    load_deadline_s: float = 600.0  # AZU_LOAD_DEADLINE_S: a job waiting for loads longer than this fails
    heartbeat_ttl_s: float = 15.0  # AZU_HEARTBEAT_TTL_S: a worker silent longer than this is not live
    request_timeout_s: float = 600.0  # AZU_REQUEST_TIMEOUT_S: how long a request waits for its job
    watchdog_interval_s: float = 5.0  # AZU_WATCHDOG_INTERVAL_S
    payout_interval_s: float = 60.0  # PAYOUT_INTERVAL_S
    reconcile_interval_s: float = 30.0  # AZU_RECONCILE_INTERVAL_S: how often open holds are reconciled
    reconcile_grace_s: float = 60.0  # AZU_RECONCILE_GRACE_S: slack before the reconciler ends/releases a hold
    task_events: bool = False  # AZU_TASK_EVENTS=1: workers send task events (Flower)
    # AZU_BROKER_PUBLIC_URL: the broker as workers reach it, without a login (enrollment adds theirs).
    # Unset: the host, port and database of the API's own Redis connection.
    broker_public_url: str | None = None
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    payments: PaymentSettings = field(default_factory=PaymentSettings)
    api: ApiSettings = field(default_factory=ApiSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    verify: VerifySettings = field(default_factory=VerifySettings)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        url = _text(env, "REDIS_URL")
        if url is None:
            host = _text(env, "REDIS_HOST", "127.0.0.1")
            url = f"redis://{host}:{_int(env, 'REDIS_PORT', 6379)}/0"
        worker_id = _text(env, "AZU_WORKER_ID")
        if worker_id is not None and (":" in worker_id or "/" in worker_id):
            raise SettingsError("AZU_WORKER_ID must be a name without ':' or '/'")
        memory = _int(env, "AZU_MEMORY_BYTES", None)
        if memory is not None and memory <= 0:
            raise SettingsError("AZU_MEMORY_BYTES must be a positive number of bytes")
        dirs = _text(env, "AZU_ALLOWED_MODEL_DIRS") or ""
        return cls(
            redis_url=url,
            database_url=_text(env, "DATABASE_URL"),
            registry_url=_text(env, "REGISTRY_URL", "http://127.0.0.1:8002") or "",
            auth_secret_key=_text(env, "AUTH_SECRET_KEY"),
            core_public_key=_text(env, "AZU_CORE_PUBLIC_KEY"),
            dispatcher=_text(env, "AZU_DISPATCHER", "workers") or "workers",
            registry_dir=Path(_text(env, "AZU_REGISTRY_DIR", ".azu/registry") or ".azu/registry"),
            allowed_model_dirs=tuple(Path(p).resolve() for p in dirs.split(os.pathsep) if p),
            hf_token=_text(env, "HF_TOKEN"),
            hf_endpoint=_text(env, "HF_ENDPOINT"),
            cache_dir=_text(env, "AZU_CACHE_DIR"),
            copies=max(1, _int(env, "AZU_COPIES", 2) or 2),
            step_timeout_s=(_float(env, "AZU_STEP_TIMEOUT_S", 0.0) if _text(env, "AZU_STEP_TIMEOUT_S")
                            else None),
            step_deadline_s=_float(env, "AZU_STEP_DEADLINE_S", 120.0),
            load_deadline_s=_float(env, "AZU_LOAD_DEADLINE_S", 600.0),
            heartbeat_ttl_s=_float(env, "AZU_HEARTBEAT_TTL_S", 15.0),
            request_timeout_s=_float(env, "AZU_REQUEST_TIMEOUT_S", 600.0),
            watchdog_interval_s=_float(env, "AZU_WATCHDOG_INTERVAL_S", 5.0),
            payout_interval_s=_float(env, "PAYOUT_INTERVAL_S", 60.0),
            reconcile_interval_s=_float(env, "AZU_RECONCILE_INTERVAL_S", 30.0),
            reconcile_grace_s=_float(env, "AZU_RECONCILE_GRACE_S", 60.0),
            task_events=_flag(env, "AZU_TASK_EVENTS"),
            broker_public_url=_text(env, "AZU_BROKER_PUBLIC_URL"),
            worker=WorkerSettings(
                worker_id=worker_id,
                device=_text(env, "AZU_DEVICE"),
                dtype=_text(env, "AZU_DTYPE"),
                wallet=_text(env, "AZU_WALLET_ADDRESS"),
                memory_bytes=memory,
                cache_dir=_text(env, "AZU_CACHE_DIR"),
                p2p_url=_text(env, "P2P_PUBLIC_URL"), p2p_listen=_text(env, "AZU_P2P_LISTEN"),
                max_cached_tokens=_int(env, "AZU_MAX_CACHED_TOKENS", 32768) or 32768,
                kv_idle_s=_float(env, "AZU_KV_IDLE_S", 600.0),
                linger_s=_float(env, "AZU_LINGER_S", 10.0),
                session_s=_float(env, "AZU_SESSION_S", 2.0),
                prefill_chunk=max(1, _int(env, "AZU_PREFILL_CHUNK", 128) or 128),
                cpu_kernels=_choice(env, "AZU_CPU_KERNELS", CPU_KERNELS, "auto"),
                decode_graphs=_choice(env, "AZU_DECODE_GRAPHS", DECODE_GRAPHS, "auto"),
                step_trace=_text(env, "AZU_STEP_TRACE"),
                heartbeat_s=_float(env, "AZU_HEARTBEAT_S", 3.0),
                key_file=_text(env, "AZU_WORKER_KEY_FILE"),
                core_url=_text(env, "AZU_CORE_URL"),
                wallet_signature=_text(env, "AZU_WALLET_SIGNATURE"),
            ),
            api=ApiSettings.from_env(env),
            metrics=MetricsSettings.from_env(env),
            verify=VerifySettings.from_env(env),
            payments=PaymentSettings(
                provider=(_text(env, "PAYMENT_PROVIDER", "hyperliquid") or "hyperliquid").lower(),
                hyperliquid_rpc_url=_text(env, "HYPERLIQUID_RPC_URL"),
                hyperliquid_address=_text(env, "HYPERLIQUID_ADDRESS"),
                hyperliquid_chain_id=_int(env, "HYPERLIQUID_CHAIN_ID", None),
                scheduler_private_key=_text(env, "SCHEDULER_PRIVATE_KEY"),
                solana_rpc_url=_text(env, "SOLANA_RPC_URL"),
                solana_address=_text(env, "SOLANA_ADDRESS"),
                solana_private_key=_text(env, "SOLANA_PRIVATE_KEY"),
                min_confirmations=_int(env, "MIN_CONFIRMATIONS", None),
                price_per_token_layer=_text(env, "PRICE_PER_TOKEN_LAYER"),
                payout_threshold=_text(env, "PAYOUT_THRESHOLD"),
            ),
        )


# Every variable Settings reads: the cache key, so a changed environment is parsed again.
VARIABLES = (
    "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "DATABASE_URL", "REGISTRY_URL", "AUTH_SECRET_KEY",
    "AZU_DISPATCHER", "AZU_REGISTRY_DIR", "AZU_ALLOWED_MODEL_DIRS", "HF_TOKEN", "HF_ENDPOINT",
    "AZU_CACHE_DIR", "AZU_COPIES", "AZU_STEP_TIMEOUT_S", "AZU_STEP_DEADLINE_S", "AZU_LOAD_DEADLINE_S",
    "AZU_HEARTBEAT_TTL_S",
    "AZU_REQUEST_TIMEOUT_S", "AZU_WATCHDOG_INTERVAL_S", "PAYOUT_INTERVAL_S", "AZU_TASK_EVENTS",
    "AZU_WORKER_ID", "AZU_DEVICE", "AZU_DTYPE", "AZU_WALLET_ADDRESS", "AZU_MEMORY_BYTES",
    "P2P_PUBLIC_URL", "AZU_P2P_LISTEN",
    "AZU_MAX_CACHED_TOKENS", "AZU_KV_IDLE_S", "AZU_LINGER_S", "AZU_SESSION_S",
    "AZU_PREFILL_CHUNK", "AZU_CPU_KERNELS", "AZU_DECODE_GRAPHS", "AZU_STEP_TRACE",
    "AZU_HEARTBEAT_S", "AZU_WORKER_KEY_FILE",
    "AZU_CORE_PUBLIC_KEY",
    "PAYMENT_PROVIDER",
    "HYPERLIQUID_RPC_URL", "HYPERLIQUID_ADDRESS",
    "HYPERLIQUID_CHAIN_ID", "SCHEDULER_PRIVATE_KEY", "SOLANA_RPC_URL", "SOLANA_ADDRESS",
    "SOLANA_PRIVATE_KEY", "MIN_CONFIRMATIONS", "PRICE_PER_TOKEN_LAYER", "PAYOUT_THRESHOLD",
    "AZU_CORE_URL", "AZU_WALLET_SIGNATURE", "AZU_BROKER_PUBLIC_URL", "AZU_RECONCILE_INTERVAL_S",
    "AZU_RECONCILE_GRACE_S",
    *API_VARIABLES, *METRICS_VARIABLES, *VERIFY_VARIABLES,
)


@lru_cache(maxsize=8)
def _parsed(values: tuple[str | None, ...]) -> Settings:
    return Settings.from_env({k: v for k, v in zip(VARIABLES, values, strict=True) if v is not None})


@lru_cache(maxsize=8)
def _parsed_raw(raw: tuple[bytes | None, ...]) -> Settings:
    # From the key itself, decoded as os.environ decodes it: reading the environment again here could
    # cache another thread's change under this key.
    encoding = sys.getfilesystemencoding()
    return _parsed(tuple(None if v is None else v.decode(encoding, "surrogateescape") for v in raw))


# CPython's os.environ keeps the environment as a dict of encoded names and values: looking the variables up
# there takes 2 us, through os.environ 55-140 us, and get_settings is called several times per job and per
# report. Where that dict is not there (or not POSIX's, whose names are encoded as below), the public way.
_ENV_DATA: dict[bytes, bytes] | None = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_NAMES = tuple(name.encode(sys.getfilesystemencoding(), "surrogateescape") for name in VARIABLES)


def get_settings() -> Settings:
    """The settings of this process's environment as it is now (parsed once per distinct environment)."""
    if _ENV_DATA is not None:
        return _parsed_raw(tuple(map(_ENV_DATA.get, _ENV_NAMES)))
    return _parsed(tuple(os.environ.get(name) for name in VARIABLES))


def redis_url() -> str:
    """REDIS_URL wins; else REDIS_HOST/REDIS_PORT (the seed's variables); else the local default."""
    return get_settings().redis_url
