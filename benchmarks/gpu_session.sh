#!/usr/bin/env bash
# The GPU tests and the benchmarks, stage by stage, for a lent GPU machine.
#
#   benchmarks/gpu_session.sh tests resident7b prefill13b      # any stages, in order
#   benchmarks/gpu_session.sh single                           # the core one-GPU stages (the list at the end)
#   benchmarks/gpu_session.sh multi                            # every stage that needs 4 GPUs
#   benchmarks/gpu_session.sh quantk:60 moe30b:150             # NAME:SECONDS stops a stage after SECONDS
#
# One-GPU stages:
#   tests          the GPU tests (numerics vs transformers, graphs vs eager, budgets, quantized formats), and the
#                  row engine's tests on CUDA (pipelined passes)
#   offload13b     llama-2-13b at 8 GiB: resident, host tier, int8 (8 GiB) and int4 (4 GiB), graphs and eager,
#                  against accelerate; batches 1 and 16
#   resident7b     llama-2-7b resident decode, graphs and eager
#   gemv           one-row products of four models' shapes: offload's GEMV kernel against cuBLAS and the floor
#   quantk         products from int8/int4 parts (offload's kernels) against bf16 and the floor, 1, 16 and 2048 rows
#   quantsweep     the same with the kernels' other blockings (the best three of each)
#   quantwords     1, 2 and 16 rows: the word kernels (quant_kernels.WORD_GEMV) beside the defaults, and the
#                  kernels' other blockings (the best three)
#   quant7b        llama-2-7b resident decode in bf16, int8 and int4, batch 1 and 16 (GPU time per pass vs floor)
#   tables7b       llama-2-7b resident at batch 16 in int4 and bf16 and at batch 1 in int4, the profiler's kernel
#                  table of each: where int4's step outruns the plan's price
#   tests_ints     the integer GEMV's tests with the default choices, then the compressed formats' GPU tests
#   quant7b_words  int8 and int4 with every word kernel (OFFLOAD_WORD_GEMV=1; the default: int4's GEMV only)
#   dotgemv        the tensor-core product of up to 16 rows (quant_kernels._dot_gemv_kernel): its tests on the GPU, then
#                  llama-2-7b's products of 1 and 16 rows against the defaults, and its blockings (the best three)
#   ints           the word GEMV's products in integers (OFFLOAD_INT_GEMV=1: four weights a dp4a): its tests on the
#                  GPU, llama-2-7b's products of 1 and 2 rows against the float products
#   ints_sweep     the integer GEMV's blockings at one row
#   ints7b         llama-2-7b resident in int4, int8 and bf16 with OFFLOAD_INT_GEMV=1 and 0 at batch 1, and
#                  SmolLM2-135M's shape in int4
#   splits         the integer GEMV's blockings with 1, 2, 4, ... stretches of the columns (int8, int4 in groups of
#                  128), llama-2-7b's products of one row: the best five of each
#   head           llama-2-7b's products of 1 and 16 rows with its LM head's (stored int8 where the layers are
#                  quantized): what the head costs in each format
#   pdl            kernels launched as dependents of the one before them (OFFLOAD_PDL=1: each waits for its inputs;
#                  2: after asking L2 for its first weights) against not: their GPU test, then llama-2-7b resident in
#                  int4, int8 and bf16 at batch 1 (int4 at 16), and SmolLM2-135M's shape in int4 (a draft's step)
#   quant7b_dot    llama-2-7b resident decode in int8 and int4 with the tensor-core product (OFFLOAD_DOT_GEMV=1)
#                  against without, bf16 beside them, batch 1 and 16; then SmolLM2-135M's shape in int4 (a draft's
#                  steps: 1 and 4 rows) with and without
#   quant7b_last   bf16, int8 and int4: split work put together by the last program of each tile (OFFLOAD_LAST_SUMS=1:
#                  one kernel a compressed product and an attention, not two) against the second kernels, after
#                  the tests that race them
#   profile7b      llama-2-7b resident, compiled: generate's ms/step against the GPU's time per pass, the kernels
#   profile13b     llama-2-13b resident, compiled, the same without the kernel table
#   host13b        llama-2-13b at 8 GiB, host tier only, batch 1, graphs and eager (no accelerate)
#   prefill13b     llama-2-13b at 8 GiB: prefill of 32 x 128 and 1 x 4096 tokens against their limits
#   int4_70b       llama-2-70b in int4 at 24 GiB (random weights made packed: loads in about the time of writing
#                  its 36 GB, where quantizing 140 GB of bf16 took over 270 s)
#   moe235_int4    qwen3-235b-a22b in int4 (118 GiB), every expert resident in 130 GiB: ms/token, experts read
#                  directly (the default there: one graph a step) against copied (graph pieces), the HBM floor
#   int4_405b      the moonshot: llama-3.1-405b in int4, 130 GiB of HBM and the rest (84 GiB) pinned on the host
#   moe30b         qwen3-30b-a3b (a mixture of 128 experts) at 8 GiB, experts streamed from the host, batch 1 and 16:
#                  copied (graph pieces) against read directly from pinned memory by the kernels (whole graphs)
#   moe30b_resident  the same with every expert resident (61 GB): direct reads (the default there: one graph a
#                  step) against copies (graph pieces: the host reads each layer's routing)
#   moe30b_acc, mixtral24_acc   the same budgets against accelerate (transformers 5's stacked experts, pageable
#                  weights: 61 and 93 GB of host RAM), batch 1
#   moehost        the host's time in a decode step of qwen3-30b-a3b's routing with every width shrunk (launches
#                  and Python, not bytes): what a streamed mixture of experts waits for at each layer
#   mixtral24      mixtral-8x7b at 24 GiB: every-pass blocks resident, experts from the host: copied into the
#                  device cache (graph pieces) against read directly by the kernels (whole graphs)
#   spec13b        llama-2-13b at 8 GiB: what a verify pass of 1..32 tokens per row costs (speculation's budget),
#                  in CUDA graphs and eagerly
#   gguf_moe30b    a qwen3-30b-a3b Q4_K_M-like GGUF file (random blocks, experts stacked, written first): its load
#                  against reading it, then its decode at 8 GiB (experts streamed, copied) and at 40 GiB (every
#                  expert resident: direct reads), the compressed kernels reading the file's formats; needs .whl
#   spec70b        llama-2-70b at 40 GiB: verify passes of 1..32 tokens a row, in CUDA graphs only
#   load70b        llama-2-70b saved in int4 (random weights, written first): its load against reading its files,
#                  then its decode at 24 GiB from the saved checkpoint
#   gguf13b        a llama-2-13b Q4_K_M-like GGUF file (random blocks, written first): its load against reading
#                  it, then its decode at 4 GiB with the compressed kernels
#   spec_smollm2   SmolLM2-135M-Instruct in bf16, every layer streamed: each draft against none, greedy and sampled
#                  (the int4 draft: the model quantized in groups of 64, named as a draft model); then deep
#                  trees (48 drafted tokens a row: 12 deep x 4, a pass 64 wide). Needs the gguf
#                  wheel in .whl and the model's GGUF file: $SMOLLM2, or its halves in .assets/smollm2/part-*
#                  (98 MB is more than one call carries: `split -n 2 FILE .assets/smollm2/part-`, carry part-aa
#                  with a command that does nothing, then at once part-ab and .whl with this stage: ignored
#                  paths stay on a warm machine between calls)
#   spec_smollm2_greedy  the same, greedy only, four drafts (a short call: what the price of draft steps gives)
#   spec_smollm2_trace   the int4 draft's chains against none, the depth chosen and 3, one prompt's timeline of each
#                  (spec_trace*-1.json.gz: where the GPU waits on the host between a pass's phases)
#   spec_smollm2_chain   the int4 draft's chains against none, the depth chosen and 3 (no profiler: a short call)
#   spec_smollm2_ahead  the int4 draft's chains against none, the depth chosen and 3, drafting ahead while the
#                  target verifies (OFFLOAD_LOOK_AHEAD=1, the default) and not (0)
#   spec_smollm2_spare  the int4 draft's step of 1, 4 and 8 rows (a small weight's GEMV of up to 8 rows; at 4 also of
#                  2: OFFLOAD_SMALL_GEMV_ROWS), then its chains drafted ahead in 3, 7, 1 and no spare rows
#                  (OFFLOAD_LOOK_AHEAD) against none, at the depth chosen, and 3 at chains of 3
#   spec_smollm2_paced  the int4 draft's chains drafted ahead in 1, no and 3 spare rows against none at the depth
#                  chosen, and in 1 at chains of 3
#   spec_smollm2_int8  the model's int8 copy as the draft beside its int4 copy (groups of 64), greedy, at the depth
#                  chosen and in chains of 6 (on a CPU, float32, chains of 6: 4.95 tokens a pass against 2.94)
#   spec_smollm2_int8_trees  the int8 copy (the best chain draft: 2.50x) in chains of 6 and 8 against trees of 2
#                  tokens a depth, and grown best first (#22's trees); DEPTHS="8 10" for other depths
#   spec_smollm2_int8_trace  the int8 copy in chains of 6 drafted ahead, 128 tokens a prompt, under the profiler: the
#                  host's time in each phase, the kernels, and one prompt's timeline (spec_int8_trace-1.json.gz: does
#                  the side stream draft beside the target's pass, or after it?)
#   spec_smollm2_int8_ahead  the int8 copy in chains of 6, 128 tokens a prompt, drafting ahead (OFFLOAD_LOOK_AHEAD=1,
#                  the default) and not (0): how often the verdict was guessed, and what a pass spends drafting
#                  (#22: its 4x needs drafting hidden behind the pass); AHEADS="1 1 0" runs each of its values
#   tests_likeliest  a draft's likeliest tokens in two kernels (kernels.likeliest) on CUDA, then tests_spec
#   load13b_ab     llama-2-13b saved in int4 (written first), loaded from disk at 4 GiB with read() through pinned
#                  buffers four reads at a time (OFFLOAD_READ_THREADS=4), one at a time (the default), staged in
#                  pageable memory (before the twenty-fifth session) and copied from the memory map (before the
#                  twentieth): bench_load.py --against-map, three rounds in turned orders
#   load13b_profile  load13b_ab, then a third load under cProfile: where a load from read() spends what the
#                  memory map's does not (0.64 against 0.78 of reading on an H100, 2026-12-07)
#   load13b_readahead  load13b_ab's loads (one round) with the read-ahead thread (OFFLOAD_READ_AHEAD=1, the default)
#                  and without (0), twice each: does asking the kernel for the next ranges compete with the loader's
#                  own reads (its posix_fadvise calls took 0.83 s of a profiled 4.9 s load on an H100, 2026-12-08)?
#   tests_reads    checkpoints read with read() (through a reused buffer to the GPU): GGUF bytes on CUDA, the
#                  tests that load checkpoints onto the GPU (numerics vs transformers, offloaded = resident, budgets)
#   tests_whole    the GPU tests of whole passes and of drafting ahead
#   tests_int4_16  int4 in groups of 16 (GGUF's Q3_K, Q2_K): the products, the experts' direct reads, their kernels
#                  compiled for sm_90 (the weights' and scales' loads), a file of Q3_K/Q2_K/Q5_0/Q5_1 layers
#   spec_host_whole  SmolLM2-135M's shape streamed (random weights): verify passes of 1 and 4 tokens against the host's
#                  time queueing them, a graph a layer against a whole pass in one graph (OFFLOAD_WHOLE_PASS=1)
#   spec_smollm2_whole  spec_host_whole, then the int4 draft's chains against none: a graph a layer
#                  (OFFLOAD_WHOLE_PASS=0) and whole passes, at the depth chosen and in chains of 3
#   spec_host      SmolLM2-135M's shape streamed (random weights): verify passes of 1, 4 and 16 tokens, the pass
#                  against the host's time queueing it (does the host set the pace?), with rings of 2 and 4 slots
#   tests_spec     speculative decoding's tests on CUDA (they load on the GPU where there is one): every draft,
#                  trees, sampled rows, verify chunks (float32: greedy output equals plain decoding's), and
#                  verify passes in CUDA graphs (bitwise against eager; their pool within the plan)
#   tests_experts  the GPU tests of mixtures of experts alone (streamed, direct, pieces, budgets), and the
#                  decode-cost probes (products of 1 and 16 rows, small kernels)
#   tests_gguf_moe GGUF files of mixtures of experts on CUDA (stacked experts, formats by layer, direct reads) and
#                  the expert kernels' GGUF formats (grouped int8, float16 scales) against float64; needs .whl
#   tests_kernels  the kernel tests alone (GEMV, int8/int4 products, norms, gates) and the experts on CUDA
#   serve13b       llama-2-13b at 8 GiB behind the HTTP server, 32 concurrent streaming clients
#   throughput70b  llama-2-70b at 40 GiB, FlexGen's protocol: --batch-size auto, a sweep, accelerate
# Four-GPU stages:
#   tests_multi    the GPU tests that need two GPUs (peer tier, tensor parallelism with graphs)
#   peer13b        llama-2-13b at 8 GiB: layers on cuda:1, graphs and eager
#   tp13b_peers    llama-2-13b at 8 GiB per GPU, TP=2 on GPUs 0 and 1 with GPUs 2 and 3 as peers, graphs and eager
#
# What is owed, in order of value, for a session of about 30 minutes on one GPU (each call under 10 minutes;
# a machine's start costs 1-7 minutes of device time, so keep it warm: the next call within 30 s). Ran on
# 2026-12-05 (docs/benchmarks.md): sixth session (H200) tests_kernels, moe30b, moe30b_resident, moehost,
# mixtral24 (cut), spec_smollm2, quantwords, quant7b, quant7b_words, load70b, offload13b, tests_spec; seventh
# (H100) quant7b, spec_smollm2 (prices' first form), mixtral24 (cut), moe30b_acc; eighth (H200, then H100)
# tests_experts, quant7b, mixtral24_acc, moe235_int4, tests_kernels, spec_smollm2_greedy, moe30b and
# moe30b_resident (b1; copies through the kernels), quant7b again; ninth (H100) quant7b_last, tests_kernels,
# tests_spec; tenth (H100, then H200) tests_experts, spec_smollm2_greedy (best-first trees: 0.99x, left off),
# load70b (0.85 of the files' speed), the fused MLP end's tests and a profile of a small model's step; eleventh
# (H200, 2026-12-06) the tests of a layer in fewer kernels (the kernel files cut at 180 s), their probe,
# spec_smollm2_greedy (1.19x: drafting 5.7 ms a pass, verifying 4.9), quant7b; twelfth (H100, 2026-12-06) dotgemv
# (then 64 features a program, at 16 rows), quant7b_dot, spec_smollm2_stop and fixed chain lengths (1.23x at best);
# thirteenth (H100, 2026-12-06) pipelined GEMVs (slower: removed), tests_kernels (in three calls), spec70b, pdl (twice);
# fourteenth (H100, 2026-12-06) dotgemv (128 x 256 tiles: still slower at one row), ints and ints_sweep (integer
# products: the default for int4, groups of 128+), head and quant7b (int4 2.00x bf16 at batch 1), test_gpu/test_quant;
# fifteenth (H100, 2026-12-06) ints_sweep (16 words a thread: no faster), splits (fewer stretches: faster), quant7b
# (int8 1.67x, int4 2.05x), tests_kernels, tests_spec, offload13b (int4 at 4 GiB: 0.99 of its link), tables7b.
# sixteenth (H100, 2026-12-06) quant7b (16-row rates through a layer: every prediction within 10%), tests_kernels
# (test_quant_kernels.py 306 passed before the limit), spec_smollm2_trace and spec_host (the draft's steps wait on the
# host; verify passes do not), tests_spec and spec_smollm2_chain (greedy chains in graphs: 1.42x); then no machine came.
# seventeenth (H100, 2026-12-06) tests_spec and spec_smollm2_chain (the chain's first step replayed: no change),
# spec_smollm2_ahead four times (drafting ahead: 1.70x against 1.28x without) and a --trace of it.
# eighteenth (H100, 2026-12-06, after half an hour of no machine) the small GEMV's tests, tests_spec,
# spec_smollm2_spare (spare rows: mostly paused), spec_smollm2_paced (queued before the pass: the pass slower; chains
# of 3 1.42x, the depth chosen 1.14x; fbb1e76 on the same machine 1.27x), tests_spec's files again.
# nineteenth (H100, 2026-12-06, after 96 minutes of no machine) tests_whole, spec_host_whole (a whole pass in one graph:
# the host queues it in 0.56 ms against 1.58), spec_smollm2_whole (1.57x against 1.48x; the priority: within noise),
# test_gpu.py's graph and budget tests with whole passes the default.
# twentieth (2026-12-06): no machine started (fifteen failed starts); checkpoints now read with read() (CPU-measured).
# twenty-first (2026-12-06/07): no machine started (seven failed starts, 24 of the 30 minutes).
# twenty-second and twenty-third (2026-12-07): no machine started (each a dozen failed or refused calls).
# twenty-fourth (2026-12-07, an H100): tests_gguf_moe (five test faults: fixed), tests_spec, tests_whole, tests_reads,
#   tests_kernels passed; spec_smollm2_int8, spec_smollm2_int8_trees, load13b_ab, load70b measured
#   (docs/benchmarks.md).
# twenty-fifth (2026-12-07, an H100 for two calls after failed starts): tests_reads, tests_gguf_moe (58% before its
#   time: no failure), load13b_profile (the loads' order confounds them: bench_load --rounds), spec_smollm2_int8_ahead
#   (the old order: drafted ahead 80% of the passes, drafting as long).
# twenty-sixth (2026-12-07, an H100 for four calls after nine calls that started none): the side-stream probe (a
#   small copy does not wait behind another stream's large ones), tests_reads, int4 in groups of 16 on CUDA,
#   spec_smollm2_int8_ahead (inputs sent first lost: removed), tests_spec, load13b_ab, spec_smollm2_int8_trace,
#   tests_gguf_moe (the experts' sm_90 compile tests failed after that session's int4 change: fixed after the
#   device time was spent, not yet run there).
# twenty-seventh (2026-12-07, an H100 for three calls, then 13 that started none): tests_int4_16 on Triton 3.6.0
#   (four faults: fixed, and the compile tests checked against a Triton 3.6.0 wheel on the CPU).
# twenty-eighth (2026-12-07, an H100 for eight calls after four that started none): the fixes (tests_int4_16 cut at
#   150 s, the 26 sm_90 compile tests, tests_reads, graph tests), load13b_ab (the map 0.79, read() 0.68, four reads
#   0.65), gguf13b, moe30b_acc (103.5x accelerate), spec_smollm2_int8_ahead (2.92x; the pace settles in two modes),
#   OFFLOAD_PDL=2 against 1 for the int8 draft (3 of 4 runs in the fast mode against 2 of 5).
# twenty-ninth (2026-12-08, an H100 for five calls after a dozen that started none): tests_likeliest (the drafting-
#   ahead test paused by its pace: fixed, passed), spec_smollm2_int8_ahead with AHEADS="1 1" twice (3.60-3.62x, and
#   2.81x not ahead; one mode), load13b_profile (read() 0.67, the map 0.78; the loader waits in preadv). Owed now:
#   1. load13b_readahead:200                                   does the read-ahead thread compete with read()? (#20)
#   2. CLOCKS=1 AHEADS=1 spec_smollm2_int8_ahead, then DEPTHS="8 10" spec_smollm2_int8_trees (the side stream's
#      window, printed now; deeper chains and trees with the faster passes: #22's 4x)
#   3. int4_405b:500 (an H200)                                 the moonshot (#20)
#   4. moe235_int4:120 (an H200), gguf_moe30b, mixtral24_acc
# A SmolLM2 stage on a fresh machine: carry part-aa and .whl with a call that does nothing, then part-ab at once.
# When machines are scarce (each failed start costs 90-180 s of the 30 minutes; the twelfth session's eleven calls
# started one), make the first call short and whole, and keep the machine warm: the next call within 30 s.
# CLOCKS=1 samples the GPU's clocks, power and throttling every 250 ms while each stage runs ($OUT/NAME.clocks.csv).
# Logs and JSON go to $OUT (default ./out). Runs from a checkout: PYTHONPATH is the repository. Wheels in
# .whl (the serve extra: fastapi, uvicorn, openai, ...) are installed to /tmp/site first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 OFFLOAD_CACHE_DIR=${OFFLOAD_CACHE_DIR:-/tmp/offload-cache}

smollm2_ready() {  # SmolLM2-135M-Instruct in bf16 (/tmp/smollm2) and its int4 copy in groups of 64 (/tmp/smollm2-int4)
  local model=${SMOLLM2:-/tmp/smollm2.gguf}
  [ -f "$model" ] || cat .assets/smollm2/part-* > "$model"
  [ -d /tmp/smollm2 ] || python3 benchmarks/gguf_to_hf.py "$model" /tmp/smollm2 --dtype bfloat16
  [ -d /tmp/smollm2-int4 ] || python3 scripts/quantize.py --model /tmp/smollm2 --quantize int4 --group-size 64 \
    --out /tmp/smollm2-int4 --device cuda
}
export -f smollm2_ready

stage() {  # stage NAME COMMAND...: run, log to $OUT/NAME.log, keep going on failure
  local name=$1; shift
  echo "=== $name: $*"
  local start=$SECONDS sampler=
  if [ -n "${CLOCKS:-}" ] && command -v nvidia-smi > /dev/null; then  # the GPU's clocks and power as it ran
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active \
      --format=csv -lms 250 > "$OUT/$name.clocks.csv" 2>&1 &
    sampler=$!
  fi
  timeout -k 30 "${STAGE_SECONDS:-0}" "$@" > "$OUT/$name.log" 2>&1  # 0: no limit; SIGKILL 30 s after SIGTERM
  local rc=$?
  [ -n "$sampler" ] && kill "$sampler" 2> /dev/null
  tail -n "${TAIL:-22}" "$OUT/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

run_stage() {
  case $1 in
    tests) stage tests python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py tests/test_quant.py \
      tests/test_kernels.py
      stage tests_quant_kernels python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py
      stage tests_engine python3 -m pytest -q -p no:cacheprovider tests/test_row_engine.py ;;  # the row engine on CUDA
    offload13b) stage offload13b python3 benchmarks/bench_offload.py --shape llama-2-13b --gpu-memory 8GiB \
      --quantize int8@8GiB,int4@4GiB --json "$OUT/offload13b.json" ;;
    resident7b) stage resident7b python3 benchmarks/bench_offload.py --shape llama-2-7b --runs resident --batch 1 \
      --decode-tokens 64 --skip-accelerate --json "$OUT/resident7b.json" ;;
    gemv) stage gemv python3 benchmarks/bench_gemv.py ;;
    quantk) stage quantk python3 benchmarks/bench_quant_kernels.py ;;
    quantsweep) stage quantsweep python3 benchmarks/bench_quant_kernels.py --rows 1,16,2048 --sweep ;;
    quantwords) stage quantwords python3 benchmarks/bench_quant_kernels.py --rows 1,2,16 --words --sweep ;;
    quant7b) stage quant7b bash -c 'for q in "" "--quantize int8" "--quantize int4"; do for b in 1 16; do
      python3 benchmarks/profile_decode.py --shape llama-2-7b --prompts 128 --new-tokens 32 --batch $b $q; done; done' ;;
    tables7b) stage tables7b bash -c 'for run in "16 --quantize int4" "16" "1 --quantize int4"; do set -- $run
      python3 benchmarks/profile_decode.py --shape llama-2-7b --prompts 128 --new-tokens 32 --batch $@ --kernels; done' ;;
    tests_ints) stage tests_ints python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py \
      -k "integer or word or gated_mlps or normalizes or last or chosen"
      stage tests_quant python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_quant.py -k quant ;;
    quant7b_words) stage quant7b_words env OFFLOAD_WORD_GEMV=1 bash -c 'for q in "--quantize int8" "--quantize int4"
      do for b in 1 16; do python3 benchmarks/profile_decode.py --shape llama-2-7b --prompts 128 --new-tokens 32 \
      --batch $b $q; done; done' ;;
    quant7b_last) stage quant7b_last bash -c 'python3 -m pytest -q -x tests/test_quant_kernels.py tests/test_kernels.py -k last &&
      for q in "" "--quantize int8" "--quantize int4"; do for b in 1 16; do for last in 0 1; do echo "OFFLOAD_LAST_SUMS=$last"
      OFFLOAD_LAST_SUMS=$last python3 benchmarks/profile_decode.py --shape llama-2-7b --prompts 128 --new-tokens 32 \
      --batch $b $q; done; done; done' ;;
    ints) stage ints_tests env OFFLOAD_INT_GEMV=1 python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py \
      -k "integer or word or gated_mlps or normalizes or last"
      stage ints python3 benchmarks/bench_quant_kernels.py --rows 1,2 --ints ;;
    ints_sweep) stage ints_sweep python3 benchmarks/bench_quant_kernels.py --rows 1 --ints --ints-sweep ;;
    splits) stage splits python3 benchmarks/bench_quant_kernels.py --rows 1 --splits-sweep ;;
    head) stage head python3 benchmarks/bench_quant_kernels.py --rows 1,16 --head ;;
    ints7b)
      stage ints7b bash -c 'for b in 1; do for run in "1 int4" "0 int4" "0 bf16" "1 int8" "0 int8"; do set -- $run
      q=$([ $2 = bf16 ] || echo "--quantize $2"); echo "OFFLOAD_INT_GEMV=$1 $2 batch $b"; OFFLOAD_INT_GEMV=$1 python3 \
      benchmarks/profile_decode.py --shape llama-2-7b --prompts 128 --new-tokens 32 --batch $b $q; done; done
      for ints in 1 0; do echo "OFFLOAD_INT_GEMV=$ints smollm2 int4 batch 1"; OFFLOAD_INT_GEMV=$ints python3 \
      benchmarks/profile_decode.py --shape smollm2-135m --prompts 128 --new-tokens 32 --batch 1 --quantize int4; done' ;;
    dotgemv) stage dotgemv_tests python3 -m pytest -q -p no:cacheprovider tests/test_quant_kernels.py -k tensor_core
      stage dotgemv python3 benchmarks/bench_quant_kernels.py --rows 1,16 --dot --dot-sweep ;;
    pdl) stage pdl_tests timeout 240 python3 -m pytest -m gpu -x -q -p no:cacheprovider tests/test_gpu.py -k dependent
      stage pdl bash -c 'for run in "1 int4" "1 int8" "1 bf16" "16 int4"; do for pdl in 0 1 2; do set -- $run
      echo "OFFLOAD_PDL=$pdl $2 batch $1"; OFFLOAD_PDL=$pdl python3 benchmarks/profile_decode.py --shape llama-2-7b \
      --prompts 128 --new-tokens 32 --batch $1 $([ $2 = bf16 ] || echo "--quantize $2"); done; done
      for pdl in 0 1 2; do echo "OFFLOAD_PDL=$pdl smollm2 int4 batch 1"; OFFLOAD_PDL=$pdl python3 \
      benchmarks/profile_decode.py --shape smollm2-135m --prompts 128 --new-tokens 32 --batch 1 --quantize int4
      done' ;;
    quant7b_dot) grep -q "failed" "$OUT/dotgemv_tests.log" 2>/dev/null && export OFFLOAD_DOT_PTX=0  # PTX fields wrong
      stage quant7b_dot bash -c 'echo "OFFLOAD_DOT_PTX=${OFFLOAD_DOT_PTX:-1}"; for b in 1 16; do for run in "1 int4" "0 int4" "0 bf16" "1 int8" "0 int8"; do
      set -- $run; q=$([ $2 = bf16 ] || echo "--quantize $2"); echo "OFFLOAD_DOT_GEMV=$1 $2 batch $b"
      OFFLOAD_DOT_GEMV=$1 python3 benchmarks/profile_decode.py --shape llama-2-7b --prompts 128 --new-tokens 32 \
      --batch $b $q; done; done; for b in 1 4; do for dot in 1 0; do echo "OFFLOAD_DOT_GEMV=$dot smollm2 int4 batch $b"
      OFFLOAD_DOT_GEMV=$dot python3 benchmarks/profile_decode.py --shape smollm2-135m --prompts 128 --new-tokens 32 \
      --batch $b --quantize int4; done; done' ;;
    profile7b) stage profile7b python3 benchmarks/profile_decode.py --shape llama-2-7b --prompts 32,128 --compile \
      --kernels ;;
    profile13b) stage profile13b python3 benchmarks/profile_decode.py --shape llama-2-13b --prompts 32,128 --compile ;;
    host13b) stage host13b python3 benchmarks/bench_offload.py --shape llama-2-13b --gpu-memory 8GiB --runs host \
      --batch 1 --skip-accelerate --json "$OUT/host13b.json" ;;
    prefill13b) stage prefill13b python3 benchmarks/bench_prefill.py --shape llama-2-13b --gpu-memory 8GiB \
      --prompts 32x128,1x4096 --json "$OUT/prefill13b.json" ;;
    int4_70b) stage int4_70b python3 benchmarks/bench_offload.py --shape llama-2-70b --gpu-memory 24GiB \
      --runs "host int4" --quantize int4 --batch 1,16 --skip-accelerate --json "$OUT/int4_70b.json" ;;
    moe235_int4) stage moe235_int4 python3 benchmarks/bench_offload.py --shape qwen3-235b-a22b --gpu-memory 130GiB \
      --quantize int4 --batch 1 --decode-tokens 4 --prompt-len 16 --skip-accelerate --json "$OUT/moe235_int4.json" ;;
    int4_405b) stage int4_405b python3 benchmarks/bench_offload.py --shape llama-3.1-405b --gpu-memory 130GiB \
      --runs "host int4" --quantize int4 --batch 1 --decode-tokens 4 --prompt-len 16 --skip-accelerate \
      --json "$OUT/int4_405b.json" ;;
    serve13b) stage serve13b python3 benchmarks/bench_serve.py --shape llama-2-13b --gpu-memory 8GiB --clients 32 \
      --json "$OUT/serve13b.json" ;;
    spec70b) stage spec70b python3 benchmarks/bench_speculative.py --shape llama-2-70b --gpu-memory 40GiB \
      --widths 1,2,4,8,16,32 --json "$OUT/spec70b.json" ;;
    throughput70b) stage throughput70b python3 benchmarks/bench_throughput.py --shape llama-2-70b --gpu-memory 40GiB \
      --records 64 --sweep 16,24,64 --json "$OUT/throughput70b.json" ;;
    tests_multi) stage tests_multi python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py \
      -k "peer or tensor_parallel" ;;
    peer13b) stage peer13b python3 benchmarks/bench_offload.py --shape llama-2-13b --gpu-memory 8GiB \
      --runs peer --batch 1 --skip-accelerate --json "$OUT/peer13b.json" ;;
    tp13b_peers) stage tp13b_peers python3 benchmarks/bench_tp.py --shape llama-2-13b --gpu-memory 8GiB \
      --cpu-memory 60GiB --tp 2 --peer-memory cuda:2=60GiB --peer-memory cuda:3=60GiB --with-eager \
      --json "$OUT/tp13b_peers.json" ;;
    moe30b) stage moe30b python3 benchmarks/bench_offload.py --shape qwen3-30b-a3b --gpu-memory 8GiB \
      --runs "host,host direct" --batch 1,16 --skip-accelerate --json "$OUT/moe30b.json" ;;
    moe30b_resident) stage moe30b_resident python3 benchmarks/bench_offload.py --shape qwen3-30b-a3b \
      --runs "resident,resident copied" --batch 1,16 --skip-accelerate --json "$OUT/moe30b_resident.json" ;;
    moe30b_acc) stage moe30b_acc python3 benchmarks/bench_offload.py --shape qwen3-30b-a3b --gpu-memory 8GiB \
      --runs host --batch 1 --accelerate-tokens 2 --json "$OUT/moe30b_acc.json" ;;
    mixtral24_acc) stage mixtral24_acc python3 benchmarks/bench_offload.py --shape mixtral-8x7b --gpu-memory 24GiB \
      --runs host --batch 1 --accelerate-tokens 2 --json "$OUT/mixtral24_acc.json" ;;
    moehost) stage moehost bash -c 'python3 benchmarks/moe_host_time.py --profile
      python3 benchmarks/moe_host_time.py --direct-experts' ;;
    mixtral24) stage mixtral24 python3 benchmarks/bench_offload.py --shape mixtral-8x7b --gpu-memory 24GiB \
      --runs "host,host direct" --batch 1,16 --skip-accelerate --json "$OUT/mixtral24.json" ;;
    spec13b) stage spec13b python3 benchmarks/bench_speculative.py --shape llama-2-13b --gpu-memory 8GiB \
      --widths 1,2,4,8,16,32 --eager --json "$OUT/spec13b.json" ;;
    spec_smollm2) stage spec_smollm2 bash -c 'set -e; model=${SMOLLM2:-/tmp/smollm2.gguf}
        [ -f "$model" ] || cat .assets/smollm2/part-* > "$model"
        python3 benchmarks/gguf_to_hf.py "$model" /tmp/smollm2 --dtype bfloat16
        python3 scripts/quantize.py --model /tmp/smollm2 --quantize int4 --group-size 64 --out /tmp/smollm2-int4 \
            --device cuda
        for t in 0 0.8; do python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream \
            --cpu-memory 4GiB --temperature $t $([ $t = 0 ] && echo --eager) --drafts none,ngram,int4,/tmp/smollm2-int4,/tmp/smollm2-int4@4 \
            --json "$0/spec_smollm2_t$t.json"; done
        python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream --cpu-memory 4GiB \
            --drafts none,/tmp/smollm2-int4@4,ngram --draft-tokens 48 --widths 1,16,64 \
            --json "$0/spec_smollm2_deep.json"' "$OUT" ;;
    spec_smollm2_greedy) stage spec_smollm2_greedy bash -c 'set -e; smollm2_ready
        python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream --cpu-memory 4GiB \
            --widths 1,4,16 --drafts none,/tmp/smollm2-int4,/tmp/smollm2-int4@4,ngram \
            --json "$0/spec_smollm2_greedy.json"
        OFFLOAD_BEST_FIRST_TREES=1 python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream \
            --cpu-memory 4GiB --widths 1 --drafts none,/tmp/smollm2-int4@4 --json "$0/spec_smollm2_best_first.json"' \
        "$OUT" ;;
    spec_smollm2_chain|spec_smollm2_trace) stage $1 bash -c 'set -e; smollm2_ready
        for depth in "" 3; do [ "$1" = spec_smollm2_trace ] && set -- "$1" --profile --trace "$0/spec_trace$depth.json.gz"
            python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream --cpu-memory 4GiB \
            --widths 1 --drafts none,/tmp/smollm2-int4 ${depth:+--draft-tokens $depth} "${@:2}" \
            --json "$0/$1$depth.json"; done' "$OUT" "$1" ;;
    spec_smollm2_ahead) stage spec_smollm2_ahead bash -c 'set -e; smollm2_ready
        for ahead in 1 0; do for depth in "" 3; do echo "OFFLOAD_LOOK_AHEAD=$ahead ${depth:+--draft-tokens $depth}"
            OFFLOAD_LOOK_AHEAD=$ahead python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream \
            --cpu-memory 4GiB --widths 1 --drafts none,/tmp/smollm2-int4 ${depth:+--draft-tokens $depth} \
            --json "$0/spec_ahead$ahead$depth.json"; done; done' "$OUT" ;;
    spec_smollm2_spare) stage spec_smollm2_spare bash -c 'set -e; smollm2_ready
        for run in "8 1" "8 4" "8 8" "2 4"; do set -- $run; echo "OFFLOAD_SMALL_GEMV_ROWS=$1 int4 step, $2 rows"
            OFFLOAD_SMALL_GEMV_ROWS=$1 python3 benchmarks/profile_decode.py --shape smollm2-135m --prompts 128 \
            --new-tokens 32 --batch $2 --quantize int4; done
        for run in "3 4" "7 8" "1 4" "0 4" "3 4 3"; do set -- $run; echo "OFFLOAD_LOOK_AHEAD=$1 OFFLOAD_SMALL_GEMV_ROWS=$2 ${3:+--draft-tokens $3}"
            OFFLOAD_LOOK_AHEAD=$1 OFFLOAD_SMALL_GEMV_ROWS=$2 python3 benchmarks/bench_speculative.py --model /tmp/smollm2 \
            --gpu-memory stream --cpu-memory 4GiB --widths 1 --drafts none,/tmp/smollm2-int4 ${3:+--draft-tokens $3} \
            --json "$0/spec_spare$1$3.json"; done' "$OUT" ;;
    spec_smollm2_paced) stage spec_smollm2_paced bash -c 'set -e; smollm2_ready
        for run in "1" "0" "3" "1 3"; do set -- $run; echo "OFFLOAD_LOOK_AHEAD=$1 ${2:+--draft-tokens $2}"
            OFFLOAD_LOOK_AHEAD=$1 python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream \
            --cpu-memory 4GiB --widths 1 --drafts none,/tmp/smollm2-int4 ${2:+--draft-tokens $2} \
            --json "$0/spec_paced$1$2.json"; done' "$OUT" ;;
    spec_smollm2_int8) stage spec_smollm2_int8 bash -c 'set -e; smollm2_ready
        [ -d /tmp/smollm2-int8 ] || python3 scripts/quantize.py --model /tmp/smollm2 --quantize int8 \
            --out /tmp/smollm2-int8 --device cuda
        for depth in "" 6; do python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream \
            --cpu-memory 4GiB --widths 1 --drafts none,/tmp/smollm2-int4,/tmp/smollm2-int8 \
            ${depth:+--draft-tokens $depth} --json "$0/spec_int8$depth.json"; done' "$OUT" ;;
    spec_smollm2_int8_ahead) stage spec_smollm2_int8_ahead bash -c 'set -e; smollm2_ready
        [ -d /tmp/smollm2-int8 ] || python3 scripts/quantize.py --model /tmp/smollm2 --quantize int8 \
            --out /tmp/smollm2-int8 --device cuda
        run=0; for ahead in ${AHEADS:-1 0}; do echo "OFFLOAD_LOOK_AHEAD=$ahead"; run=$((run + 1))
            OFFLOAD_LOOK_AHEAD=$ahead python3 benchmarks/bench_speculative.py \
            --model /tmp/smollm2 --gpu-memory stream --cpu-memory 4GiB --widths 1 --drafts none,/tmp/smollm2-int8 \
            --draft-tokens 6 --max-new-tokens 128 --json "$0/spec_int8_ahead$ahead-$run.json"; done' "$OUT" ;;
    spec_smollm2_int8_trace) stage spec_smollm2_int8_trace bash -c 'set -e; smollm2_ready
        [ -d /tmp/smollm2-int8 ] || python3 scripts/quantize.py --model /tmp/smollm2 --quantize int8 \
            --out /tmp/smollm2-int8 --device cuda
        python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream --cpu-memory 4GiB \
            --widths 1 --drafts none,/tmp/smollm2-int8 --draft-tokens 6 --max-new-tokens 128 --profile \
            --trace "$0/spec_int8_trace.json.gz" --json "$0/spec_int8_trace.json"' "$OUT" ;;
    spec_smollm2_int8_trees) stage spec_smollm2_int8_trees bash -c 'set -e; smollm2_ready
        [ -d /tmp/smollm2-int8 ] || python3 scripts/quantize.py --model /tmp/smollm2 --quantize int8 \
            --out /tmp/smollm2-int8 --device cuda
        for depth in ${DEPTHS:-6 8}; do python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream \
            --cpu-memory 4GiB --widths 1 --drafts none,/tmp/smollm2-int8,/tmp/smollm2-int8@2 --draft-tokens $depth \
            --json "$0/spec_int8_trees$depth.json"; done
        OFFLOAD_BEST_FIRST_TREES=1 python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream \
            --cpu-memory 4GiB --widths 1 --drafts none,/tmp/smollm2-int8@4 --json "$0/spec_int8_best_first.json"' \
        "$OUT" ;;
    load13b_profile) stage load13b_profile bash -c 'set -e; trap "rm -rf /tmp/13b-int4" EXIT
        python3 benchmarks/bench_load.py --write int4 --shape llama-2-13b --out /tmp/13b-int4 --gpu-memory 4GiB \
            --cpu-memory 16GiB --against-map --profile 30 --json "$0/load13b_profile.json"' "$OUT" ;;
    load13b_ab) stage load13b_ab bash -c 'set -e; trap "rm -rf /tmp/13b-int4" EXIT
        OFFLOAD_READ_THREADS=4 python3 benchmarks/bench_load.py --write int4 --shape llama-2-13b --out /tmp/13b-int4 \
            --gpu-memory 4GiB --cpu-memory 16GiB --against-map --rounds 3 --json "$0/load13b_ab.json"' "$OUT" ;;
    load13b_readahead) stage load13b_readahead bash -c 'set -e; trap "rm -rf /tmp/13b-int4" EXIT
        for ahead in 1 0 1 0; do echo "OFFLOAD_READ_AHEAD=$ahead"; OFFLOAD_READ_AHEAD=$ahead python3 \
            benchmarks/bench_load.py $([ -d /tmp/13b-int4 ] && echo --model || echo --write int4 --shape llama-2-13b \
            --out) /tmp/13b-int4 --gpu-memory 4GiB --cpu-memory 16GiB --against-map \
            --json "$0/load13b_readahead$ahead.json"; done' "$OUT" ;;
    tests_reads) stage tests_reads python3 -m pytest -s -q -p no:cacheprovider tests/test_gguf.py tests/test_gpu.py \
      tests/test_checkpoint_reads.py \
      -k "sent_to_a_gpu or transformers or offloaded_equals_resident or stay_in_budget or reading_rows" ;;
    tests_whole) stage tests_whole python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py \
      -k "whole or ahead" ;;
    spec_host_whole) stage spec_host_whole bash -c 'for whole in 0 1; do echo "OFFLOAD_WHOLE_PASS=$whole"
        OFFLOAD_WHOLE_PASS=$whole python3 benchmarks/bench_speculative.py --shape smollm2-135m --gpu-memory stream \
        --cpu-memory 4GiB --widths 1,4 --json "$0/spec_host_whole$whole.json"; done' "$OUT" ;;
    spec_smollm2_whole) run_stage spec_host_whole
      stage spec_smollm2_whole bash -c 'set -e; smollm2_ready
        for run in "0" "1" "0 3" "1 3"; do set -- $run; echo "OFFLOAD_WHOLE_PASS=$1 ${2:+--draft-tokens $2}"
            OFFLOAD_WHOLE_PASS=$1 python3 benchmarks/bench_speculative.py --model /tmp/smollm2 --gpu-memory stream \
            --cpu-memory 4GiB --widths 1 --drafts none,/tmp/smollm2-int4 ${2:+--draft-tokens $2} \
            --json "$0/spec_whole$1$2.json"; done' "$OUT" ;;
    spec_host) stage spec_host bash -c 'for slots in 2 4; do python3 benchmarks/bench_speculative.py \
        --shape smollm2-135m --gpu-memory stream --cpu-memory 4GiB --widths 1,4,16 --slots $slots \
        --json "$0/spec_host$slots.json"; done' "$OUT" ;;
    load70b) stage load70b bash -c 'set -e; trap "rm -rf /tmp/70b-int4 /tmp/.70b-int4.*.partial" EXIT
        python3 benchmarks/bench_load.py --write int4 --shape llama-2-70b --out /tmp/70b-int4 --gpu-memory 24GiB \
            --cpu-memory 100GiB --against-map --json "$0/load70b.json"
        python3 benchmarks/bench_offload.py --model /tmp/70b-int4 --gpu-memory 24GiB --runs host --skip-accelerate \
            --batch 1,16 --json "$0/int4_70b_saved.json"' "$OUT" ;;
    gguf13b) stage gguf13b bash -c 'set -e; trap "rm -f /tmp/13b.gguf /tmp/.13b.gguf.*.partial" EXIT
        python3 benchmarks/bench_load.py --write gguf --shape llama-2-13b --out /tmp/13b.gguf --gpu-memory 4GiB \
            --cpu-memory 32GiB --json "$0/load_gguf13b.json"
        python3 benchmarks/bench_offload.py --model /tmp/13b.gguf --gpu-memory 4GiB --runs host --skip-accelerate \
            --batch 1,16 --json "$0/gguf13b.json"' "$OUT" ;;
    gguf_moe30b) stage gguf_moe30b bash -c 'set -e; trap "rm -f /tmp/30b.gguf /tmp/.30b.gguf.*.partial" EXIT
        python3 benchmarks/bench_load.py --write gguf --shape qwen3-30b-a3b --out /tmp/30b.gguf --gpu-memory 8GiB \
            --cpu-memory 40GiB --json "$0/load_gguf_moe30b.json"
        python3 benchmarks/bench_offload.py --model /tmp/30b.gguf --gpu-memory 8GiB --runs host --skip-accelerate \
            --batch 1 --json "$0/gguf_moe30b.json"
        python3 benchmarks/bench_offload.py --model /tmp/30b.gguf --gpu-memory 40GiB --runs resident \
            --skip-accelerate --batch 1,16 --json "$0/gguf_moe30b_resident.json"' "$OUT" ;;
    tests_likeliest) stage tests_likeliest python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k likeliest
      run_stage tests_spec ;;
    tests_spec) stage tests_spec bash -c 'python3 -m pytest -q -p no:cacheprovider tests/test_speculation.py \
      tests/test_verify_chunk.py tests/test_drafts.py tests/test_graphs.py; python3 -m pytest -m gpu -s -q \
      -p no:cacheprovider tests/test_gpu.py -k "verify or speculative or greedy_chain or ahead or whole"' ;;
    tests_experts) stage tests_experts python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py \
      -k "experts or probes" ;;
    tests_int4_16) stage tests_int4_16 python3 -m pytest -q -p no:cacheprovider --slow tests/test_direct_experts.py \
      tests/test_quant_kernels.py tests/test_gguf.py tests/test_gguf_moe.py -k "hopper or two_groups or past_a_row \
      or tiled_int4 or two_three or three_and_two or int4-16 or reference and int4" ;;
    tests_gguf_moe) stage tests_gguf_moe python3 -m pytest -q -p no:cacheprovider --slow tests/test_gguf_moe.py \
      tests/test_direct_experts.py -k "gguf or reference or hopper or experts" ;;
    tests_kernels) stage tests_kernels bash -c 'python3 -m pytest -s -q -p no:cacheprovider \
      tests/test_quant_kernels.py tests/test_kernels.py tests/test_direct_experts.py -m "gpu or not gpu"; \
      python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_gpu.py tests/test_quant.py -k "experts or quant"; \
      OFFLOAD_WORD_GEMV=1 python3 -m pytest -m gpu -s -q -p no:cacheprovider tests/test_quant.py' ;;  # words on
    single) for s in tests gemv offload13b resident7b prefill13b int4_70b serve13b throughput70b; do run_stage $s; done ;;
    multi) for s in tests_multi peer13b tp13b_peers; do run_stage $s; done ;;
    *) echo "unknown stage $1" >&2; exit 2 ;;
  esac
}

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpus.txt"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'accelerate', accelerate.__version__)" | tee "$OUT/versions.txt"
date -u | tee -a "$OUT/versions.txt"
for s in "${@:-single}"; do
  STAGE_SECONDS=0; [[ $s == *:* ]] && STAGE_SECONDS=${s#*:}
  run_stage "${s%%:*}"
done
