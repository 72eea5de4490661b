#!/usr/bin/env bash
# The real model for the lent GPU in two calls when the checkout itself is large: each call
# carries at most 64 MiB in all (checkout included), and this repository's checkout is about
# 18 MB, so the 98 MB GGUF halves of ../shared/gpu/split-model no longer fit beside it.
# xz shrinks the GGUF to about 90 MB; its two halves (about 45 MB each) do. With the checkout at
# 19.8 MB (2026-12-01) that leaves about 2 MB of room per call: keep large results out of git.
# Run from the project's root after ../shared/gpu/split-model (which fetches and checks the
# GGUF and the gguf wheel). Writes .gpu1/model.xz.part1 and .gpu2/model.xz.part2 (git-ignored);
# scripts/gpu_run.sh and scripts/gpu_train.sh assemble either form and check the sha256.
set -euo pipefail
cache=${SPECC_CACHE:-$HOME/.cache/specc}
gguf="$cache/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || { echo "no $gguf: run ../shared/gpu/split-model first" >&2; exit 1; }
[ -f .gpu2/gguf-0.19.0-py3-none-any.whl ] || { echo "no .gpu2/gguf wheel: run ../shared/gpu/split-model first" >&2; exit 1; }
tmp=$(mktemp)
xz -T0 -6 -c "$gguf" > "$tmp"
half=$(( ($(stat -c %s "$tmp") + 1) / 2 ))
rm -f .gpu1/model.part1 .gpu2/model.part2
head -c "$half" "$tmp" > .gpu1/model.xz.part1
tail -c +$(( half + 1 )) "$tmp" > .gpu2/model.xz.part2
rm -f "$tmp"
ls -la .gpu1 .gpu2
