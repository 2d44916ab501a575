#!/usr/bin/env bash
# The GPU tests and the benchmarks, in one command for a lent GPU machine.
#
#   benchmarks/gpu_session.sh single    # 1 GPU: GPU tests, llama-2-13b vs accelerate, batch scheduling, serving
#   benchmarks/gpu_session.sh multi     # 2+ GPUs: peer tests, peer-tier bench, TP=1 vs TP=2, llama-2-70b at TP=4
#
# Logs and JSON go to $OUT (default ./out). Runs from a checkout: PYTHONPATH is the repository.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OFFLOAD_CACHE_DIR=${OFFLOAD_CACHE_DIR:-/tmp/offload-cache}
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")

stage() {  # stage NAME COMMAND...: run, log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n "${TAIL:-25}" "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
nvidia-smi topo -m > "$OUT/topo.txt" 2>&1
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__)" | tee "$OUT/versions.txt"
date -u | tee -a "$OUT/versions.txt"

case ${1:-single} in
  single)
    stage gpu_tests python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py
    stage bench_13b python3 benchmarks/bench_offload.py --shape llama-2-13b --gpu-memory 8GiB --json "$OUT/bench_13b.json"
    stage batch_7b python3 benchmarks/bench_batch.py --shape llama-2-7b --gpu-memory 12GiB --records 256 \
      --batch-size 32 --json "$OUT/batch_7b.json"
    stage serve_13b python3 benchmarks/bench_serve.py --shape llama-2-13b --gpu-memory 8GiB --clients 32 \
      --json "$OUT/serve_13b.json"
    ;;
  multi)
    stage gpu_tests python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py -k "peer or budget or bitwise"
    stage peer_13b python3 benchmarks/bench_offload.py --shape llama-2-13b --gpu-memory 8GiB --batch 1 \
      --skip-accelerate --json "$OUT/peer_13b.json"
    stage tp_13b python3 benchmarks/bench_tp.py --shape llama-2-13b --gpu-memory 8GiB --cpu-memory 60GiB --tp 1,2 --json "$OUT/tp_13b.json"
    if [ "$GPUS" -ge 4 ]; then  # TP=2 on GPUs 0 and 1, GPUs 2 and 3 lending them memory
      stage tp_13b_peers python3 benchmarks/bench_tp.py --shape llama-2-13b --gpu-memory 8GiB --cpu-memory 60GiB \
        --tp 2 --peer-memory cuda:2=60GiB --peer-memory cuda:3=60GiB --json "$OUT/tp_13b_peers.json"
      stage tp_70b python3 benchmarks/bench_tp.py --shape llama-2-70b --gpu-memory 20GiB --cpu-memory 40GiB --tp 4 --json "$OUT/tp_70b.json"
    fi
    ;;
  *) echo "usage: $0 single|multi" >&2; exit 2 ;;
esac
