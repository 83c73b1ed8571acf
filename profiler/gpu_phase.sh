#!/usr/bin/env bash
# Runs one phase of the profiling inside a 10-minute device command (docs/gpu/fp8-h200.md, profiler/SWEEPS.md).
#   bash profiler/gpu_phase.sh diffusers|llm|vlm|fp8-llm|fp8-vlm|fp8-dit|rest [models...]
# The GPU is named by $GPU (h100, h200), else read from nvidia-smi. Tables are written straight
# under $OUT/p/$GPU/ point by point, so whatever finished comes back even if the command is
# killed; the log goes to $OUT/log_<phase>.txt. DRY_RUN=1: list the points, measure nothing. A sweep resumes from the tables committed under
# traces/profiles/$GPU/ (it skips the points they hold).
set -uo pipefail
PHASE=$1; shift || true
T0=$(date +%s)
LIMIT=${LIMIT_S:-565}          # seconds this phase may use in all
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD VLLM_ENABLE_V1_MULTIPROCESSING=0
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ -z "${GPU:-}" ]; then
  case "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)" in
    *H200*) GPU=h200 ;; *H100*) GPU=h100 ;;
    *) echo "[phase] cannot tell the GPU from nvidia-smi: set GPU=h100|h200" >&2; exit 2 ;;
  esac
fi
OUTD=${OUT:-/tmp/out}; mkdir -p "$OUTD/p/$GPU"
LOG="$OUTD/log_$PHASE.txt"
echo "[phase] gpu=$GPU phase=$PHASE" | tee -a "$LOG"
cp -n traces/profiles/$GPU/*.parquet "$OUTD/p/$GPU/" 2>/dev/null || true
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
# run <share of what is left, in %> <min seconds> <args...>: a sweep with a budget in minutes
run() {
  local share=$1 floor=$2; shift 2
  local l; l=$(left); local b=$(( l * share / 100 )); [ $b -lt $floor ] && b=$floor
  [ $b -gt $(( l - 15 )) ] && b=$(( l - 15 ))
  if [ $b -lt 20 ]; then echo "[phase] no time left for: $*" | tee -a "$LOG"; return; fi
  echo "[phase] $(date -u +%T) budget ${b}s: $*" | tee -a "$LOG"
  timeout $(( b + 40 )) python3 -m profiler "$@" gpu=$GPU out_dir="$OUTD/p" max_minutes=$(awk "BEGIN{printf \"%.2f\", $b/60}") ${DRY_RUN:+dry_run=true} 2>&1 | tee -a "$LOG"
}
VLGRID=("grid.decode_context=[16,128,1024,4096,16384]" "grid.decode_batch=[1,4,16,64,256]" "grid.prefill_context=[8192]")
nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm --format=csv 2>&1 | tee -a "$LOG" || true
case $PHASE in
  diffusers)
    echo "[phase] $(date -u +%T) flux e2e" | tee -a "$LOG"
    [ -n "${DRY_RUN:-}" ] || timeout 150 python3 -m profiler e2e e2e.out="$OUTD/diffusers_flux_e2e.json" e2e.repeats=1 2>&1 | tee -a "$LOG"
    run 45 60 sweep model=qwen_image backend=diffusers warmup=1 max_point_seconds=2.5
    run 70 60 sweep model=flux1_dev backend=diffusers warmup=1 max_point_seconds=2.5
    run 100 30 sweep model=sd3_5_medium backend=diffusers warmup=1 max_point_seconds=2.5
    ;;
  llm)
    run 100 60 sweep model=qwen2_5_7b backend=vllm
    ;;
  vlm)
    run 45 60 sweep model=llama2_7b backend=vllm
    run 100 60 sweep model=qwen2_5_vl_7b backend=vllm "${VLGRID[@]}"
    ;;
  fp8-vlm)       # the default mix's VLM / condition encoder in FP8 (weights; then + FP8 KV cache)
    run 100 60 sweep model=qwen2_5_vl_7b@${PREC:-fp8} backend=vllm "${VLGRID[@]}"
    ;;
  fp8-llm)
    run 100 60 sweep model=qwen2_5_7b@${PREC:-fp8} backend=vllm
    ;;
  fp8-dit)       # the default mix's DiT with FP8 linear layers (torchao if installed, else builtin)
    run 100 60 sweep model=qwen_image@fp8 backend=diffusers warmup=1 max_point_seconds=2.5
    ;;
  rest)   # resume whatever is missing (each sweep skips finished points)
    for m in "$@"; do              # backend=auto: the engine of the model's family
      if [ "${m%@*}" = qwen2_5_vl_7b ]; then run 100 30 sweep model=$m backend=vllm "${VLGRID[@]}"
      else run 100 30 sweep model=$m backend=auto; fi
    done
    ;;
  *) echo "[phase] unknown phase $PHASE; allowed: diffusers llm vlm fp8-vlm fp8-llm fp8-dit rest" >&2; exit 2 ;;
esac
echo "[phase] $(date -u +%T) done in $(( $(date +%s) - T0 ))s" | tee -a "$LOG"
ls -la "$OUTD" "$OUTD/p"/* 2>/dev/null | tee -a "$LOG"
