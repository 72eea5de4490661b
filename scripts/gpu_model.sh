# Sourced by scripts/gpu_run.sh and scripts/gpu_train.sh on the lent GPU machine: assemble the
# real model in ~/m from the carried parts (the calls before copied .gpu1/* and .gpu1b/* to ~/m;
# this call carries .gpu2), plain halves (../shared/gpu/split-model) or xz parts
# (scripts/split_model_xz.sh), check its sha256,
# install the gguf wheel and specc. Sets GGUF, PYTHONPATH and SPECC_CACHE.
GGUF=~/m/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$GGUF" ]; then
  if [ -f ~/m/model.xz.part1 ]; then
    cat ~/m/model.xz.part[0-9] .gpu2/model.xz.part[0-9] \
      | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" > "$GGUF"
  else
    cat ~/m/model.part1 .gpu2/model.part2 > "$GGUF"
  fi
fi
if ! echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $GGUF" | sha256sum -c --quiet; then
  echo "the assembled $GGUF is wrong (sha256); carry both halves again" >&2
  rm -f "$GGUF"
  exit 1
fi
python3 -m pip install -q --no-index --no-deps --target ~/site .gpu2/gguf-*.whl 2>/dev/null
export PYTHONPATH=~/site SPECC_CACHE=~/m
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
