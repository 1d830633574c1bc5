"""Schemas of the whole API in one place (pydantic): every request, how a request body is parsed, and the
OpenAI answers (chat completion, its stream chunks, the model list).

Every request schema is strict (a number must be a JSON number, a flag a JSON boolean) and refuses unknown
fields, so a typo like ``max_token`` is a 400 that names it instead of a silently ignored setting. OpenAI
fields that azu does not implement are either accepted at their no-op value (``n=1``,
``presence_penalty=0``...) or refused with a reason. Limits are azu.network.jobs' (what a job may ask for).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, get_args

from flask import request
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from azu.errors import AzuError, InvalidRequest
from azu.network.jobs import MAX_SEED, MAX_STOP_STRINGS, MAX_TEMPERATURE, MAX_TOKENS, MAX_TOP_K
from azu.verification.status import STATUSES as VERIFICATION_STATUSES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Temperature = Annotated[float, Field(ge=0.0, le=MAX_TEMPERATURE)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
# top_k: 0 means "off"; vLLM's -1 is accepted with the same meaning.
TopK = Annotated[int, Field(ge=-1, le=MAX_TOP_K)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Stop = str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)] | None


def stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    return list(stop)


class SamplingFields(Strict):
    temperature: Temperature | None = None
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    stop: Stop = None


# --- POST /submit ------------------------------------------------------------------------------------------
class SubmitRequest(SamplingFields):
    model_id: Annotated[str, Field(min_length=1, max_length=512)]
    prompt: Annotated[str, Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    # The seed README's name for the token budget; same meaning as max_tokens.
    est_tokens: MaxTokens | None = None
    # The seed README sent the caller's wallet here; identity now comes from the API key, so it is ignored.
    user_pubkey: str | None = None

    @model_validator(mode="after")
    def _budget(self) -> SubmitRequest:
        if self.max_tokens is None and self.est_tokens is None:
            raise ValueError("max_tokens (or est_tokens) is required: the most tokens to generate")
        if self.max_tokens is not None and self.est_tokens is not None and self.max_tokens != self.est_tokens:
            raise ValueError("max_tokens and est_tokens disagree; send one of them")
        return self

    @property
    def token_budget(self) -> int:
        return int(self.max_tokens if self.max_tokens is not None else self.est_tokens)  # type: ignore[arg-type]


# --- POST /v1/chat/completions -----------------------------------------------------------------------------
class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"only text content parts are supported, got type {kind!r}")
        return content

    def as_template_dict(self) -> dict[str, Any]:
        # Chat templates expect a string; a list of text parts is joined (images etc. are refused earlier).
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.name:
            out["name"] = self.name
        return out


class StreamOptions(Strict):
    include_usage: bool = False
    continuous_usage_stats: Literal[False] = False


class ChatCompletionRequest(SamplingFields):
    model: Annotated[str, Field(min_length=1, max_length=512)]
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Accepted only at the value that means "feature off", so clients that always send them still work.
    n: Literal[1] = 1
    presence_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=0.0, le=0.0)] = 0.0
    logprobs: Literal[False] = False
    metadata: dict[str, str] | None = None
    store: Literal[False] = False

    @field_validator("messages")
    @classmethod
    def _last_message(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if all(m.role in ("system", "developer") for m in messages):
            raise ValueError("messages need at least one user or assistant message")
        return messages

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- registry ----------------------------------------------------------------------------------------------
class ShardRequest(Strict):
    model_id: Annotated[str, Field(min_length=1, max_length=512)]


# --- accounts ----------------------------------------------------------------------------------------------
class AccountsBody(Strict):
    # Addresses and signatures are pasted by hand: surrounding whitespace is not part of them.
    model_config = ConfigDict(str_strip_whitespace=True)


# Surrounding whitespace is stripped: a value must contain something else (the pattern says so in the schema).
Address = Annotated[str, Field(min_length=1, max_length=128, pattern=r"\S")]


class DepositRequest(AccountsBody):
    tx_sig: Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]
    user_pubkey: Address


class ChallengeRequest(AccountsBody):
    address: Address


class KeyRequest(AccountsBody):
    address: Address
    challenge: Annotated[str, Field(min_length=1, max_length=2000, pattern=r"\S")]
    signature: Annotated[str, Field(min_length=1, max_length=1000, pattern=r"\S")]
    label: Annotated[str, Field(max_length=100)] | None = None


# --- OpenAI answers ----------------------------------------------------------------------------------------
# Built by web/openai.py and dumped as they are: field order is the JSON's order.
class Usage(BaseModel):
    """OpenAI's usage plus azu's: the token-layers run, in total and per worker id."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    token_layers: int
    workers: dict[str, int]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


VerificationState = Literal["pending", "verified", "failed", "inconclusive", "not_checked"]
# The schema's list is azu.verification.status's: a status added there must be added here.
assert set(get_args(VerificationState)) == set(VERIFICATION_STATUSES)


class VerificationLink(BaseModel):
    """Where the job's check stands when the answer is sent, and where to poll for the outcome.

    Checks run after the answer, so this is usually ``pending``, ``not_checked`` or null (not decided yet);
    ``url`` (``GET /results/<job_id>``) shows the outcome once it is known."""

    status: VerificationState | None
    url: str


class AzuExtension(BaseModel):
    """azu's extension of an OpenAI answer: the job behind it and its verification."""

    job_id: str
    verification: VerificationLink


class ChatCompletion(BaseModel):
    id: str
    created: int
    model: str
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage
    azu: AzuExtension


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _only_what_changed(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A delta carries only what it adds ({} with the finish reason), as OpenAI's stream does.
        return {k: v for k, v in handler(self).items() if v is not None}


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One event of a stream. ``usage`` is sent (null until the last chunk) only when the client asked for it
    with ``stream_options.include_usage``; the dump leaves it out otherwise. ``azu`` is on the final chunk
    only (the one before ``[DONE]``)."""

    id: str
    created: int
    model: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: Usage | None = None
    azu: AzuExtension | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "azu"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class UnsupportedMediaType(AzuError):
    status = 415
    code = "unsupported_media_type"


# --- parsing -----------------------------------------------------------------------------------------------
M = TypeVar("M", bound=BaseModel)


# What a field accepts, for errors where the value matched none of a union's shapes.
_HINTS = {
    "stop": f"must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings",
    "content": "must be a string or a list of text parts ({\"type\": \"text\", \"text\": ...})",
}


def _clean_loc(loc: tuple[Any, ...]) -> list[str]:
    # pydantic puts the union member it tried into the location ("str", "list[str]", "TextPart"...);
    # field names here are lower snake_case, so anything else is such a tag.
    out = []
    for part in loc:
        text = str(part)
        if isinstance(part, int) or (text.isidentifier() and text.islower() and text not in _TYPE_TAGS):
            out.append(text)
    return out


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _reason(errors: list[Any]) -> tuple[str, str | None]:
    cleaned = [(_clean_loc(e.get("loc", ())), e) for e in errors]
    top = cleaned[0][0][:1]
    same_field = [(loc, e) for loc, e in cleaned if loc[:1] == top]
    deepest = max(len(loc) for loc, _ in same_field)
    candidates = [(loc, e) for loc, e in same_field if len(loc) == deepest]
    loc, err = candidates[0]
    name = ".".join(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"unknown or unsupported field {name!r}", name or None
    if kind == "missing":
        return f"missing required field {name!r}", name or None
    if len(candidates) > 1:  # the value fit none of the union's shapes
        field = next((p for p in reversed(loc) if not p.isdigit()), "")
        message = _HINTS.get(field) or " or ".join(sorted({str(e.get("msg")) for _, e in candidates}))
    else:
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    return (f"{name}: {message}" if name else message), name or None


def _no_constant(name: str) -> Any:
    raise InvalidRequest(f"the request body contains {name}, which JSON does not allow; send a finite number")


def parse_body(schema: type[M]) -> M:
    """The request's JSON body validated against ``schema``; InvalidRequest (400) naming the field if not.

    The body must be sent as ``Content-Type: application/json`` (415 otherwise: curl's -d alone sends
    form-urlencoded; add ``-H 'Content-Type: application/json'``). NaN and Infinity are refused.
    """
    if request.mimetype != "application/json":
        raise UnsupportedMediaType(
            f"send the body as JSON with 'Content-Type: application/json' "
            f"(got {request.mimetype or 'no Content-Type'})")
    raw = request.get_data(cache=True)
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the request body is not valid JSON (send a JSON object): {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return validate(schema, data)


def validate(schema: type[M], data: dict[str, Any]) -> M:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        message, param = _reason(exc.errors(include_url=False))
        raise InvalidRequest(message, param=param) from None


# --- the other answers (what /openapi.json documents; web/openapi.py) --------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error, on every route and status: OpenAI's shape."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class SubmitAccepted(BaseModel):
    job_id: str
    status: Literal["queued"]
    model_id: str
    prompt_tokens: int
    max_tokens: int
    results_url: str


class Verification(BaseModel):
    """A job's verification (azu.verification.status): ``status`` and what the verifier said with it (for a
    failed check, ``hop`` and ``worker`` name the stage and ``reason`` says how)."""

    model_config = ConfigDict(extra="allow")

    status: VerificationState


class JobResult(BaseModel):
    job_id: str
    status: Literal["queued", "running", "done", "failed"]
    model_id: str
    text: str | None
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage | None
    error: str | None
    verification: Verification | None = Field(
        description="null while the job runs and until the core decides whether to check it")


class ShardStatus(BaseModel):
    model_id: str
    state: Literal["pending", "sharding", "ready", "failed"]
    progress: float
    reason: str | None


class DepositReceipt(BaseModel):
    tx_id: str
    address: str
    amount: int
    balance: int
    unit: str


class BalanceView(BaseModel):
    address: str
    balance: int
    held: int


class ChallengeView(BaseModel):
    address: str
    challenge: str
    expires_in: int


class KeyView(BaseModel):
    id: int
    label: str | None
    created_at: str
    revoked_at: str | None


class NewKey(KeyView):
    address: str
    key: str


class KeyList(BaseModel):
    address: str
    keys: list[KeyView]
