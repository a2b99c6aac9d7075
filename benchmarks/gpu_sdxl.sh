#!/usr/bin/env bash
# One prepared GPU check at SDXL scale on one H100 (or H200): under 7 minutes wall time with the
# wheel install and every model build. From the repository root, the wheels in .whl/ (the device
# tool: carry [".whl"]):  bash benchmarks/gpu_sdxl.sh
# Figures in $OUT (default ./gpu_sdxl_out): results.jsonl (one JSON per measurement), gpu_sdxl.md
# (the tables), gpu_sdxl.log (everything printed), profile_512_opt.txt (top kernels), flops.log.
#
# Phases, each a process with its own limit (a failure or OOM in one leaves the others' numbers;
# each python phase stops itself before its --budget, and every phase is cut at its limit):
#   flops     CPU, in the background: the iteration's FLOPs per sample on meta tensors (for MFU;
#             counting on the GPU beside ZeRO-2 ran out of memory)
#   gen       UNet fwd+bwd NCHW vs channels-last; AdamW foreach vs fused; 1-/4-step generation
#             at 1024²: eager autocast (the old path) vs bf16 without autocast vs CUDA graphs
#   512_base  training at 512², batch 4, the config defaults (DeepSpeed ZeRO-2, one rank, bf16)
#   512_opt   the same with optim.fused and pool.fused on (and train.channels_last if gen measured
#             a gain), then one profiled iteration
#   1024_opt  the optimised settings at 1024², the largest batch that fits memory and time
#   compiled  torch.compile generation, only if >= 110 s are left (GPU_SDXL_DEADLINE=580 makes
#             room for it)
# Plan: install ~15 s, gen <= 80 s, 512_base <= 100 s, 512_opt <= 100 s, 1024_opt <= 140 s, report:
# about 7 minutes before the deadline trims it (512_base overran 70 s on the H100); each phase takes 20 timed iterations or as many as fit its budget (the old
# numbers: 2.0 s per 512² batch-4 and 2.2 s per 1024² batch-1 iteration). A deadline of 405 s
# from the start (GPU_SDXL_DEADLINE) shortens or skips whatever would run past it.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1

DEADLINE=${GPU_SDXL_DEADLINE:-405}  # seconds from the start of this script (bash's SECONDS)
OUT=${OUT:-$PWD/gpu_sdxl_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_sdxl.log
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True NITRO_CACHE=/tmp/nitro_cache
export WANDB_MODE=disabled
# GPU_SDXL_SMOKE=1: the tiny look-alike on the CPU at 1/8 the resolution (checks this script)
SMOKE= R1=512 R2=1024
if [ -n "${GPU_SDXL_SMOKE:-}" ]; then SMOKE=--smoke R1=64 R2=128; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
echo "plan: install ${SECONDS}s + gen <= 80 s + 512_base <= 70 s + 512_opt <= 75 s + 1024_opt <= 140 s" \
  "+ report ~5 s: about 6.3 min; deadline ${DEADLINE}s" | tee -a "$LOG"

# GPU_SDXL_PHASES="512_base 1024_opt ...": run only those phases (default: all)
want() { [ -z "${GPU_SDXL_PHASES:-}" ] || [[ " $GPU_SDXL_PHASES " == *" $1 "* ]]; }

# phase NAME LIMIT_S SCRIPT ARGS...: runs under min(LIMIT, time to the deadline - 10 s)
phase() {
  local name=$1 limit=$2 script=$3; shift 3
  local start=$SECONDS left rc
  if ! want "$name"; then return; fi
  left=$((DEADLINE - SECONDS - 10))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 30 ]; then
    echo "=== $name skipped: ${left}s left before the deadline" | tee -a "$LOG"
    return
  fi
  echo "=== $name (limit ${limit}s) at +${SECONDS}s" | tee -a "$LOG"
  timeout -k 5 "$limit" python3 "benchmarks/$script" "$@" $SMOKE --out "$OUT" --budget $((limit - 8)) \
    2>&1 | grep --line-buffered -v -e "Setting accelerator" -e "^\s*warnings.warn" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - start))s (+${SECONDS}s)" | tee -a "$LOG"
}

FLOPS_PID=
if want flops; then
  CUDA_VISIBLE_DEVICES= timeout 300 python3 benchmarks/gpu_sdxl.py flops $SMOKE --out "$OUT" \
    --resolutions $R1 $R2 > "$OUT/flops.log" 2>&1 &
  FLOPS_PID=$!
fi

phase gen 80 gpu_sdxl_gen.py --tag gen
phase 512_base 100 gpu_sdxl.py train --resolution $R1 --batch 4 --settings base --tag 512_base
phase 512_opt 100 gpu_sdxl.py train --resolution $R1 --batch 4 --settings opt --profile --tag 512_opt
phase 1024_opt 140 gpu_sdxl.py train --resolution $R2 --batch 1 --settings opt \
  --then-batch auto --skip-first --max-batch 8 --tag 1024_opt
# Compiled training only when named: GPU_SDXL_PHASES="... 512_compile" (inductor compiles the
# SDXL UNet's forward and backward for minutes before the first timed iteration)
if [[ " ${GPU_SDXL_PHASES:-} " == *" 512_compile "* ]]; then
  phase 512_compile 280 gpu_sdxl.py train --resolution $R1 --batch 4 --settings compiled \
    --warmup 3 --tag 512_compile
fi
if ! want compiled; then
  :
elif [ $((DEADLINE - SECONDS)) -ge 110 ]; then
  phase compiled 200 gpu_sdxl_gen.py --variants eager_bf16 compiled --no-components --tag compile
else
  echo "=== compiled generation skipped: $((DEADLINE - SECONDS))s left" | tee -a "$LOG"
fi

if [ -n "$FLOPS_PID" ]; then
  wait "$FLOPS_PID" 2>/dev/null
  grep RESULT "$OUT/flops.log" | tee -a "$LOG"
fi
timeout 30 python3 benchmarks/gpu_sdxl_report.py --out "$OUT" | tee -a "$LOG"
echo "gpu_sdxl.sh: ${SECONDS}s in all" | tee -a "$LOG"
