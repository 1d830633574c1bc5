"""The plain job API: ``POST /submit`` starts a job, ``GET /results/<job_id>`` reports it.

A job is asynchronous: /submit answers at once with the job id (202); /results shows the status, the tokens
generated so far, their text and, at the end, the usage in token-layers per worker. Callers only ever see
their own jobs.
"""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify, url_for

from azu import metrics, serving
from azu.tokenization import decode_final, load_tokenizer
from azu.verification import status as verification
from web import billing, current_user, redis_client
from web.schemas import SubmitRequest, parse_body, stop_list

log = logging.getLogger(__name__)
bp = Blueprint("jobs", __name__)

SUBMIT_DEFAULT_TEMPERATURE = 0.0  # /submit is greedy unless asked otherwise: the same prompt, the same answer


@bp.post("/submit")
def submit():
    user_id = current_user()
    body = parse_body(SubmitRequest)
    r = redis_client()
    model = serving.ready_model(r, body.model_id, param="model_id")
    prompt_ids = model.tokenizer.encode(body.prompt)
    max_tokens = serving.check_context(model, prompt_ids, body.token_budget, prompt_param="prompt",
                                       default_max_tokens=body.token_budget)
    sampling = serving.Sampling(
        temperature=SUBMIT_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=stop_list(body.stop))
    job_id = serving.start_job(r, billing(), model, user_id=user_id, prompt_ids=prompt_ids,
                               max_tokens=max_tokens, sampling=sampling)
    metrics.API_JOBS_STARTED.labels("submit").inc()
    return jsonify({"job_id": job_id, "status": "queued", "model_id": model.model_id,
                    "prompt_tokens": len(prompt_ids), "max_tokens": max_tokens,
                    "results_url": url_for("jobs.results", job_id=job_id)}), 202


@bp.get("/results/<job_id>")
def results(job_id: str):
    user_id = current_user()
    r = redis_client()
    view = serving.own_job(r, job_id, user_id)
    token_ids = [int(t) for t in (view.token_ids or [])]
    text = _text(view.model_id, token_ids, serving.job_stop_strings(view))
    prompt_tokens = int(view.prompt_tokens or 0)
    usage = (serving.usage_dict(view.usage, prompt_tokens=prompt_tokens, completion_tokens=len(token_ids))
             if view.usage else None)
    return jsonify({"job_id": job_id, "status": view.status, "model_id": view.model_id, "text": text,
                    "token_ids": token_ids, "finish_reason": view.finish_reason, "usage": usage,
                    "error": view.error, "verification": verification.read(r, job_id)})


def _text(model_id: str, token_ids: list[int], stop: list[str]) -> str | None:
    try:
        return decode_final(load_tokenizer(serving.tokenizer_folder(model_id)), token_ids, stop=stop)
    except Exception:  # the model's files went away since the job ran: the ids still answer
        log.warning("cannot decode job text for model %s", model_id, exc_info=True)
        return None
