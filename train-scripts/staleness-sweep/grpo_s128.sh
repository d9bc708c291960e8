#!/usr/bin/env bash
# Qwen2.5-Math-7B, 8xH100 | GRPO (clip 0.2) | staleness 128 updates (sweep)
# usage: bash $0 [--dry-run] [--cpu-smoke] [hydra overrides]    (see train-scripts/launch.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch llm=qwen2.5-math-7b method=grpo m2po.stale.staleness_updates=128 "$@"
