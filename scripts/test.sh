#!/usr/bin/env bash
# The test command: set up (if needed), lint, run the whole suite offline on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
