"""Benchmark `azu shard` against a plain safetensors read of the same files.

    python bench/shard.py [--dtype bfloat16|float32] [--repeat 2] [--cache /tmp/azu-bench-cache]

Model: Qwen2.5-0.5B-shaped (hidden 896, 24 layers, 14 heads, 2 kv heads, intermediate 4864, vocab 151936,
tied head), random weights, built once with transformers' Qwen2Config + from_config and saved sharded
(max_shard_size="200MB"); kept in the cache folder between runs.

Each measurement runs in a fresh subprocess so its peak RSS (VmHWM of that process) is its own:
- "raw read": every byte of the files through one 8 MiB buffer (the I/O ceiling);
- "read + sha256": the same, hashing each file (azu shard hashes every byte it writes);
- "safetensors load_file + clone": safetensors.torch.load_file of each source file in turn, tensors
  materialised (load_file maps lazily) and dropped before the next file;
- "azu shard": `azu shard SRC --out DIR --quiet` (azu.cli.main in the child): read, split, hash, write;
  once with DIR on the cache's disk, once on tmpfs (/dev/shm: the sharder's own cost, without the disk's
  writeback);
- the ceiling: hashlib.sha256 of bytes in memory on one core (azu shard hashes every byte it writes).
MB/s = source weight bytes / wall seconds. The page cache is warm for every row (same files, read before).
Target (issue 2): `azu shard` peak RSS <= largest source file + 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6

QWEN_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True,
                max_position_embeddings=32768)

_HWM = textwrap.dedent("""
    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
""")

# load_file maps the file lazily: without touching the tensors it reads nothing, so the row clones each
# tensor (bytes materialised in RAM, as a loader that keeps the weights must).
READ_CHILD = _HWM + textwrap.dedent("""
    import json, sys, time
    import torch  # imported before the baseline: the row measures reading, not importing
    from safetensors.torch import load_file
    files = sys.argv[1:]
    before = hwm()
    t0 = time.perf_counter()
    for f in files:
        tensors = {k: v.clone() for k, v in load_file(f).items()}
        del tensors
    print(json.dumps({"seconds": time.perf_counter() - t0, "before": before, "peak": hwm()}))
""")

# The I/O ceiling: read every byte of the files through one 8 MiB buffer, nothing else.
RAW_CHILD = _HWM + textwrap.dedent("""
    import json, sys, time
    buf = memoryview(bytearray(8 << 20))
    before = hwm()
    t0 = time.perf_counter()
    for f in sys.argv[1:]:
        with open(f, "rb") as fh:
            while fh.readinto(buf):
                pass
    print(json.dumps({"seconds": time.perf_counter() - t0, "before": before, "peak": hwm()}))
""")

# What hashing alone costs: azu shard must SHA-256 every byte it writes (the manifest's hashes).
SHA_CHILD = _HWM + textwrap.dedent("""
    import hashlib, json, sys, time
    buf = memoryview(bytearray(8 << 20))
    before = hwm()
    t0 = time.perf_counter()
    for f in sys.argv[1:]:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while n := fh.readinto(buf):
                h.update(buf[:n])
    print(json.dumps({"seconds": time.perf_counter() - t0, "before": before, "peak": hwm()}))
""")

# The ceiling: SHA-256 of bytes already in memory, on one core (azu shard hashes every byte it writes).
SHA_MEM_CHILD = _HWM + textwrap.dedent("""
    import hashlib, json, os, time
    data = memoryview(os.urandom(64 << 20))
    before = hwm()
    t0 = time.perf_counter()
    for _ in range(8):
        h = hashlib.sha256()
        for i in range(0, len(data), 8 << 20):
            h.update(data[i:i + (8 << 20)])
    print(json.dumps({"seconds": time.perf_counter() - t0, "bytes": 8 * len(data), "before": before,
                      "peak": hwm()}))
""")

SHARD_CHILD = _HWM + textwrap.dedent("""
    import json, sys, time
    from azu.cli import main
    before = hwm()
    t0 = time.perf_counter()
    rc = main(["shard", sys.argv[1], "--out", sys.argv[2], "--quiet"])
    assert rc == 0, rc
    print(json.dumps({"seconds": time.perf_counter() - t0, "before": before, "peak": hwm()}))
""")


def build_model(cache: Path, dtype: str) -> Path:
    out = cache / f"qwen2.5-0.5b-shaped-{dtype}-200MB"
    if (out / "model.safetensors.index.json").exists():
        return out
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**QWEN_05B)
    print(f"building {out} (one-time) ...", file=sys.stderr)
    model = transformers.Qwen2ForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=cache))
    model.save_pretrained(tmp, max_shard_size="200MB")
    os.replace(tmp, out)
    return out


def _child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cache", default="/tmp/azu-bench-cache")
    parser.add_argument("--json", action="store_true",
                        help="print rows for bench/engine.py's table as one JSON object instead")
    args = parser.parse_args()

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    src = build_model(cache, args.dtype)
    files = sorted(str(p) for p in src.glob("*.safetensors"))
    sizes = [Path(f).stat().st_size for f in files]
    total, largest = sum(sizes), max(sizes)

    # The output goes to the cache's disk ("azu shard") and, where there is one, to tmpfs: the disk row
    # includes what the disk's writeback allows, the tmpfs row is the sharder's own cost.
    outputs = {"azu shard": cache}
    if Path("/dev/shm").is_dir():
        outputs["azu shard, output on tmpfs"] = Path("/dev/shm")
    rows: dict[str, list[dict]] = {"raw read (8 MiB buffer)": [], "read + sha256": [],
                                   "safetensors load_file + clone": [], **{k: [] for k in outputs}}
    sha_ceiling = []
    written = 0
    for _ in range(args.repeat):
        rows["raw read (8 MiB buffer)"].append(_child(RAW_CHILD, *files))
        rows["read + sha256"].append(_child(SHA_CHILD, *files))
        rows["safetensors load_file + clone"].append(_child(READ_CHILD, *files))
        sha_ceiling.append(_child(SHA_MEM_CHILD))
        for name, where in outputs.items():
            out = Path(tempfile.mkdtemp(prefix="azu-bench-shard-", dir=where))
            try:
                rows[name].append(_child(SHARD_CHILD, str(src), str(out / "shards")))
                written = sum(p.stat().st_size for p in (out / "shards").glob("*.safetensors"))
            finally:
                shutil.rmtree(out, ignore_errors=True)
    sha_mb_s = max(r["bytes"] / MB / r["seconds"] for r in sha_ceiling)

    if args.json:
        import json

        def best(name: str) -> dict:
            return min(rows[name], key=lambda r: r["seconds"])

        base = best("safetensors load_file + clone")
        base_peak = max(r["peak"] for r in rows["safetensors load_file + clone"])
        azu_peak = max(r["peak"] for name in outputs for r in rows[name])
        print(json.dumps({"rows": [
            *([f"{name} MB/s ({args.dtype} source, {total / MB:.0f} MB; sha256 {sha_mb_s:.0f} MB/s/core)",
               f"{total / MB / base['seconds']:.0f} (load)",
               f"{total / MB / best(name)['seconds']:.0f}", f"{base['seconds'] / best(name)['seconds']:.2f}x",
               ">= 0.5x"] for name in outputs),
            [f"shard peak RSS MB (largest file {largest / MB:.0f} MB)", f"{base_peak / MB:.0f} (load)",
             f"{azu_peak / MB:.0f}", f"{azu_peak / largest:.2f}x of largest file", "<= 1.10x"],
        ]}))
        return

    print(f"\nQwen2.5-0.5B-shaped, {args.dtype}, {len(files)} source files, {total / MB:.0f} MB "
          f"(largest {largest / MB:.0f} MB); azu shard writes {written / MB:.0f} MB (tied head cloned); "
          f"best of {args.repeat}, warm page cache, CPU: {os.cpu_count()} cores\n")
    print("| what | MB/s (source bytes) | wall s | peak RSS MB | RSS before MB | peak / largest file |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in rows.items():
        best = min(runs, key=lambda r: r["seconds"])
        peak = max(r["peak"] for r in runs)
        print(f"| {name} | {total / MB / best['seconds']:.0f} | {best['seconds']:.2f} | {peak / MB:.0f} | "
              f"{best['before'] / MB:.0f} | {peak / largest:.2f} |")
    base = min(rows["safetensors load_file + clone"], key=lambda r: r["seconds"])
    for name in outputs:
        azu = min(rows[name], key=lambda r: r["seconds"])
        print(f"\n{name}: {base['seconds'] / azu['seconds']:.2f}x the MB/s of safetensors load_file + clone "
              "(target >= 0.5x)", end="")
    print(f"\nceiling: hashlib.sha256 on bytes in memory, one core: {sha_mb_s:.0f} MB/s; azu shard hashes "
          f"{written / MB:.0f} MB ({written / MB / sha_mb_s:.2f} core-seconds)")
    shard_peak = max(r["peak"] for name in outputs for r in rows[name])
    verdict = "MET" if shard_peak <= 1.10 * largest else "NOT MET"
    print(f"\ntarget `azu shard` peak RSS <= largest source file + 10% ({1.10 * largest / MB:.0f} MB): "
          f"{verdict} ({shard_peak / MB:.0f} MB)")


if __name__ == "__main__":
    main()
