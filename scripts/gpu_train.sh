#!/usr/bin/env bash
# One lent-GPU call: self-distillation data, then a time-boxed EAGLE-3 training run.
# Second of the two model calls in ../shared/GPU.md (carry .gpu2). Outputs under $OUT:
# the best head (bf16 safetensors), metrics, summary, plots, the dataset as one tar, the log.
#   GEN_SECONDS=180 TRAIN_SECONDS=170 bash scripts/gpu_train.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GGUF=~/m/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$GGUF" ] || cat ~/m/model.part1 .gpu2/model.part2 > "$GGUF"
python3 -m pip install -q --no-index --no-deps --target ~/site .gpu2/gguf-*.whl 2>/dev/null
export PYTHONPATH=~/site SPECC_CACHE=~/m
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
{
  python3 -m specc.draft.cli --model "$GGUF" --seed 0 --steps 0 --generate-data 8000 --gen-batch-size 64 \
    --max-new-tokens 256 --gen-time-budget "${GEN_SECONDS:-180}" --data-dir ~/m/data --no-progress
  python3 -m specc.draft.cli --model "$GGUF" --kind eagle3 --data-dir ~/m/data --out-dir ~/m/run \
    --steps "${TRAIN_STEPS:-1500}" --time-budget "${TRAIN_SECONDS:-170}" --resume --batch-size 16 --max-len 768 \
    --lr 5e-4 --seed 0 --eval-every 250 --no-progress
} 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/train.log" | tail -25
cp ~/m/run/draft-best.safetensors ~/m/run/metrics.jsonl ~/m/run/summary.json "$OUT/" 2>/dev/null
cp ~/m/run/*.png "$OUT/" 2>/dev/null
tar -C ~/m -cf "$OUT/data.tar" data && ls -la "$OUT"
