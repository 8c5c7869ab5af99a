#!/bin/sh
# Train a LoRA through the real cog HTTP server on the repo's sample images, then predict with the zip it returns,
# and print where the outputs are. `sh cog_test_train.sh --tiny` runs fully offline on the CPU with the tiny test
# model (the main smoke job); without --tiny it trains SDXL, in a cog-built Docker image when cog and Docker are
# installed (--cog-file cog.cuda.yaml for NVIDIA), else on this machine. `sh cog_test_train.sh --help` for options.
# Plain POSIX sh: it runs the same as `sh` (dash on Debian/Ubuntu), `bash` or `./cog_test_train.sh`.
set -eu
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  echo "no .venv yet: running scripts/setup.sh first" >&2
  bash scripts/setup.sh
fi
exec .venv/bin/python -m trainer.tooling.smoke "$@"
