#!/usr/bin/env bash
# One lent-GPU call: self-distillation data, then a time-boxed EAGLE-3 training run.
# The last of the model calls (carry .gpu2; scripts/split_model_xz.sh says the calls before it). Under
# $OUT (at most 8 files come back): the best head (bf16 safetensors), the data shards
# (seqs-*.pt, while they fit), and run.tar (metrics, summary, plots, data recipe and prompts, the log).
#   GEN_PROMPTS=20000 GEN_SECONDS=150 TRAIN_SECONDS=330 INIT_FROM=specc/assets/draft/...safetensors \
#     bash scripts/gpu_train.sh
# Generation runs the uncompiled step from a CUDA graph at batch GEN_BATCH (no Inductor
# compile), falling back to the compiled engines if that fails. Training uses batches of
# TRAIN_BATCH_TOKENS padded tokens of similar-length sequences and fits its schedule to
# TRAIN_SECONDS (--fit-steps-to-time). With data already in ~/m/data (SKIP_GEN=1) generation
# is skipped; with INIT_FROM the run starts from that head's weights. RUN_DIR (default ~/m/run)
# holds the run, so a second call on the warm machine can train on from the first call's head
# into a fresh run (RUN_DIR=~/m/run2 SKIP_GEN=1 INIT_FROM=~/m/run/draft-best.safetensors).
# NO_SHARDS=1 keeps the data shards off $OUT. The head under $OUT carries the data's token
# counts and a default draft vocabulary of DRAFT_VOCAB tokens (16384; 0: the whole vocabulary).
# TUNE=1 then runs `specc tune-tree` for the new head within that draft vocabulary, on the GPU in
# fp32 (seed tasks and GSM8K, as specc/assets/trees was tuned), into $OUT/tuning.json. The head
# (and tuning.json) are also left in ~/m/stage for a follow-up call (gpu_run.sh's STAGE_FROM).
set -uo pipefail
export PYTHONUNBUFFERED=1
# training batches vary in width: let the allocator grow segments instead of fragmenting
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu_model.sh
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
RUN_DIR=${RUN_DIR:-$HOME/m/run}
mkdir -p "$RUN_DIR"
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
    --data-dir ~/m/data --out-dir "$RUN_DIR" --steps "${TRAIN_STEPS:-100000}" --time-budget "${TRAIN_SECONDS:-330}" \
    --fit-steps-to-time --resume --batch-tokens "${TRAIN_BATCH_TOKENS:-24576}" --max-len 768 --lr "${TRAIN_LR:-5e-4}" \
    --seed 0 --eval-every "${EVAL_EVERY:-200}" ${INIT_FROM:+--init-from "$INIT_FROM"} --no-progress
} 2>&1 | grep --line-buffered -v -i warn | tee "$RUN_DIR/train.log" | tail -40
# the head comes back with its data's token counts and a default draft vocabulary (DRAFT_VOCAB, 0: all)
specc draft-vocab --draft "$RUN_DIR/draft-best.safetensors" --data-dir ~/m/data --size "${DRAFT_VOCAB:-16384}" \
  --out "$OUT/draft-best.safetensors" 2>&1 | tail -3 || cp "$RUN_DIR/draft-best.safetensors" "$OUT/" 2>/dev/null
# the data shards come back while they fit $OUT's 64 MiB (head, run.tar and three 12 MiB shards)
[ -z "${NO_SHARDS:-}" ] && ls ~/m/data/seqs-*.pt 2>/dev/null | head -3 | xargs -r -I{} cp {} "$OUT/"
cp ~/m/data/recipe-*.json ~/m/data/prompts-*.jsonl "$RUN_DIR/" 2>/dev/null
# a later call on the warm machine benches this head: STAGE_FROM=~/m/stage bash scripts/gpu_run.sh spec
rm -rf ~/m/stage && mkdir -p ~/m/stage && cp "$OUT/draft-best.safetensors" ~/m/stage/ 2>/dev/null  # no stale tuning.json from an earlier call
if [ -n "${TUNE:-}" ] && [ -f "$OUT/draft-best.safetensors" ]; then
  DRAFT="$OUT/draft-best.safetensors" OUT="$OUT" bash scripts/gpu_run.sh tune 2>&1 | tee "$RUN_DIR/tune.log"
  cp "$OUT/tuning.json" ~/m/stage/ 2>/dev/null
fi
tar -C "$RUN_DIR" -cf "$OUT/run.tar" --exclude=ckpt --exclude=draft-best.safetensors . && ls -la "$OUT"
