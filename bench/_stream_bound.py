"""What the machine allows P3: the most that many concurrent streams could gain over one, on the same stages.

``python bench/pipeline.py``'s P3 row compares the pipeline's aggregate tokens/s at 16 streams with one
stream. How much a batch of rows gains over one row is the CPU's matter, not the pipeline's: on an AVX2 CPU a
Qwen layer's linears run 8 rows in about 2.3x the time of one, on an AVX-512 one in about 1.5x. This
measures, in this process, on the same two stages the workers hold (their kernels, their layouts):

- one stream: a token is a one-row step of each stage in turn;
- ``streams`` streams, as the workers run them (``azu.network.batching.micro_batch_rows``): two micro-batches
  of ``streams / 2`` rows, each stage stepping one while the other steps the other, so a micro-batch's
  tokens come once per step of the slower stage. The two stages step at once here too, in two threads (the
  linears release the GIL): on a CPU they share the memory bandwidth and the cache, as the two workers do.

The one-stream figure is taken before the batch steps and again after them (once the weights are back in one
user's layout, as an idle worker moves them back), the median of both. The ratio of the two rates is the
bound. It leaves out the prompts (the row's aggregate counts them) and all messaging, so it is a ceiling,
not a forecast.

Run for the Qwen shape only: the two threads share one GIL, and on a small model (Petals' 512-wide test
model) that sharing, not the CPU, set the pace: 35-37 ms a first stage's step of 8 rows in the threads, where
the pipeline's workers ran 16 streams at 252-260 tok/s (a step of at most 31-32 ms) on the same machine
(an AMD EPYC with AVX2, 2026-12-02). On the Qwen shape a step's Python is a few percent of its products.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from azu.engine.kernels import SWITCH_BACK_IDLE_S
from azu.engine.span import Span
from azu.engine.stage import Stage

# Batch steps each stage runs before the timed ones, its weights already in its batch layout (moved there
# first: under a long enough load a worker moves them, azu.engine.kernels.LayoutSwitch).
WARM_STEPS = 8
# Timed steps and one-row tokens: at least this many, over at least this long each (a small model's 12
# tokens take a quarter of a second, too short a window on a machine whose speed moves from moment to moment).
TIMED_STEPS, TIMED_S = 12, 2.0
ONE_ROW_TOKENS, ONE_ROW_S = 12, 1.5


@dataclass(frozen=True)
class StreamBound:
    streams: int
    rows: int  # a micro-batch's rows
    one_token_s: float  # one stream: a one-row step of each stage in turn
    step_s: tuple[float, float]  # each stage's micro-batch step, both stepping at once

    @property
    def ratio(self) -> float:
        """``streams`` streams' tokens/s over one stream's."""
        return self.rows / max(self.step_s) * self.one_token_s

    def describe(self) -> str:
        a, b = (s * 1000 for s in self.step_s)
        return (f"this process, the same stages: one row {self.one_token_s * 1000:.0f} ms a token; "
                f"{self.rows} rows {a:.0f} / {b:.0f} ms a step, both stages at once: "
                f"{self.streams} streams at most {self.ratio:.2f}x one")


def measure(folder: Path, cut: int, num_layers: int, prompts: list[list[int]], *,
            kernels: str) -> StreamBound:
    """The bound for ``len(prompts)`` streams on layers [0, cut) and [cut, num_layers) of the model in
    ``folder`` (float32 on this CPU, one thread per stage)."""
    torch.set_num_threads(1)
    first = Stage.load(folder, Span(0, cut, embeddings=True), device="cpu", dtype="float32",
                       kernels=kernels)
    last = Stage.load(folder, Span(cut, num_layers, head=True), device="cpu", dtype="float32",
                      kernels=kernels)
    jobs = [f"s{i}" for i in range(len(prompts))]
    states = first.forward_batch([(job, torch.tensor(p)) for job, p in zip(jobs, prompts, strict=True)])
    last.forward_batch(list(zip(jobs, states, strict=True)))
    hidden = {job: state[-1:] for job, state in zip(jobs, states, strict=True)}  # a decode step's input

    def one_row_tokens() -> list[float]:
        took: list[float] = []
        began = time.perf_counter()
        while len(took) < ONE_ROW_TOKENS or time.perf_counter() - began < ONE_ROW_S:
            start = time.perf_counter()
            token = 3 + len(took) % 200
            int(last.forward(jobs[0], first.forward(jobs[0], torch.tensor([token]))).argmax())
            took.append(time.perf_counter() - start)
        return took

    ones = one_row_tokens()
    for stage in (first, last):  # the steady state under batches: the weights where batches run them
        switch = stage.layouts
        if (switch is not None and switch.plan.batch_layout is not None
                and not switch.move_all(switch.plan.batch_layout)):
            print("[bench] the 16-stream bound: a stage's weights did not all move to its batch layout (the "
                  "log says why): its steps time the layouts they are in", file=sys.stderr, flush=True)
    rows = len(jobs) // 2
    groups = (jobs[:rows], jobs[rows:2 * rows])
    spans: list[list[tuple[float, float]]] = [[], []]
    stopped = threading.Event()
    errors: list[BaseException] = []

    def timed_enough() -> bool:
        """Whether both stages have run their warm steps and then ``TIMED_STEPS`` steps over ``TIMED_S``."""
        if min(len(spans[0]), len(spans[1])) < WARM_STEPS + TIMED_STEPS:
            return False
        return time.perf_counter() - max(s[WARM_STEPS - 1][1] for s in spans) >= TIMED_S

    def stepping(which: int) -> None:
        """Batch steps of one stage until both stages have run their warm and timed steps: the quicker one
        goes on meanwhile, so every timed step of the slower one shares the machine with it."""
        try:
            step = 0
            while not stopped.is_set() and not timed_enough():
                start = time.perf_counter()
                if which == 0:
                    first.forward_batch([(job, torch.tensor([3 + step % 200])) for job in groups[0]])
                else:
                    for out in last.forward_batch([(job, hidden[job]) for job in groups[1]]):
                        int(out.argmax())
                spans[which].append((start, time.perf_counter()))
                step += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            stopped.set()  # the other thread stops too (it would otherwise wait for steps that never come)

    threads = [threading.Thread(target=stepping, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    # The timed steps (after the warm ones) that ended while the other stage was still stepping.
    both_until = min(spans[0][-1][1], spans[1][-1][1])
    steps = [statistics.median([end - start for start, end in s[WARM_STEPS:] if end <= both_until])
             for s in spans]
    # One stream again, the weights back in one user's layout (as an idle worker moves them back): the
    # one-row figure brackets the batch steps, so this machine's drift between them weighs less.
    time.sleep(SWITCH_BACK_IDLE_S)
    for stage in (first, last):
        while stage.move_layouts_when_idle():
            pass
    ones += one_row_tokens()
    for job in jobs:
        first.end_job(job)
        last.end_job(job)
    return StreamBound(streams=len(jobs), rows=rows, one_token_s=statistics.median(ones),
                       step_s=(steps[0], steps[1]))
