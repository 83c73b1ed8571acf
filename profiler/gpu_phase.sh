#!/usr/bin/env bash
# Runs one phase of the H100 profiling inside a 10-minute device command (see SWEEPS.md).
#   bash profiler/gpu_phase.sh diffusers|llm|vlm|rest
# Tables are written straight under $OUT/p/h100/ point by point, so whatever finished comes
# back even if the command is killed; the log goes to $OUT/log_<phase>.txt.
set -uo pipefail
PHASE=$1
T0=$(date +%s)
LIMIT=${LIMIT_S:-565}          # seconds this phase may use in all
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD/p"
LOG="$OUTD/log_$PHASE.txt"
# resume: start from the tables already committed (a sweep skips the points they hold)
mkdir -p "$OUTD/p/h100"; cp -n traces/profiles/h100/*.parquet "$OUTD/p/h100/" 2>/dev/null || true
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
# run <share of what is left, in %> <min seconds> <args...>: a sweep with a budget in minutes
run() {
  local share=$1 floor=$2; shift 2
  local l; l=$(left); local b=$(( l * share / 100 )); [ $b -lt $floor ] && b=$floor
  [ $b -gt $(( l - 15 )) ] && b=$(( l - 15 ))
  if [ $b -lt 20 ]; then echo "[phase] no time left for: $*" | tee -a "$LOG"; return; fi
  echo "[phase] $(date -u +%T) budget ${b}s: $*" | tee -a "$LOG"
  timeout $(( b + 40 )) python3 -m profiler "$@" out_dir="$OUTD/p" max_minutes=$(awk "BEGIN{printf \"%.2f\", $b/60}") 2>&1 | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv | tee -a "$LOG"
case $PHASE in
  diffusers)
    echo "[phase] $(date -u +%T) flux e2e" | tee -a "$LOG"
    timeout 150 python3 -m profiler e2e e2e.out="$OUTD/diffusers_flux_e2e.json" e2e.repeats=1 2>&1 | tee -a "$LOG"
    run 45 60 sweep model=qwen_image backend=diffusers warmup=1 max_point_seconds=2.5
    run 70 60 sweep model=flux1_dev backend=diffusers warmup=1 max_point_seconds=2.5
    run 100 30 sweep model=sd3_5_medium backend=diffusers warmup=1 max_point_seconds=2.5
    ;;
  llm)
    run 100 60 sweep model=qwen2_5_7b backend=vllm
    ;;
  vlm)
    run 45 60 sweep model=llama2_7b backend=vllm
    run 100 60 sweep model=qwen2_5_vl_7b backend=vllm 'grid.decode_context=[16,128,1024,4096,16384]' 'grid.decode_batch=[1,4,16,64,256]' 'grid.prefill_context=[8192]'
    ;;
  rest)   # resume whatever is missing (each sweep skips finished points)
    shift; for m in "$@"; do run 100 30 sweep model=$m; done   # backend=auto: by the model's family
    ;;
esac
echo "[phase] $(date -u +%T) done in $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
ls -la "$OUTD" "$OUTD/p"/* 2>/dev/null | tee -a "$LOG"
