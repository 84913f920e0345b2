#!/usr/bin/env bash
# Every GPU check and timing in one prepared run on one NVIDIA H100/H200:
#   bash benchmarks/gpu_suite.sh OUT [part...]      parts: parity train_step fused_loss load claim
# Needs the packages of setup.py importable and, for `claim`, the artefacts in $CBD_CACHE
# (python launch/fetch_assets.py). Each part has its own time limit; results land in OUT as
# JSON/PNG, and everything printed goes to OUT/gpu_suite.log.
set -uo pipefail
OUT=${1:?usage: gpu_suite.sh OUT [part...]}
shift
PARTS=${*:-parity train_step fused_loss load claim}
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
run() {  # run NAME SECONDS CMD...
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  echo "=== $name rc=${PIPESTATUS[0]} $((SECONDS - t0))s" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$LOG"
for part in $PARTS; do
  case $part in
    parity) run parity 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -x -p no:cacheprovider \
              tests/test_model.py -k "logits_match or bf16" ;;
    train_step) run train_step 200 python3 benchmarks/bench_train_step.py --gpu --batch 16 \
                  --microbatches 1 --chunk 8192
                cp benchmarks/results/train_step_gpu.json "$OUT/"
                run train_step_7b 240 python3 benchmarks/bench_train_step.py --gpu --link 1.5b \
                  --batch 8 --microbatches 1 --remat --chunk 8192 --timeout 230
                cp benchmarks/results/train_step_gpu_7b.json "$OUT/" ;;
    # The naive baseline's [tokens, 151936] fp32 logits (and their copies) bound the token count.
    fused_loss) run fused_loss 150 python3 benchmarks/bench_fused_loss.py --tokens 16384 \
                  --chunk-size 1024 --dtype bfloat16 --repeats 3 --out "$OUT/fused_loss_gpu.json" ;;
    load) run load 90 python3 benchmarks/bench_load.py --dir /tmp/cbd_load \
            --out "$OUT/load_gpu.json" ;;
    claim) run claim 420 python3 benchmarks/bench_cbd_claim.py --preset gpu --build \
             --chain /tmp/cbd_claim_chain --out "$OUT" ;;
    *) echo "unknown part $part" | tee -a "$LOG" ;;
  esac
done
