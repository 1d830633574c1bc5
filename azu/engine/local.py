"""A sharded model run as N stages inside one process: ``azu generate``, a worker operator's self-check.

The stages exchange exactly what they exchange over the network (token ids in, hidden states between
stages, logits out of the last) but through function calls.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from azu.engine.sampling import SamplingParams, sample
from azu.engine.span import Span
from azu.engine.stage import Stage
from azu.errors import AzuError, InvalidRequest
from azu.registry.manifest import Manifest


def split_layers(num_layers: int, num_stages: int) -> list[Span]:
    """Contiguous, near-equal layer groups; the first holds the embeddings, the last the head."""
    if not 1 <= num_stages <= num_layers:
        raise InvalidRequest(f"cannot split {num_layers} layers into {num_stages} stages")
    cuts = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
    return [
        Span(cuts[i], cuts[i + 1], embeddings=i == 0, head=i == num_stages - 1)
        for i in range(num_stages)
    ]


@dataclass
class GenerateResult:
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    ttft_s: float
    total_s: float
    timings: list[float] = field(default_factory=list)


class LocalPipeline:
    def __init__(
        self,
        shard_dir: str | Path,
        num_stages: int,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        max_cached_tokens: int = 32768,
        kernels: str = "auto",
        graphs: str = "auto",
    ) -> None:
        self.manifest = Manifest.load(shard_dir)
        self.stages = [
            Stage.load(shard_dir, span, device=device, dtype=dtype, max_cached_tokens=max_cached_tokens,
                       kernels=kernels, graphs=graphs)
            for span in split_layers(self.manifest.num_layers, num_stages)
        ]

    def step(self, job_id: str, ids: torch.Tensor) -> torch.Tensor:
        x = ids
        for stage in self.stages:
            x = stage.forward(job_id, x)
        return x

    def stream(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        params: SamplingParams | None = None,
        seed: int = 0,
        stop_token_ids: set[int] | None = None,
    ) -> Iterator[int]:
        params = params or SamplingParams()
        job_id = uuid.uuid4().hex
        try:
            x = torch.tensor(prompt_ids, dtype=torch.long)
            for step in range(max_tokens):
                logits = self.step(job_id, x)
                token = sample(logits, params, seed=seed, step=step)
                yield token
                if stop_token_ids and token in stop_token_ids:
                    return
                x = torch.tensor([token], dtype=torch.long)
        finally:
            for stage in self.stages:
                stage.end_job(job_id)

    def generate(
        self,
        prompt_ids: list[int],
        *,
        max_tokens: int,
        params: SamplingParams | None = None,
        seed: int = 0,
        stop_token_ids: set[int] | None = None,
    ) -> GenerateResult:
        start = time.perf_counter()
        tokens: list[int] = []
        timings: list[float] = []
        for token in self.stream(
            prompt_ids, max_tokens=max_tokens, params=params, seed=seed, stop_token_ids=stop_token_ids
        ):
            tokens.append(token)
            timings.append(time.perf_counter() - start)
        stopped = bool(stop_token_ids) and bool(tokens) and tokens[-1] in (stop_token_ids or ())
        return GenerateResult(
            tokens,
            "stop" if stopped else "length",
            len(prompt_ids),
            timings[0] if timings else 0.0,
            time.perf_counter() - start,
            timings,
        )


# -- CLI: azu generate -------------------------------------------------------------------------------
def add_arguments(parser) -> None:
    parser.add_argument("shard_dir", help="a folder written by `azu shard`")
    parser.add_argument("--stages", type=int, default=2, help="number of layer groups")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text (needs the model's tokenizer files)")
    group.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 5,6,7")
    parser.add_argument("--max-tokens", type=int, default=32, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", default=None,
        help="float32, bfloat16 or float16 (default: float32 on cpu, bfloat16 on cuda)",
    )
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _eos_ids(manifest: Manifest) -> set[int]:
    eos = manifest.config.get("eos_token_id")
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def run(args) -> int:
    try:
        if args.max_tokens < 1:
            raise InvalidRequest("--max-tokens must be at least 1")
        params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
        pipe = LocalPipeline(args.shard_dir, args.stages, device=args.device, dtype=dtype)
        tokenizer = None
        if args.prompt is not None:
            from azu.tokenization import load_tokenizer

            tokenizer = load_tokenizer(args.shard_dir)
            prompt_ids = tokenizer.encode(args.prompt)
        else:
            try:
                prompt_ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
            except ValueError:
                raise InvalidRequest("--prompt-ids must be comma-separated integers, e.g. 5,6,7") from None
            if not prompt_ids:
                raise InvalidRequest("--prompt-ids is empty")
        result = pipe.generate(
            prompt_ids,
            max_tokens=args.max_tokens,
            params=params,
            seed=args.seed,
            stop_token_ids=None if args.ignore_eos else _eos_ids(pipe.manifest),
        )
    except (AzuError, FileNotFoundError) as exc:
        print(f"azu generate: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    out: dict = {
        "model_id": pipe.manifest.model_id,
        "stages": args.stages,
        "token_ids": result.token_ids,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "ttft_s": round(result.ttft_s, 4),
        "total_s": round(result.total_s, 4),
    }
    if tokenizer is None:
        try:
            from azu.tokenization import load_tokenizer

            tokenizer = load_tokenizer(args.shard_dir)
        except Exception:  # no tokenizer files: ids only
            tokenizer = None
    if tokenizer is not None:
        out["text"] = tokenizer.decode(result.token_ids)
    if args.json:
        print(json.dumps(out))
    else:
        if "text" in out:
            print(out["text"])
        print(
            f"[{len(result.token_ids)} tokens, {args.stages} stages, ttft {result.ttft_s * 1000:.0f} ms, "
            f"{len(result.token_ids) / max(result.total_s, 1e-9):.1f} tok/s] ids: {result.token_ids}",
            file=sys.stderr,
        )
    return 0
