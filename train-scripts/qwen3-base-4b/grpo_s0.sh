#!/usr/bin/env bash
# Qwen3-Base-4B, 8xH100 | GRPO (clip 0.2) | staleness 0 updates
# usage: bash $0 [--dry-run] [--cpu-smoke] [hydra overrides]    (see train-scripts/launch.sh)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
launch llm=qwen3-base-4b method=grpo m2po.stale.staleness_updates=0 "$@"
