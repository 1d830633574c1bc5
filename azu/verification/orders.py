"""The verifier's one order to a worker: send the signed bundles you kept for a job (on ``ctl.<id>``)."""

from __future__ import annotations

from azu.network import auth
from azu.network.dispatch import Dispatcher, control_queue, get_dispatcher
from azu.network.wire import evidence_order_part

EVIDENCE = "workers.stage.evidence"


def send_evidence_order(worker_id: str, *, job_id: str, epoch: int,
                        dispatch: Dispatcher | None = None) -> None:
    """Ask ``worker_id`` for its evidence of ``job_id``'s ``epoch`` (the core signs the order)."""
    sig = auth.sign(auth.core_signing_key(), auth.EVIDENCE_ORDER, evidence_order_part(job_id, epoch))
    (dispatch or get_dispatcher()).send_task(
        EVIDENCE, queue=control_queue(worker_id), kwargs={"job_id": job_id, "epoch": epoch, "sig": sig})
