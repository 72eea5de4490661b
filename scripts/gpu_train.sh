#!/usr/bin/env bash
# One lent-GPU call: self-distillation data, then a time-boxed EAGLE-3 training run.
# Second of the two model calls in ../shared/GPU.md (carry .gpu2; scripts/gpu_model.sh). Under
# $OUT (at most 8 files come back): the best head (bf16 safetensors), the data shards
# (seqs-*.pt, while they fit), and run.tar (metrics, summary, plots, data recipe and prompts, the log).
#   GEN_PROMPTS=20000 GEN_SECONDS=150 TRAIN_SECONDS=330 INIT_FROM=specc/assets/draft/...safetensors \
#     bash scripts/gpu_train.sh
# Generation runs the uncompiled step from a CUDA graph at batch GEN_BATCH (no Inductor
# compile), falling back to the compiled engines if that fails. Training uses batches of
# TRAIN_BATCH_TOKENS padded tokens of similar-length sequences and fits its schedule to
# TRAIN_SECONDS (--fit-steps-to-time). With data already in ~/m/data (SKIP_GEN=1) generation
# is skipped; with INIT_FROM the run starts from that head's weights.
set -uo pipefail
export PYTHONUNBUFFERED=1
# training batches vary in width: let the allocator grow segments instead of fragmenting
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu_model.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
mkdir -p ~/m/run
gen() {
  timeout $(( ${GEN_SECONDS:-150} + 60 )) python3 -m specc.draft.cli --model "$GGUF" --seed "${GEN_SEED:-2}" --steps 0 \
    --generate-data "${GEN_PROMPTS:-20000}" --gen-batch-size "${GEN_BATCH:-256}" --max-new-tokens 256 \
    --gen-time-budget "${GEN_SECONDS:-150}" --data-dir ~/m/data --no-progress "$@"
}
{
  if [ -z "${SKIP_GEN:-}" ]; then
    gen --no-compile || { echo "uncompiled generation failed: compiled engines instead"; GEN_SECONDS=100 GEN_BATCH=64 gen; }
  fi
  timeout $(( ${TRAIN_SECONDS:-330} + 60 )) python3 -m specc.draft.cli --model "$GGUF" --kind eagle3 \
    --data-dir ~/m/data --out-dir ~/m/run --steps "${TRAIN_STEPS:-100000}" --time-budget "${TRAIN_SECONDS:-330}" \
    --fit-steps-to-time --resume --batch-tokens "${TRAIN_BATCH_TOKENS:-24576}" --max-len 768 --lr "${TRAIN_LR:-5e-4}" \
    --seed 0 --eval-every "${EVAL_EVERY:-200}" ${INIT_FROM:+--init-from "$INIT_FROM"} --no-progress
} 2>&1 | grep --line-buffered -v -i warn | tee ~/m/run/train.log | tail -40
cp ~/m/run/draft-best.safetensors "$OUT/" 2>/dev/null
# the data shards come back while they fit $OUT's 64 MiB (head, run.tar and three 12 MiB shards)
ls ~/m/data/seqs-*.pt 2>/dev/null | head -3 | xargs -r -I{} cp {} "$OUT/"
cp ~/m/data/recipe-*.json ~/m/data/prompts-*.jsonl ~/m/run/ 2>/dev/null
tar -C ~/m/run -cf "$OUT/run.tar" --exclude=ckpt --exclude=draft-best.safetensors . && ls -la "$OUT"
