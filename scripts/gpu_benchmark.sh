#!/usr/bin/env bash
# The GPU benchmark in one call, for a lent device machine (which has torch but not diffusers & co).
#   here:        bash scripts/gpu_benchmark.sh --download     # wheels for the device's Python 3.12 into .whl/
#   on the GPU:  bash scripts/gpu_benchmark.sh                # (device tool: carry .whl; results in $OUT or ./)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS="diffusers==0.42.1 prodigyopt==1.1.2 peft==0.21.2 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0
typing-inspection==0.4.5 open_clip_torch==3.3.0 importlib_metadata==10.2.0"
if [ "${1:-}" = "--download" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  # shellcheck disable=SC2086
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $WHEELS
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRAINER_MODEL_CACHE=/tmp/model-cache
DEST=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$DEST/gpu.txt"
# Default settings (regional compile on): the Eden default job shape and the 1024 px case, both optimisers.
python3 -m trainer benchmark --model sdxl --resolutions 512 1024 --batches 1 4 --optimizers adamw prodigy \
  --steps 10 --warmup 4 --end-to-end --output "$DEST/sdxl.json" | tee "$DEST/sdxl.md"
python3 -m trainer benchmark --model sd15 --resolutions 512 --batches 4 --optimizers adamw \
  --steps 10 --warmup 4 --output "$DEST/sd15.json" | tee "$DEST/sd15.md"
# The low-memory preset (16 GiB class cards): peak allocated memory is the number that matters.
python3 -m trainer benchmark --model sdxl --resolutions 1024 --batches 1 2 --optimizers adamw \
  --preset low-memory --steps 6 --warmup 3 --output "$DEST/sdxl-lowmem.json" | tee "$DEST/sdxl-lowmem.md"
