"""A model's tokenizer, read from its shard folder, without torch.

The API process handles token ids and bytes only, so it must not import torch (a gunicorn worker stays
small and starts fast). ``transformers``' ``from_pretrained`` imports torch, so this module reads the same
files itself: ``tokenizer.json`` through the ``tokenizers`` library (the Rust fast tokenizer that
``PreTrainedTokenizerFast`` wraps), the special tokens and the chat template from
``tokenizer_config.json`` / ``chat_template.jinja``, and renders the template in a sandboxed Jinja
environment configured the way ``transformers`` configures it (trim_blocks, lstrip_blocks, loop controls,
``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII), so prompts are the same token ids.

``StreamDecoder`` turns generated token ids into text incrementally for streaming: it never emits half a
UTF-8 character (byte-level tokens can split one), and it holds back text that could be the start of a stop
string, so a client never sees a stop string it asked to be cut.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from azu.errors import InvalidRequest, NotFound

# Config keys that give the context length, by family (first one present wins).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                 "max_sequence_length")
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json is a string or a serialized AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


def _chat_template_from(folder: Path, tok_config: dict[str, Any]) -> str | None:
    # transformers 5 saves the template as chat_template.jinja; older folders keep it in
    # tokenizer_config.json, as a string or as a list of named templates ("default" is the chat one).
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        default = named.get("default")
        return default if isinstance(default, str) else None
    return None


def context_length(config: dict[str, Any]) -> int | None:
    """The longest sequence (prompt + generated tokens) the model's positions allow, if the config says."""
    for key in _CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class ModelTokenizer:
    """Everything the API needs to turn text into a model's token ids and back."""

    tokenizer: Any  # tokenizers.Tokenizer (typed loosely: the Rust extension ships no precise stubs)
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... -> text
    eos_token_ids: list[int] = field(default_factory=list)
    context_length: int | None = None

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelTokenizer:
        from tokenizers import Tokenizer

        folder = Path(folder)
        tok_file = folder / "tokenizer.json"
        if not tok_file.is_file():
            raise NotFound(f"the model folder has no tokenizer.json ({folder.name}); only fast tokenizers "
                           "are supported")
        tokenizer = Tokenizer.from_file(str(tok_file))
        tok_config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        specials: dict[str, str] = {}
        for key in _SPECIAL_KEYS:
            content = _token_content(tok_config.get(key)) or _token_content(special_map.get(key))
            if content is not None:
                specials[key] = content
        config = _read_json(folder / "config.json")
        # The config of a multimodal wrapper keeps the language model's settings under text_config.
        nested = config.get("text_config")
        text_config: dict[str, Any] = nested if isinstance(nested, dict) else config
        gen_config = _read_json(folder / "generation_config.json")
        eos_ids = _eos_ids(gen_config.get("eos_token_id"), text_config.get("eos_token_id"))
        if not eos_ids and "eos_token" in specials:
            token_id = tokenizer.token_to_id(specials["eos_token"])
            if token_id is not None:
                eos_ids = [token_id]
        return cls(tokenizer=tokenizer, chat_template=_chat_template_from(folder, tok_config),
                   special_tokens=specials, eos_token_ids=eos_ids, context_length=context_length(text_config))

    # --- text <-> ids -----------------------------------------------------------------------------------
    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    # --- chat -------------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """The prompt text for ``messages`` (dicts with role and content) per the model's chat template."""
        if not self.chat_template:
            raise InvalidRequest("this model has no chat template; use POST /submit with a plain prompt",
                                 param="messages")
        from jinja2 import TemplateError

        template = _compile_template(self.chat_template)
        try:
            return str(template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       tools=tools, **self.special_tokens, **template_kwargs))
        except _TemplateRaised as exc:  # the template refused the conversation (e.g. roles out of order)
            raise InvalidRequest(f"the chat template refused the messages: {exc}", param="messages") from None
        except TemplateError as exc:
            raise InvalidRequest(f"the chat template failed on these messages: {exc}",
                                 param="messages") from None

    def encode_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> list[int]:
        # The template writes the special tokens itself (BOS included), so the text is encoded without
        # adding any, as transformers' apply_chat_template(tokenize=True) does.
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False)

    def stream_decoder(self, *, stop: Iterable[str] = (), skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, stop=stop, skip_special_tokens=skip_special_tokens)


def _eos_ids(*candidates: Any) -> list[int]:
    for value in candidates:
        if isinstance(value, int):
            return [value]
        if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
            return list(value)
    return []


# --- chat template environment ------------------------------------------------------------------------
class _TemplateRaised(Exception):
    """raise_exception(...) called by a chat template."""


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters and non-ASCII; chat templates expect plain JSON.
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile_template(source: str):
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        # Some templates mark the assistant's part with {% generation %}...{% endgeneration %} (used by
        # transformers to build training masks); for a prompt the block simply renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


# --- loading, cached per folder -------------------------------------------------------------------------
_cache: dict[tuple[str, float], ModelTokenizer] = {}
_cache_lock = threading.Lock()


def load_tokenizer(folder: str | Path) -> ModelTokenizer:
    """The tokenizer of the model in ``folder`` (a shard folder), cached until its tokenizer.json changes."""
    folder = Path(folder)
    try:
        stamp = (folder / "tokenizer.json").stat().st_mtime
    except FileNotFoundError:
        raise NotFound(f"the model folder has no tokenizer.json ({folder.name})") from None
    key = (str(folder.resolve()), stamp)
    with _cache_lock:
        cached = _cache.get(key)
    if cached is not None:
        return cached
    loaded = ModelTokenizer.from_folder(folder)
    with _cache_lock:
        # A re-sharded folder gets a new mtime: drop the stale entry for the same folder.
        for old in [k for k in _cache if k[0] == key[0]]:
            del _cache[old]
        _cache[key] = loaded
    return loaded


# --- streaming detokenization ---------------------------------------------------------------------------
class StreamDecoder:
    """Generated token ids in, text deltas out; the deltas join to the final text.

    Decoding one token at a time is wrong for byte-level vocabularies (a token can hold half a UTF-8
    character) and for SentencePiece ones (a leading space depends on the token before). So each step decodes
    a short window of recent tokens twice, with and without the new ones, and emits the difference, unless it
    ends in U+FFFD (an incomplete character: wait for the next token). The window start moves forward as text
    is emitted, so a step costs the same at token 10 and at token 10,000.
    """

    def __init__(self, tokenizer: ModelTokenizer, *, stop: Iterable[str] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stop = [s for s in stop if s]
        # At most len(longest stop) - 1 characters can be the beginning of a stop string still to come.
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.token_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        self._text = ""  # decoded so far (complete characters only)
        self._emitted = 0  # characters of _text already handed out
        self.stopped = False  # a stop string was found: nothing more will be emitted
        self.finished = False

    @property
    def text(self) -> str:
        """The text handed out so far (what the client has seen)."""
        return self._text[: self._emitted]

    def push(self, token_ids: int | Sequence[int]) -> str:
        """Add generated token(s); return the text that can safely be shown now (maybe "")."""
        if self.finished:
            raise RuntimeError("push() after finish()")
        ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.token_ids.extend(ids)
        if self.stopped or not ids:
            return ""
        prefix_text = self._tok.decode(self.token_ids[self._prefix_offset:self._read_offset],
                                       skip_special_tokens=self._skip)
        new_text = self._tok.decode(self.token_ids[self._prefix_offset:], skip_special_tokens=self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith(_REPLACEMENT):
            self._text += new_text[len(prefix_text):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: return whatever is still held back (incomplete bytes decode as U+FFFD)."""
        if self.finished:
            return ""
        self.finished = True
        if not self.stopped:
            full = self._tok.decode(self.token_ids, skip_special_tokens=self._skip)
            if full.startswith(self._text):
                self._text = full
            else:  # decoding in windows differed from decoding at once: trust the tail of the last window
                tail = self._tok.decode(self.token_ids[self._prefix_offset:], skip_special_tokens=self._skip)
                head = self._tok.decode(self.token_ids[self._prefix_offset:self._read_offset],
                                        skip_special_tokens=self._skip)
                self._text += tail[len(head):]
        return self._release(final=True)

    def _partial_stop_suffix(self) -> int:
        """Length of the longest end of the text that is the beginning of a stop string (hold it back)."""
        for k in range(min(self._holdback, len(self._text)), 0, -1):
            tail = self._text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _release(self, *, final: bool) -> str:
        if self.stopped:
            return ""
        end = len(self._text)
        if self._stop:
            # A stop string can straddle what was emitted and what is new: search a little before.
            start = max(0, self._emitted - self._holdback)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                end = min(hits)
                self.stopped = True
            elif not final:
                end = max(self._emitted, len(self._text) - self._partial_stop_suffix())
        delta = self._text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        if self.stopped:
            self._text = self._text[: self._emitted]
        return delta


def decode_final(tokenizer: ModelTokenizer, token_ids: Sequence[int], *, stop: Iterable[str] = ()) -> str:
    """The answer's text: generated ids decoded at once, cut before the first stop string."""
    decoder = tokenizer.stream_decoder(stop=stop)
    decoder.push(list(token_ids))
    decoder.finish()
    return decoder.text
