"""What a stage's step costs after the process has been idle: the same forward back to back and after a pause.

    python bench/idle_wake.py [--steps 100] [--gaps 0,5,15,50] [--spins 1,5]

bench/latency.py builds its bound from the step measured with no delay, where the workers run steps back to
back. With a delay every step follows a pause (the worker waits on the network), and on some machines a
burst of work after a pause runs slower (a virtual CPU that idled: its clock, its caches, the host's
scheduling). This measures that on the latency bench's own model: the first half of the demo model as a
stage, one decode step at a time, sleeping ``gap`` ms before each.

With ``--spins``, each gap is measured again for each spin: the pause's last ``spin`` ms (or all of it,
where shorter) spent polling a socket that never becomes ready (``select`` with no timeout, as a waiting
worker would poll its connection) instead of sleeping. Whether a worker that spun while it waited would
run its next step at the back-to-back speed: a CPU kept busy is not idle, but its caches are someone's.
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100, help="timed steps per gap")
    p.add_argument("--gaps", default="0,5,15,50", help="idle ms before each step, comma-separated (first: 0)")
    p.add_argument("--spins", default="",
                   help="ms of each gap's end spent polling, not sleeping, comma-separated (none: skip)")
    args = p.parse_args()

    import torch

    from azu.cli.demo import build_demo_model
    from azu.engine.span import Span
    from azu.engine.stage import Stage
    from azu.registry.manifest import Manifest
    from azu.registry.sharder import shard_model

    torch.set_num_threads(1)
    gaps = [float(g) for g in args.gaps.split(",")]
    spins = [float(s) for s in args.spins.split(",") if s]
    quiet, _other = socket.socketpair()  # nothing is ever sent: a poll of it always finds nothing
    quiet.setblocking(False)

    def pause(gap_ms: float, spin_ms: float) -> None:
        spin_ms = min(spin_ms, gap_ms)
        if gap_ms > spin_ms:
            time.sleep((gap_ms - spin_ms) / 1000)
        until = time.perf_counter() + spin_ms / 1000
        while time.perf_counter() < until:
            select.select([quiet], [], [], 0)
    with tempfile.TemporaryDirectory(prefix="azu-idle-") as tmp:
        src = build_demo_model(Path(tmp) / "src")
        shards = Path(tmp) / "shards"
        shard_model(src, shards, progress=False)
        layers = Manifest.load(shards).num_layers
        stage = Stage.load(shards, Span(0, layers // 2, embeddings=True))
        rows = []
        for gap in gaps:
            row = [gap]
            for spin in [0.0, *spins]:
                if spin and not gap:
                    row.append(row[1])  # no pause: nothing to spin in
                    continue
                stage.end_job("j")
                stage.forward("j", torch.tensor([1, 5, 6, 7]))
                times = []
                for _ in range(args.steps):
                    if gap:
                        pause(gap, spin)
                    start = time.perf_counter()
                    stage.forward("j", torch.tensor([5]))
                    times.append(time.perf_counter() - start)
                row.append(statistics.median(times[5:]) * 1000)
            rows.append(row)
    base = rows[0][1]
    print(f"demo model, layers 0-{layers // 2} with the embeddings, one decode step at a time, 1 thread")
    head = f"{'idle before each step':>22} {'forward (median)':>17} {'vs back to back':>16}"
    for spin in spins:
        head += f" {f'last {spin:g} ms spun':>22}"
    print(head)
    for gap, ms, *spun in rows:
        line = f"{gap:>19g} ms {ms:>14.3f} ms {ms / base:>15.2f}x"
        for s in spun:
            line += f" {f'{s:.3f} ms, {s / base:.2f}x':>22}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
