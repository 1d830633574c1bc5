"""A stage: one worker's contiguous range of layers, loaded from shard files, serving many jobs.

How a stage runs a family without rewriting it: the model skeleton is built from its config with every
parameter on ``meta`` (buffers such as rotary ``inv_freq`` stay real), only the stage's tensors are
loaded (through ``transformers``' own checkpoint conversion, so per-expert MoE names on disk become the
fused in-memory experts), the base model's layer list is cut down to the stage's layers (each keeps its
global index, which drives layer types, MoE sparse steps and dense-first layers), and the modules the
stage does not own are neutralised (see ``families``). Then the family's own forward runs.

Each job has its own KV cache (``StageCache``) and position counter. The cache answers HF's "how long
is the past" questions from a layer the stage owns, since HF asks cache layer 0 by default — a layer a
later stage does not hold. It goes in as ``cache=``, the keyword transformers keeps (``past_key_values=``
is deprecated since 5.24 and goes in 5.40).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from azu.config import DECODE_GRAPHS
from azu.engine.families import Family, family_for
from azu.engine.graphs import (
    BATCH_GRAPH_FAILURES,
    GRAPHED_JOBS,
    RETRY_AFTER_OOM_S,
    SPARE_POSITIONS,
    SPARES,
    WARM_BATCH_ROWS,
    WARMUP_STEPS,
    DecodeGraph,
    copy_into,
    room_for,
    rows_for,
)
from azu.engine.heap import release_freed_memory
from azu.engine.kernels import LayoutSwitch, apply_plan, layer_shapes, plan_for, stage_shapes
from azu.engine.kvcache import GROW_MIN, BatchRows, GrowingLayer, Past, RowsLayer, StageCache
from azu.engine.naming import classify_tensor
from azu.engine.span import Span
from azu.errors import CacheFull, IntegrityFailure, InvalidRequest, UnsupportedArchitecture
from azu.registry.manifest import LoadedFiles, Manifest

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise InvalidRequest(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}") from None


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on ``meta`` while buffers stay real (a plain meta device breaks them)."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers draws a "Loading weights" bar per call; a worker loading one stage doesn't need it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _ZeroPositions(nn.Module):
    """Stands for learned position embeddings on a stage that does not own them: adds exact zeros."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.dim, self.dtype, self.device = dim, dtype, device

    def forward(self, *args, **kwargs) -> torch.Tensor:
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = next(a for a in args if isinstance(a, torch.Tensor))
        return torch.zeros(*positions.shape, self.dim, dtype=self.dtype, device=self.device)


_JOB_SERIALS = itertools.count()


@dataclass
class _Job:
    cache: StageCache
    length: int = 0
    last_used: float = 0.0
    # Where the job's keys and values are while it runs in batches: row ``row`` of ``rows`` (its own cache
    # layers are then empty). None: in its own cache layers.
    rows: BatchRows | None = None
    row: int = 0
    # The job's decode graph (azu.engine.graphs), and whether its cache layers' ``keys``/``values`` views lag
    # behind the positions graphed steps wrote (brought up to date before anything else reads them).
    graph: DecodeGraph | None = None
    stale_views: bool = False
    # The jobs of the last batch this job ran in (their serials): a batch of the same jobs again is worth a
    # batch decode graph on a GPU (``_batch_graph_wanted``).
    batch_key: frozenset[int] | None = None
    serial: int = dataclasses.field(default_factory=lambda: next(_JOB_SERIALS))


def _one_token_steps(jobs: Sequence[_Job], sizes: Sequence[int]) -> bool:
    """Whether a batch is one-token steps of jobs under way (what decode graphs run)."""
    return all(n == 1 and job.length for job, n in zip(jobs, sizes, strict=True))


def _resolve(module: Any, path: str) -> Any:
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    return module


class Stage:
    """Serve one layer group. Build with :meth:`load`."""

    def __init__(
        self,
        model: Any,
        manifest: Manifest,
        span: Span,
        family: Family,
        *,
        device: torch.device,
        dtype: torch.dtype,
        max_cached_tokens: int,
        graphs: str = "auto",
    ) -> None:
        if graphs not in DECODE_GRAPHS:
            raise InvalidRequest(f"unknown decode graphs setting {graphs!r}; "
                                 f"use one of {', '.join(DECODE_GRAPHS)}")
        self.model = model
        self.manifest = manifest
        self.span = span
        self.family = family
        self.device = device
        self.dtype = dtype
        self.max_cached_tokens = max_cached_tokens
        self.config: Any = model.config
        self._base = _resolve(getattr(model, model.base_model_prefix), family.inner)
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self.max_positions = int(
            getattr(self.config, "max_position_embeddings", 0)
            or getattr(self.config, "n_positions", 0)
            or getattr(self.config, "max_seq_len", 0)
            or 1 << 30
        )
        self._base_takes_positions = "position_ids" in inspect.signature(self._base.forward).parameters
        self._lm_takes_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.graphs = graphs
        # A batch of at most this many one-token steps runs as one graph replay per job (``_as_replays``): on
        # a GPU, where eager steps are launch-bound; tests set it to run the path on a CPU.
        self.replay_rows = GRAPHED_JOBS if device.type == "cuda" else 0
        self._spare_graphs: list[DecodeGraph] = []  # graphs no job uses, for the next jobs (oldest first)
        self._records = device.type == "cuda"  # graphs are recorded (else the static step runs eagerly)
        self._batch_graphs = True  # off once batch decode graphs' recordings failed (not for memory)
        self._batch_graph_failures = 0
        self._no_new_graphs_until = 0.0  # monotonic time: no new room or recording before it (out of memory)
        # On a CPU whose best layout for one user's steps is not the best for batches: moves the weights
        # between the two with the load (azu.engine.kernels). Set by :meth:`load`.
        self.layouts: LayoutSwitch | None = None
        self._graph_pool: Any = None  # the stage's graphs share one memory pool and one recording stream
        self._graph_stream: Any = None

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        shard_dir: str | Path,
        span: Span,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_cached_tokens: int = 32768,
        kernels: str = "auto",
        graphs: str = "auto",
    ) -> Stage:
        """The stage holding ``span`` from a shard folder. ``kernels`` picks the linears' kernel on a CPU
        (azu.engine.kernels): ``"auto"`` measures this CPU and picks for float32; ``"packed"``,
        ``"transposed"`` and ``"plain"`` force the weights' layout; ``"torch"`` is PyTorch's own linear.
        ``graphs``: whether one-token steps replay CUDA graphs (``DECODE_GRAPHS``, azu.engine.graphs)."""
        import transformers
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        manifest = Manifest.load(shard_dir)
        torch_dtype = parse_dtype(dtype)
        torch_device = torch.device(device)
        if span.last > manifest.num_layers:
            raise InvalidRequest(
                f"{manifest.model_id} has {manifest.num_layers} layers; "
                f"a stage cannot hold [{span.first}, {span.last})"
            )
        if span.head and span.last != manifest.num_layers:
            raise InvalidRequest("only the stage ending at the last layer can hold the head")

        # Measured (once per process) before the weights are read: the measurement's own weights come and go
        # before the stage's arrive. What stays is oneDNN's primitive cache and some heap (a Qwen stage: 58 MB
        # measuring a layer, 85 MB with the head's share; README, twenty-fourth session).
        entries = manifest.files_for(span.first, span.last, embeddings=span.embeddings, head=span.head)
        # The head runs on the plan unless it is tied to embeddings this stage holds (``apply_plan``).
        head_on_plan = span.head and not (manifest.tied_head and span.embeddings)
        shapes = stage_shapes(layer_shapes(manifest.config, manifest.hidden_size), span.last - span.first,
                              (manifest.vocab_size, manifest.hidden_size) if head_on_plan else None)
        plan = plan_for(kernels, torch_device, torch_dtype, sum(e.size for e in entries), shapes)
        config = _build_config(manifest)
        with _params_on_meta():
            try:
                # Built in the stage's dtype: transformers casts each loaded tensor to the dtype of the
                # parameter it fills, so a skeleton in the config's dtype (bfloat16 for most hub models)
                # would turn a float32 stage back into bfloat16, after a float32 copy of every file.
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
            except ValueError as exc:
                raise UnsupportedArchitecture(
                    f"architecture {manifest.architecture!r} is not a causal LM transformers can build: {exc}"
                ) from None
        model.eval()
        base_root = getattr(model, model.base_model_prefix)
        family = family_for(manifest.model_type, manifest.architecture, base_root)
        base = _resolve(base_root, family.inner)

        # Only this stage's files, each hash-checked before it is parsed, one file at a time (a layer
        # file holds all of its layer's tensors, MoE experts included, so conversion works per file and
        # peak memory stays at the stage's weights plus one file). Tensors are views of the file's buffer
        # and go in as they are: transformers casts each one to its parameter's dtype (a no-op view when
        # the file already has it), so no whole-file converted copy is made first.
        load_config = LoadStateDictConfig(
            weight_mapping=get_model_conversion_mapping(model),  # type: ignore[arg-type]
            dtype=torch_dtype,
            device_map={"": torch_device},
        )
        # A move off a layout that cannot be read back (MLAS's packed weights) reads the rows from the files
        # again: their bytes are checksummed as they are given back.
        restorable = plan is not None and plan.rereads_rows
        files = LoadedFiles(restorable=restorable)
        # On a CPU, narrower files (bfloat16 for a float32 stage) are cast here, block by block, each block of
        # the file given back as it is cast (LoadedFiles): transformers would hold a file and its whole cast
        # copy at once, and the copy as a heap block whose pages a layout's copy cannot give back.
        widen_to = torch_dtype if torch_device.type == "cpu" else None
        with _quiet_transformers():
            for entry in entries:
                state = files.load(manifest.directory or shard_dir, entry, widen_to=widen_to)
                convert_and_load_state_dict_in_model(model, state, load_config)
                del state
        _check_materialised(model, span, family)

        # Cut the layer list down to the stage's layers; they keep their global index.
        layers = getattr(base, family.layers)
        setattr(
            base, family.layers, nn.ModuleList(layers[i] for i in range(span.first, span.last))
        )
        local = copy.copy(base.config)
        if getattr(local, "layer_types", None):
            local.layer_types = list(local.layer_types[span.first : span.last])
        base.config = local
        for attr, how in family.first_stage.items():
            if not span.embeddings:
                _neutralise(base, attr, how, torch_dtype, torch_device)
        for attr, how in family.last_stage.items():
            if not span.head:
                _neutralise(base, attr, how, torch_dtype, torch_device)
        layouts = None
        if plan is not None:
            # After the cut: a tied head is converted only where no embedding on this stage still reads it.
            apply_plan(model, plan, files.release, files if restorable else None)
            if plan.batch_layout is not None:
                # It gives back the loaded rows' pages as they move (the file buffers, held weakly), and reads
                # them again where it must.
                layouts = LayoutSwitch(model, plan, files.release, files if restorable else None)
        del files
        release_freed_memory()  # load scratch: dtype-conversion copies, and those a layout replaced
        # Buffers (rotary inv_freq, ALiBi helpers) were built real on the CPU; move them along.
        for module in model.modules():
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.device != torch_device:
                    module._buffers[name] = buf.to(torch_device)
        stage = cls(
            model,
            manifest,
            span,
            family,
            device=torch_device,
            dtype=torch_dtype,
            max_cached_tokens=max_cached_tokens,
            graphs=graphs,
        )
        stage.layouts = layouts
        if torch_device.type == "cuda":
            stage.warm_graphs()
        return stage

    # -- jobs ----------------------------------------------------------------------------------
    @property
    def cached_tokens(self) -> int:
        return sum(j.length for j in self._jobs.values())

    def kv_cache_bytes(self) -> int:
        """Bytes of memory holding the jobs' keys and values: every buffer whole (room included), each counted
        once (a batch's buffers hold the rows of all its jobs)."""
        seen: dict[int, int] = {}

        def count(t: Any) -> None:
            if isinstance(t, torch.Tensor) and t.numel():
                storage = t.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()

        for graph in [*self._spare_graphs, *(j.graph for j in list(self._jobs.values()) if j.graph)]:
            for pair in graph.rooms.values():
                for buffer in pair:
                    count(buffer)
        for job in list(self._jobs.values()):
            rows = job.rows
            if rows is not None:
                for buffer in [*rows.keys.values(), *rows.values.values()]:
                    count(buffer)
            for idx in job.cache.owned:
                layer: Any = job.cache.layers[idx] if idx < len(job.cache.layers) else None
                for t in (getattr(layer, "_room", None) or (getattr(layer, "keys", None),
                                                             getattr(layer, "values", None))):
                    count(t)
        return sum(seen.values())

    @property
    def jobs(self) -> list[str]:
        return list(self._jobs)

    def job_length(self, job_id: str) -> int:
        job = self._jobs.get(job_id)
        return job.length if job else 0

    def end_job(self, job_id: str, *, release: bool = True) -> None:
        with self._lock:
            job = self._jobs.pop(job_id, None)
            held = job is not None
            if job is not None and job.rows is not None:
                rows, job.rows = job.rows, None
                self._disband(rows)
            if job is not None and job.graph is not None:
                self._spare(job.graph)
                job.graph = None
            idle = not self._jobs
        if held and idle and release:
            # The stage went idle: hand its freed KV caches back to the OS (only then: a trim of a large heap
            # takes 60-600 ms, and while jobs run glibc reuses the freed memory anyway).
            release_freed_memory()

    def move_layouts_when_idle(self) -> bool:
        """With nothing to run: move the next of the weights' blocks back to one user's layout, if a run of
        batches moved them (``layouts``); whether more are left to move."""
        if self.layouts is None:
            return False
        with self._lock:
            more = self.layouts.move_when_idle()
            finished = self.layouts.finished_idle
        if finished:
            release_freed_memory()  # the other layout's blocks; outside the lock: a step may come meanwhile
        return more

    # -- compute -------------------------------------------------------------------------------
    def forward(self, job_id: str, x: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Run ``x`` (token ids ``[n]`` on the first stage, hidden ``[n, hidden]`` elsewhere) for one job.

        Returns hidden states ``[n, hidden]``, or on the last stage float32 logits ``[vocab]`` of the last
        position (``[n, vocab]``, every position, with ``all_logits``: the verifier's one prefill). The job's
        cache grows by ``n`` positions.
        """
        return self._forward_checked(job_id, self._check_input(x), all_logits=all_logits)

    def _forward_checked(self, job_id: str, x: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        n = int(x.shape[0])
        with self._lock:
            job = self._admit(job_id, n)
            try:
                out = self._run(job, x, all_logits=all_logits)
            except Exception:
                # A half-applied step leaves some layers' caches longer than others: drop the job.
                self._jobs.pop(job_id, None)
                raise
            job.length += n
            job.last_used = time.monotonic()
            if self.layouts is not None and n == 1:  # a prompt's chunk counts neither way
                self.layouts.after_step(1)
        return out

    def forward_batch(self, items: Sequence[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Several jobs' inputs at once. Each job's cache advances as with :meth:`forward`, and each output is
        what :meth:`forward` would return for that job alone. Admitted whole or refused whole.

        The rows run as one batch (one pass over the weights for all of them) where the stage's layers allow
        it: one-token decode steps, prompt chunks of any length, or both mixed (a chunk of a long prompt
        beside the decode steps of other jobs); rows whose caches differ too much in length run in separate
        batches (``batch_parts``). Anything else runs job by job.
        """
        job_ids = [job_id for job_id, _ in items]
        inputs = [self._check_input(x) for _, x in items]
        batchable = self._can_batch and len(items) > 1 and len(set(job_ids)) == len(job_ids)
        if not batchable:
            return [self._forward_checked(job_id, x) for job_id, x in zip(job_ids, inputs, strict=True)]
        with self._lock:
            jobs: list[_Job] = []
            pending = 0
            try:
                for job_id, x in zip(job_ids, inputs, strict=True):
                    jobs.append(self._admit(job_id, int(x.shape[0]), pending=pending))
                    pending += int(x.shape[0])
            except Exception:
                for job_id, job in zip(job_ids, jobs, strict=False):
                    if job.length == 0:  # admitted just now for this batch: leave nothing behind
                        self._jobs.pop(job_id, None)
                raise
            outs: list[torch.Tensor | None] = [None] * len(jobs)
            decode_rows = 0  # the most one-token rows one product ran (parts run apart)
            try:
                sizes = [int(x.shape[0]) for x in inputs]
                for part in batch_parts([job.length for job in jobs], sizes):
                    decode_rows = max(decode_rows, sum(1 for b in part if sizes[b] == 1))
                    those, their_sizes = [jobs[b] for b in part], [sizes[b] for b in part]
                    ran: list[torch.Tensor] | None = None
                    if len(part) > 1 and self._batch_graph_wanted(those, their_sizes):
                        ran = self._batch_graph_step(those, [inputs[b] for b in part])
                    if ran is None:
                        if len(part) == 1 or self._as_replays(those, their_sizes):
                            ran = [self._run(jobs[b], inputs[b]) for b in part]
                        else:
                            ran = self._run_batch(those, [inputs[b] for b in part])
                    together = frozenset(job.serial for job in those)
                    for b, out in zip(part, ran, strict=True):
                        outs[b] = out
                        jobs[b].batch_key = together
            except Exception:
                for job_id in job_ids:
                    self._jobs.pop(job_id, None)
                raise
            now = time.monotonic()
            for job, x in zip(jobs, inputs, strict=True):
                job.length += int(x.shape[0])
                job.last_used = now
            if self.layouts is not None and decode_rows:  # prompts' chunks alone count neither way
                self.layouts.after_step(decode_rows)
        return cast(list[torch.Tensor], outs)  # every row is in one part

    @functools.cached_property
    def _can_batch(self) -> bool:
        """A batch pads each job's cache (and its new tokens) on the left and masks the padding; that needs
        explicit positions (rotary families) and plain full-attention cache layers."""
        if not self.family.batch_decode or not self._base_takes_positions:
            return False
        probe = StageCache(self.model.config, range(self.span.first, self.span.last))
        return not any(probe.is_sliding[i] for i in probe.owned)

    @torch.inference_mode()
    def _run_batch(self, jobs: list[_Job], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rows of ``n_b >= 1`` new tokens each, as one batch on the jobs' ``BatchRows`` (azu.engine.kvcache).

        Row b has ``L_b`` positions cached, at columns ``[0, L_b)`` of its row. Its new tokens are left-padded
        to the longest row ``Q``, so every row's last token is in the last column (the one the head keeps);
        its real tokens go to columns ``[L_b, L_b + n_b)``, its padding tokens to the free columns after them
        (each padding query sees only itself: a query that sees nothing would give NaN)."""
        owned = range(self.span.first, self.span.last)
        rows = self._rows_for(jobs)
        order = sorted(range(len(jobs)), key=lambda b: jobs[b].row)
        jobs, inputs = [jobs[b] for b in order], [inputs[b] for b in order]
        lengths = [job.length for job in jobs]
        sizes = [int(x.shape[0]) for x in inputs]
        widest, batch = max(sizes), len(jobs)
        span = max(lengths) + widest
        dev = self.device
        length = torch.tensor(lengths, device=dev)[:, None]  # [B, 1]
        size = torch.tensor(sizes, device=dev)[:, None]
        pad = widest - size
        query = torch.arange(widest, device=dev)[None, :]  # [1, Q]
        real = query >= pad  # [B, Q]
        positions = torch.where(real, length + query - pad, 0)
        where = torch.where(real, positions, length + size + query)  # each query's column in its row
        col = torch.arange(span, device=dev)[None, None, :]  # [1, 1, S]
        seen = torch.where(real[..., None], col <= where[..., None], col == where[..., None])  # [B, Q, S]
        mask = torch.zeros(batch, 1, widest, span, dtype=self.dtype, device=dev)
        mask.masked_fill_(~seen[:, None], torch.finfo(self.dtype).min)
        temp = StageCache(self.model.config, owned)
        row_index = torch.arange(batch, device=dev)[:, None]
        for idx in owned:
            temp.layers[idx] = RowsLayer(rows, idx, where, span, row_index)
        kwargs: dict = {
            "cache": temp,
            "use_cache": True,
            "attention_mask": mask,  # 4-D: transformers takes it as it is
            "position_ids": positions,
        }
        if self.span.embeddings:
            ids = torch.zeros(batch, widest, dtype=torch.long, device=dev)
            for b, x in enumerate(inputs):
                ids[b, widest - sizes[b] :] = x
            kwargs["input_ids"] = ids  # [B, Q]
        else:
            embeds = inputs[0].new_zeros(batch, widest, inputs[0].shape[-1])
            for b, x in enumerate(inputs):
                embeds[b, widest - sizes[b] :] = x
            kwargs["inputs_embeds"] = embeds  # [B, Q, hidden]
        out = self._model_output(kwargs)
        # Logits of each row's last position, or hidden states of each row's real tokens ([n_b, hidden]).
        outs = list(out.unbind(0)) if self.span.head else [out[b, widest - sizes[b] :] for b in range(batch)]
        if rows.forget_pasts():
            # The jobs that joined these rows: their keys and values were copied in.
            self._left_for_rows(jobs)
        in_order: list[torch.Tensor] = [outs[0]] * batch
        for b, out_b in zip(order, outs, strict=True):
            in_order[b] = out_b
        return in_order

    def _rows_for(self, jobs: list[_Job]) -> BatchRows:
        """The ``BatchRows`` holding exactly ``jobs`` (in any order), or new rows for them, made from where
        each job's past is now (its own buffers, or another batch's rows) when the batch runs."""
        held = self._held_rows(jobs)
        if held is not None:
            return held
        rows = BatchRows([self._past_of(job) for job in jobs])
        self._join_rows(jobs, rows)
        return rows

    @staticmethod
    def _held_rows(jobs: list[_Job], *, padded: bool = False) -> BatchRows | None:
        """The rows that hold exactly ``jobs`` now, if any; ``padded``: also rows with pad rows after the
        jobs' (a batch decode graph's, ``rows_for``: an eager batch runs on rows of its jobs alone)."""
        held = jobs[0].rows
        if (held is not None and len(held.members) == len(jobs) and (padded or held.size == len(jobs))
                and all(job.rows is held for job in jobs)):
            return held
        return None

    def _join_rows(self, jobs: list[_Job], rows: BatchRows) -> None:
        """``jobs`` (in row order) move into ``rows``; rows they leave are disbanded (``_disband``)."""
        rows.members = list(jobs)
        left = {id(job.rows): job.rows for job in jobs if job.rows is not None}
        for b, job in enumerate(jobs):
            job.rows, job.row = rows, b
        for old in left.values():
            self._disband(old)

    def _disband(self, rows: BatchRows) -> None:
        """Rows a job leaves (it joins other rows, runs alone, or ended): the jobs still in them leave too,
        each with a copy of its row (``_settle``), so the buffers go now. Kept, they would hold a whole
        batch's rows, those of jobs that moved or ended included (memory the bound on cached positions does
        not see), for as long as the jobs left in them idle or run alone."""
        for member in rows.members:
            if member.rows is rows:
                self._settle(member)
        rows.members = []

    def _past_of(self, job: _Job) -> Past | None:
        """Where ``job``'s cached keys and values are, per layer: ``[heads, positions, head_dim]``."""
        n = job.length
        if n == 0:
            return None
        self._sync_views(job)
        if job.rows is not None:
            rows, row = job.rows, job.row
            return lambda idx: (rows.keys[idx][row, :, :n], rows.values[idx][row, :, :n])
        cache = job.cache
        return lambda idx: (cast(Any, cache.layers[idx]).keys[0], cast(Any, cache.layers[idx]).values[0])

    def _settle(self, job: _Job) -> None:
        """``job`` leaves its rows for its own cache layers, which take a copy of its row: its positions and
        the room a cache of its own would have (not the row's whole length, which the batch's longest job
        set). A copy, not views: views would keep the whole batch's buffers alive for one job."""
        rows = job.rows
        if rows is None:
            return
        keep = job.length + max(GROW_MIN, job.length // 4)
        # Every layer's copy first, then the job leaves: a copy that fails (out of memory) leaves the job
        # whole in its rows, not with some layers' caches empty and its length unchanged.
        copies = {}
        for idx in range(self.span.first, self.span.last):
            held = rows.row(idx, job.row)
            if held is not None:
                copies[idx] = tuple(t[..., : min(keep, t.shape[-2]), :].clone() for t in held)
        job.rows = None
        for idx, (keys, values) in copies.items():
            layer: Any = job.cache.layers[idx]
            if isinstance(layer, GrowingLayer):
                layer.reserve(keys, values, keys.shape[-2] - job.length)
            else:
                layer.lazy_initialization(keys, values)
                layer.keys, layer.values = keys[..., : job.length, :], values[..., : job.length, :]

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InvalidRequest("stage input must be a tensor")
        if self.span.embeddings:
            if x.ndim != 1 or x.dtype not in (torch.int64, torch.int32) or x.numel() == 0:
                raise InvalidRequest("the first stage takes a non-empty 1-D tensor of token ids")
            if int(x.min()) < 0 or int(x.max()) >= self.config.vocab_size:
                raise InvalidRequest(f"token ids must be in [0, {self.config.vocab_size})")
            return x.to(self.device, torch.long)
        hidden = self.manifest.hidden_size
        if x.ndim != 2 or x.shape[1] != hidden or not x.is_floating_point() or x.shape[0] == 0:
            raise InvalidRequest(
                f"this stage takes hidden states of shape [n, {hidden}], got {list(x.shape)}"
            )
        return x.to(self.device, self.dtype)

    def _admit(self, job_id: str, n: int, *, pending: int = 0) -> _Job:
        job = self._jobs.get(job_id)
        length = job.length if job else 0
        if length + n > self.max_positions:
            raise InvalidRequest(
                f"job {job_id} would reach {length + n} positions; the model's context is "
                f"{self.max_positions}"
            )
        if self.cached_tokens + pending + n > self.max_cached_tokens:
            raise CacheFull(
                f"this stage's KV cache holds {self.cached_tokens} of {self.max_cached_tokens} "
                f"tokens; job {job_id} needs {n} more. Retry later or route to another worker."
            )
        if job is None:
            owned = range(self.span.first, self.span.last)
            job = self._jobs[job_id] = _Job(cache=StageCache(self.model.config, owned))
        return job

    @torch.inference_mode()
    def _run(self, job: _Job, x: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """One job's step on its own cache layers (it leaves any batch's rows first: ``_disband``)."""
        if job.rows is not None:
            self._disband(job.rows)
        n = x.shape[0]
        if n == 1 and not all_logits and job.length and self._graphs_on:
            out = self._graph_step(job, x)
            if out is not None:
                return out
        self._sync_views(job)
        kwargs: dict = {"cache": job.cache, "use_cache": True}
        if self.span.embeddings:
            kwargs["input_ids"] = x.unsqueeze(0)
        else:
            kwargs["inputs_embeds"] = x.unsqueeze(0)
        if self._base_takes_positions:
            kwargs["position_ids"] = torch.arange(job.length, job.length + n, device=self.device).unsqueeze(0)
        return self._one_job_output(kwargs, all_logits=all_logits)

    def _one_job_output(self, kwargs: dict, *, all_logits: bool = False) -> torch.Tensor:
        """The stage's layers run on ``kwargs`` (one job's row): float32 logits of the last position (of
        every position with ``all_logits``) at the head, else hidden states ``[n, hidden]``."""
        if self.span.head and all_logits:
            return self.model(**kwargs).logits[0].float()
        return self._model_output(kwargs)[0]

    def _model_output(self, kwargs: dict) -> torch.Tensor:
        """The stage's layers run on ``kwargs`` (rows of jobs): float32 logits of each row's last position
        ``[rows, vocab]`` at the head, else hidden states ``[rows, positions, hidden]``."""
        if self.span.head:
            if self._lm_takes_logits_to_keep:
                kwargs["logits_to_keep"] = 1
            return self.model(**kwargs).logits[:, -1].float()
        out = self._base(**kwargs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    # -- decode graphs (azu.engine.graphs) ---------------------------------------------------------
    @functools.cached_property
    def _graphs_on(self) -> bool:
        """Whether one-token steps run as static steps: the batch's conditions (explicit positions, full
        attention: the static step masks as a batch does), on a GPU (or forced)."""
        if self.graphs == "off" or (self.graphs == "auto" and self.device.type != "cuda"):
            return False
        return self._can_batch

    def _graph_step(self, job: _Job, x: torch.Tensor) -> torch.Tensor | None:
        """``job``'s one-token step through its decode graph (None: this step runs eagerly)."""
        needed = job.length + 1
        graph = job.graph
        if graph is None or not graph.fits(needed) or not self._graph_holds(job, graph):
            graph = self._graph_for(job, needed)
            if graph is None:
                if job.graph is not None and not self._graph_holds(job, job.graph):
                    job.graph = None  # outgrown and left behind (no room to be had): its memory goes
                return None
        out = graph.step(self._static_forward, x, job.length)
        job.stale_views = True
        return out[0]

    def _graph_holds(self, job: _Job, graph: DecodeGraph) -> bool:
        """Whether ``graph``'s rooms are ``job``'s cache (nothing moved it since: a batch, a growth)."""
        layers = job.cache.layers
        for idx, (keys, _values) in graph.rooms.items():
            room = getattr(layers[idx], "_room", None)
            if room is None or room[0] is not keys:
                return False
        return True

    def _graph_for(self, job: _Job, needed: int) -> DecodeGraph | None:
        """A graph for ``job`` with room for ``needed`` positions, its cache moved into the graph's rooms: the
        job's own graph or a spare if one fits (no recording), else a new one, recorded now."""
        self._sync_views(job)
        owned = range(self.span.first, self.span.last)
        layers = [cast(Any, job.cache.layers[idx]) for idx in owned]
        if not all(isinstance(layer, GrowingLayer) and layer._room is not None for layer in layers):
            return None
        filled = {idx: cast(tuple[torch.Tensor, torch.Tensor], layer._room)
                  for idx, layer in zip(owned, layers, strict=True)}
        room = room_for(needed, self.max_positions)
        old = job.graph
        graph = old if old is not None and old.fits(needed) else None
        if graph is None:
            graph = next((g for g in self._spare_graphs if needed <= g.room <= room), None)
            if graph is not None:
                self._spare_graphs.remove(graph)
            elif len(self._jobs) > GRAPHED_JOBS and self.device.type == "cuda":
                # Many jobs here: their steps run as batches (eager), and a recording for each job's odd
                # step alone would cost more than it saves. Graphs are for a few jobs at a time.
                return None
        fresh = graph is None
        if graph is None:
            if time.monotonic() < self._no_new_graphs_until:
                return None  # the device was out of memory a moment ago (below)
            try:
                # Zeros: the columns after a step's position are masked, and must be finite (0 x NaN is NaN).
                rooms = {idx: (k.new_zeros(*k.shape[:-2], room, k.shape[-1]),
                               v.new_zeros(*v.shape[:-2], room, v.shape[-1]))
                         for idx, (k, v) in filled.items()}
            except torch.OutOfMemoryError:
                # Nothing has moved yet: the step runs eagerly on the job's own cache, the spares go.
                self._out_of_memory(f"a decode graph's rooms ({room} positions)")
                return None
            graph = DecodeGraph(rooms, self._graph_input())
        copy_into(graph, filled, job.length)
        for idx, layer in zip(owned, layers, strict=True):
            keys, values = graph.rooms[idx]
            layer.reserve(keys, values, graph.room - job.length)
        job.graph = graph
        if old is not None and old is not graph:
            # Only now, with the job's cache out of its rooms: the old graph serves the next job that fits.
            self._spare(old)
        if fresh and self._records:
            try:
                self._record(graph, job.length)
            except Exception as exc:
                # The job's cache is in the graph's rooms, which eager steps use as well: it goes on eagerly.
                job.graph = None
                if isinstance(exc, torch.OutOfMemoryError):
                    self._out_of_memory("recording a decode graph")
                else:
                    # Anything else is the step's own code (an op a recording cannot hold, a host sync):
                    # every later recording would fail the same way, after its warm-up runs.
                    log.exception("stage %s: recording a decode graph failed; one-token steps run eagerly "
                                  "from now on", self.span)
                    self.graphs = "off"
                    self.__dict__.pop("_graphs_on", None)
                return None
        return graph

    def _out_of_memory(self, what: str) -> None:
        """The device had no memory for ``what``: the spares go, and for ``RETRY_AFTER_OOM_S`` no new graph
        is tried (a step that tried anyway would fail the same way, and each failed allocation makes
        PyTorch's allocator hand back its whole cache, so that every allocation after it is a fresh
        cudaMalloc). Steps meanwhile run eagerly, or on the graphs their jobs hold."""
        self._spare_graphs.clear()
        self._no_new_graphs_until = time.monotonic() + RETRY_AFTER_OOM_S
        log.warning("stage %s: out of device memory for %s; one-token steps of new graphs run eagerly for "
                    "%.0f s", self.span, what, RETRY_AFTER_OOM_S)

    def _graph_input(self, rows: int = 1) -> torch.Tensor:
        """One-token steps' input, zero: a token id, or one position's hidden state, a row each."""
        if self.span.embeddings:
            return torch.zeros(rows, dtype=torch.long, device=self.device)
        return torch.zeros(rows, self.manifest.hidden_size, dtype=self.dtype, device=self.device)

    def _record(self, graph: DecodeGraph, positions: int | list[int]) -> None:
        started = time.perf_counter()
        first = self._graph_pool is None
        if first:
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._graph_stream = torch.cuda.Stream(self.device)
        graph.capture(self._static_forward, positions, pool=self._graph_pool, stream=self._graph_stream,
                      warmup=WARMUP_STEPS if first else 0)
        log.info("stage %s: recorded a decode graph (%d rows, room %d) in %.1f ms", self.span, graph.rows,
                 graph.room, (time.perf_counter() - started) * 1000)

    def _static_forward(self, graph: DecodeGraph) -> torch.Tensor:
        """The one-token steps a decode graph records: row b's input ``graph.x[b]`` at position
        ``graph.pos[b]``, the cache the graph's rooms (``StaticLayer``), the mask made from ``pos``. No host
        sync, no shape that depends on a value: what a recording needs. Returns a row each: logits
        ``[rows, vocab]`` at the head, else hidden states ``[rows, 1, hidden]``."""
        cache = StageCache(self.model.config, range(self.span.first, self.span.last))
        for idx, layer in graph.layers().items():
            cache.layers[idx] = layer
        kwargs: dict = {"cache": cache, "use_cache": True, "attention_mask": graph.mask(),
                        "position_ids": graph.positions}
        if self.span.embeddings:
            kwargs["input_ids"] = graph.x.view(graph.rows, 1)
        else:
            kwargs["inputs_embeds"] = graph.x.view(graph.rows, 1, -1)
        return self._model_output(kwargs)

    # -- batch decode graphs: one replay for the one-token steps of a batch's jobs -----------------
    def _batch_graph_wanted(self, jobs: list[_Job], sizes: list[int]) -> bool:
        """Whether one-token steps of ``jobs`` (two or more) run as a batch decode graph: on a stage that
        takes graphs, for a batch too large for one replay per job (``replay_rows``), one whose jobs ran
        together last time (in one batch's rows, or as replays): a recording per batch of jobs is paid back
        by the batch's next steps, and jobs that meet once would each pay for it; or one whose replays
        would record two graphs or more (jobs fresh from their prompts, no spares for them): one recording
        for all of them costs less (on an H200 a burst of 16 streams recorded 8 graphs of a job each, ~9 ms
        apiece, before its first batch graph)."""
        if not (self._graphs_on and self._batch_graphs and _one_token_steps(jobs, sizes)):
            return False
        together = frozenset(job.serial for job in jobs)
        return (len(jobs) > self.replay_rows or self._held_rows(jobs, padded=True) is not None
                or all(job.batch_key == together for job in jobs)
                or self._replays_would_record(jobs) > 1)

    def _replays_would_record(self, jobs: list[_Job]) -> int:
        """About how many graphs replays of ``jobs``' next steps would record: the jobs without a graph that
        fits the step, less the spares that could serve them (``_graph_for`` takes a spare first)."""
        lacking = [job.length + 1 for job in jobs if job.graph is None or not job.graph.fits(job.length + 1)]
        if not lacking:
            return 0
        smallest, room = min(lacking), room_for(max(lacking), self.max_positions)
        spares = sum(1 for g in self._spare_graphs if smallest <= g.room <= room)
        return max(0, len(lacking) - spares)

    @torch.inference_mode()
    def _batch_graph_step(self, jobs: list[_Job], inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """One-token steps of ``jobs`` as one replay of their rows' decode graph (recorded now if the rows
        are new or outgrew it); None: no graph to be had (the batch runs otherwise)."""
        graph = self._rows_graph(jobs)
        if graph is None:
            return None
        order = sorted(range(len(jobs)), key=lambda b: jobs[b].row)
        out = graph.step(self._static_forward, torch.cat([inputs[b] for b in order]),
                         [jobs[b].length for b in order])  # the rows after the jobs' are padding
        outs: list[torch.Tensor] = [out[0]] * len(jobs)
        for b, out_b in zip(order, out.unbind(0), strict=True):
            outs[b] = out_b
        return outs

    def _rows_graph(self, jobs: list[_Job]) -> DecodeGraph | None:
        """The decode graph of the rows holding exactly ``jobs``, with a free column in every row: the rows'
        own, or new rows under a new recording: the jobs' caches copied into rooms of ``room_for``
        positions, and pad rows after them up to ``rows_for`` (a stage records a few batch sizes)."""
        owned = range(self.span.first, self.span.last)
        needed = max(job.length for job in jobs) + 1
        held = self._held_rows(jobs, padded=True)
        # (Rows whose buffers an eager batch replaced have no graph any more: BatchRows.reserve.)
        if held is not None and held.graph is not None and held.graph.fits(needed):
            return cast(DecodeGraph, held.graph)
        if time.monotonic() < self._no_new_graphs_until:
            return None
        room = room_for(needed, self.max_positions)
        # Padded first; where the pad rows find no memory, rows of the jobs alone (a size seldom recorded).
        for size in dict.fromkeys((rows_for(len(jobs)), len(jobs))):
            rows = BatchRows([*(self._past_of(job) for job in jobs), *[None] * (size - len(jobs))])
            try:
                # Zeroed buffers: the columns after a row's position are masked, and must be finite (0 x NaN).
                rows.make(owned, room)
                break
            except torch.OutOfMemoryError:
                if size == len(jobs):
                    self._out_of_memory(f"a batch decode graph's rooms ({size} rows of {room} positions)")
                    return None
        self._join_rows(jobs, rows)
        self._left_for_rows(jobs)
        graph = DecodeGraph({idx: (rows.keys[idx], rows.values[idx]) for idx in owned},
                            self._graph_input(size))
        rows.graph = graph
        if self._records:
            try:
                self._record(graph, [job.length for job in jobs])
            except Exception as exc:
                # The rows hold the jobs' caches: an eager batch runs on them, or on rows of its jobs alone,
                # copied out of these (with pad rows: _held_rows).
                rows.graph = None
                if isinstance(exc, torch.OutOfMemoryError):
                    self._out_of_memory("recording a batch decode graph")
                else:
                    # The step's own code, most likely (as for a job's graph), but a batch's shapes are new
                    # to the stage's kernels: batch graphs end after BATCH_GRAPH_FAILURES of them.
                    self._batch_graph_failures += 1
                    log.exception("stage %s: recording a batch decode graph failed (%d of %d); the batch "
                                  "runs eagerly", self.span, self._batch_graph_failures, BATCH_GRAPH_FAILURES)
                    if self._batch_graph_failures >= BATCH_GRAPH_FAILURES:
                        self._batch_graphs = False
                return None
        return graph

    def _left_for_rows(self, jobs: list[_Job]) -> None:
        """``jobs`` now live in a batch's rows: their own cache layers' buffers go, and so do their decode
        graphs (as spares): a graph's rooms no longer hold its job's cache, and kept beside the rows they
        would hold every batched job's positions twice."""
        for job in jobs:
            for idx in range(self.span.first, self.span.last):
                own: Any = job.cache.layers[idx]
                if own.is_initialized:
                    own.reset()
            job.stale_views = False
            if job.graph is not None:
                self._spare(job.graph)
                job.graph = None

    def _as_replays(self, jobs: list[_Job], sizes: list[int]) -> bool:
        """Whether a batch runs as one decode-graph replay per job: one-token steps of jobs under way, at
        most ``replay_rows`` of them (on a GPU, where an eager batch step costs more than that many replays;
        azu.engine.graphs)."""
        if not (len(jobs) <= self.replay_rows and self._graphs_on and _one_token_steps(jobs, sizes)):
            return False
        # Only where the jobs have graphs, or may record them: steps that would run eagerly one by one (a
        # busy stage) cost more than one eager batch.
        return len(self._jobs) <= GRAPHED_JOBS or all(
            job.graph is not None and job.graph.fits(job.length + 1) for job in jobs)

    def warm_graphs(self) -> None:
        """Record a first decode graph now, kept as a spare (``load`` does on a GPU, where the stage takes
        graphs): a stage's first recording also warms its recording stream (two eager runs), 150-630 ms
        measured on an H200, which its first job would wait for otherwise. Then a batch decode graph of each
        of ``WARM_BATCH_ROWS`` rows, thrown away: the first recording of a batch size costs several times a
        later one, which the first burst of users would wait for. Runs throwaway jobs (before ``load``
        returns no step can reach the stage, so their names meet no real job's)."""
        if not self._graphs_on:
            return
        job_id = f"stage-warm-up:{id(self):x}"
        x = self._graph_input()
        try:
            self._forward_checked(job_id, x)
            self._forward_checked(job_id, x)
        except Exception:  # the first job records instead
            log.exception("stage %s: warming decode graphs up failed", self.span)
            return
        finally:
            self.end_job(job_id, release=False)
        for rows in WARM_BATCH_ROWS:
            if (not (self._graphs_on and self._batch_graphs) or time.monotonic() < self._no_new_graphs_until
                    or 3 * rows > self.max_cached_tokens):
                return  # graphs ended or paused (a failed recording, no memory), or no room for the jobs
            batch = [(f"{job_id}:{rows}:{n}", x) for n in range(rows)]
            try:
                # An eager batch (their first steps), then one-token steps: as a batch decode graph, at the
                # latest the second time (jobs that ran together), then one replay of it.
                for _ in range(3):
                    self.forward_batch(batch)
            except Exception:  # a burst's first batch records instead
                log.exception("stage %s: warming batch decode graphs of %d rows up failed", self.span, rows)
                return
            finally:
                for member, _ in batch:
                    self.end_job(member, release=False)

    def _spare(self, graph: DecodeGraph) -> None:
        """Keep ``graph`` for a later job: the newest spares, ``SPARES`` and ``SPARE_POSITIONS`` at most (an
        older one goes, with its memory)."""
        spares = self._spare_graphs
        if graph.room > SPARE_POSITIONS:
            return  # one long job's room would push every other spare out, then itself
        spares.append(graph)
        while spares and (len(spares) > SPARES or sum(g.room for g in spares) > SPARE_POSITIONS):
            spares.pop(0)

    def _sync_views(self, job: _Job) -> None:
        """Bring ``job``'s cache layers' ``keys``/``values`` up to the positions its graphed steps wrote."""
        if not job.stale_views:
            return
        job.stale_views = False
        for idx in range(self.span.first, self.span.last):
            layer: Any = job.cache.layers[idx]
            keys, values = layer._room
            layer.keys, layer.values = keys[..., : job.length, :], values[..., : job.length, :]


# How much of a batch's cache may be padding: rows are as long as the longest (its cache and its new tokens),
# so one job far longer than the others would make every row hold its length (memory the bound on cached
# positions does not count: 8 rows beside a 32k-position job hold 8 x 32k) and every row's attention read it.
# A batch is split where its cache would hold more than half as many positions again as its rows fill, past
# ``PART_SLACK`` positions a row (so two rows, one short and one long, run apart too).
PART_PADDING = 1.5
PART_SLACK = 64


def batch_parts(lengths: Sequence[int], sizes: Sequence[int]) -> list[list[int]]:
    """The rows of a batch (cached positions ``lengths``, new tokens ``sizes``) as the batches they run in:
    indices, rows of like lengths together, each part in the batch's order; one part if padding costs
    little."""
    order = sorted(range(len(lengths)), key=lambda b: lengths[b] + sizes[b])
    parts: list[list[int]] = []
    part: list[int] = []
    for b in order:
        rows = [*part, b]
        span = max(lengths[r] for r in rows) + max(sizes[r] for r in rows)
        real = sum(lengths[r] + sizes[r] for r in rows)
        if part and len(rows) * span > PART_PADDING * real + len(rows) * PART_SLACK:
            parts.append(part)
            rows = [b]
        part = rows
    parts.append(part)
    return [sorted(part) for part in parts]


def _build_config(manifest: Manifest):
    from transformers import AutoConfig

    cfg = dict(manifest.config)
    model_type = cfg.pop("model_type", manifest.model_type)
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as exc:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} ({manifest.architecture}) is unknown to transformers: {exc}"
        ) from None


def _neutralise(owner: nn.Module, attr: str, how: str, dtype: torch.dtype, device: torch.device) -> None:
    module = getattr(owner, attr, None)
    if module is None:
        return
    if how == "identity":
        setattr(owner, attr, nn.Identity())
    elif how == "none":
        setattr(owner, attr, None)
    elif how == "zero_positions":
        setattr(owner, attr, _ZeroPositions(int(module.weight.shape[-1]), dtype, device))
    else:  # pragma: no cover - the table only holds the three
        raise ValueError(how)


def _check_materialised(model: Any, span: Span, family: Family) -> None:
    """Every parameter the stage will use came from its files (a missing tensor would stay on meta)."""
    missing = []
    for name, param in model.named_parameters():
        if not param.is_meta:
            continue
        part = classify_tensor(name)
        owned = (
            span.first <= part < span.last
            if isinstance(part, int)
            else span.embeddings
            if part == "embeddings"
            else span.head
        )
        if owned:
            missing.append(name)
    if span.head:
        head = model.get_output_embeddings()
        if head is not None and head.weight.is_meta:
            missing.append("lm_head.weight")
    if missing:
        raise IntegrityFailure(
            f"the shard files lack tensors this stage needs: {', '.join(sorted(missing)[:8])}"
            + (" ..." if len(missing) > 8 else "")
        )
