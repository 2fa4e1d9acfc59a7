#!/usr/bin/env bash
# The main job, end to end, on a fresh machine: set up, export the x86-dev bundle, and answer a spoken question
# with it (espeak-ng asks "What is the capital of France?"), printing the transcript, the reply, the reply WAV and
# the latency line. Usage: bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sottovoce demo "$@"
