#!/usr/bin/env bash
# One lent-GPU call: install specc, run the GPU tests, the real-model checks and benchmarks.
# Usage (the last of the model calls: carry .gpu2; scripts/split_model_xz.sh says the calls before it):
#   bash scripts/gpu_run.sh [tests] [checks] [sampling_smoke] [plain] [spec] [sampling] [systems] [gap] [step_diff] [profile] [attention] [step_parts] [variants] [rotary] [draftfuse] [linear_bench] [topk_bench] [kv_bench] [kvw_bench] [step_variants] [tune] ...
# step_variants: VARIANT_ARGS="before after --dump after" (scripts/step_variants.py: profiles of code variants side by side).
# STAGE_FROM=~/m/stage runs them with the head gpu_train.sh left there.
# DRAFT=path measures another head than the shipped one (spec, sampling); UNTRAINED_PROMPTS=0
# skips the untrained-head rows of spec; SPEC_ARGS adds options (e.g. "--batch-sizes 8,32"). TAG=_x suffixes the gap, step_diff, systems, profile and step_parts files; STEP_PARTS_ARGS for step_parts (e.g. "--parts attention").
# PROFILE_ARGS='--trees eagle;dynamic:8,8,64 --steps 50' for profile (no inner quotes: the value is split on spaces).
# variants: VARIANTS="none split merge" (results/2026-12-03b_h200/variant_spec.py: this code and each kernel change undone, side by side).
# rotary: VARIANTS="unfused rotary" (results/2026-12-03c_h200/variant_spec.py: SPECC_FUSE_ROTARY=0, then the default, side by side).
# draftfuse: VARIANTS="unfused fused fold" (results/2026-12-03d_h200/variant_spec.py: SPECC_FUSE_DRAFT_LINEAR=0 (the default), =1, and =1 with the folded attention merge).
# topk_bench: scripts/topk_bench.py (specc::topk's stage-1 chunk, warps and key width at the step's shapes).
# kv_bench: scripts/kv_write_attention_bench.py (specc::kv_write_attention's one launch against kv_write + tree_attention).
# kvw_bench: scripts/kv_write_bench.py (kv_write's launch settings; q's rotation inside tree attention).
# linear_bench: scripts/fused_linear_bench.py (specc::fused_linear against Inductor + cuBLAS at the draft's shapes).
# checks: CHECKS_CONFIGS="fp32:eagle;fp32:dynamic:8,8,64" (dtype:tree;...), CHECKS_TOKENS=128.
# Everything lands under $OUT; the last lines printed are a short table.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu_model.sh
# STAGE_FROM=~/m/stage: measure the head (and trees, if tuned) that gpu_train.sh left on this warm
# machine, in place of the shipped ones (the checkout here is a copy; nothing goes back)
if [ -n "${STAGE_FROM:-}" ]; then
  cp "$STAGE_FROM/draft-best.safetensors" specc/assets/draft/smollm2-135m-instruct-eagle3.safetensors || exit 1
  [ -f "$STAGE_FROM/tuning.json" ] && cp "$STAGE_FROM/tuning.json" specc/assets/trees/smollm2-135m-instruct-eagle3.json
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for job in "$@"; do
  case "$job" in
    tests)  python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    checks) python3 -c "from specc.bench.gpu_checks import DEFAULT_CONFIGS, run; run(draft_path='${DRAFT:-}' or None, out='$OUT/gpu_checks.json', configs='${CHECKS_CONFIGS:-}' or DEFAULT_CONFIGS, max_new_tokens=${CHECKS_TOKENS:-64})" 2>&1 | tee "$OUT/gpu_checks.log" | tail -25 ;;
    sampling_smoke) python3 -c "import json; from specc.bench.gpu_checks import sampling_smoke; json.dump(sampling_smoke(), open('$OUT/sampling_smoke.json', 'w'), indent=1)" 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/sampling.log" | tail -8 ;;
    plain)  specc bench plain --out "$OUT/plain.json" 2>&1 | tee "$OUT/plain.log" | tail -12 ;;
    spec)   specc bench spec --out "$OUT/spec.json" --plots "$OUT" --trees "${TREES:-tuned-chat:64,4;dynamic:8,8,64;eagle;chain:6}" \
              ${DRAFT:+--draft "$DRAFT"} $( [ "${UNTRAINED_PROMPTS:-16}" -gt 0 ] && echo --untrained --untrained-prompts "${UNTRAINED_PROMPTS:-16}" ) \
              --hf-prompts "${HF_PROMPTS:-4}" --max-new-tokens 256 ${SPEC_ARGS:-} 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/spec.log" | tail -30 ;;
    sampling) specc bench sampling --out "$OUT/sampling.json" ${DRAFT:+--draft "$DRAFT"} ${SAMPLING_ARGS:-} 2>&1 | grep --line-buffered -v -i warn \
              | tee "$OUT/sampling.log" | tail -12 ;;
    systems) specc bench systems --out "$OUT/systems${TAG:-}.json" --plots "$OUT${TAG:+/plots$TAG}" ${SYSTEMS_ARGS:-} 2>&1 \
              | grep --line-buffered -v -i warn | tee "$OUT/systems${TAG:-}.log" | tail -40 ;;
    gap)    specc bench gap --out "$OUT/gap${TAG:-}.json" --plot "$OUT/gap${TAG:-}.png" ${DRAFT:+--draft "$DRAFT"} ${GAP_ARGS:-} 2>&1 \
              | grep --line-buffered -v -i warn | tee "$OUT/gap${TAG:-}.log" | tail -12 ;;
    step_diff) specc bench step-diff --out "$OUT/step_diff${TAG:-}.json" ${DRAFT:+--draft "$DRAFT"} ${STEP_DIFF_ARGS:---b triton,triton_graph,compiled,compiled_graph} 2>&1 \
              | grep --line-buffered -v -i warn | tee "$OUT/step_diff${TAG:-}.log" | grep --line-buffered -E "^(---|accept)" ;;
    profile) specc bench profile --out "$OUT/profile${TAG:-}.json" --plot "$OUT/profile${TAG:-}.png" ${DRAFT:+--draft "$DRAFT"} ${PROFILE_ARGS:-} 2>&1 \
              | grep --line-buffered -v -i warn | tee "$OUT/profile${TAG:-}.log" | tail -45 ;;
    tune)   for source in seed-tasks:96 gsm8k:48; do  # the head's trees (DRAFT, else the shipped or staged one), as specc/assets/trees was tuned
              specc tune-tree --model "$GGUF" ${DRAFT:+--draft "$DRAFT"} --device cuda --dtype fp32 --prompts "${source%%:*}" --n-prompts "${source##*:}" \
                --max-new-tokens 192 --batch-size 48 --nodes 64 --depths 8 --out ~/m/tune-${source%%:*}.json \
                --save-ranks ~/m/ranks-${source%%:*}.pt 2>&1 | tail -3
            done
            specc tune-tree --from-ranks ~/m/ranks-seed-tasks.pt --from-ranks ~/m/ranks-gsm8k.pt --nodes 8,12,16,25,32,48,64 \
              --depths 3,4,5,6,7,8 --out "$OUT/tuning.json" 2>&1 | tail -20 ;;
    variants) python3 results/2026-12-03b_h200/variant_spec.py "$OUT" ${VARIANTS:-none split merge} 2>&1 | grep --line-buffered -v -i warn \
              | tee "$OUT/variants.log" | tail -30 ;;
    rotary)  python3 results/2026-12-03c_h200/variant_spec.py "$OUT" ${VARIANTS:-unfused rotary} 2>&1 | grep --line-buffered -v -i warn \
              | tee "$OUT/rotary.log" | grep --line-buffered -E "^(plain|spec|variant|Traceback|[A-Za-z]*Error)" ;;
    draftfuse) python3 results/2026-12-03d_h200/variant_spec.py "$OUT" ${VARIANTS:-unfused fused} 2>&1 | grep --line-buffered -v -i warn \
              | tee "$OUT/draftfuse.log" | grep --line-buffered -E "^(plain|spec|variant|Traceback|[A-Za-z]*Error)" ;;
    topk_bench) python3 scripts/topk_bench.py --out "$OUT/topk_bench.json" 2>&1 | grep --line-buffered -v -i warn | tee "$OUT/topk_bench.log" ;;
    kvw_bench) python3 scripts/kv_write_bench.py --out "$OUT/kv_write_bench.json" 2>&1 | grep --line-buffered -v -i warn \
              | tee "$OUT/kv_write_bench.log" ;;
    kv_bench) python3 scripts/kv_write_attention_bench.py --out "$OUT/kv_write_attention_bench.json" 2>&1 | grep --line-buffered -v -i warn \
              | tee "$OUT/kv_write_attention_bench.log" ;;
    linear_bench) python3 scripts/fused_linear_bench.py --out "$OUT/fused_linear.json" 2>&1 | grep --line-buffered -v -i warn \
              | tee "$OUT/fused_linear.log" | tail -14 ;;
    step_variants) python3 scripts/step_variants.py --out "$OUT/step_variants.json" ${VARIANT_ARGS:-before after} 2>&1 | grep --line-buffered -v -i warn \
              | tee "$OUT/step_variants.log" | grep --line-buffered -E "^(variant|Traceback|[A-Za-z]*Error| *[a-z_0-9]+ +[0-9])" ;;
    attention) python3 scripts/attention_modes.py --out "$OUT/attention_modes.json" 2>&1 | tee "$OUT/attention_modes.log" | tail -45 ;;
    step_parts) python3 scripts/step_parts.py --out "$OUT/step_parts${TAG:-}.json" ${STEP_PARTS_ARGS:-} 2>&1 | grep --line-buffered -v -i warn \
              | tee "$OUT/step_parts${TAG:-}.log" | cut -c1-160 | tail -40 ;;
    *) echo "unknown job $job" ;;
  esac
done
