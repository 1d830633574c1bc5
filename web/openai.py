"""OpenAI-compatible routes: ``POST /v1/chat/completions`` (plain and server-sent events), ``GET /v1/models``.

Errors under /v1 have OpenAI's shape (web/errors.py). The official ``openai`` Python client reads both the
plain answer and the stream; ``stream_options.include_usage`` adds a last chunk with the usage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from flask import Blueprint, Response, jsonify, stream_with_context, url_for

from azu import metrics, serving
from azu.errors import AzuError, JobFailed, JobTimeout
from azu.registry import status as shard_status
from azu.tokenization import decode_final
from azu.verification import status as verification
from web import billing, current_user, redis_client, request_timeout_s
from web.errors import openai_error_body
from web.metrics import request_started
from web.schemas import (
    AssistantMessage,
    AzuExtension,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    Usage,
    VerificationLink,
    parse_body,
    stop_list,
)

bp = Blueprint("openai", __name__, url_prefix="/v1")

CHAT_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default
CHAT_DEFAULT_MAX_TOKENS = 512  # when the request sets none: capped by the context left after the prompt
KEEPALIVE_EVERY_S = 10.0  # an SSE comment line this often while waiting: proxies keep the stream open


@bp.get("/models")
def list_models():
    current_user()
    models = ModelList(data=[ModelCard(id=model_id)
                             for model_id in sorted(shard_status.ready_models(redis_client()))])
    return jsonify(models.model_dump())


@bp.post("/chat/completions")
def chat_completions():
    user_id = current_user()
    body = parse_body(ChatCompletionRequest)
    r = redis_client()
    model = serving.ready_model(r, body.model, param="model")
    prompt_ids = model.tokenizer.encode_chat([m.as_template_dict() for m in body.messages])
    max_tokens = serving.check_context(model, prompt_ids, body.token_budget, prompt_param="messages",
                                       default_max_tokens=CHAT_DEFAULT_MAX_TOKENS)
    sampling = serving.Sampling(
        temperature=CHAT_DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=body.top_p, top_k=body.top_k, seed=body.seed, stop=stop_list(body.stop))
    job_id = serving.start_job(r, billing(), model, user_id=user_id, prompt_ids=prompt_ids,
                               max_tokens=max_tokens, sampling=sampling)
    metrics.API_JOBS_STARTED.labels("chat_stream" if body.stream else "chat").inc()
    head = _Head(id=f"chatcmpl-{job_id.removeprefix('job-')}", created=int(time.time()), model=model.model_id,
                 job_id=job_id, results_url=url_for("jobs.results", job_id=job_id))
    timeout_s = request_timeout_s()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(r, job_id, head, model, sampling, prompt_tokens=len(prompt_ids),
                         include_usage=include_usage, timeout_s=timeout_s, started=request_started())
        return Response(stream_with_context(events), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                 "X-Azu-Job-Id": job_id})

    outcome = serving.wait_for(r, job_id, timeout_s=timeout_s)
    serving.raise_for(outcome, job_id, timeout_s=timeout_s)
    content = decode_final(model.tokenizer, outcome.token_ids, stop=sampling.stop)
    usage = Usage(**serving.usage_dict(outcome.usage, prompt_tokens=len(prompt_ids),
                                       completion_tokens=len(outcome.token_ids)))
    answer = ChatCompletion(id=head.id, created=head.created, model=head.model, usage=usage,
                            choices=[Choice(message=AssistantMessage(content=content),
                                            finish_reason=outcome.finish_reason or "stop")],
                            azu=_extension(r, head))
    return jsonify(answer.model_dump()), 200, {"X-Azu-Job-Id": job_id}


@dataclass(frozen=True)
class _Head:
    """What the answer and every chunk of one completion repeat."""

    id: str
    created: int
    model: str
    job_id: str
    results_url: str  # GET /results/<job_id>: where the user polls for the verification's outcome


def _extension(r: redis.Redis, head: _Head) -> AzuExtension:
    """The ``azu`` field: the job and its verification as it stands now (checks run after the answer, so
    usually pending, not_checked or null), with the URL that will show the outcome."""
    try:
        state = verification.read(r, head.job_id)
    except redis.RedisError:  # the answer is complete; its verification can be read later at the URL
        state = None
    return AzuExtension(job_id=head.job_id, verification=VerificationLink(
        status=state["status"] if state else None, url=head.results_url))


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _stream(r: redis.Redis, job_id: str, head: _Head, model: serving.ReadyModel, sampling: serving.Sampling,
            *, prompt_tokens: int, include_usage: bool, timeout_s: float,
            started: float | None = None) -> Iterator[str]:
    """One chunk per piece of text; the finish reason; the usage (when asked); ``[DONE]``.

    If the client goes away, the WSGI server closes this generator (GeneratorExit at a yield) and the job
    is cancelled, so the workers stop spending on an answer nobody reads.
    """
    dec = serving.decoder(model, sampling)
    # Without include_usage, chunks have no "usage" key at all (OpenAI's shape); with it, null until the end.
    leave_out = None if include_usage else {"usage"}

    def send(chunk: ChatCompletionChunk) -> str:
        # "azu" only where it is set (the final chunk): the other chunks keep OpenAI's exact shape.
        exclude = (leave_out or set()) | ({"azu"} if chunk.azu is None else set())
        return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"

    def make(delta: Delta, finish_reason: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=head.id, created=head.created, model=head.model,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)])

    def chunk(delta: Delta, finish_reason: str | None = None) -> str:
        return send(make(delta, finish_reason))

    finished = False
    try:
        yield chunk(Delta(role="assistant", content=""))
        last_sent = time.monotonic()
        deadline = time.monotonic() + timeout_s
        for event in serving.follow(r, job_id, deadline=deadline):
            if event is None:
                if time.monotonic() - last_sent >= KEEPALIVE_EVERY_S:
                    last_sent = time.monotonic()
                    yield ": keep-alive\n\n"
                continue
            # The first token, maybe in "done": a stop id that ends the answer at once is not shown, but
            # it was the first token all the same (the core counts it too). A job cancelled before its
            # first token also ends with "done", and has no first token to time.
            first = event.token_id is not None or (event.kind == "done" and event.finish_reason == "stop")
            if started is not None and first:
                metrics.API_TTFT_SECONDS.labels("chat_stream").observe(time.monotonic() - started)
                started = None
            if event.kind == "token" and event.token_id is not None:
                text = dec.push(int(event.token_id))
                if text:
                    last_sent = time.monotonic()
                    yield chunk(Delta(content=text))
            elif event.kind == "done":
                finished = True
                tail = dec.finish()
                if tail:
                    yield chunk(Delta(content=tail))
                last = [make(Delta(), event.finish_reason or "stop")]
                if include_usage:
                    usage = Usage(**serving.usage_dict(event.usage, prompt_tokens=prompt_tokens,
                                                       completion_tokens=len(dec.token_ids)))
                    last.append(ChatCompletionChunk(id=head.id, created=head.created, model=head.model,
                                                    choices=[], usage=usage))
                # The final chunk (the usage one when asked for) carries the job and its verification.
                last[-1] = last[-1].model_copy(update={"azu": _extension(r, head)})
                for final in last:
                    yield send(final)
                yield "data: [DONE]\n\n"
            elif event.kind == "error":
                finished = True
                err: AzuError
                if event.error == "timeout":
                    serving.cancel_quietly(r, job_id)
                    err = JobTimeout(f"job {job_id} did not finish in time; it was cancelled")
                else:
                    err = JobFailed(f"job {job_id} failed: {event.error or 'unknown error'}")
                yield _sse(openai_error_body(err.status, err.message, code=err.code))
                yield "data: [DONE]\n\n"
    finally:
        if not finished:
            serving.cancel_quietly(r, job_id)
