#!/usr/bin/env bash
# One lent-GPU call: self-distillation data, then a time-boxed EAGLE-3 training run.
# Second of the two model calls in ../shared/GPU.md (carry .gpu2). Under $OUT (at most 8
# files come back): the best head (bf16 safetensors), the data shards (seqs-*.pt), and
# run.tar (metrics, summary, plots, data recipe and prompts, the log).
#   GEN_PROMPTS=6000 GEN_SECONDS=240 TRAIN_SECONDS=250 TRAIN_STEPS=2000 bash scripts/gpu_train.sh
# With INIT_FROM=path/to/head.safetensors the run starts from that head's weights; with data
# already in ~/m/data (SKIP_GEN=1) generation is skipped.
set -uo pipefail
export PYTHONUNBUFFERED=1
# training batches vary in width: let the allocator grow segments instead of fragmenting
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GGUF=~/m/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] || cat ~/m/model.part1 .gpu2/model.part2 > "$GGUF"
python3 -m pip install -q --no-index --no-deps --target ~/site .gpu2/gguf-*.whl 2>/dev/null
export PYTHONPATH=~/site SPECC_CACHE=~/m
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
mkdir -p ~/m/run
{
  if [ -z "${SKIP_GEN:-}" ]; then
    timeout $(( ${GEN_SECONDS:-240} + 120 )) python3 -m specc.draft.cli --model "$GGUF" --seed 0 --steps 0 \
      --generate-data "${GEN_PROMPTS:-6000}" --gen-batch-size 64 --max-new-tokens 256 \
      --gen-time-budget "${GEN_SECONDS:-240}" --data-dir ~/m/data --no-progress
  fi
  timeout $(( ${TRAIN_SECONDS:-250} + 90 )) python3 -m specc.draft.cli --model "$GGUF" --kind eagle3 \
    --data-dir ~/m/data --out-dir ~/m/run --steps "${TRAIN_STEPS:-2000}" --time-budget "${TRAIN_SECONDS:-250}" \
    --resume --batch-size "${TRAIN_BATCH:-16}" --max-len 768 --lr "${TRAIN_LR:-5e-4}" --seed 0 --eval-every 250 \
    ${INIT_FROM:+--init-from "$INIT_FROM"} --no-progress
} 2>&1 | grep --line-buffered -v -i warn | tee ~/m/run/train.log | tail -40
cp ~/m/run/draft-best.safetensors "$OUT/" 2>/dev/null
cp ~/m/data/seqs-*.pt "$OUT/" 2>/dev/null
cp ~/m/data/recipe-*.json ~/m/data/prompts-*.jsonl ~/m/run/ 2>/dev/null
tar -C ~/m/run -cf "$OUT/run.tar" --exclude=ckpt --exclude=draft-best.safetensors . && ls -la "$OUT"
