#!/usr/bin/env bash
# The claim benchmark (benchmarks/bench_cbd_claim.py --preset gpu) on one GPU machine that has no
# network and takes at most 64 MiB of files per call. The teacher GGUF alone is 98 MB, so the
# offline bundle travels in two halves, each under that limit:
#
#   bash benchmarks/claim_gpu.sh pack          # here: writes .gpu_a/ and .gpu_b/ (git-ignored)
#   first call,  carrying .gpu_a:  true        # the first half stays on the warm machine
#   second call, carrying .gpu_b:  bash benchmarks/claim_gpu.sh run "$OUT"
#
# "run" installs the few packages the GPU image lacks (wheels in .gpu_a/whl), puts the teacher and
# the text where cbd_jax.checkpoints.assets looks ($CBD_CACHE), builds a small chain and compares the methods
# (about 5 minutes on an H100/H200); it writes cbd_claim.json and cbd_claim.png to the folder given.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
WHEELS="datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ml_collections==1.1.0 gguf==0.19.0"

pack() {
  local cache="${CBD_CACHE:-$HOME/.cache/cbd-jax}"
  python launch/fetch_assets.py > /dev/null
  rm -rf .gpu_a .gpu_b
  mkdir -p .gpu_a/cache/text .gpu_a/whl .gpu_b
  cp "$cache"/text/wiki_train.txt "$cache"/text/news_heldout.txt .gpu_a/cache/text/
  cp -r "$cache"/gpt2_tokenizer .gpu_a/cache/
  local half=$(( ($(stat -c %s "$cache/smollm2/$GGUF") + 1) / 2 ))
  split -b "$half" -d "$cache/smollm2/$GGUF" .gpu_a/gguf_part_
  mv .gpu_a/gguf_part_01 .gpu_b/
  # shellcheck disable=SC2086
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 -d .gpu_a/whl $WHEELS
  du -sh .gpu_a .gpu_b
}

run() {
  local out="${1:?give the output folder}"
  for f in .gpu_a/gguf_part_00 .gpu_b/gguf_part_01; do
    [ -f "$f" ] || { echo "error: $f missing; run 'pack' here and carry .gpu_a, then .gpu_b" >&2
                     exit 2; }
  done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu_a/whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" CBD_CACHE=/tmp/cbd-cache HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
  mkdir -p "$CBD_CACHE/smollm2"
  cp -r .gpu_a/cache/. "$CBD_CACHE/"
  cat .gpu_a/gguf_part_00 .gpu_b/gguf_part_01 > "$CBD_CACHE/smollm2/$GGUF"
  nvidia-smi -L || true
  python3 benchmarks/bench_cbd_claim.py --preset gpu --build --out "$out"
}

case "${1:-}" in
  pack) pack ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 pack | run OUT_DIR" >&2; exit 2 ;;
esac
