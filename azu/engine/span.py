"""The one span type: layers ``[first, last)`` of a model, plus its embeddings and/or its head.

A stage holds a span, a route hop runs one, a load order asks for one, a manifest lists the files of one.
Torch-free: the API and the scheduler use it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from azu.errors import InvalidRequest, shown


@dataclass(frozen=True, order=True)
class Span:
    first: int
    last: int
    embeddings: bool = False
    head: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.first < self.last:
            raise InvalidRequest(f"a span holds at least one layer: got [{self.first}, {self.last})")
        if self.embeddings and self.first != 0:
            raise InvalidRequest("only the span starting at layer 0 can hold the embeddings")

    @property
    def num_layers(self) -> int:
        return self.last - self.first

    def __str__(self) -> str:
        parts = ["embeddings"] if self.embeddings else []
        parts.append(f"layers [{self.first}, {self.last})")
        if self.head:
            parts.append("head")
        return " + ".join(parts)

    def to_list(self) -> list[Any]:
        return [self.first, self.last, self.embeddings, self.head]

    @classmethod
    def from_list(cls, value: Any) -> Span:
        try:
            first, last, embeddings, head = value
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"malformed span {shown(value)}") from exc
        if not (isinstance(first, int) and isinstance(last, int) and isinstance(embeddings, bool)
                and isinstance(head, bool)) or isinstance(first, bool) or isinstance(last, bool):
            raise InvalidRequest(f"malformed span {shown(value)}")
        return cls(first, last, embeddings, head)
