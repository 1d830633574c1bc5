"""The floor under a 2-worker pipeline at b=1: the same two stages in two bare processes, a pipe between them.

``python bench/pipeline.py`` compares the pipeline with ``generate`` in one process. Part of that gap is not
azu's: two processes that take turns (each idles while the other computes) run their steps slower than one
process running both back to back, on some machines by several percent (bench/idle_wake.py). This measures
that part alone: this process runs the first stage, a child process the second, and a step crosses an OS pipe
as raw float bytes and comes back as a token id. No Redis, Celery, signatures, commitments or msgpack: what
the pipeline costs beyond this is its own messaging.

The child is this file run as a script (``python bench/_pipe_pair.py child ...``), started with the pipe's
two ends inherited (``pass_fds``): a forked child of a process that has run PyTorch can hang in its thread
pools.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from _support import pythonpath


def _read(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError("the other stage's process closed the pipe")
        out += chunk
    return bytes(out)


def _stage(folder: str, first: int, last: int, *, device: str, dtype: str, kernels: str, embeddings: bool,
           head: bool):
    from azu.engine.span import Span
    from azu.engine.stage import Stage

    return Stage.load(folder, Span(first, last, embeddings=embeddings, head=head), device=device, dtype=dtype,
                      kernels=kernels)


def _child(folder: str, first: int, last: int, device: str, dtype: str, kernels: str, rounds: int, steps: int,
           read_fd: int, write_fd: int) -> None:
    """The last stage: hidden states in (length-prefixed float bytes), a greedy token id out, per step."""
    import torch

    from azu.engine.sampling import SamplingParams, sample

    torch.set_num_threads(1)
    stage = _stage(folder, first, last, device=device, dtype=dtype, kernels=kernels, embeddings=False,
                   head=True)
    os.write(write_fd, b"R")  # loaded
    for _ in range(rounds):
        stage.end_job("j")
        for step in range(steps):
            try:
                n = int.from_bytes(_read(read_fd, 8), "little")
            except EOFError:  # the first stage's side closed: no more rounds
                return
            rows = torch.frombuffer(bytearray(_read(read_fd, n)), dtype=stage.dtype)
            x = rows.reshape(-1, stage.manifest.hidden_size).to(device)
            token = int(sample(stage.forward("j", x), SamplingParams(), seed=0, step=step))
            os.write(write_fd, token.to_bytes(8, "little"))


class PipePair:
    """Layers [0, cut) in this process, [cut, last) in a child process, for ``rounds`` rounds of ``n`` steps
    (``round``), each a greedy answer to the same prompt. ``close`` when done (the child ends after its last
    round)."""

    def __init__(self, folder: Path, cut: int, n: int, *, device: str, dtype: str, rounds: int,
                 kernels: str = "auto") -> None:
        import torch

        from azu.registry.manifest import Manifest

        last = Manifest.load(folder).num_layers
        torch.set_num_threads(1)
        self.n, self.device = n, device
        # ``kernels``: the workers' AZU_CPU_KERNELS, in both processes: the pair runs what they run.
        self.stage = _stage(str(folder), 0, cut, device=device, dtype=dtype, kernels=kernels, embeddings=True,
                            head=False)
        to_child, self._to_child = os.pipe()
        self._from_child, from_child = os.pipe()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=pythonpath())
        self.child = subprocess.Popen([sys.executable, __file__, "child", str(folder), str(cut), str(last),
                                       device, dtype, kernels, str(rounds), str(n), str(to_child),
                                       str(from_child)],
                                      pass_fds=(to_child, from_child), env=env)
        os.close(to_child)
        os.close(from_child)
        _read(self._from_child, 1)  # the child has loaded its stage

    def round(self, prompt: list[int]) -> tuple[float, float]:
        """One answer of ``n`` tokens: (TTFT s, decode tokens/s)."""
        import torch

        self.stage.end_job("j")
        token, arrivals = None, []
        start = time.perf_counter()
        for step in range(self.n):
            x = torch.tensor(prompt if step == 0 else [token], device=self.device)
            # .cpu() waits for the device: the bytes are the step's output, as a hop's would be.
            out = self.stage.forward("j", x).contiguous().cpu()
            data = out.reshape(-1).view(torch.uint8).numpy().tobytes()
            os.write(self._to_child, len(data).to_bytes(8, "little") + data)
            token = int.from_bytes(_read(self._from_child, 8), "little")
            arrivals.append(time.perf_counter())
        return arrivals[0] - start, (self.n - 1) / (arrivals[-1] - arrivals[0])

    def close(self) -> None:
        os.close(self._to_child)
        os.close(self._from_child)
        try:
            self.child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.child.kill()


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:  # on PYTHONPATH: the repository (pythonpath())
    folder_, first_, last_, device_, dtype_, kernels_, rounds_, steps_, read_, write_ = sys.argv[2:12]
    _child(folder_, int(first_), int(last_), device_, dtype_, kernels_, int(rounds_), int(steps_), int(read_),
           int(write_))
