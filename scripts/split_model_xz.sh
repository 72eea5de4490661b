#!/usr/bin/env bash
# The real model for the lent GPU in three calls: each call carries at most 64 MiB in all
# (checkout included), and this repository's checkout is about 22 MB (2026-12-06), so neither
# the 98 MB GGUF halves of ../shared/gpu/split-model nor two xz halves (45 MB each) fit beside it.
# xz shrinks the GGUF to about 90 MB; cut in three (about 30 MB each), every part fits.
# Run from the project's root after ../shared/gpu/split-model (which fetches and checks the
# GGUF and the gguf wheel). Writes the git-ignored .gpu1/model.xz.part1, .gpu1b/model.xz.part2 and
# .gpu2/model.xz.part3 (beside the gguf wheel). On the GPU machine, back to back:
#   1. carry [".gpu1"]:  mkdir -p ~/m && cp .gpu1/* ~/m/
#   2. carry [".gpu1b"]: cp .gpu1b/* ~/m/
#   3. carry [".gpu2"]:  bash scripts/gpu_run.sh ...   (scripts/gpu_model.sh assembles and checks it)
set -euo pipefail
cache=${SPECC_CACHE:-$HOME/.cache/specc}
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || { echo "no $gguf: run ../shared/gpu/split-model first" >&2; exit 1; }
[ -f .gpu2/gguf-0.19.0-py3-none-any.whl ] || { echo "no .gpu2/gguf wheel: run ../shared/gpu/split-model first" >&2; exit 1; }
tmp=$(mktemp)
xz -T0 -6 -c "$gguf" > "$tmp"
part=$(( ($(stat -c %s "$tmp") + 2) / 3 ))
rm -rf .gpu1 .gpu1b && mkdir -p .gpu1 .gpu1b
rm -f .gpu2/model.part2 .gpu2/model.xz.part*
head -c "$part" "$tmp" > .gpu1/model.xz.part1
dd if="$tmp" of=.gpu1b/model.xz.part2 bs="$part" skip=1 count=1 status=none
tail -c +$(( 2 * part + 1 )) "$tmp" > .gpu2/model.xz.part3
rm -f "$tmp"
ls -la .gpu1 .gpu1b .gpu2
