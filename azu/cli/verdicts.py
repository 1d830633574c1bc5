"""``azu verdicts``, ``azu unban``: an operator's view of verification (docs/security.md, "Verified work").

They run where the core runs (its ``REDIS_URL``, and ``DATABASE_URL`` for the ledger's verdict rows):

- ``azu verdicts [--worker W]``: banned workers and why, suspects, and the ledger's verdicts (what was
  withheld and refunded, with the evidence);
- ``azu unban W``: an operator's ruling after reading the evidence: routes again, payouts again (the ledger's
  freeze cleared), strikes and suspicion reset. The withheld earnings stay withheld.
"""

from __future__ import annotations

import argparse
import json
import sys

from azu.config import get_settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.prog.endswith("unban"):
        parser.add_argument("worker", help="the worker id to put back on routes and pay again")
    else:
        parser.add_argument("--worker", default=None, help="only this worker's verdicts")


def _redis():  # type: ignore[no-untyped-def]
    import redis

    return redis.Redis.from_url(get_settings().redis_url, decode_responses=True)


def cmd_verdicts(args: argparse.Namespace) -> int:
    from azu.network import keys

    r = _redis()
    banned = r.hgetall(keys.BANNED)
    suspects = sorted(r.smembers(keys.VERIFY_SUSPECT))
    for worker, why in sorted(banned.items()):
        if args.worker in (None, worker):
            print(f"banned  {worker}: {why}")
    for worker in suspects:
        if args.worker in (None, worker):
            print(f"suspect {worker} (every job checked; strikes {r.get(keys.verify_strikes(worker)) or 0})")
    if not get_settings().database_url:
        print("(no DATABASE_URL: the ledger's verdicts are not shown)")
        return 0
    from azu.billing.factory import process_ledger
    from azu.billing.ledger import service
    from azu.billing.ledger.db import session_scope

    with session_scope(process_ledger().engine) as session:
        for v in service.verdicts(session, worker_id=args.worker):
            print(json.dumps({"job_id": v.job_id, "worker": v.worker_id, "outcome": v.outcome,
                              "reason": v.reason,
                              "withheld": v.withheld, "shortfall": v.shortfall, "refunded": v.refunded,
                              "evidence": v.evidence, "at": v.created_at.isoformat()}))
    return 0


def cmd_unban(args: argparse.Namespace) -> int:
    from azu.network import keys

    r = _redis()
    r.hdel(keys.BANNED, args.worker)
    r.srem(keys.VERIFY_SUSPECT, args.worker)
    r.delete(keys.verify_strikes(args.worker))
    if get_settings().database_url:
        from azu.billing.factory import process_ledger

        process_ledger().billing.unfreeze_worker(worker_id=args.worker)
    print(f"{args.worker}: back on routes; payouts resume; its withheld earnings stay withheld")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return cmd_unban(args) if args.command == "unban" else cmd_verdicts(args)
    except Exception as exc:  # one line for an operator, not a traceback
        print(f"azu {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
