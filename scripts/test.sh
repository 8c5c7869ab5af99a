#!/usr/bin/env bash
# The test command: set up (if needed), lint, type-check, run the whole suite offline on the CPU.
# `--fast` leaves out the slow tier (tests that load the tiny models, train, compile or start servers); other
# arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
markers=()
if [ "${1:-}" = "--fast" ]; then
  shift
  markers=(-m "not slow")
fi
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m mypy
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "${markers[@]}" "$@"
