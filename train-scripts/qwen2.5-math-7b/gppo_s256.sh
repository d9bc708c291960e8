#!/usr/bin/env bash
# Qwen2.5-Math-7B, 8xH100 | GPPO (gradient-preserving clipping) | staleness 256 updates
# usage: bash $0 [--dry-run] [--cpu-smoke] [hydra overrides]    (see train-scripts/launch.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch llm=qwen2.5-math-7b method=gppo m2po.stale.staleness_updates=256 "$@"
