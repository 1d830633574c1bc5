"""What the bench scripts share. A bench script runs as ``python bench/<name>.py``, so this folder is first on
``sys.path`` and ``from _support import ...`` finds this module."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from azu.waiting import wait_until as _wait_until

REPO = Path(__file__).resolve().parents[1]

# A bench stops with the reason (SystemExit) when what it waits for does not come.
wait_until = functools.partial(_wait_until, error=SystemExit)

# Qwen2.5-0.5B's shape (random weights): bench/pipeline.py's P1/P3 and bench/long_prompt.py.
QWEN = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
            intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, use_sliding_window=False,
            max_position_embeddings=4096)


def stream_prompts(streams: int) -> list[list[int]]:
    """P3's prompts (bench/pipeline.py): 16 tokens each, a different one per stream."""
    return [[1, *[(7 * i + 3 * j) % 300 + 3 for j in range(15)]] for i in range(streams)]


def rss_mb() -> float:
    """This process's resident memory, in MB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def row_blocks(weight: Any) -> list[Any]:
    """``weight`` (a tensor, ``(out, in)``) in the row blocks of at most 32 MB a float32 stage holds it in
    (``azu.engine.kernels.block_rows``), views of it."""
    from azu.engine.kernels import block_rows

    per = block_rows(weight.shape[1])
    return [weight[i:i + per] for i in range(0, weight.shape[0], per)]


def pythonpath() -> str:
    """PYTHONPATH for a bench's child processes: the repository first, then what the caller had
    (bench/gpu.sh's carried packages on a GPU machine)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def synchronize(device: str) -> None:
    """Wait for the work queued on ``device`` (a GPU runs it asynchronously): before and after a timing."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
