"""Load orders under contention (issue "Survive faults"): two loads into one shared cache folder at once.

bench/pipeline.py's workers share one cache folder; a load wrote the manifest through one fixed temporary
name, so when two loads ran at once one could find its temporary file already moved by the other
(FileNotFoundError): that load failed, more often the busier the machine, and whoever waited for the span
waited for its deadline. Each writer now has a temporary name of its own.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from azu.engine.span import Span
from azu.network import loading
from azu.registry import status as models

pytestmark = [pytest.mark.network]


def test_loads_into_one_folder_at_once_all_succeed(shard: Any, registry_http: Any, tmp_path: Path) -> None:
    model_id = shard("tiny-shared-cache")
    manifest = (models.shard_dir(model_id) / "manifest.json").read_bytes()
    folder = tmp_path / "shared"
    # The layer files are there already (bench/pipeline.py's workers load from the registry's own folder):
    # what the loads race on is the manifest they each write last.
    loading.fetch_span(registry_http.url, model_id, Span(0, 4, True, True), folder)
    errors: list[BaseException] = []

    def load(span: Span) -> None:
        try:
            for _ in range(30):
                loading.fetch_span(registry_http.url, model_id, span, folder)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(span,)) for span in
               (Span(0, 2, True, False), Span(2, 4, False, True)) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (folder / "manifest.json").read_bytes() == manifest
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # no temporary file left
